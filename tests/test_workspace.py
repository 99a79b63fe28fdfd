"""A quantized allreduce whose payload has an odd byte count keeps the torch.compile path: the encode
kernels write block scales into a scratch buffer of their own (copied into the payload after), since a
compiled kernel that writes an fp32 view and a byte view of one buffer fails to compile whenever the
buffer's size is not a multiple of 4. Workspace buffers are also rounded up to 64 bytes, so typed views
of them stay whole elements. Run with a cold inductor cache (`make test` keeps one per clone): an entry
cached by an earlier build of the kernels can hide a compile failure."""

import warnings

import torch

from raylane.comm import CompressionConfig, host_store, kernels, quantized_allreduce
from raylane.comm.process_group import connect
from raylane.comm.workspace import Workspace


def test_workspace_storage_is_a_multiple_of_64_bytes_and_views_are_exact():
    ws = Workspace()
    view = ws.get("send", 1_065_301, torch.uint8)
    assert view.numel() == 1_065_301 and view.untyped_storage().nbytes() % 64 == 0
    assert ws.get("send", 7, torch.float32).numel() == 7


def test_an_odd_sized_fp4_payload_stays_on_the_compiled_path():
    kernels.configure(compile=True)
    store = host_store("127.0.0.1", 30)  # kept alive as long as the group
    comm = connect("127.0.0.1", store.port, 0, 0, 1, "gloo", 30.0)
    x = torch.randn(2**20 + 333, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="raylane.comm.kernels")
        quantized_allreduce(comm, x, CompressionConfig(name="fp4").build(), op="sum", key="odd")
    assert kernels.configure()["compile"] and torch.isfinite(x).all()
