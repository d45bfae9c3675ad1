"""IMTL-G (Liu et al., ICLR 2021): equal projections onto every unit task gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, normalize_gramian

RANK_TOL = 1e-10


class IMTLG(Aggregator):
    """Weights w summing to 1 such that d = sum_i w_i g_i has the same projection onto every
    unit task gradient: M w is proportional to the vector of norms |g_i|, so
    w = M^+ n / (1^T M^+ n) with n_i = |g_i|. (Matches torchjd's IMTLG, which generalises
    the paper's closed form to rank-deficient M with the pseudo-inverse.)

    Fallback (counted): a rank-deficient M (the pseudo-inverse is used; the projections are then
    equal only on the span) or 1^T M^+ n = 0 (weights all zero).
    """

    name = "imtlg"
    graph_safe = False  # torch.linalg.eigh checks its result on the host on CUDA

    def _weights(self, gramian: Tensor, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        a, _, _ = normalize_gramian(gramian)
        eigvals, eigvecs = torch.linalg.eigh(a)
        keep = eigvals > RANK_TOL * eigvals.max()
        inv = torch.where(keep, 1.0 / torch.where(keep, eigvals, 1.0), 0.0)
        norms = torch.sqrt(torch.clamp(torch.diagonal(a), min=0.0))
        v = eigvecs @ (inv * (eigvecs.T @ norms))
        total = v.sum()
        usable = total.abs() > 1e-12
        weights = torch.where(usable, v / torch.where(usable, total, 1.0), torch.zeros_like(v))
        return weights, ~usable | ~keep.all()
