"""Resolve and open a Hugging Face checkpoint without trusting it.

``open_hf_checkpoint(src)`` accepts a local directory or a hub repo id (resolved through
``huggingface_hub``'s cache; offline works). Before anything is converted it checks what a bad
checkpoint would otherwise break on half-way: the config parses, the index names only files inside
the model directory, every shard exists, every safetensors header parses and fits its file, and the
index agrees with the headers. Tensors are then read one at a time, each mapped on its own
(``mmap`` of just its byte range, private): the page cache is used in place, with no copy, and the
mapping goes away with the tensor, so memory holds the tensors in flight, never a whole shard
(``safe_open`` maps the whole file, and every page read stays resident until the handle closes).
Pickle weights (``*.bin``, ``*.pt``) are refused: we never unpickle a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from ckptconv.formats.array import BY_SAFETENSORS, Array, DType, FileBacking
from ckptconv.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files that travel with the weights: configs, tokenizer, processor, chat template.
_SIDECAR = re.compile(r".*\.(json|txt|model|jinja|tiktoken|py)$|^tokenizer.*")


# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone does not).
_TOKENIZER_VOCAB = re.compile(r"^tokenizer\.(json|model)$|^(vocab\.(json|txt)|merges\.txt|spiece\.model)$|.*\.tiktoken$")


def missing_tokenizer_note(file_names, where: str) -> str | None:
    """A summary note when none of ``file_names`` holds a tokenizer: the output then carries none,
    which a user should hear about rather than find out when training or serving."""
    if any(_TOKENIZER_VOCAB.match(name) for name in file_names):
        return None
    return (f"{where} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, *.tiktoken): "
            "the output carries none; take them from the original model")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str
    """safetensors dtype name, e.g. ``BF16``."""
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0
    """Where the tensor's bytes start in the file."""

    @property
    def array_dtype(self) -> DType:
        return BY_SAFETENSORS[self.dtype]


@dataclass
class HFCheckpoint:
    root: Path
    config: dict
    tensors: dict[str, TensorInfo]
    _handles: dict = field(default_factory=dict, repr=False)

    def read(self, name: str) -> Array:
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(self.root / info.file, "rb", buffering=0)
        if info.nbytes == 0:
            return Array.zeros(info.shape, info.array_dtype)
        # The backing lets writers copy bytes that are still this file range file to file (pages.py).
        data, backing = FileBacking.map(handle.fileno(), info.offset, info.nbytes)
        return Array.frombuffer(data, info.array_dtype, info.shape, backing=backing)

    def sidecar_files(self) -> list[Path]:
        """Config, tokenizer and processor files to carry along (never weights or the index)."""
        return sorted(
            p for p in self.root.iterdir()
            if p.is_file() and _SIDECAR.match(p.name) and p.name != INDEX_NAME and not p.name.endswith(".py")
        )

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read now, not at huggingface_hub's import, so later settings count)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(src: str) -> Path:
    """A local model directory, or a hub repo id found in (or, when online, fetched into) the cache.

    A snapshot directory of the hub cache is a local directory like any other (its files are
    symlinks into ``blobs/``). A name of the form ``org/name`` that is not a local directory is
    looked up in the cache, then (unless ``HF_HUB_OFFLINE``) on the hub; the error says all three,
    since it may as well be a mistyped local path."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{src}: not a model directory (expected a directory with config.json and *.safetensors)")
        return path.resolve()
    if not _REPO_ID.match(src):
        raise ConversionError(f"{src}: no such directory (and not a hub repo id of the form org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*"]
    cache_dir = hub_cache_dir()
    not_here = f"{src}: no such local directory; not in the local hub cache ({cache_dir}) either"
    try:
        return Path(snapshot_download(src, local_files_only=True, allow_patterns=patterns, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        if _offline():
            raise ConversionError(f"{not_here}, and HF_HUB_OFFLINE is set, so the hub was not asked") from None
    try:
        return Path(snapshot_download(src, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as exc:  # network, auth, missing repo: one line for the user
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConversionError(f"{not_here}, and fetching it from the hub failed ({type(exc).__name__}: {reason})") from None


def read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise ConversionError(f"{root}: config.json is missing (not a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return config


def _inside(relative: str, where: str) -> str:
    """An index entry must name a file inside the model directory. The *name* is judged, not where
    the file leads: in the hub cache every file of a snapshot is a symlink into ``../../blobs/``,
    and where a symlink points is the cache's business. Refused: absolute paths (POSIX or with a
    drive), ``..`` anywhere, backslashes (a Windows separator smuggling ``..``) and empty names."""
    if not isinstance(relative, str) or not relative.strip() or "\\" in relative or "\0" in relative:
        raise ConversionError(f"{where}: refusing shard path {relative!r} outside the model directory")
    candidate = PurePosixPath(relative)
    if candidate.is_absolute() or PureWindowsPath(relative).drive or ".." in candidate.parts or not candidate.parts:
        raise ConversionError(f"{where}: refusing shard path {relative!r} outside the model directory")
    return candidate.as_posix()


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 1024 * 1024):
            raise ConversionError(f"{path}: corrupt safetensors header (header length {header_len}, file size {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConversionError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header")
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: corrupt safetensors header entry for {name}") from None
        if dtype not in BY_SAFETENSORS:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if end > data_len:
            raise ConversionError(
                f"{path}: truncated: tensor {name} ends at byte {end} of the data section but the file holds only {data_len}"
            )
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * BY_SAFETENSORS[dtype].itemsize:
            raise ConversionError(f"{path}: corrupt header: tensor {name} {dtype}{list(shape)} spans {end - start} bytes")
        infos[name] = TensorInfo(name, path.name, dtype, shape, end - start, 8 + header_len + start)
    return infos


def open_hf_checkpoint(src: str) -> HFCheckpoint:
    root = resolve_source(src)
    config = read_config(root)
    index_path = root / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError):
            raise ConversionError(f"{index_path}: not a valid safetensors index (needs a weight_map object)") from None
        files = sorted({_inside(rel, str(index_path)) for rel in weight_map.values()})
    elif (root / SINGLE_NAME).is_file():
        weight_map, files = None, [SINGLE_NAME]
    else:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(
                f"{root}: only pickle weights ({', '.join(pickles)}); ckptconv never unpickles checkpoints. "
                "Convert them to safetensors first in a trusted environment (e.g. save_pretrained(..., safe_serialization=True))"
            )
        raise ConversionError(f"{root}: no model.safetensors or {INDEX_NAME}")

    tensors: dict[str, TensorInfo] = {}
    for rel in files:
        path = root / rel
        if not path.is_file():
            raise ConversionError(f"{index_path}: names shard {rel} which does not exist")
        for name, info in read_safetensors_header(path).items():
            if name in tensors:
                raise ConversionError(f"{path}: tensor {name} also appears in {tensors[name].file}")
            tensors[name] = TensorInfo(name, rel, info.dtype, info.shape, info.nbytes, info.offset)
    if weight_map is not None:
        for name, rel in weight_map.items():
            if name not in tensors or tensors[name].file != Path(rel).as_posix():
                raise ConversionError(f"{index_path}: says {name} is in {rel}, but that shard's header does not have it")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise ConversionError(f"{index_path}: shards hold tensors the index does not list: {', '.join(extra[:5])}")
    return HFCheckpoint(root=root, config=config, tensors=tensors)
