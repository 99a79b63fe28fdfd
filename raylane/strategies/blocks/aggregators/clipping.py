"""Centered clipping (Karimireddy, He and Jaggi 2021). Stateful: the center is the previous aggregate.

v_0 = the previous aggregate (zeros at the first step); `iters` times:
v <- v + (1/n) sum_i (g_i - v) min(1, tau / |g_i - v|). Each row moves the result by at most
tau / n per iteration, however large it is. The state {"center": v} is the result itself; pass it
back on the next call (the robust strategy keeps it in its state_dict, so checkpoints carry it).
Computed on the coefficients over [G; center] in the Gram space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raylane.strategies.blocks.aggregators.base import Aggregator, Result, gram, register
from raylane.validation import check


@dataclass
class CenteredClippingConfig:
    tau: float = 1.0         # clipping radius
    iters: int = 1           # clipping iterations per step (the paper: 1 suffices with momentum)

    def validate(self, prefix: str) -> None:
        check(self.tau > 0, f"{prefix}.tau", self.tau, "must be > 0")
        check(self.iters >= 1, f"{prefix}.iters", self.iters, "must be >= 1")


@register
class CenteredClipping(Aggregator):
    name, config_cls = "centered_clipping", CenteredClippingConfig
    stateful = True

    def __call__(self, G, state: dict[str, Any] | None = None, gram_matrix=None) -> Result:
        n, d = G.shape
        center = state["center"] if state and state.get("center") is not None else torch.zeros(d, dtype=G.dtype)
        K = gram(G, center.reshape(1, -1))            # (n + 1) x (n + 1): the rows, then the center
        a = torch.zeros(n + 1, dtype=torch.float64)
        a[n] = 1.0                                     # v = a @ [G; center]
        clipped = 0
        for _ in range(self.cfg.iters):
            Ka = K @ a
            dist = (a @ Ka - 2 * Ka[:n] + K.diagonal()[:n]).clamp(min=0).sqrt()
            scale = torch.clamp(self.cfg.tau / dist.clamp(min=1e-300), max=1.0)
            clipped += int((scale < 1).sum())
            step = -scale.sum() / n * a                # (1/n) sum_i s_i (e_i - a)
            step[:n] += scale / n
            a = a + step
        v = (a[:n].to(G.dtype) @ G) + a[n].to(G.dtype) * center
        return Result(v, weights=a[:n].clone(), state={"center": v.clone()},
                      info={"clipped_rows": float(clipped) / self.cfg.iters})
