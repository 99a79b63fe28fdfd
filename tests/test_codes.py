"""Gradient codes: every n - s responders decode the full gradient (exhaustively, n <= 12)."""

import itertools
import warnings

import numpy as np
import pytest

from raylane.strategies.gradient_coding.codes import (CyclicRepetitionCode, DecodeAccuracyWarning, FractionalRepetitionCode,
                                      make_code)

SMALL = [(n, s) for n in range(2, 13) for s in range(n)]


def _worst_relative_error(code, subsets) -> float:
    rng = np.random.default_rng(code.n * 100 + code.s)
    g = rng.standard_normal((code.n, 64))
    coded = code.matrix @ g
    worst = 0.0
    for responders in subsets:
        a = code.decode(responders)
        assert a is not None, f"{code.kind} n={code.n} s={code.s}: {responders} did not decode"
        assert set(a) <= set(responders)
        decoded = sum(a[i] * coded[i] for i in a)
        worst = max(worst, np.abs(decoded - g.sum(0)).max() / np.abs(g.sum(0)).max())
    return worst


@pytest.mark.parametrize("n,s", [(n, s) for n, s in SMALL if n % (s + 1) == 0])
def test_frc_every_n_minus_s_responders_decode_the_full_gradient_exactly(n, s):
    code = FractionalRepetitionCode(n, s)
    assert _worst_relative_error(code, itertools.combinations(range(n), n - s)) <= 1e-12
    assert set(np.unique(code.matrix)) <= {0.0, 1.0}


@pytest.mark.parametrize("n,s", SMALL)
def test_crc_every_n_minus_s_responders_decode_within_1e_6(n, s):
    """Up to n = 8 no decode is even flagged; beyond, a few ill-conditioned ones (cond ~ 5e9 at
    n=10, s=6) warn, as they should, yet still decode within 1e-6 in float64."""
    code = CyclicRepetitionCode(n, s, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if n <= 8 else "ignore", DecodeAccuracyWarning)
        assert _worst_relative_error(code, itertools.combinations(range(n), n - s)) <= 1e-6


def test_crc_accepts_decodable_but_ill_conditioned_sets_the_review_found():
    """Large decoding coefficients leave a float64 residual above any fixed bound (1e-9 rejected these)."""
    for n, s, responders in [(12, 4, [2, 3, 4, 5, 6, 8, 10, 11]), (10, 6, None)]:
        code = CyclicRepetitionCode(n, s, seed=0)
        subsets = [responders] if responders else list(itertools.combinations(range(n), n - s))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DecodeAccuracyWarning)
            assert _worst_relative_error(code, subsets) <= 1e-6


@pytest.mark.parametrize("kind", ["frc", "crc"])
def test_more_responders_than_needed_decode_too(kind):
    code = make_code(6, 2, kind)
    subsets = [c for k in range(5, 7) for c in itertools.combinations(range(6), k)]
    assert _worst_relative_error(code, subsets) <= 1e-9


def test_every_worker_of_a_code_computes_s_plus_1_partitions():
    for kind in ("frc", "crc"):
        code = make_code(6, 2, kind)
        assert all(len(code.support(i)) == 3 for i in range(6))
        assert (np.count_nonzero(code.matrix, axis=0) == 3).all()  # every partition on s+1 workers


def test_too_few_responders_do_not_decode():
    frc = FractionalRepetitionCode(6, 2)
    assert frc.decode([0, 1, 2, 3, 4]) is not None
    assert frc.decode([3, 4, 5]) is None          # group {0, 1, 2} silent
    assert frc.decode([0, 3]) is not None          # one per group is enough for FRC
    crc = CyclicRepetitionCode(6, 2)
    assert all(crc.decode(c) is None for c in itertools.combinations(range(6), 3))


def test_crc_decodes_are_cached_per_responder_set():
    code = CyclicRepetitionCode(8, 2)
    first = code.decode([0, 1, 2, 3, 4, 5])
    assert code.decode((5, 4, 3, 2, 1, 0)) is first


def test_an_ill_conditioned_decode_warns():
    code = CyclicRepetitionCode(16, 3, message_eps=float(np.finfo(np.float32).eps))
    with pytest.warns(DecodeAccuracyWarning, match="condition number"):
        for responders in itertools.combinations(range(16), 13):
            code.decode(responders)


def test_auto_code_is_frc_when_s_plus_1_divides_n_else_crc():
    assert make_code(8, 1).kind == "frc" and make_code(8, 3).kind == "frc"
    assert make_code(8, 2).kind == "crc" and make_code(8, 2, "crc").kind == "crc"
    with pytest.raises(ValueError, match=r"s=2: the fractional repetition code needs \(s\+1\) to divide n=8"):
        make_code(8, 2, "frc")


def test_s_zero_is_the_identity_code():
    for kind in ("frc", "crc"):
        code = make_code(4, 0, kind)
        assert np.array_equal(code.matrix, np.eye(4))
        assert code.decode([0, 1, 2]) is None and code.decode(range(4)) == {i: 1.0 for i in range(4)}
