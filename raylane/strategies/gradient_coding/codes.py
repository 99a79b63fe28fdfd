"""Gradient codes (Tandon et al., "Gradient Coding", ICML 2017): what each worker combines,
and how the driver turns the combinations of any n - s responders back into the full gradient.

A code for n workers and s stragglers is an n x n matrix C over n data partitions: worker i
sends c_i = sum_j C[i, j] g_j. From a responder set S the driver finds a with
a^T C[S] = 1^T, so that sum_{i in S} a_i c_i = sum_j g_j (the full gradient, as a sum of
partition gradients that are already weighted by partition size).

- FRC, fractional repetition (needs (s+1) | n): the workers form n/(s+1) groups; every member
  of group k sends the plain sum of the group's s+1 partitions. Decoding takes the
  lowest-ranked responder of each group with coefficient 1: exact 0/1 arithmetic.
- CRC, cyclic repetition (any s < n): worker i combines partitions i, ..., i+s (mod n); its
  coefficients put row i in the null space of a seeded random s x n matrix H with H 1 = 0, so
  any n - s rows span that space, which holds 1. Decoding is least squares in float64,
  accepted when the residual is within rounding of |C[S]| |a| (a relative test: an absolute one
  rejected decodable but ill-conditioned sets), cached per responder set; a
  `DecodeAccuracyWarning` says when cond(C[S]) times the message precision exceeds `tolerance`
  (the decode would then be off by more than that, relatively).

`make_code(n, s, kind)` picks one (`auto`: FRC when (s+1) | n, else CRC). s = 0 is the
identity (uncoded). Pure numpy; no Ray, no torch.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np

KINDS = ("auto", "frc", "crc")


class DecodeAccuracyWarning(UserWarning):
    """cond(C[S]) x message precision exceeds the tolerance: the decoded gradient is inexact."""


class GradientCode:
    """An (n, s) gradient code: `matrix`, `support(i)`, `decode(responders)`."""

    kind = "base"

    def __init__(self, n: int, s: int, matrix: np.ndarray):
        assert 0 <= s < n and matrix.shape == (n, n), (n, s, matrix.shape)
        self.n, self.s, self.matrix = n, s, matrix
        self._supports = [[(int(j), float(matrix[i, j])) for j in np.flatnonzero(matrix[i])] for i in range(n)]

    def support(self, worker: int) -> list[tuple[int, float]]:
        """(partition, coefficient) pairs worker `worker` combines."""
        return self._supports[worker]

    def decode(self, responders: Iterable[int]) -> dict[int, float] | None:
        """Coefficients {worker: a_i} with sum_i a_i C[i] = 1, or None if `responders` cannot decode."""
        raise NotImplementedError

    def can_decode(self, responders: Iterable[int]) -> bool:
        return self.decode(responders) is not None

    def completion(self, have: Iterable[int], candidates: Iterable[int]) -> list[int] | None:
        """The first workers of `candidates` (in order) whose rows, added to those of `have`, make
        the set decodable, skipping a candidate whose row is already in the set (a second member
        of an FRC group adds nothing). [] if `have` decodes already; None if every candidate
        together does not. Decodability, not a row count, decides."""
        chosen = sorted(set(have))
        taken: list[int] = []
        for i in candidates:
            if self.can_decode(chosen):
                return taken
            if not any(np.array_equal(self.matrix[i], self.matrix[j]) for j in chosen):
                chosen.append(i)
                taken.append(i)
        return taken if self.can_decode(chosen) else None


class FractionalRepetitionCode(GradientCode):
    kind = "frc"

    def __init__(self, n: int, s: int):
        if n % (s + 1):
            raise ValueError(f"s={s}: the fractional repetition code needs (s+1) to divide n={n}")
        matrix = np.zeros((n, n))
        for i in range(n):
            k = i // (s + 1)
            matrix[i, k * (s + 1):(k + 1) * (s + 1)] = 1.0
        super().__init__(n, s, matrix)

    def decode(self, responders: Iterable[int]) -> dict[int, float] | None:
        chosen: dict[int, int] = {}
        for i in sorted(set(responders)):
            chosen.setdefault(i // (self.s + 1), i)
        if len(chosen) < self.n // (self.s + 1):
            return None
        return {i: 1.0 for i in chosen.values()}


class CyclicRepetitionCode(GradientCode):
    kind = "crc"

    def __init__(self, n: int, s: int, seed: int = 0, message_eps: float = float(np.finfo(np.float64).eps),
                 tolerance: float = 1e-6, cache_size: int = 4096):
        super().__init__(n, s, _cyclic_matrix(n, s, seed))
        self.message_eps, self.tolerance, self.cache_size = message_eps, tolerance, cache_size
        self._cache: dict[frozenset[int], dict[int, float] | None] = {}

    def decode(self, responders: Iterable[int]) -> dict[int, float] | None:
        key = frozenset(responders)
        if key not in self._cache:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._solve(sorted(key))
        return self._cache[key]

    def _solve(self, rows: list[int]) -> dict[int, float] | None:
        if len(rows) < self.n - self.s:
            return None  # fewer rows than the null space's dimension cannot span 1 (generic H)
        sub = self.matrix[rows]
        a, *_ = np.linalg.lstsq(sub.T, np.ones(self.n), rcond=None)
        sv = np.linalg.svd(sub, compute_uv=False)
        if np.abs(sub.T @ a - 1.0).max() > residual_tolerance(sv[0], float(np.linalg.norm(a)), self.n):
            return None
        cond = sv[0] / sv[self.n - self.s - 1]  # the rows span an (n-s)-dim space: its conditioning
        if cond * self.message_eps > self.tolerance:
            warnings.warn(f"cyclic repetition decode from workers {rows}: condition number {cond:.3g} x "
                          f"message precision {self.message_eps:.3g} exceeds {self.tolerance:g}",
                          DecodeAccuracyWarning, stacklevel=3)
        return {i: float(v) for i, v in zip(rows, a)}


def residual_tolerance(norm: float, coeff_norm: float, n: int) -> float:
    """The largest |C[S]^T a - 1| a float64 least-squares solve leaves when 1 IS in the row space:
    rounding scales with |C[S]| |a| (large when the rows are ill-conditioned), so an absolute bound
    rejects decodable sets. A set that cannot decode leaves a residual of order 1."""
    return 64 * n * float(np.finfo(np.float64).eps) * (norm * coeff_norm + 1.0)


def _cyclic_matrix(n: int, s: int, seed: int) -> np.ndarray:
    """Tandon et al.'s Algorithm 2: cyclic supports, rows in the null space of H (H 1 = 0)."""
    if s == 0:
        return np.eye(n)
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((s, n))
    h[:, -1] = -h[:, :-1].sum(axis=1)
    matrix = np.zeros((n, n))
    for i in range(n):
        cols = [(i + k) % n for k in range(s + 1)]
        matrix[i, cols[0]] = 1.0
        matrix[i, cols[1:]] = np.linalg.solve(h[:, cols[1:]], -h[:, cols[0]])
    return matrix


def make_code(n: int, s: int, kind: str = "auto", seed: int = 0,
              message_eps: float = float(np.finfo(np.float64).eps)) -> GradientCode:
    """The (n, s) code of `kind`: auto = FRC when (s+1) divides n, else CRC."""
    if kind not in KINDS:
        raise ValueError(f"code={kind!r}: choose one of {list(KINDS)}")
    if kind == "frc" or (kind == "auto" and n % (s + 1) == 0):
        return FractionalRepetitionCode(n, s)
    return CyclicRepetitionCode(n, s, seed, message_eps)
