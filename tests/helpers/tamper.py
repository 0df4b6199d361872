"""Make a wrong checkpoint out of a right one, in place: rows or whole chunks exchanged on disk.

A torch_dist chunk is a ``torch.save`` archive at (file, offset, length) given by ``.metadata``; its
tensor bytes are one stored record inside it. We load the chunk with ``torch.load``, edit it, and
write the new bytes over the old ones (same shape and dtype, so the archive stays valid). Rows are
found by their values -- the HF tensor's rows are looked up in the Megatron chunk -- so no test needs
a family's row arithmetic.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch


def _chunks(ckpt, key_pattern: str):
    """(reader, key, offsets, storage info) of every chunk whose key matches ``key_pattern``."""
    from ckptconv.formats.torch_dist import DistCheckpointReader

    reader = DistCheckpointReader(Path(ckpt))
    for (key, offsets), info in reader.metadata.storage.items():
        if offsets is not None and re.search(key_pattern, key):
            yield reader, key, offsets, info


def _load(reader, info) -> tuple[bytes, torch.Tensor]:
    with open(reader.directory / info.relative_path, "rb") as f:
        f.seek(info.offset)
        archive = f.read(info.length)
    return archive, torch.load(io.BytesIO(archive), weights_only=True)


def _store(reader, info, archive: bytes, before: torch.Tensor, after: torch.Tensor) -> None:
    old, new = (t.contiguous().view(torch.uint8).numpy().tobytes() for t in (before, after))
    at = archive.find(old)
    assert at >= 0 and archive.find(old, at + 1) < 0, "the chunk's data record is not unique in its archive"
    with open(reader.directory / info.relative_path, "r+b") as f:
        f.seek(info.offset + at)
        f.write(new)


def hf_rows(hf_dir, name_pattern: str) -> torch.Tensor:
    """The one HF tensor whose on-disk name matches ``name_pattern``."""
    from safetensors import safe_open

    found = []
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found += [f.get_tensor(k) for k in f.keys() if re.search(name_pattern, k)]
    assert len(found) == 1, f"{name_pattern}: {len(found)} HF tensors match"
    return found[0]


def _find_block(matrix: torch.Tensor, block: torch.Tensor) -> int | None:
    """First row index where ``block``'s rows sit contiguously in ``matrix``."""
    for start in (matrix == block[0]).all(dim=1).nonzero().flatten().tolist():
        if start + len(block) <= len(matrix) and torch.equal(matrix[start:start + len(block)], block):
            return start
    return None


def swap_row_blocks(ckpt, key_pattern: str, block_a: torch.Tensor, block_b: torch.Tensor) -> str:
    """Exchange two equally long row blocks (found by value) inside the one chunk that holds both."""
    for reader, key, offsets, info in _chunks(ckpt, key_pattern):
        archive, tensor = _load(reader, info)
        matrix = tensor.reshape(-1, tensor.shape[-1])
        a, b = _find_block(matrix, block_a), _find_block(matrix, block_b)
        if a is None or b is None:
            continue
        edited = matrix.clone()
        edited[a:a + len(block_a)], edited[b:b + len(block_b)] = matrix[b:b + len(block_b)], matrix[a:a + len(block_a)]
        _store(reader, info, archive, tensor, edited.reshape(tensor.shape))
        return key
    raise AssertionError(f"no chunk of {key_pattern} holds both row blocks")


def swap_chunks(ckpt, key_a: str, key_b: str) -> None:
    """Exchange the contents of two single-chunk tensors of the same shape and dtype."""
    (ra, _, _, ia), = _chunks(ckpt, re.escape(key_a) + "$")
    (rb, _, _, ib), = _chunks(ckpt, re.escape(key_b) + "$")
    archive_a, a = _load(ra, ia)
    archive_b, b = _load(rb, ib)
    assert a.shape == b.shape and a.dtype == b.dtype and not torch.equal(a, b)
    _store(ra, ia, archive_a, a, b)
    _store(rb, ib, archive_b, b, a)
