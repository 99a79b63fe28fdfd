"""A strategy's declared contract, checked against what its ranks really hold.

Ranks that the strategy's layout gives one state key must hold the same parameters: checkpoints keep
one copy per key, and recovery copies a live holder's state onto a replacement. A strategy whose
ranks step locally (DiLoCo's inner steps) but keeps the inherited `replicas_identical = True` breaks
that silently — exact recovery then restores one rank's copy onto all of them. At every checkpoint
the coordinator compares a fingerprint of each rank's parameters (`TrainWorker.fingerprint`: a few
values at the same positions on every rank) and stops the run with `identical_state_problem`'s line.
"""

from __future__ import annotations

from typing import Any, Sequence

RTOL = 1e-4  # far above float noise between identical replicas, far below one local optimizer step


def identical_state_problem(layout: Any, prints: Sequence[Sequence[float]], strategy: str) -> str | None:
    """Why ranks that share a state key do not hold identical parameters, or None when they do."""
    for key, ranks in layout.holders().items():
        ref = prints[ranks[0]]
        scale = max([1.0, *(abs(v) for v in ref)])
        for r in ranks[1:]:
            other = prints[r]
            diff = float("inf") if len(other) != len(ref) else max((abs(a - b) for a, b in zip(ref, other)),
                                                                   default=0.0)
            if diff > RTOL * scale:
                return (f"strategy={strategy}: ranks {ranks[0]} and {r} share state key {key!r} (the layout says "
                        f"they hold identical state) but their parameters differ by {diff:.3g}; a strategy whose "
                        f"ranks step locally must set replicas_identical = False (or give each rank its own key "
                        f"in layout()), else checkpoints keep one copy and recovery restores the wrong state "
                        f"(docs/ARCHITECTURE.md, \"Adding a strategy\")")
    return None
