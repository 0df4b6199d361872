"""``torch.save``'s archive format, written and read without torch.

A torch_dist checkpoint stores every chunk as a ``torch.save`` archive (a zip of ``data.pkl`` plus
the raw storage bytes), because DCP's reader ``torch.load``s each chunk. ``torch.save`` moves the
storage through its zip writer at a fraction of the speed of a plain ``write``, and needs torch
imported. Here ``data.pkl`` comes from :mod:`ckptconv.formats.pickles` (byte-identical to torch's) and the
storage is written straight from the source (:mod:`ckptconv.formats.pages`): the same archive, at the speed
of the copy.

Records are stored uncompressed, data aligned to 64 bytes like torch does (or to the source's
place in a page), no CRC (as ``torch.save`` with ``compute_crc32=False``; torch's reader does not
check it). A storage of 4 GiB or more gets zip64 size and offset fields, as torch's writer gives it.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ckptconv.formats import pickles
from ckptconv.formats.array import BY_STORAGE, BY_TORCH_NAME, Array, as_array
from ckptconv.formats.pages import file_range, write_tensor_bytes

ARCHIVE = "archive"
ALIGNMENT = 64
PAGE = 4096
_ZIP64_AT = 0xFFFFFFFF
"""Sizes and offsets from here on are written in zip64 fields (a chunk of 4 GiB or more)."""
# What torch.save writes around data.pkl and the storages (serialization format 3); the id is opaque.
_HEAD_RECORDS = ((".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", b"little"))
_TRAILER_RECORDS = (("version", b"3\n"), (".data/serialization_id", b"0" * 40))


def _local_header(name: bytes, size: int, offset: int, modulus: int = ALIGNMENT, remainder: int = 0) -> bytes:
    """Local file header at ``offset`` whose extra field pads the data start to ``remainder``
    modulo ``modulus`` (torch pads to 64; we may pad further, see :func:`write_tensor`). A record
    of 4 GiB or more carries its size in a zip64 field, as torch's own writer does."""
    zip64 = size >= _ZIP64_AT
    sizes = struct.pack("<HHQQ", 0x0001, 16, size, size) if zip64 else b""
    base = 30 + len(name) + len(sizes)
    pad = (remainder - (offset + base + 4)) % modulus
    extra = sizes + struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # "FB": torch's own padding field id
    stored = 0xFFFFFFFF if zip64 else size
    return struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 0, 0, 0, 0, stored, stored, len(name), len(extra)
    ) + name + extra


def _central_entry(name: bytes, size: int, offset: int) -> bytes:
    big_size, big_offset = size >= _ZIP64_AT, offset >= _ZIP64_AT
    values = ([size, size] if big_size else []) + ([offset] if big_offset else [])
    extra = struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values) if values else b""
    version = 45 if values else 20
    return struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, 0, 0, 0, 0,
        0xFFFFFFFF if big_size else size, 0xFFFFFFFF if big_size else size, len(name), len(extra), 0, 0, 0, 0,
        0xFFFFFFFF if big_offset else offset,
    ) + name + extra


def _end_of_archive(entries: int, central_size: int, central_offset: int) -> bytes:
    """End-of-central-directory record, preceded by the zip64 ones when the directory starts at
    4 GiB or later."""
    if central_offset < _ZIP64_AT:
        return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, entries, entries, central_size, central_offset, 0)
    zip64_end = central_offset + central_size
    return (
        struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, entries, entries, central_size, central_offset)
        + struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1)
        + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, entries, entries, central_size, 0xFFFFFFFF, 0)
    )


def _write_archive(file, records: list[tuple[str, object, int]]) -> None:
    """Write a stored zip of ``(name, bytes or list of tensor parts, size)`` records."""
    position = 0
    directory = []
    archive_start = getattr(file, "offset", None)
    for name, payload, size in records:
        full_name = f"{ARCHIVE}/{name}".encode()
        remainder = None if isinstance(payload, bytes) else _congruent_remainder(archive_start, payload[0])
        header = _local_header(full_name, size, position, *((PAGE, remainder) if remainder is not None else ()))
        file.write(header)
        directory.append(_central_entry(full_name, size, position))
        position += len(header)
        if isinstance(payload, bytes):
            file.write(payload)
        else:  # the storage record: the tensor's bytes, written as they lie in the source
            for part in payload:
                write_tensor_bytes(file, part)
        position += size
    central = b"".join(directory)
    file.write(central)
    file.write(_end_of_archive(len(records), len(central), position))


def _congruent_remainder(archive_start: int | None, first_part) -> int | None:
    """Where (mod PAGE, relative to the archive start) the storage should begin so that its bytes
    sit at the same offset within a page as in the source file they are copied from: the kernel
    then copies whole pages, measured 15 % faster than unaligned ranges (docs/benchmarks.md).
    None when the first part is not a source file range."""
    source = file_range(first_part)
    if archive_start is None or source is None:
        return None
    return (source[1] - archive_start) % PAGE


def write_tensor(file, tensor, shape: tuple[int, ...] | None = None) -> None:
    """Append ``tensor`` to ``file`` (anything with ``write``) as a ``torch.load``-able archive of
    shape ``shape`` (default: its own). ``tensor`` is an :class:`~ckptconv.formats.array.Array`, a torch
    tensor or :class:`~ckptconv.core.transforms.RowBlocks`, whose parts are written back to back as one
    storage, never concatenated in memory."""
    shape = tuple(shape if shape is not None else tensor.shape)
    parts = [as_array(p).contiguous() for p in (tensor.parts if hasattr(tensor, "parts") else [tensor])]
    dtype = parts[0].dtype
    nbytes = sum(p.nbytes for p in parts)
    data_pkl = pickles.tensor_data_pkl(dtype, shape)
    _write_archive(file, [*_sized([("data.pkl", data_pkl), *_HEAD_RECORDS]), ("data/0", parts, nbytes),
                          *_sized(_TRAILER_RECORDS)])


def _sized(records) -> list[tuple[str, bytes, int]]:
    return [(name, payload, len(payload)) for name, payload in records]


def write_object(file, obj) -> None:
    """``torch.save(obj)`` for a plain object (no tensors inside), e.g. ``[None]`` or ``{}``."""
    _write_archive(file, _sized([("data.pkl", pickles.dumps(obj)), *_HEAD_RECORDS, *_TRAILER_RECORDS]))


def object_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    write_object(buffer, obj)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# Reading: the same archives, loaded in place.
class _StorageType:
    """What ``torch.BFloat16Storage`` & co. stand for in ``data.pkl``: the element dtype."""

    def __init__(self, dtype):
        self.dtype = dtype


_UNTYPED = _StorageType(None)


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` into :class:`Array` views of the archive's storage records.

    Only the names ``torch.save`` writes for tensors and plain containers are admitted; they map to
    our own functions, so loading a chunk neither imports torch nor runs code the file names.
    """

    def __init__(self, data: bytes, buffer: memoryview, records: dict[str, tuple[int, int]]):
        super().__init__(io.BytesIO(data))
        self.buffer, self.records = buffer, records

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_tensor_v3
        if module == "torch" and name in BY_STORAGE:
            return _StorageType(BY_STORAGE[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _UNTYPED
        if module == "torch" and name in BY_TORCH_NAME:
            return BY_TORCH_NAME[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint chunk")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        offset, size = self.records[_record_name(self.records, f"data/{key}")]
        return storage_type, self.buffer, offset, size


def _record_name(records, name: str) -> str:
    if name in records:
        return name
    for candidate in records:
        if candidate.split("/", 1)[-1] == name:
            return candidate
    raise pickle.UnpicklingError(f"archive has no record {name}")


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    storage_type, buffer, offset, nbytes = storage
    return _rebuild(dtype, buffer, offset, nbytes, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, metadata=None):
    storage_type, buffer, offset, nbytes = storage
    return _rebuild(storage_type.dtype, buffer, offset, nbytes, storage_offset, size, stride)


def _rebuild(dtype, buffer, offset, nbytes, storage_offset, size, stride) -> Array:
    if dtype is None:
        raise pickle.UnpicklingError("untyped storage without a dtype")
    storage = np.frombuffer(buffer, dtype=dtype.raw, count=nbytes // dtype.itemsize, offset=offset)
    size, stride = tuple(size), tuple(stride)
    end = storage_offset + sum((d - 1) * s for d, s in zip(size, stride)) + 1 if all(size) else storage_offset
    if storage_offset < 0 or end > storage.size:
        raise pickle.UnpicklingError(f"tensor {list(size)} at offset {storage_offset} overruns its storage of {storage.size}")
    raw = as_strided(storage[storage_offset:], size, tuple(s * dtype.itemsize for s in stride))
    return Array(raw, dtype)


def read_archive(buffer):
    """Load a torch.save archive lying in ``buffer`` (writable for a writable result, e.g. a private
    mmap): tensors come back as :class:`Array` views of the buffer itself, not copies."""
    view = memoryview(buffer)
    records = _central_directory(view)
    offset, size = records[_record_name(records, "data.pkl")]
    return _ArchiveUnpickler(bytes(view[offset:offset + size]), view, records).load()


def read_tensor(buffer, backing=None) -> Array:
    """The tensor a chunk archive holds; ``backing``: the file mapping ``buffer`` lies in, if any
    (so writers can copy its bytes file to file). Archives this parser does not understand (not a
    stored zip, other pickled types) go through ``torch.load(weights_only=True)``."""
    try:
        tensor = read_archive(buffer)
    except (ValueError, struct.error, pickle.UnpicklingError, KeyError):
        return as_array(_torch_load(buffer))
    if not isinstance(tensor, Array):
        raise ValueError(f"chunk holds a {type(tensor).__name__}, not a tensor")
    tensor.backing = backing
    return tensor


def read_object(buffer):
    """A ShardedObject's value (e.g. ``[None]``), via ``torch.load(weights_only=True)`` when it is
    more than plain data."""
    try:
        return read_archive(buffer)
    except (ValueError, struct.error, pickle.UnpicklingError, KeyError):
        return _torch_load(buffer)


def _torch_load(buffer):
    import torch

    return torch.load(io.BytesIO(bytes(buffer)), map_location="cpu", weights_only=True)


def _central_directory(buffer: memoryview) -> dict[str, tuple[int, int]]:
    """name -> (data offset, size) for a stored (uncompressed) zip, zip64 included."""
    end = len(buffer) - 22
    if end < 0 or bytes(buffer[end:end + 4]) != b"PK\x05\x06":
        raise ValueError("no end-of-central-directory record at the end of the archive")
    entries, cd_size, cd_offset = struct.unpack_from("<HII", buffer, end + 10)
    if cd_offset == 0xFFFFFFFF or entries == 0xFFFF:  # zip64: the locator sits just before
        (zip64_end,) = struct.unpack_from("<Q", buffer, end - 20 + 8)
        entries, cd_size, cd_offset = struct.unpack_from("<QQQ", buffer, zip64_end + 32)
    records, position = {}, cd_offset
    for _ in range(entries):
        if bytes(buffer[position:position + 4]) != b"PK\x01\x02":
            raise ValueError("corrupt central directory")
        method, = struct.unpack_from("<H", buffer, position + 10)
        csize, usize, name_len, extra_len, comment_len = struct.unpack_from("<IIHHH", buffer, position + 20)
        (local_offset,) = struct.unpack_from("<I", buffer, position + 42)
        name = bytes(buffer[position + 46: position + 46 + name_len]).decode()
        extra = buffer[position + 46 + name_len: position + 46 + name_len + extra_len]
        if 0xFFFFFFFF in (usize, csize, local_offset):
            usize, csize, local_offset = _zip64_sizes(extra, usize, csize, local_offset)
        if method != 0 or csize != usize:
            raise ValueError(f"record {name} is compressed")
        local_name_len, local_extra_len = struct.unpack_from("<HH", buffer, local_offset + 26)
        records[name] = (local_offset + 30 + local_name_len + local_extra_len, usize)
        position += 46 + name_len + extra_len + comment_len
    return records


def _zip64_sizes(extra: memoryview, usize: int, csize: int, local_offset: int) -> tuple[int, int, int]:
    position = 0
    while position + 4 <= len(extra):
        header_id, size = struct.unpack_from("<HH", extra, position)
        if header_id == 0x0001:
            values = iter(struct.unpack_from(f"<{size // 8}Q", extra, position + 4))
            usize = next(values) if usize == 0xFFFFFFFF else usize
            csize = next(values) if csize == 0xFFFFFFFF else csize
            local_offset = next(values) if local_offset == 0xFFFFFFFF else local_offset
            return usize, csize, local_offset
        position += 4 + size
    raise ValueError("zip64 sizes missing")


