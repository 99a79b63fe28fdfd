"""The (inner) optimizer and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raylane.validation import check, one_of


@dataclass
class OptimConfig:
    name: str = "adamw"            # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    momentum: float = 0.0          # sgd only
    schedule: str = "cosine"       # constant | cosine (with linear warmup)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1      # cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0         # max global grad norm; 0 disables

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.name", self.name, ("adamw", "sgd"))
        check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1, f"{prefix}.beta1", self.beta1, "must be in [0, 1)")
        check(0 <= self.beta2 < 1, f"{prefix}.beta2", self.beta2, "must be in [0, 1)")
        check(0 <= self.momentum < 1, f"{prefix}.momentum", self.momentum, "must be in [0, 1)")
        one_of(f"{prefix}.schedule", self.schedule, ("constant", "cosine"))
        check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "must be >= 0")


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for 1-based `step` of `total_steps`."""
    if cfg.schedule == "constant":
        return cfg.lr
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)

