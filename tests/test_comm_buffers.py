"""After a first call, the compressed collectives allocate no tensor at the data's size (the torch
profiler's CPU allocations, on a world-1 Communicator, in the calling thread); top-k's candidate search
does not fall back to a full topk on a gradient whose row length aliases a strided sample; random-k
draws its permutation once per collective."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from raylane.comm import Communicator, collectives, fast_paths, kernels, pipeline, sparse
from raylane.comm.error_feedback import ErrorFeedback
from raylane.comm.powersgd import PowerSGD
from raylane.comm.quantizers import FP4Quantizer, IntQuantizer

pytestmark = pytest.mark.timeout(120)

N = 1 << 20


def _largest_allocation(fn) -> int:
    """Bytes of the largest CPU allocation during the second of two calls of fn."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


@pytest.fixture
def eager():
    kernels.configure(compile=False)
    yield
    kernels.configure(compile=True, min_numel=1 << 20)
    pipeline.configure(pipeline_floats=pipeline.DEFAULT_FLOATS)


@pytest.mark.parametrize("stage", [0, 1 << 18])
@pytest.mark.parametrize("make", [lambda: IntQuantizer(8, 256), lambda: IntQuantizer(4, 64),
                                  lambda: FP4Quantizer("e2m1", 256)], ids=["int8", "int4", "fp4"])
def test_quantized_allreduce_allocates_nothing_at_the_data_size(eager, make, stage):
    pipeline.configure(pipeline_floats=stage)
    comm, x, c = Communicator(None, 0, 1), torch.randn(N), make()
    t = x.clone()
    biggest = _largest_allocation(lambda: fast_paths.quantized_allreduce(comm, t.copy_(x), c, "avg", "k"))
    assert biggest < N, f"{biggest} bytes allocated in one call (tensor: {4 * N})"


def test_topk_allgather_and_error_feedback_powersgd_allocate_nothing_at_the_data_size():
    comm, x = Communicator(None, 0, 1), torch.randn(N)
    t = x.clone()
    topk = sparse.TopK(0.01)
    assert _largest_allocation(lambda: fast_paths.allgather_reduce(comm, t.copy_(x), topk, "avg", "g")) < N
    ef, m = ErrorFeedback(PowerSGD(4)), x.view(1024, 1024)
    mt = m.clone()
    residual = []

    def psgd():
        collectives._powersgd_allreduce(comm, [mt.copy_(m)], ef.inner, ef, "avg", "p")
        residual.append(ef.residuals["p/0"].data_ptr())
    assert _largest_allocation(psgd) < N
    assert residual[-1] == residual[-2], "the residual was reallocated"


def test_top_indices_on_a_gradient_whose_rows_alias_a_strided_sample_needs_no_full_topk():
    rows, cols = 512, 2048  # a strided sample (stride n / 65,536 = 16) would see every 16th column only
    g = torch.Generator().manual_seed(0)
    mags = (torch.rand(rows, cols, generator=g) * torch.where(torch.arange(cols) % 16 == 0, 100.0, 1.0)).view(-1)
    k = sparse.kept(mags.numel(), 0.01)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        got = sparse.top_indices(mags, k)
    full = [e for e in prof.events() if e.name == "aten::topk" and e.input_shapes[0] == [mags.numel()]]
    assert not full, "fell back to topk over the whole tensor"
    assert torch.equal(got.sort().values, mags.topk(k).indices.sort().values)


def test_random_k_draws_one_permutation_per_collective(monkeypatch):
    calls = []
    real = torch.randperm

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "randperm", counting)
    comm, x = Communicator(None, 0, 1), torch.randn(10_000)
    c = sparse.RandomK(0.05, seed=1)
    fast_paths.allgather_reduce(comm, x.clone(), c, "sum", "r")
    payload = c.compress(x, "r")
    assert torch.equal(c.decompress(payload), c.decompress(payload))
    assert calls == [10_000, 10_000], calls  # one per call (the first collective, then compress)
