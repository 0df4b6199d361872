"""Write a tensor's bytes without holding the file pages behind them.

Source tensors are private mmaps of the checkpoint (no copy). Two ways to write one out:

- Bytes that are still exactly a range of a source file (a copied weight, a row block of a fused
  QKV, the real rows of a padded vocabulary) are streamed file to file through a small reused buffer,
  the way ``cat`` does: the mapping is never touched, so no page is faulted in.
- Anything else (tensors a transform computed) is written from memory in windows; afterwards
  ``MADV_PAGEOUT`` drops clean file-backed pages from our page tables (they stay in the page cache;
  no data is lost) and leaves anonymous memory alone when there is no swap, so it is safe on any tensor.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import weakref

from ckptconv.array import Array, as_array

WINDOW = 64 * 1024 * 1024
COPY_BUFFER = 128 * 1024
"""Small enough to stay in the CPU cache between the read and the write (why ``cat`` is fast)."""

_mappings: dict[int, tuple[int, int, int]] = {}
"""mapping address -> (length, file descriptor, file offset of the mapping start)."""
_mappings_lock = threading.Lock()
_copy_buffer = threading.local()


def register_mapping(region: mmap.mmap, address: int, fd: int, file_offset: int) -> None:
    """Remember which file range ``region`` (mapped at ``address``) shows, until it is unmapped."""
    with _mappings_lock:
        _mappings[address] = (len(region), fd, file_offset)
    weakref.finalize(region, _forget, address)


def _forget(address: int) -> None:
    with _mappings_lock:
        _mappings.pop(address, None)


def file_range(tensor: Array) -> tuple[int, int] | None:
    """(fd, offset) when the contiguous ``tensor`` lies in a registered mapping, else None."""
    if not tensor.is_contiguous() or tensor.nbytes == 0:
        return None
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
    with _mappings_lock:
        for address, (length, fd, file_offset) in _mappings.items():
            if address <= start and end <= address + length:
                return fd, file_offset + (start - address)
    return None


def _copy_from_file(file, fd: int, offset: int, nbytes: int) -> None:
    buffer = getattr(_copy_buffer, "view", None)
    if buffer is None:
        buffer = _copy_buffer.view = memoryview(bytearray(COPY_BUFFER))
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [buffer[: min(COPY_BUFFER, nbytes - done)]], offset + done)
        if got <= 0:
            raise OSError(f"short read at byte {offset + done} of a source file")
        file.write(buffer[:got])
        done += got
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


def write_tensor_bytes(file, tensor) -> int:
    """Write a contiguous tensor's (Array's) bytes: straight from its source file when it is an
    unchanged range of one, else from memory in windows, paging each window out once written."""
    tensor = as_array(tensor)
    if tensor.nbytes == 0:
        return 0
    source = file_range(tensor)
    if source is not None:
        _copy_from_file(file, *source, tensor.nbytes)
        return tensor.nbytes
    data = tensor.bytes_view()
    address = tensor.data_ptr()
    for start in range(0, len(data), WINDOW):
        window = data[start:start + WINDOW]
        file.write(window)
        release(address + start, len(window))
    return len(data)
