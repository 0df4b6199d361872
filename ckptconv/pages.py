"""Write a tensor's bytes and let go of the mapped file pages behind them.

Source tensors are private mmaps of the checkpoint (no copy). Once their bytes are written, the
pages they faulted in are still counted in this process's resident set until the tensor dies; for a
multi-GB embedding that is the peak of the run. ``MADV_PAGEOUT`` drops clean file-backed pages from
our page tables (they stay in the page cache, and are read back if touched again: no data is lost)
and leaves anonymous memory alone when there is no swap, so it is safe on any tensor.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

WINDOW = 64 * 1024 * 1024
_MADV_PAGEOUT = 21  # Linux >= 5.4

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not Linux / no libc symbol: writing still works, pages stay
    _madvise = None


def release(address: int, length: int) -> None:
    """Page out the whole pages inside ``[address, address + length)`` (best effort)."""
    if _madvise is None:
        return
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _madvise(start, end - start, _MADV_PAGEOUT)


def write_tensor_bytes(file, tensor: torch.Tensor) -> int:
    """Write a contiguous tensor's bytes in windows, paging each window out once written."""
    if tensor.nbytes == 0:
        return 0
    data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    address = tensor.data_ptr()
    for start in range(0, len(data), WINDOW):
        window = data[start:start + WINDOW]
        file.write(window)
        release(address + start, len(window))
    return len(data)
