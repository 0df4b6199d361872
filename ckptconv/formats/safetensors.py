"""Stream tensors into safetensors shards whose headers are known up front.

``safetensors.torch.save_file`` wants a whole shard in memory. Export knows every tensor's name,
dtype and shape before reading any data (transforms run on meta tensors), so the header can be
written first and each tensor appended as it is produced, then freed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ckptconv.formats.array import DType, dtype_of, numel
from ckptconv.errors import ConversionError
from ckptconv.formats.pages import WriterLanes, write_tensor_at

PAGE = 4096


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * numel(self.shape)


@dataclass
class Shard:
    file_name: str
    tensors: list[PlannedTensor] = field(default_factory=list)
    data_start: int | None = None
    """Where the data section should start (the source file's, to put every tensor at its source
    offset); None: right after the header."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[Shard]:
    """Fill shards in order up to ``max_shard_bytes`` (a tensor larger than that gets its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [Shard("model.safetensors", groups[0])]
    total = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{total:05d}.safetensors", g) for i, g in enumerate(groups)]


def shards_like_source(tensors: list[PlannedTensor], sources: dict[str, dict], data_starts: dict[str, int]) -> list[Shard] | None:
    """The source checkpoint's own sharding: its file names, each file's tensors in their source
    order, each data section where the source's began. Every tensor then lands at the offset it
    had in the source, which is also (page-wise) where its chunk's bytes lie in the torch_dist
    checkpoint (``torch_save_format``), so the kernel copies whole pages. None when the manifest
    does not describe every tensor (e.g. a checkpoint written by Megatron training)."""
    if not data_starts or any(t.name not in sources or "offset" not in sources[t.name] for t in tensors):
        return None
    by_file: dict[str, list[PlannedTensor]] = {}
    for tensor in sorted(tensors, key=lambda t: (sources[t.name]["file"], sources[t.name]["offset"])):
        by_file.setdefault(sources[tensor.name]["file"], []).append(tensor)
    if any(Path(name).name != name or not name.endswith(".safetensors") or name not in data_starts for name in by_file):
        return None
    return [Shard(name, group, data_starts[name]) for name, group in sorted(by_file.items())]


def _header(shard: Shard) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard.tensors:
        header[t.name] = {"dtype": t.dtype.safetensors, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    if shard.data_start is not None:  # pad with spaces (allowed after the JSON)
        end = 8 + len(raw)
        if end <= shard.data_start:
            raw += b" " * (shard.data_start - end)  # the source's own data start
        else:
            raw += b" " * ((shard.data_start - end) % PAGE)  # our header is longer: the same place in a page
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Writes one shard: each tensor, in whatever order it comes, at its planned offset, by lane
    ``lane`` of the shared :class:`~ckptconv.formats.pages.WriterLanes` (the next tensor is read while
    this one is written, and different shards are written at once)."""

    def __init__(self, directory: Path, shard: Shard, lanes: WriterLanes, lane: int = 0):
        self.shard = shard
        self._lane = lane
        self.path = Path(directory) / shard.file_name
        self._lanes = lanes
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        header = _header(shard)
        os.pwrite(self._fd, header, 0)
        self._slots: dict[str, tuple[PlannedTensor, int]] = {}
        offset = len(header)
        for planned in shard.tensors:
            self._slots[planned.name] = (planned, offset)
            offset += planned.nbytes
        self._written: set[str] = set()
        self.bytes_written = 0

    def write(self, name: str, tensor) -> int:
        """Queue ``name`` (a tensor or row blocks), cast to its planned dtype; returns its size."""
        if name not in self._slots or name in self._written:
            raise ConversionError(f"{self.path.name}: unexpected {'second ' if name in self._written else ''}tensor {name}")
        expected, offset = self._slots[name]
        tensor = tensor.to(expected.dtype)
        if dtype_of(tensor.dtype) != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise ConversionError(
                f"{self.path.name}: expected {expected.name} {expected.dtype}{list(expected.shape)}, "
                f"got {tensor.dtype}{list(tensor.shape)}"
            )
        start = offset
        for part in (tensor.parts if hasattr(tensor, "parts") else [tensor]):
            part = part.contiguous()
            self._lanes.submit(self._lane, partial(write_tensor_at, self._fd, offset, part), part.nbytes)
            offset += part.nbytes
        self._written.add(name)
        self.bytes_written += offset - start
        return offset - start

    @property
    def complete(self) -> bool:
        return len(self._written) == len(self._slots)

    def close(self) -> None:
        """After the lanes are done: close the file; every planned tensor must have come."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self.complete:
            missing = [name for name in self._slots if name not in self._written]
            raise ConversionError(f"{self.path.name}: {len(missing)} tensor(s) never written, e.g. {missing[0]}")


def write_index(directory: Path, shards: list[Shard]) -> None:
    if len(shards) == 1 and shards[0].file_name == "model.safetensors":
        return
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {t.name: s.file_name for s in shards for t in s.tensors},
    }
    (Path(directory) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
