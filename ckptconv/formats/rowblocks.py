"""Row blocks: a tensor kept as the row-wise parts it is the concatenation of."""

from __future__ import annotations

from ckptconv.formats.array import cat, numel


class RowBlocks:
    """A tensor that is the concatenation of ``parts`` along dim 0, kept as its parts.

    Megatron's fused layouts are row concatenations (padding rows after the vocabulary, ...). The
    streaming converter writes such a tensor block by block, so it never allocates the fused copy:
    for the embedding of a large vocabulary that copy would be the peak of the whole conversion.
    """

    def __init__(self, parts: list, shape: tuple[int, ...] | None = None):
        """``shape``: the shape the concatenation is viewed as (e.g. ``[E, F, H]`` for E stacked
        ``[F, H]`` experts); default ``[sum of rows, *trailing]``."""
        # Blocks of blocks (a row slice of chunks that were themselves read as blocks, e.g. one
        # query group of a TP-split fused QKV) are flattened: writers take parts that are tensors.
        flat = []
        for p in parts:
            if isinstance(p, RowBlocks):
                flat.extend(p.parts if p._plain_rows() else [p.materialize()])
            else:
                flat.append(p)
        parts = flat
        self.parts = [p for p in parts if p.ndim == 0 or p.shape[0]] or parts[:1]
        first = self.parts[0]
        self.dtype = first.dtype
        rows = (sum(p.shape[0] if p.ndim else 1 for p in self.parts), *first.shape[1:])
        self.shape = tuple(shape) if shape is not None else rows
        if any(tuple(p.shape[1:]) != tuple(first.shape[1:]) or p.dtype != first.dtype for p in self.parts):
            raise ValueError("row blocks must agree in trailing shape and dtype")
        if numel(self.shape) != numel(rows):
            raise ValueError(f"row blocks of {numel(rows)} elements cannot be viewed as {list(self.shape)}")

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _plain_rows(self) -> bool:
        """True when ``shape`` is the parts stacked row after row (no other view of them)."""
        return self.shape == (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])

    def __getitem__(self, index):
        """A row slice stays blocks (one block comes back as itself, e.g. the gate half of a
        SwiGLU fc1 read from its two chunks); any other index reads the materialized tensor."""
        rows = index[0] if isinstance(index, tuple) and len(index) == 1 else index
        if isinstance(rows, slice) and rows.step in (None, 1) and self._plain_rows():
            start, stop, _ = rows.indices(self.shape[0])
            picked = self.narrow_rows(start, max(stop - start, 0))
            return picked.parts[0] if len(picked.parts) == 1 else picked
        return self.materialize()[index]

    def contiguous(self) -> "RowBlocks":
        return self  # each part is made contiguous when it is written

    def reshape(self, *shape):
        return self.materialize().reshape(*shape)

    def to_torch(self):
        whole = self.materialize()
        return whole.to_torch() if hasattr(whole, "to_torch") else whole

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def to(self, dtype) -> "RowBlocks":
        return RowBlocks([p.to(dtype) for p in self.parts], self.shape)

    def narrow_rows(self, start: int, length: int) -> "RowBlocks":
        out, row = [], 0
        for part in self.parts:
            lo, hi = max(start, row), min(start + length, row + part.shape[0])
            if lo < hi:
                out.append(part[lo - row: hi - row])
            row += part.shape[0]
        return RowBlocks(out)

    def materialize(self):
        whole = cat([p.reshape(-1, *p.shape[1:]) for p in self.parts], dim=0) if len(self.parts) > 1 else self.parts[0]
        return whole.reshape(self.shape)
