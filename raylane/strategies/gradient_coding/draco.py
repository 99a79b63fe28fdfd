"""DRACO's majority vote over a fractional repetition code (Chen et al., "DRACO: Byzantine-resilient
Distributed Training via Redundant Gradients", ICML 2018).

With an FRC code every group of s + 1 workers computes the same coded vector (the sum of its
group's partition gradients): honest copies are the same computation on the same inputs, so they
are bit-identical. Up to `f` Byzantine workers can send anything. A group's vote is won by a value
that at least f + 1 copies agree on: with at most f liars such a value includes an honest copy, and
every honest copy is that value, so the decoded sum is exactly the uncoded gradient. Copies are
compared exactly (bitwise); a worker whose copy differs from its group's winner disagreed and is
named. Stragglers still fall away: a group needs f + 1 agreeing answers, not all s + 1, so with
2f + 1 <= s + 1 a group of s + 1 skips up to s - 2f silent members even when f of the rest lie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Vote:
    winners: dict[int, int]  # group -> a worker whose copy won the group's vote
    disagreeing: list[int]  # workers whose copy differs from their group's winner


def groups(n: int, s: int) -> list[list[int]]:
    """The FRC groups: workers k(s+1) .. k(s+1)+s."""
    return [list(range(k * (s + 1), (k + 1) * (s + 1))) for k in range(n // (s + 1))]


def vote(copies: dict[int, np.ndarray], n: int, s: int, f: int) -> Vote | None:
    """Every group's winning copy among `copies` (worker -> its coded vector), or None while some
    group has no value that f + 1 copies agree on (wait for more answers)."""
    winners, disagreeing = {}, []
    for k, members in enumerate(groups(n, s)):
        clusters: list[list[int]] = []
        for i in (m for m in members if m in copies):
            for cluster in clusters:
                if np.array_equal(copies[cluster[0]], copies[i]):  # nan never equals: a nan copy stands alone
                    cluster.append(i)
                    break
            else:
                clusters.append([i])
        agreed = [c for c in clusters if len(c) >= f + 1]
        if len(agreed) != 1:  # none yet, or two (more than f liars agree: no honest majority to trust)
            return None
        winners[k] = agreed[0][0]
        disagreeing += [i for c in clusters if c is not agreed[0] for i in c]
    return Vote(winners, sorted(disagreeing))


def check_vote(n: int, s: int, f: int, code: str) -> str | None:
    """Why DRACO cannot run with these settings (None: it can)."""
    if code not in ("frc", "auto"):
        return f"the majority vote needs the fractional repetition code (code=frc), not code={code}"
    if n % (s + 1):
        return f"the fractional repetition code needs (s+1)={s + 1} to divide cluster.num_workers={n}"
    if 2 * f + 1 > s + 1:
        return f"a group of s+1={s + 1} copies outvotes at most floor(s/2)={s // 2} liars; needs 2f+1 <= s+1"
    return None
