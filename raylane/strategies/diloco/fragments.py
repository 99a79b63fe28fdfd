"""Streaming DiLoCo's fragments and their sync schedule (pure: no communication).

Fragments. The model's blocks (`model.blocks`) are split into P fragments:
- `strided` (the paper's default): fragment p holds blocks p, p+P, p+2P, ...;
- `sequential`: fragment p holds a contiguous run of blocks (sizes differ by at most one).
Rule for the parameters outside the blocks: one registered before the first block's (token and
position embeddings) belongs to the fragment of block 0; one registered after (final norm, head)
to the fragment of the last block. A model without `.blocks` is one fragment (P must be 1).

Schedule. With H inner steps per outer step, fragment p has offset o_p = floor(p*H/P) and starts
its sync after inner step t (1-based) when t >= 1 and (t - o_p) mod H == 0, so each fragment
starts exactly once in any H consecutive steps and at most one fragment starts per step
(P <= H). A sync started after step t is merged after step t + tau (tau < H: a fragment's
sync is merged before it starts again; tau > H/P puts several fragments in flight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylane.validation import ConfigError, one_of

PATTERNS = ("strided", "sequential")


def block_fragments(n_blocks: int, fragments: int, pattern: str) -> list[list[int]]:
    """Block indices of each fragment; every fragment gets at least one block."""
    one_of("strategy.fragment_pattern", pattern, PATTERNS)
    if not 1 <= fragments <= n_blocks:
        raise ConfigError(f"strategy.fragments={fragments}: must be in [1, {n_blocks}], the model's number "
                          f"of blocks (model.n_layer)")
    if pattern == "strided":
        return [list(range(p, n_blocks, fragments)) for p in range(fragments)]
    bounds = [n_blocks * p // fragments for p in range(fragments + 1)]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None


def split_parameters(model: torch.nn.Module, fragments: int,
                     pattern: str) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """(name, parameter) lists, one per fragment, each in registration order (the stated rule)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        if fragments != 1:
            raise ConfigError(f"strategy.fragments={fragments}: the model has no .blocks to split; use 1")
        return [named]
    owner = {b: p for p, idx in enumerate(block_fragments(len(blocks), fragments, pattern)) for b in idx}
    out: list[list[tuple[str, torch.nn.Parameter]]] = [[] for _ in range(fragments)]
    seen_block = False
    for name, param in named:
        b = _block_index(name)
        seen_block |= b is not None
        frag = owner[b] if b is not None else owner[len(blocks) - 1] if seen_block else owner[0]
        out[frag].append((name, param))
    return out


@dataclass(frozen=True)
class SyncSchedule:
    """When each fragment's outer sync starts and is merged (see the module docstring)."""

    sync_every: int  # H
    fragments: int  # P
    overlap_steps: int  # tau

    def __post_init__(self) -> None:
        assert 1 <= self.fragments <= self.sync_every and 0 <= self.overlap_steps < self.sync_every, self

    def offset(self, fragment: int) -> int:
        return fragment * self.sync_every // self.fragments

    def starting(self, step: int) -> int | None:
        """The fragment whose sync starts after inner step `step` (1-based), if any."""
        if step < 1:
            return None
        for p in range(self.fragments):
            if (step - self.offset(p)) % self.sync_every == 0:
                return p
        return None

    def merge_step(self, start_step: int) -> int:
        return start_step + self.overlap_steps
