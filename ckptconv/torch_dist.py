"""Write and read megatron-core ``torch_dist`` checkpoints chunk by chunk.

The format is PyTorch Distributed Checkpoint (DCP) plus two megatron files:

- ``__<rank>_<n>.distcp``: each tensor chunk as a ``torch.save`` archive, back to back (written by
  ``torch_save_format.write_tensor``, which streams the bytes without torch.save's copies); each ShardedObject
  (``_extra_state``) as the bytes of ``torch.save([obj])``;
- ``.metadata``: a pickled ``torch.distributed.checkpoint.metadata.Metadata`` with every key's
  global shape, dtype and chunk list, and where each chunk's bytes live;
- ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``) and ``common.pt`` (the
  non-sharded part of the state dict; empty for a model).

``dist_checkpointing.save`` needs the whole state dict in memory at once. Writing the format
ourselves lets us stream: a chunk is serialized, written and freed before the next is read. Reading
uses the chunk table directly, so a single tensor can be fetched without loading the rest, and the
``.metadata`` pickle is loaded with an unpickler that only admits the DCP metadata classes.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ckptconv.errors import ConversionError
from ckptconv.manifest import checksum_bytes, new_checksum
from ckptconv.torch_save_format import read_tensor, write_tensor

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
EXTRA_STATE_BYTES_OBJECT = [None]
"""What a local-spec (non-Transformer-Engine) linear's ``_extra_state`` ShardedObject holds."""


def _serialize(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@dataclass
class LocalIndex:
    """What one rank wrote: merged by rank 0 into the checkpoint's ``.metadata``."""

    tensors: dict[str, tuple[torch.Size, torch.dtype, list[ChunkStorageMetadata]]] = field(default_factory=dict)
    objects: set[str] = field(default_factory=set)
    storage: dict[MetadataIndex, _StorageInfo] = field(default_factory=dict)
    file_hashes: dict[str, str] = field(default_factory=dict)
    bytes_written: int = 0


class _HashingFile:
    """The data file as torch.save sees it: every write is checksummed and counted on the way."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.checksum = new_checksum()
        self.offset = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self._file.write(view)
        self.checksum.update(view)
        self.offset += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class DistCheckpointWriter:
    """Appends chunks to ``__<rank>_0.distcp``.

    The caller (reading and transforming HF tensors) hands each chunk over and moves on; a
    background thread serializes and writes it, so reading the next tensor overlaps with writing
    this one. The hand-over is bounded in bytes, which bounds memory by a few tensors, not the model.
    """

    def __init__(self, directory: Path, rank: int = 0, max_queued_bytes: int = 256 * 1024 * 1024):
        self.directory = Path(directory)
        self.file_name = f"__{rank}_0.distcp"
        self.index = LocalIndex()
        self._file = _HashingFile(self.directory / self.file_name)
        self._queue: queue.Queue = queue.Queue()
        self._queued_bytes = 0
        self._max_queued_bytes = max_queued_bytes
        self._space = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="ckptconv-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            index, payload, size = job
            if self._error is None:
                try:
                    start = self._file.offset
                    if isinstance(payload, bytes):
                        self._file.write(payload)
                    else:
                        write_tensor(self._file, *payload)
                    self.index.storage[index] = _StorageInfo(self.file_name, start, self._file.offset - start)
                except BaseException as exc:  # disk full etc.: surfaced on the next write / close
                    self._error = exc
            del payload
            with self._space:
                self._queued_bytes -= size
                self._space.notify_all()

    def wait_for_room(self, size: int) -> None:
        """Block while the queue holds work and ``size`` more bytes would exceed the bound."""
        with self._space:
            while self._queued_bytes > 0 and self._queued_bytes + size > self._max_queued_bytes:
                self._space.wait()

    def _submit(self, index: MetadataIndex, payload) -> None:
        if self._error is not None:
            raise ConversionError(f"writing {self.directory / self.file_name} failed: {self._error}")
        size = payload[0].nbytes if isinstance(payload, tuple) else len(payload)
        self.wait_for_room(size)
        with self._space:
            self._queued_bytes += size
        self._queue.put((index, payload, size))

    def write_chunk(self, key: str, global_shape: tuple[int, ...], offsets: tuple[int, ...], chunk,
                    shape: tuple[int, ...] | None = None) -> None:
        """Queue one chunk (a tensor or :class:`RowBlocks`) at ``offsets`` of the global tensor
        ``key``; ``shape`` (default: the chunk's) adds the leading layer / expert axes of extent 1."""
        size = torch.Size(global_shape)
        shape = torch.Size(shape if shape is not None else chunk.shape)
        entry = self.index.tensors.get(key)
        if entry is None:
            entry = self.index.tensors[key] = (size, chunk.dtype, [])
        elif entry[0] != size or entry[1] != chunk.dtype:
            raise ConversionError(
                f"{key}: inconsistent global tensor: {list(entry[0])} {entry[1]} vs {list(size)} {chunk.dtype} (shape mismatch between layers?)"
            )
        entry[2].append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=shape))
        self._submit(MetadataIndex(key, torch.Size(offsets)), (chunk, shape))

    def write_object(self, fqn: str, obj) -> None:
        if fqn in self.index.objects:
            raise ConversionError(f"object {fqn} written twice")
        self.index.objects.add(fqn)
        self._submit(MetadataIndex(fqn), _serialize(obj))

    def _stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._file.close()

    def close(self) -> LocalIndex:
        self._stop()
        if self._error is not None:
            raise ConversionError(f"writing {self.directory / self.file_name} failed: {self._error}")
        self.index.bytes_written = self._file.offset
        self.index.file_hashes[self.file_name] = self._file.checksum.hexdigest()
        return self.index

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._stop()


def write_metadata(directory: Path, parts: list[LocalIndex]) -> dict[str, str]:
    """Merge every rank's index into ``.metadata``; write ``metadata.json`` and ``common.pt``.
    Returns the sha256 of each metadata file written."""
    state_dict_metadata: dict = {}
    storage: dict = {}
    for part in parts:
        for key, (size, dtype, chunks) in part.tensors.items():
            existing = state_dict_metadata.get(key)
            if existing is None:
                state_dict_metadata[key] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=dtype), size=size, chunks=list(chunks)
                )
            else:
                if existing.size != size or existing.properties.dtype != dtype:
                    raise ConversionError(f"{key}: ranks disagree on its global shape / dtype")
                existing.chunks.extend(chunks)
        for fqn in part.objects:
            state_dict_metadata[fqn] = BytesStorageMetadata()
        storage.update(part.storage)
    _check_chunks_tile(state_dict_metadata)
    metadata = Metadata(
        state_dict_metadata=dict(sorted(state_dict_metadata.items())),
        planner_data=None,
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=None, save_id="ckptconv"),
    )
    hashes = {}
    payloads = {
        ".metadata": pickle.dumps(metadata),
        "metadata.json": json.dumps(MEGATRON_METADATA).encode(),
        "common.pt": _serialize({}),
    }
    for name, payload in payloads.items():
        (directory / name).write_bytes(payload)
        hashes[name] = checksum_bytes(payload)
    return hashes


def _check_chunks_tile(state_dict_metadata: dict) -> None:
    """Every element of every global tensor is covered by exactly one chunk."""
    for key, md in state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        total = 1
        for d in md.size:
            total *= d
        covered = 0
        for chunk in md.chunks:
            n = 1
            for d in chunk.sizes:
                n *= d
            covered += n
        if covered != total:
            raise ConversionError(f"{key}: chunks cover {covered} of {total} elements (a layer or expert is missing or doubled)")


# ------------------------------------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Admit only the classes a DCP ``.metadata`` file is made of (no code execution)."""

    _ALLOWED_MODULES = (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed.checkpoint.planner",
        "torch.distributed.checkpoint._extension",
    )
    _ALLOWED = {
        ("torch", "Size"), ("torch", "device"), ("collections", "OrderedDict"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "slice"),
        # torch.layout pickles as a call to this lookup by name.
        ("torch.serialization", "_get_layout"),
    }

    def find_class(self, module, name):
        if module.startswith(self._ALLOWED_MODULES) or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def resolve_checkpoint_dir(path: Path) -> Path:
    """Megatron-LM layout (``latest_checkpointed_iteration.txt`` -> ``release/`` or ``iter_NNNNNNN/``)
    or a bare torch_dist directory."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: no such checkpoint directory")
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        value = tracker.read_text().strip()
        sub = path / ("release" if value == "release" else f"iter_{int(value):07d}" if value.isdigit() else value)
        if not sub.is_dir():
            raise ConversionError(f"{tracker}: names {value!r} but {sub} does not exist")
        path = sub
    meta_json = path / "metadata.json"
    if not meta_json.is_file():
        raise ConversionError(f"{path}: not a megatron-core distributed checkpoint (no metadata.json)")
    try:
        backend = json.loads(meta_json.read_text()).get("sharded_backend")
    except (json.JSONDecodeError, AttributeError):
        raise ConversionError(f"{meta_json}: not valid JSON") from None
    if backend != "torch_dist":
        raise ConversionError(f"{path}: sharded backend is {backend!r}; only torch_dist is supported")
    if not (path / ".metadata").is_file():
        raise ConversionError(f"{path}: torch_dist checkpoint without a .metadata file")
    return path


class DistCheckpointReader:
    """Fetch one tensor (or one slot of a stacked tensor) at a time."""

    def __init__(self, directory: Path):
        self.directory = resolve_checkpoint_dir(directory)
        try:
            with open(self.directory / ".metadata", "rb") as f:
                self.metadata: Metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise ConversionError(f"{self.directory / '.metadata'}: unreadable checkpoint metadata: {exc}") from None
        self.entries = self.metadata.state_dict_metadata
        self._files: dict[str, object] = {}

    def tensor_keys(self) -> list[str]:
        return [k for k, v in self.entries.items() if isinstance(v, TensorStorageMetadata)]

    def object_keys(self) -> list[str]:
        return [k for k, v in self.entries.items() if isinstance(v, BytesStorageMetadata)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor_md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor_md(key).properties.dtype

    def _tensor_md(self, key: str) -> TensorStorageMetadata:
        md = self.entries.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ConversionError(f"{self.directory}: checkpoint has no tensor {key}")
        return md

    def _map_chunk(self, index: MetadataIndex) -> memoryview:
        """The chunk's bytes, mapped privately (no copy; gone when the last tensor using them is)."""
        try:
            info = self.metadata.storage_data[index]
        except KeyError:
            raise ConversionError(f"{self.directory}: metadata lists {index.fqn} but no storage for it") from None
        path = self.directory / info.relative_path
        handle = self._files.get(info.relative_path)
        if handle is None:
            if not path.is_file():
                raise ConversionError(f"{path}: checkpoint data file is missing")
            handle = self._files[info.relative_path] = open(path, "rb")
        if info.offset + info.length > os.fstat(handle.fileno()).st_size:
            raise ConversionError(f"{path}: truncated (chunk of {index.fqn} at byte {info.offset} needs {info.length} bytes)")
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(handle.fileno(), info.offset + info.length - start, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        return memoryview(region)[info.offset - start:]

    def read(self, key: str, axis_index: tuple[int, ...] = ()) -> torch.Tensor:
        """The tensor at ``axis_index`` on the leading (layer / expert) axes, assembled from every
        chunk that overlaps it, whatever TP/PP/EP layout wrote them."""
        md = self._tensor_md(key)
        n_axes = len(axis_index)
        wanted = tuple(md.size[n_axes:])
        covering = [c for c in md.chunks if all(o <= i < o + s for i, o, s in zip(axis_index, c.offsets, c.sizes))]
        if len(covering) == 1 and tuple(covering[0].sizes[n_axes:]) == wanted:
            # One chunk holds it all (how ckptconv and TP=1 runs write): no assembly, no copy.
            chunk = covering[0]
            data = self._load_chunk(key, chunk)
            return data[tuple(i - o for i, o in zip(axis_index, chunk.offsets))] if n_axes else data
        out = torch.empty(wanted, dtype=md.properties.dtype)
        filled = 0
        for chunk in covering:
            data = self._load_chunk(key, chunk)
            piece = data[tuple(i - o for i, o in zip(axis_index, chunk.offsets))] if n_axes else data
            target = out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets[n_axes:], chunk.sizes[n_axes:]))]
            target.copy_(piece)
            filled += piece.numel()
        if filled != out.numel():
            raise ConversionError(f"{key}{list(axis_index)}: chunks cover {filled} of {out.numel()} elements")
        return out

    def _load_chunk(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        data = read_tensor(self._map_chunk(MetadataIndex(key, chunk.offsets)))
        if tuple(data.shape) != tuple(chunk.sizes):
            raise ConversionError(f"{self.directory}: chunk of {key} at {list(chunk.offsets)} has shape {list(data.shape)}, metadata says {list(chunk.sizes)}")
        return data

    def read_object(self, fqn: str):
        if not isinstance(self.entries.get(fqn), BytesStorageMetadata):
            raise ConversionError(f"{self.directory}: checkpoint has no object {fqn}")
        return torch.load(io.BytesIO(bytes(self._map_chunk(MetadataIndex(fqn)))), weights_only=True)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
