"""Error feedback: nothing is lost, only delayed; residuals per key in state_dict; EF top-k SGD
reaches the uncompressed optimum; EF makes repeated quantized allreduces exact on average."""

import io

import pytest
import torch

from raylane.comm.collectives import quantized_allreduce
from raylane.comm.error_feedback import ErrorFeedback
from raylane.comm.quantizers import IntQuantizer
from raylane.comm.sparse import TopK
from tests.test_compressors import sample

pytestmark = pytest.mark.timeout(120)


def test_sent_plus_residual_equals_everything_that_was_meant_to_be_sent():
    ef, total, sent = ErrorFeedback(TopK(0.05)), torch.zeros(3, 5, 77), torch.zeros(3, 5, 77)
    for step in range(20):
        x = sample((3, 5, 77), torch.float32, step)
        total += x
        sent += ef.decompress(ef.compress(x, "w"))
    torch.testing.assert_close(sent + ef.residuals["w"], total, rtol=1e-5, atol=1e-4)


def test_payloads_are_the_inner_compressors_own():
    x = sample((1000,), torch.bfloat16)
    ef, inner = ErrorFeedback(IntQuantizer(4, 64)), IntQuantizer(4, 64)
    payload = ef.compress(x, "w")
    assert torch.equal(payload.to_bytes(), inner.compress(x).to_bytes())
    assert torch.equal(inner.decompress(payload), ef.decompress(payload))
    assert ef.payload_bytes(x.shape, x.dtype) == payload.nbytes and payload.dtype == torch.bfloat16


def test_residuals_are_kept_per_key_and_survive_state_dict():
    ef = ErrorFeedback(TopK(0.1))
    a, b = sample((100,), torch.float32, 0), sample((7, 3), torch.float32, 1)
    ef.compress(a, "a")
    ef.compress(b, "b")
    assert set(ef.residuals) == {"a", "b"} and ef.residuals["b"].shape == (7, 3)
    restored = ErrorFeedback(TopK(0.1))
    restored.load_state_dict(torch.load(io.BytesIO(_saved(ef.state_dict()))))
    assert torch.equal(restored.compress(a, "a").to_bytes(), ef.compress(a, "a").to_bytes())
    assert not torch.equal(ErrorFeedback(TopK(0.1)).compress(a, "a").to_bytes(), restored.compress(a, "a").to_bytes())


def _saved(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_a_key_whose_shape_changes_is_rejected():
    ef = ErrorFeedback(TopK(0.1))
    ef.compress(torch.ones(10), "w")
    with pytest.raises(ValueError, match="key 'w' had shape"):
        ef.compress(torch.ones(11), "w")


def _sgd(compressor, steps: int = 3000, lr: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights after minibatch SGD, optimum) on least squares whose optimum fits every sample."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 500, generator=g) / 500 ** 0.5
    b = a @ torch.randn(500, generator=g)
    w, batches = torch.zeros(500), torch.Generator().manual_seed(1)
    for _ in range(steps):
        rows = torch.randint(0, 2000, (100,), generator=batches)
        grad = a[rows].T @ (a[rows] @ w - b[rows]) * 5
        w -= lr * (compressor.decompress(compressor.compress(grad, "w")) if compressor else grad)
    return w, torch.linalg.lstsq(a, b).solution


def test_sgd_with_error_feedback_topk_reaches_the_uncompressed_optimum():
    plain, optimum = _sgd(None)
    compressed, _ = _sgd(ErrorFeedback(TopK(0.01)))  # 5 of 500 coordinates per step
    assert (plain - optimum).norm() <= 1e-3 * optimum.norm()
    assert (compressed - optimum).norm() <= 1e-3 * optimum.norm()
    assert (compressed - plain).norm() <= 1e-3 * optimum.norm()


def _repeated_allreduce(comm, with_feedback: bool) -> bytes:
    x = sample((300,), torch.float32, comm.rank)
    c = ErrorFeedback(IntQuantizer(4, 64)) if with_feedback else IntQuantizer(4, 64)
    outs = torch.stack([quantized_allreduce(comm, x.clone(), c, "avg", key="g") for _ in range(20)])
    return _saved({"mean": outs.mean(0), "state": c.state_dict()})


@pytest.mark.parametrize("with_feedback", [True, False])
def test_error_feedback_makes_repeated_quantized_allreduce_exact_on_average(with_feedback):
    from tests.multiproc import run_ranks

    results = [torch.load(io.BytesIO(r)) for r in run_ranks(_repeated_allreduce, 2, with_feedback)]
    average = (sample((300,), torch.float32, 0) + sample((300,), torch.float32, 1)) / 2
    error = (results[0]["mean"] - average).abs().max() / average.abs().max()
    if with_feedback:  # residuals stay bounded, so the mean's error shrinks as 1/rounds
        assert error < 0.01
        assert {"g#0", "g#1", "g#0/ag"} <= set(results[0]["state"]["residuals"])
    else:  # the same rounding every round: the mean is as far off as one round
        assert error > 0.02
