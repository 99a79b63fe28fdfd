"""Named, grow-only scratch buffers, so that a collective allocates nothing at the data's size per call.

`Workspace.get(name, numel, dtype, device)` returns a view of the first `numel` elements of the
buffer called `name` on that device, creating or enlarging it (to the bytes asked, rounded up to 64)
when it is too small. The rounding keeps every typed view's storage a whole number of elements:
torch.compile refuses a float32 view of a byte storage whose size is not a multiple of 4. A view is valid until the next `get` of the same name: callers use a name for one purpose
at a time. Each Communicator owns one (`Communicator.workspace`); its collectives run on one thread
in call order, so they never share a buffer concurrently. Memory: the largest request per name, kept
until `clear()` (see docs/ARCHITECTURE.md for what the collectives ask for).
"""

from __future__ import annotations

import torch


class Workspace:
    """Grow-only byte buffers by (name, device)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        key = (name, str(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers.pop(key, None)  # free the old one before the new one is made
            del buf
            buf = self._buffers[key] = torch.empty(-(-nbytes // 64) * 64, dtype=torch.uint8, device=device)
        return buf[:nbytes].view(dtype)

    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(b.numel() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
