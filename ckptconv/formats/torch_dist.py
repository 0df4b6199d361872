"""Write and read megatron-core ``torch_dist`` checkpoints chunk by chunk, without torch.

The format is PyTorch Distributed Checkpoint (DCP) plus two megatron files:

- ``__<rank>_<lane>.distcp``: each tensor chunk as a ``torch.save`` archive, back to back (written
  by ``torch_save_format.write_tensor``, which streams the bytes without torch.save's copies); each
  ShardedObject (``_extra_state``) as the bytes of ``torch.save([obj])``;
- ``.metadata``: a pickled ``torch.distributed.checkpoint.metadata.Metadata`` with every key's
  global shape, dtype and chunk list, and where each chunk's bytes live;
- ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``) and ``common.pt`` (the
  non-sharded part of the state dict: Megatron-LM's ``args``, ``iteration``, ``checkpoint_version``;
  see :mod:`ckptconv.pipeline.training`).

``dist_checkpointing.save`` needs the whole state dict in memory at once. Writing the format
ourselves lets us stream: a chunk is serialized, written and freed before the next is read. The
pickles are emitted by :mod:`ckptconv.formats.pickles` and read back into our own record types by
restricted unpicklers, so neither direction imports torch or DCP (2.3 s of imports). Reading uses
the chunk table directly, so a single tensor can be fetched without loading the rest.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ckptconv.formats.array import BY_TORCH_NAME, Array, DType, FileBacking, dtype_of, numel
from ckptconv.errors import ConversionError
from ckptconv.formats.checksum import checksum_bytes
from ckptconv.formats.pages import OutputFile, WriterLanes
from ckptconv.formats.pickles import Call, Global, Obj, dumps
from ckptconv.formats.torch_save import object_bytes, read_object, read_tensor, write_tensor
from ckptconv.formats.rowblocks import RowBlocks

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
EXTRA_STATE_BYTES_OBJECT = [None]
"""What a local-spec (non-Transformer-Engine) linear's ``_extra_state`` ShardedObject holds."""


@dataclass(frozen=True)
class ChunkMeta:
    """Where one saved chunk sits in its global tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass
class TensorMeta:
    dtype: DType
    size: tuple[int, ...]
    chunks: list[ChunkMeta]


@dataclass(frozen=True)
class BytesMeta:
    """A ShardedObject (e.g. a linear's ``_extra_state``)."""


@dataclass(frozen=True)
class StorageInfo:
    relative_path: str
    offset: int
    length: int


StorageKey = tuple[str, "tuple[int, ...] | None"]
"""(fqn, chunk offsets), or (fqn, None) for an object: DCP's ``MetadataIndex``."""


@dataclass
class CheckpointMetadata:
    """What ``.metadata`` says, in our own types (DCP's classes need torch.distributed.checkpoint)."""

    entries: dict[str, "TensorMeta | BytesMeta"]
    storage: dict[StorageKey, StorageInfo]


@dataclass
class LocalIndex:
    """What one rank wrote: merged by rank 0 into the checkpoint's ``.metadata``."""

    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    objects: set[str] = field(default_factory=set)
    storage: dict[StorageKey, StorageInfo] = field(default_factory=dict)
    file_hashes: dict[str, str] = field(default_factory=dict)
    bytes_written: int = 0


class _LaneFile:
    """The ``.distcp`` file one writer lane appends to, and what it has written there."""

    def __init__(self, path: Path):
        self.file_name = path.name
        self.file = OutputFile(path, checksum=True)
        self.assigned = 0
        """Bytes handed to this lane so far (balances the lanes)."""
        self.storage: dict[StorageKey, StorageInfo] = {}

    def append(self, index: StorageKey, payload) -> None:
        """Runs on the lane's thread: one chunk archive (or object bytes) at the end of the file."""
        start = self.file.offset
        if isinstance(payload, bytes):
            self.file.write(payload)
        else:
            write_tensor(self.file, *payload)
        self.storage[index] = StorageInfo(self.file_name, start, self.file.offset - start)


class DistCheckpointWriter:
    """Appends chunks to ``__<rank>_<lane>.distcp``, one file per writer lane.

    The caller (reading and transforming HF tensors) hands each chunk over and moves on; writer
    threads (:class:`~ckptconv.formats.pages.WriterLanes`) serialize and write them, so reading the next
    tensor overlaps with writing this one. Several lanes write in parallel (each to its own file,
    the layout DCP itself writes with ``thread_count > 1``): a kernel file-to-file copy keeps one
    core busy, and a second one roughly doubles the throughput on a warm page cache
    (docs/benchmarks.md). The hand-over is bounded in bytes, which bounds memory by a few tensors,
    not the model.
    """

    def __init__(self, directory: Path, rank: int = 0, max_queued_bytes: int = 256 * 1024 * 1024, lanes: int = 2):
        self.directory = Path(directory)
        self.index = LocalIndex()
        self._files = [_LaneFile(self.directory / f"__{rank}_{i}.distcp") for i in range(max(1, lanes))]
        self._lanes = WriterLanes(len(self._files), max_queued_bytes)

    def wait_for_room(self, size: int) -> None:
        """Block while the lanes hold work and ``size`` more bytes would exceed the bound."""
        self._lanes.wait_for_room(size)

    def _submit(self, index: StorageKey, payload) -> None:
        size = payload[0].nbytes if isinstance(payload, tuple) else len(payload)
        lane = min(range(len(self._files)), key=lambda i: self._files[i].assigned)
        self._files[lane].assigned += size
        try:
            self._lanes.submit(lane, partial(self._files[lane].append, index, payload), size)
        except BaseException as exc:  # an earlier chunk's write failed (disk full, ...)
            raise ConversionError(f"writing {self.directory} failed: {exc}") from None

    def write_chunk(self, key: str, global_shape: tuple[int, ...], offsets: tuple[int, ...], chunk,
                    shape: tuple[int, ...] | None = None) -> None:
        """Queue one chunk (a tensor or :class:`RowBlocks`) at ``offsets`` of the global tensor
        ``key``; ``shape`` (default: the chunk's) adds the leading layer / expert axes of extent 1."""
        size = tuple(global_shape)
        shape = tuple(shape if shape is not None else chunk.shape)
        dtype = dtype_of(chunk.dtype)
        entry = self.index.tensors.get(key)
        if entry is None:
            entry = self.index.tensors[key] = TensorMeta(dtype, size, [])
        elif entry.size != size or entry.dtype != dtype:
            raise ConversionError(
                f"{key}: inconsistent global tensor: {list(entry.size)} {entry.dtype} vs {list(size)} {dtype} (shape mismatch between layers?)"
            )
        entry.chunks.append(ChunkMeta(tuple(offsets), shape))
        self._submit((key, tuple(offsets)), (chunk, shape))

    def write_object(self, fqn: str, obj) -> None:
        if fqn in self.index.objects:
            raise ConversionError(f"object {fqn} written twice")
        self.index.objects.add(fqn)
        self._submit((fqn, None), object_bytes(obj))

    def close(self) -> LocalIndex:
        try:
            self._lanes.close()
            digests = [lane.file.close() for lane in self._files]
        except BaseException as exc:
            self.abort()
            raise ConversionError(f"writing {self.directory} failed: {exc}") from None
        for lane, digest in zip(self._files, digests):
            self.index.storage.update(lane.storage)
            self.index.file_hashes[lane.file_name] = digest
            self.index.bytes_written += lane.file.offset
        return self.index

    def abort(self) -> None:
        self._lanes.abort()
        for lane in self._files:
            lane.file.abort()


def write_metadata(directory: Path, parts: list[LocalIndex], checkpoint_id: str | None = None,
                   common_state: dict | None = None) -> dict[str, str]:
    """Merge every rank's index into ``.metadata``; write ``metadata.json`` and ``common.pt``.
    ``checkpoint_id``: the directory the checkpoint will be read from (``StorageMeta.checkpoint_id``,
    which torch's writer sets to its path; default ``directory``). ``common_state``: the non-sharded
    part of the state dict (what ``load_common_state_dict`` returns): Megatron-LM's ``args`` /
    ``iteration`` / ``checkpoint_version``, built of plain values and
    :class:`~ckptconv.formats.pickles.Obj` records (see :mod:`ckptconv.pipeline.training`).
    Returns the checksum of each metadata file written."""
    entries: dict[str, TensorMeta | BytesMeta] = {}
    storage: dict[StorageKey, StorageInfo] = {}
    for part in parts:
        for key, md in part.tensors.items():
            existing = entries.get(key)
            if existing is None:
                entries[key] = TensorMeta(md.dtype, md.size, list(md.chunks))
            else:
                if existing.size != md.size or existing.dtype != md.dtype:
                    raise ConversionError(f"{key}: ranks disagree on its global shape / dtype")
                existing.chunks.extend(md.chunks)
        for fqn in part.objects:
            entries[fqn] = BytesMeta()
        storage.update(part.storage)
    _check_chunks_tile(entries)
    metadata = CheckpointMetadata(dict(sorted(entries.items())), storage)
    hashes = {}
    payloads = {
        ".metadata": dcp_metadata_pickle(
            metadata, checkpoint_id=str(checkpoint_id if checkpoint_id is not None else directory),
            save_id=save_id_for({name: digest for part in parts for name, digest in part.file_hashes.items()})),
        "metadata.json": json.dumps(MEGATRON_METADATA).encode(),
        "common.pt": object_bytes(common_state if common_state is not None else {}),
    }
    for name, payload in payloads.items():
        (directory / name).write_bytes(payload)
        hashes[name] = checksum_bytes(payload)
    return hashes


def _check_chunks_tile(entries: dict) -> None:
    """Every element of every global tensor is covered by exactly one chunk."""
    for key, md in entries.items():
        if not isinstance(md, TensorMeta):
            continue
        covered = sum(numel(chunk.sizes) for chunk in md.chunks)
        if covered != numel(md.size):
            raise ConversionError(f"{key}: chunks cover {covered} of {numel(md.size)} elements (a layer or expert is missing or doubled)")


# ------------------------------------------------------------------------------------------------
# .metadata: DCP's pickled ``Metadata``, written and read without importing DCP.
_DCP = "torch.distributed.checkpoint.metadata"
_DCP_FILESYSTEM = "torch.distributed.checkpoint.filesystem"


def _torch_size(values) -> Call:
    return Call(Global("torch", "Size"), (tuple(values),))


DCP_VERSION = "1.0.0"
"""``Metadata.version`` as torch's own ``FileSystemWriter.finish`` writes it (``CURRENT_DCP_VERSION``
in ``torch/distributed/checkpoint/filesystem.py``, torch 2.13); megatron-core's
``dist_checkpointing.save`` ends in that same ``finish``."""


def save_id_for(file_hashes: dict[str, str]) -> str:
    """``StorageMeta.save_id``: torch draws a ``uuid4``; ours is a uuid derived from the data files'
    checksums, the same form, and the same bytes for the same checkpoint (``.metadata``'s checksum
    is in ckptconv.json)."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, json.dumps(sorted(file_hashes.items()))))


def dcp_metadata_pickle(metadata: CheckpointMetadata, *, checkpoint_id: str, save_id: str,
                        use_torch: bool | None = None) -> bytes:
    """The ``.metadata`` bytes: DCP's ``Metadata`` with the fields torch's ``FileSystemWriter``
    writes (``version``, ``storage_meta``, ``planner_data=None`` as megatron-core's planner leaves it),
    so ``torch.distributed.checkpoint`` and megatron-core load it as their own (tested field for field
    against megatron-core's ``dist_checkpointing.save``).

    Two writers, one result. Where torch is already imported (torchrun, dtype casts), DCP's own
    dataclasses go through ``pickle``: at real size (80k chunks) that is 2-3x faster than our
    emitter. Where it is not, the torch-free emitter saves the 1.4 s torch + DCP import, which is
    more than the emitter costs below ~40k chunks (docs/benchmarks.md, "Writing .metadata").
    """
    if use_torch is None:
        use_torch = "torch" in sys.modules
    if use_torch:
        return _metadata_with_torch(metadata, checkpoint_id, save_id)
    return _metadata_without_torch(metadata, checkpoint_id, save_id)


def _metadata_with_torch(metadata: CheckpointMetadata, checkpoint_id: str, save_id: str) -> bytes:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
        TensorStorageMetadata,
    )

    def tensor_entry(md: TensorMeta) -> TensorStorageMetadata:
        chunks = [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in md.chunks]
        return TensorStorageMetadata(TensorProperties(dtype=getattr(torch, md.dtype.torch_name)), torch.Size(md.size), chunks)

    return pickle.dumps(Metadata(
        state_dict_metadata={key: tensor_entry(md) if isinstance(md, TensorMeta) else BytesStorageMetadata()
                             for key, md in metadata.entries.items()},
        planner_data=None,
        storage_data={MetadataIndex(fqn, offsets): _StorageInfo(info.relative_path, info.offset, info.length)
                      for (fqn, offsets), info in metadata.storage.items()},
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id),
        version=DCP_VERSION,
    ))


def _metadata_without_torch(metadata: CheckpointMetadata, checkpoint_id: str, save_id: str) -> bytes:
    """``pickle.dumps(Metadata(...))`` as the stdlib would pickle DCP's classes: the same classes,
    fields and state, emitted by name without importing them."""

    def tensor_entry(md: TensorMeta) -> Obj:
        properties = Obj(Global(_DCP, "TensorProperties"), (
            Global("torch", md.dtype.torch_name),
            Call(Global("torch.serialization", "_get_layout"), ("torch.strided",)),
            False,  # requires_grad
            Call(Global(_DCP, "_MEM_FORMAT_ENCODING"), (0,)),  # contiguous
            False,  # pin_memory
        ))
        chunks = [Obj(Global(_DCP, "ChunkStorageMetadata"), {"offsets": _torch_size(c.offsets), "sizes": _torch_size(c.sizes)})
                  for c in md.chunks]
        return Obj(Global(_DCP, "TensorStorageMetadata"),
                   {"properties": properties, "size": _torch_size(md.size), "chunks": chunks})

    state_dict_metadata = {
        key: tensor_entry(md) if isinstance(md, TensorMeta) else Obj(Global(_DCP, "BytesStorageMetadata"))
        for key, md in metadata.entries.items()
    }
    storage_data = {
        Obj(Global(_DCP, "MetadataIndex"), {"fqn": fqn, "index": None,
                                            "offset": None if offsets is None else _torch_size(offsets)}):
        Obj(Global(_DCP_FILESYSTEM, "_StorageInfo"), {"relative_path": info.relative_path, "offset": info.offset,
                                                      "length": info.length})
        for (fqn, offsets), info in metadata.storage.items()
    }
    storage_meta = Obj(Global(_DCP, "StorageMeta"), {"checkpoint_id": checkpoint_id, "save_id": save_id,
                                                     "load_id": None, "modules": []})
    return dumps(Obj(Global(_DCP, "Metadata"), {
        "state_dict_metadata": state_dict_metadata,
        "planner_data": None,
        "storage_data": storage_data,
        "storage_meta": storage_meta,
        "version": DCP_VERSION,
    }))


class _Record:
    """Stands in for a DCP class while unpickling: keeps the state, runs nothing."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            self.__dict__.update(state[0] or {})
            self.__dict__.update(state[1])
        else:
            self.state = state


_RECORD_TYPES: dict[tuple[str, str], type] = {}


def _record_type(module: str, name: str) -> type:
    if (module, name) not in _RECORD_TYPES:
        _RECORD_TYPES[(module, name)] = type(name, (_Record,), {"__module__": "ckptconv.formats.torch_dist.dcp"})
    return _RECORD_TYPES[(module, name)]


def _path_string(*parts) -> str:
    """Stands in for ``pathlib.PosixPath(*parts)``: the joined string parts, nothing else."""
    if not all(isinstance(part, str) for part in parts):
        raise TypeError("PosixPath with non-string parts")
    return "/".join(parts)


class _MetadataUnpickler(pickle.Unpickler):
    """Reads a DCP ``.metadata`` pickle into inert stand-ins: the DCP class names map to
    :class:`_Record` types, torch's Size / dtype / layout to plain values; anything else is
    refused. No code the file names is ever run, and torch is not imported."""

    _DCP_MODULES = (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed.checkpoint.planner",
        "torch.distributed.checkpoint._extension",
    )
    _PLAIN = {
        ("torch", "Size"): lambda values=(): tuple(values),
        ("torch", "device"): lambda *args: ":".join(map(str, args)),
        ("torch.serialization", "_get_layout"): str,  # torch.layout pickles as a lookup by name
        ("collections", "OrderedDict"): dict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        # megatron-core 0.12 stores the path it saved to (storage_meta.checkpoint_id) as a PosixPath.
        ("pathlib", "PosixPath"): _path_string,
    }
    _TORCH_CONSTANTS = {"strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format"}
    # What older megatron-core versions add to the pickle (measured on checkpoints their own
    # dist_checkpointing.save wrote: tests/data/old_mcore, scripts/make_old_mcore_checkpoints.py):
    # 0.12-0.15 keep every rank's plan (``all_local_plans``, a list of ``MCoreSavePlan``), 0.15 pickles
    # the Metadata itself as its subclass ``MCoreMetadata``; megatron-core 0.16 keeps empty classes of
    # both names so it can still read them (strategies/torch.py). Exactly these, as inert records.
    _MCORE_RECORDS = {
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    }

    def find_class(self, module, name):
        if module.startswith(self._DCP_MODULES) or (module, name) in self._MCORE_RECORDS:
            return _record_type(module, name)
        if (module, name) in self._PLAIN:
            return self._PLAIN[(module, name)]
        if module == "torch" and name in BY_TORCH_NAME:
            return BY_TORCH_NAME[name]
        if module == "torch" and name in self._TORCH_CONSTANTS:
            return name
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def read_dcp_metadata(path: Path) -> CheckpointMetadata:
    """Parse a ``.metadata`` file with the restricted unpickler into :class:`CheckpointMetadata`."""
    try:
        with open(path, "rb") as f:
            raw = _MetadataUnpickler(f).load()
        entries: dict[str, TensorMeta | BytesMeta] = {}
        for key, md in raw.state_dict_metadata.items():
            kind = type(md).__name__
            if kind == "TensorStorageMetadata":
                properties = md.properties
                dtype = properties.state[0] if hasattr(properties, "state") else properties.dtype
                if not isinstance(dtype, DType):
                    raise TypeError(f"{key}: unsupported dtype {dtype!r}")
                chunks = [ChunkMeta(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]
                entries[key] = TensorMeta(dtype, tuple(md.size), chunks)
            elif kind == "BytesStorageMetadata":
                entries[key] = BytesMeta()
            else:
                raise TypeError(f"{key}: unexpected metadata entry {kind}")
        storage = {
            (index.fqn, None if getattr(index, "offset", None) is None else tuple(index.offset)):
                StorageInfo(str(info.relative_path), int(info.offset), int(info.length))
            for index, info in raw.storage_data.items()
        }
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError, IndexError) as exc:
        raise ConversionError(f"{path}: unreadable checkpoint metadata: {exc}") from None
    return CheckpointMetadata(entries, storage)


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
        self.metadata = read_dcp_metadata(self.directory / ".metadata")
        self.entries = self.metadata.entries
        self._files: dict[str, object] = {}

    def tensor_keys(self) -> list[str]:
        return [k for k, v in self.entries.items() if isinstance(v, TensorMeta)]

    def object_keys(self) -> list[str]:
        return [k for k, v in self.entries.items() if isinstance(v, BytesMeta)]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensor_md(key).size

    def dtype(self, key: str) -> DType:
        return self._tensor_md(key).dtype

    def _tensor_md(self, key: str) -> TensorMeta:
        md = self.entries.get(key)
        if not isinstance(md, TensorMeta):
            raise ConversionError(f"{self.directory}: checkpoint has no tensor {key}")
        return md

    def _map_chunk(self, index: StorageKey) -> tuple[memoryview, FileBacking]:
        """The chunk's bytes, mapped privately (no copy; gone when the last array using them is)."""
        try:
            info = self.metadata.storage[index]
        except KeyError:
            raise ConversionError(f"{self.directory}: metadata lists {index[0]} but no storage for it") from None
        path = self.directory / info.relative_path
        handle = self._files.get(info.relative_path)
        if handle is None:
            if Path(info.relative_path).name != info.relative_path or not path.is_file():
                raise ConversionError(f"{path}: checkpoint data file is missing")
            handle = self._files[info.relative_path] = open(path, "rb")
        if info.offset + info.length > os.fstat(handle.fileno()).st_size:
            raise ConversionError(f"{path}: truncated (chunk of {index[0]} at byte {info.offset} needs {info.length} bytes)")
        # The backing lets writers copy bytes that are still this file range file to file (pages.py).
        return FileBacking.map(handle.fileno(), info.offset, info.length)

    def read(self, key: str, axis_index: tuple[int, ...] = ()) -> Array:
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
        pieces = sorted(covering, key=lambda c: c.offsets[n_axes] if wanted else 0)
        if len(pieces) > 1 and wanted and _tile_rows(pieces, n_axes, wanted):
            # Split along rows only (a SwiGLU fc1's gate and up chunks, column-parallel TP):
            # hand the chunks on as row blocks instead of copying them into one tensor.
            return RowBlocks([self._load_chunk(key, c)[tuple(i - o for i, o in zip(axis_index, c.offsets))] for c in pieces])
        out = Array.zeros(wanted, md.dtype)
        filled = 0
        for chunk in covering:
            data = self._load_chunk(key, chunk)
            piece = data[tuple(i - o for i, o in zip(axis_index, chunk.offsets))] if n_axes else data
            region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets[n_axes:], chunk.sizes[n_axes:]))
            out.raw[region] = piece.raw
            filled += piece.numel()
        if filled != out.numel():
            raise ConversionError(f"{key}{list(axis_index)}: chunks cover {filled} of {out.numel()} elements")
        return out

    def chunks(self, key: str) -> list[ChunkMeta]:
        """Where each stored chunk of ``key`` sits in the global tensor."""
        return list(self._tensor_md(key).chunks)

    def read_chunk(self, key: str, chunk: ChunkMeta) -> Array:
        """One stored chunk, mapped privately (no copy until a cast needs one)."""
        return self._load_chunk(key, chunk)

    def _load_chunk(self, key: str, chunk: ChunkMeta) -> Array:
        try:
            data = read_tensor(*self._map_chunk((key, chunk.offsets)))
        except ValueError as exc:
            raise ConversionError(f"{self.directory}: chunk of {key} at {list(chunk.offsets)} is unreadable: {exc}") from None
        if data.shape != tuple(chunk.sizes) or data.dtype != self.dtype(key):
            raise ConversionError(f"{self.directory}: chunk of {key} at {list(chunk.offsets)} is {data.dtype}{list(data.shape)}, "
                                  f"metadata says {self.dtype(key)}{list(chunk.sizes)}")
        return data

    def read_object(self, fqn: str):
        if not isinstance(self.entries.get(fqn), BytesMeta):
            raise ConversionError(f"{self.directory}: checkpoint has no object {fqn}")
        return read_object(self._map_chunk((fqn, None))[0])

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def _tile_rows(chunks: list[ChunkMeta], n_axes: int, wanted: tuple[int, ...]) -> bool:
    """Do ``chunks`` (sorted by row) cover ``wanted`` row after row, each spanning whole rows?"""
    row = 0
    for chunk in chunks:
        if tuple(chunk.sizes[n_axes + 1:]) != tuple(wanted[1:]) or chunk.offsets[n_axes] != row:
            return False
        row += chunk.sizes[n_axes]
    return row == wanted[0]
