"""Write one tensor in ``torch.save``'s format, with the tensor bytes going straight to the file.

A torch_dist checkpoint stores every chunk as a ``torch.save`` archive (a zip of ``data.pkl`` plus
the raw storage bytes), because DCP's reader ``torch.load``s each chunk. ``torch.save`` itself moves
the storage through its zip writer at a fraction of the speed of a plain ``write``; for a
converter whose limit is the disk, that is the bottleneck. Here the small records come from
torch's own pickler (so ``data.pkl`` is exactly what ``torch.save`` would write) and the storage is
written with one ``write(memoryview)``: the same archive, at the speed of the write.

Records are stored uncompressed, data aligned to 64 bytes like torch does, no CRC (as
``torch.save`` with ``compute_crc32=False``; torch's reader does not check it). Archives whose
storage is 4 GiB or more would need zip64: for those we fall back to ``torch.save``.
"""

from __future__ import annotations

import pickle
import struct

import torch

from ckptconv.pages import write_tensor_bytes

ARCHIVE = "archive"
ALIGNMENT = 64
_ZIP32_LIMIT = 0xFFFFFFFF - (1 << 20)
# What PyTorchFileWriter adds at the end of every archive (format version 3, an opaque id).
_TRAILER_RECORDS = (("version", b"3\n"), (".data/serialization_id", b"0" * 40))


class _RecordCollector:
    """Stands in for torch's zip writer to capture what ``torch.serialization._save`` records."""

    def __init__(self):
        self.records: list[tuple[str, bytes | None, int]] = []

    def write_record(self, name, data, nbytes):
        payload = data.encode() if isinstance(data, str) else data if isinstance(data, bytes) else None
        self.records.append((name, payload, nbytes))

    def write_record_metadata(self, name, nbytes):
        self.records.append((name, None, nbytes))


def _standalone_alias(tensor: torch.Tensor) -> torch.Tensor:
    """The same bytes as a tensor whose storage is exactly its data (no copy when already
    contiguous): ``data.pkl`` then describes one storage of ``tensor.nbytes`` bytes at offset 0."""
    tensor = tensor.contiguous()
    if tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return torch.from_numpy(raw).view(tensor.dtype).view(tensor.shape)


def _local_header(name: bytes, size: int, data_offset_if_no_extra: int) -> tuple[bytes, int]:
    """Local file header with an extra field that pads the data start to ALIGNMENT."""
    base = 30 + len(name)
    pad = (-(data_offset_if_no_extra + base + 4)) % ALIGNMENT
    extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # "FB": torch's own padding field id
    header = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, size, size, len(name), len(extra)
    ) + name + extra
    return header, len(extra)


def _central_entry(name: bytes, size: int, offset: int) -> bytes:
    return struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, size, size, len(name), 0, 0, 0, 0, 0, offset
    ) + name


def write_tensor(file, tensor, shape: tuple[int, ...] | None = None) -> None:
    """Append ``tensor`` to ``file`` (anything with ``write``) as a ``torch.load``-able archive of
    shape ``shape`` (default: its own). ``tensor`` may be :class:`~ckptconv.transforms.RowBlocks`:
    its parts are written back to back as one storage, never concatenated in memory."""
    shape = tuple(shape if shape is not None else tensor.shape)
    parts = tensor.parts if hasattr(tensor, "parts") else [tensor.detach()]
    parts = [_standalone_alias(p) for p in parts]
    nbytes = sum(p.nbytes for p in parts)
    if nbytes >= _ZIP32_LIMIT:
        whole = torch.cat([p.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0]
        torch.save(whole.reshape(shape), file)
        return
    # data.pkl only describes the storage (dtype, size, shape): a stand-in from torch.empty is never
    # touched, so it costs address space, not memory.
    stand_in = parts[0] if len(parts) == 1 else torch.empty(shape, dtype=parts[0].dtype)
    collector = _RecordCollector()
    torch.serialization._save(stand_in.reshape(shape), collector, pickle, 2, _disable_byteorder_record=False)
    records = [*collector.records, *((name, data, len(data)) for name, data in _TRAILER_RECORDS)]
    position = 0
    directory = []
    for name, payload, size in records:
        full_name = f"{ARCHIVE}/{name}".encode()
        header, _ = _local_header(full_name, size, position)
        file.write(header)
        directory.append(_central_entry(full_name, size, position))
        position += len(header)
        if payload is None:  # the storage record: the tensor's bytes, written as they lie in memory
            if size != nbytes:
                raise AssertionError(f"storage record of {size} bytes for a tensor of {nbytes}")
            for part in parts:
                write_tensor_bytes(file, part)
        else:
            file.write(payload)
        position += size
    central = b"".join(directory)
    file.write(central)
    file.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central), position, 0))


# ------------------------------------------------------------------------------------------------
# Reading: the same archives, loaded in place.
class _ZipView:
    """The records of one torch.save archive lying in a buffer, as torch's loader asks for them.

    ``torch.serialization._load`` given ``overall_storage`` (what ``torch.load(mmap=True)`` does for
    a whole file) slices storages out of it instead of copying them; this view lets us do the same
    for an archive that is one chunk inside a larger ``.distcp`` file."""

    def __init__(self, buffer):
        self.buffer = memoryview(buffer)
        self.records = _central_directory(self.buffer)
        self.serialization_id = lambda: ""

    def _name(self, name: str) -> str:
        return name if name in self.records else next(n for n in self.records if n.split("/", 1)[-1] == name)

    def has_record(self, name: str) -> bool:
        return any(n == name or n.split("/", 1)[-1] == name for n in self.records)

    def get_record(self, name: str) -> bytes:
        offset, size = self.records[self._name(name)]
        return bytes(self.buffer[offset: offset + size])

    def get_record_offset(self, name: str) -> int:
        return self.records[self._name(name)][0]

    def get_all_records(self) -> list[str]:
        return [n.split("/", 1)[-1] for n in self.records]


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


def read_tensor(buffer) -> torch.Tensor:
    """Load a torch.save archive lying in ``buffer`` (writable, e.g. a private mmap) with the
    weights-only unpickler; the tensor's storage is the buffer itself, not a copy. Archives this
    parser does not understand go through ``torch.load``."""
    try:
        view = _ZipView(buffer)
    except (ValueError, struct.error, StopIteration):
        import io

        return torch.load(io.BytesIO(bytes(buffer)), map_location="cpu", weights_only=True)
    overall = torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
    return torch.serialization._load(
        view, "cpu", torch._weights_only_unpickler, overall_storage=overall, encoding="utf-8"
    )
