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
                if part.nbytes:
                    file.write(memoryview(part.reshape(-1).view(torch.uint8).numpy()))
        else:
            file.write(payload)
        position += size
    central = b"".join(directory)
    file.write(central)
    file.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central), position, 0))
