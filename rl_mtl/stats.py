"""Statistics over seeds: mean and SEM, the interquartile mean (IQM) and its stratified
bootstrap confidence interval (Agarwal et al., 2021, "Deep RL at the edge of the statistical
precipice"; the same definitions as their rliable library, written here with numpy/scipy
because rliable ships only as a source package pulling pandas, seaborn and arch)."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import trim_mean


def mean_sem(values: np.ndarray) -> tuple[float, float | None]:
    """Mean and standard error over seeds: sample std (ddof=1) / sqrt(n). SEM is None for n < 2
    (undefined, not zero)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return math.nan, None
    if n < 2:
        return float(values.mean()), None
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n))


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of all scores (the mean of the middle 50%, 25% cut at each end)."""
    return float(trim_mean(np.asarray(scores, dtype=np.float64), proportiontocut=0.25, axis=None))


def stratified_bootstrap_ci(
    scores: np.ndarray, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of the IQM of a [runs, tasks] score matrix, resampling the runs with
    replacement independently within each task (task = stratum)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    n_runs, n_tasks = scores.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_runs, size=(reps, n_runs, n_tasks))
    resampled = scores[idx, np.arange(n_tasks)]  # [reps, runs, tasks]
    stats = trim_mean(resampled.reshape(reps, -1), proportiontocut=0.25, axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)
