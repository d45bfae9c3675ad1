"""CARE, contextual attention-based representations (Sodhani, Zhang, Pineau, ICML 2021), after
its authors' code (facebookresearch/mtrl).

For one task k and a batch of observations s [B, obs] (and, for a critic, actions a [B, A]):

    z_ctx = context(c_k)                              task k's context [C]
    alpha = softmax(attention(z_ctx) / temperature)   weights of the E encoders [E]
    z_enc = sum_i alpha_i encoder_i(s)                [B, C]
    out   = head([z_enc, z_ctx, a])                   an MLP of ``agent.hidden_sizes``

``context`` is an MLP (C -> C -> C -> C, ReLU between) on relu(c_k). The published method takes
c_k from a pretrained language model's encoding of task k's description (frozen), projected by
D -> 2C -> C with ReLUs; this project cannot download a language model, so c_k is a learned
embedding of task k (N(0, 1) at the start, as Meta-World+ does), or, with the option
``context_file``, a frozen vector per task read from a JSON file ``{"<task name>": [floats], ...}``
(the names with or without their ``-v1``/``-v2``/``-v3`` suffix), projected as published; run.json
records which, with the file's SHA-256. Encoders: E MLPs obs -> C -> C. Published MT10 settings
(mtrl's documented CARE command and configs): E = 4 encoders, C = 50, temperature 1, a 3 x 400
head, Xavier-uniform weights and zero biases. Where this differs from mtrl: there the actor
reuses the critic's encoders (detached) and one task encoder serves all networks; here the
policy and each critic have their own (as in Meta-World+), so CARE fits the same per-network
update as every other architecture.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..registry import check_option
from .layers import Params, experts_forward, mlp_forward, mlp_init

CONTEXT_LAYERS = 3  # C -> C -> C -> C
ATTENTION_LAYERS = 3  # C -> C -> C -> E
ENCODER_LAYERS = 2  # obs -> C -> C


def read_context_file(path: str, tasks: list[str]) -> Tensor:
    """[K, D]: each task's context vector from a JSON file of ``{"<task name>": [floats]}``; a
    name matches with or without its version suffix (mtrl's file names Meta-World v1 tasks)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"care: cannot read the context file {path!r} ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"care: the context file {path!r} must hold a JSON object of task name -> list of numbers")
    unversioned = {re.sub(r"-v\d+$", "", str(name)): vector for name, vector in data.items()}
    rows = []
    for task in tasks:
        vector = data.get(task, unversioned.get(re.sub(r"-v\d+$", "", task)))
        if not isinstance(vector, list) or not vector or not all(isinstance(v, (int, float)) for v in vector):
            raise ValueError(f"care: the context file {path!r} has no list of numbers for task {task!r}")
        rows.append(vector)
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"care: the context file {path!r} has vectors of different lengths")
    context = torch.tensor(rows, dtype=torch.float32)
    if not torch.isfinite(context).all():
        raise ValueError(f"care: the context file {path!r} holds non-finite numbers")
    return context


class CARE:
    def __init__(self, obs_dim: int, extra_dim: int, out_dim: int, tasks: list[str], hidden_sizes: list[int],
                 init: str, num_encoders: int = 4, context_width: int = 50, temperature: float = 1.0,
                 context_file: str | None = None) -> None:  # fmt: skip
        check_option("care", "num_encoders", num_encoders, 1, integer=True)
        check_option("care", "context_width", context_width, 1, integer=True)
        check_option("care", "temperature", temperature, 1e-6)
        self.obs_dim, self.extra_dim, self.out_dim, self.tasks = obs_dim, extra_dim, out_dim, list(tasks)
        self.hidden_sizes, self.init_scheme = list(hidden_sizes), init
        self.encoders, self.width, self.temperature = num_encoders, context_width, float(temperature)
        if context_file is not None and not Path(context_file).is_file():
            raise ValueError(f"care: context_file {context_file!r} is not a file")
        self.context_file = context_file

    @functools.cached_property
    def file_context(self) -> Tensor | None:
        """[K, D] from ``context_file`` (read when the network's parameters are first made)."""
        return None if self.context_file is None else read_context_file(self.context_file, self.tasks)

    def init(self, generator: torch.Generator) -> tuple[Params, Params]:
        g, c = generator, self.width
        scheme = "xavier"  # mtrl initialises every linear layer Xavier-uniform, biases zero
        shared: Params = {}
        if self.file_context is None:
            task = {"context": torch.randn(len(self.tasks), c, generator=g)}
        else:  # frozen (see forward_one), projected D -> 2C -> C
            task = {"context": self.file_context.clone()}
            shared.update(mlp_init([self.file_context.shape[1], 2 * c, c], scheme, g, "projection"))
        shared.update(mlp_init([c] * (CONTEXT_LAYERS + 1), scheme, g, "context"))
        shared.update(mlp_init([c] * ATTENTION_LAYERS + [self.encoders], scheme, g, "attention"))
        shared.update(mlp_init([self.obs_dim] + [c] * ENCODER_LAYERS, scheme, g, "encoders", copies=self.encoders))
        head = [2 * c + self.extra_dim, *self.hidden_sizes, self.out_dim]
        shared.update(mlp_init(head, scheme, g, "head"))
        return shared, task

    def context(self, shared: Params, task: Params) -> Tensor:
        """z_ctx [C] of the task whose parameters ``task`` holds."""
        c = torch.relu(task["context"])
        if self.file_context is not None:  # detached: a frozen context gets no gradient, so Adam never moves it
            c = mlp_forward(shared, "projection", 2, c.detach(), last_relu=True)
        return mlp_forward(shared, "context", CONTEXT_LAYERS, c)

    def attention(self, shared: Params, z_ctx: Tensor) -> Tensor:
        """alpha [E]: a task's weights of the encoders (a distribution), from its context."""
        logits = mlp_forward(shared, "attention", ATTENTION_LAYERS, z_ctx)
        return torch.softmax(logits / self.temperature, dim=-1)

    def forward_one(self, shared: Params, task: Params, x: Tensor) -> Tensor:
        obs, extra = x[..., : self.obs_dim], x[..., self.obs_dim :]
        z_ctx = self.context(shared, task)
        alpha = self.attention(shared, z_ctx)
        z_enc = torch.einsum("k,bkc->bc", alpha, experts_forward(shared, "encoders", ENCODER_LAYERS, obs))
        head_in = torch.cat([z_enc, z_ctx.expand(*z_enc.shape[:-1], -1), extra], dim=-1)
        return mlp_forward(shared, "head", len(self.hidden_sizes) + 1, head_in)

    def describe(self) -> dict[str, Any]:
        if self.context_file is None:
            return {"context": "learned task embeddings"}
        digest = hashlib.sha256(Path(self.context_file).read_bytes()).hexdigest()
        return {"context": "frozen vectors from a file", "context_file": str(self.context_file), "sha256": digest}
