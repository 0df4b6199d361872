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

from ckptconv.array import DType, dtype_of
from ckptconv.errors import ConversionError
from ckptconv.pages import WriterLanes, write_tensor_at


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    file_name: str
    tensors: list[PlannedTensor] = field(default_factory=list)

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


def _header(shard: Shard) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard.tensors:
        header[t.name] = {"dtype": t.dtype.safetensors, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Writes one shard. Tensors must arrive in the planned order; each is written at its planned
    offset by lane ``lane`` of the shared :class:`~ckptconv.pages.WriterLanes`, so the next tensor
    is read while this one is written, and different shards are written at once."""

    def __init__(self, directory: Path, shard: Shard, lanes: WriterLanes, lane: int = 0):
        self.shard = shard
        self._lane = lane
        self.path = Path(directory) / shard.file_name
        self._lanes = lanes
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        header = _header(shard)
        os.pwrite(self._fd, header, 0)
        self._offset = len(header)
        """Where the next tensor goes."""
        self._next = 0
        self.bytes_written = 0

    def write_next(self, name: str, tensor) -> int:
        """Queue the next planned tensor (a tensor or row blocks), cast to its planned dtype;
        returns its size in bytes."""
        if self._next >= len(self.shard.tensors):
            raise ConversionError(f"{self.path.name}: unexpected extra tensor {name}")
        expected = self.shard.tensors[self._next]
        tensor = tensor.to(expected.dtype)
        if name != expected.name or dtype_of(tensor.dtype) != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise ConversionError(
                f"{self.path.name}: expected {expected.name} {expected.dtype}{list(expected.shape)}, "
                f"got {name} {tensor.dtype}{list(tensor.shape)}"
            )
        parts = [part.contiguous() for part in (tensor.parts if hasattr(tensor, "parts") else [tensor])]
        offset = self._offset
        for part in parts:
            self._lanes.submit(self._lane, partial(write_tensor_at, self._fd, offset, part), part.nbytes)
            offset += part.nbytes
        written = offset - self._offset
        self._offset = offset
        self.bytes_written += written
        self._next += 1
        return written

    @property
    def complete(self) -> bool:
        return self._next == len(self.shard.tensors)

    def close(self) -> None:
        """After the lanes are done: close the file; every planned tensor must have come."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self.complete:
            missing = [t.name for t in self.shard.tensors[self._next:]]
            raise ConversionError(f"{self.path.name}: {len(missing)} tensor(s) never written, e.g. {missing[0]}")


def write_index(directory: Path, shards: list[Shard]) -> None:
    if len(shards) == 1 and shards[0].file_name == "model.safetensors":
        return
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {t.name: s.file_name for s in shards for t in s.tensors},
    }
    (Path(directory) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
