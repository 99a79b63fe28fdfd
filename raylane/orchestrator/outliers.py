"""C4-style fault detection from timings: collectives are periodic and homogeneous, so a
worker whose time outside collectives departs from its peers' is the one holding them up
(a straggler, a hung or throttled worker): the others wait for it inside the collective.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque


class OutlierDetector:
    def __init__(self, window: int, factor: float, min_s: float):
        self.window, self.factor, self.min_s = window, factor, min_s
        self.compute_s: dict[int, deque] = defaultdict(lambda: deque(maxlen=window))
        self.flagged: set[int] = set()

    def reset(self) -> None:
        """Membership changed: ranks mean other workers now."""
        self.compute_s.clear()
        self.flagged.clear()

    def observe(self, results: list[dict]) -> list[tuple[int, float, float]]:
        """Feed one round; returns newly flagged (rank, its median s, peers' median s)."""
        for r in results:
            self.compute_s[r["rank"]].append(r["step_time_s"] - r.get("comm_wait_s", 0.0))
        if len(self.compute_s) < 3 or any(len(q) < self.window for q in self.compute_s.values()):
            return []
        medians = {rank: statistics.median(q) for rank, q in self.compute_s.items()}
        new = []
        for rank, m in medians.items():
            peers = statistics.median(v for k, v in medians.items() if k != rank)
            slow = m > self.factor * peers and m - peers > self.min_s
            if slow and rank not in self.flagged:
                new.append((rank, m, peers))
                self.flagged.add(rank)
            elif not slow:
                self.flagged.discard(rank)
        return new
