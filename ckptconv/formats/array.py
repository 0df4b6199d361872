"""Checkpoint tensors as numpy arrays of raw bits: conversion without importing torch.

Converting a checkpoint is moving bytes: slicing rows, interleaving QKV heads, appending pad rows,
transposing a router. None of it does arithmetic, so none of it needs torch — and importing torch
(1.4 s) plus torch.distributed.checkpoint (0.9 s more) costs more than copying a 3 GB model. An
:class:`Array` is a numpy array of same-width integers (the raw bits; numpy has no bfloat16) tagged
with the checkpoint dtype. It offers the few tensor methods the transforms use, under torch's names,
so a transform works on an ``Array`` and on a ``torch.Tensor`` alike. torch is imported only to
change a dtype (``--dtype``), where there is arithmetic to do.

"Meta" arrays carry a shape and no data (zero strides over one element): the converter runs every
transform on them before writing anything, to check shapes, as it would with torch's meta device.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided


@dataclass(frozen=True, eq=False)
class DType:
    safetensors: str
    """Name in a safetensors header, e.g. ``BF16``."""
    torch_name: str
    """``torch.<name>``; also how DCP metadata and torch.save name it."""
    storage: str | None
    """torch's legacy typed-storage class, which ``torch.save`` records for each storage; None for
    dtypes torch saves as an untyped storage plus the dtype (``_rebuild_tensor_v3``)."""
    itemsize: int
    is_floating_point: bool

    @property
    def raw(self) -> np.dtype:
        """The numpy integer type holding the bits."""
        return np.dtype(f"<i{self.itemsize}")

    def to_torch(self):
        import torch

        return getattr(torch, self.torch_name)

    def __repr__(self) -> str:
        return f"torch.{self.torch_name}"

    def __eq__(self, other) -> bool:
        """Equal to the same DType and to the ``torch.dtype`` of the same name."""
        if isinstance(other, DType):
            return self.torch_name == other.torch_name
        return type(other).__name__ == "dtype" and str(other) == f"torch.{self.torch_name}"

    def __hash__(self) -> int:
        return hash(self.torch_name)


DTYPES = [
    DType("F64", "float64", "DoubleStorage", 8, True),
    DType("F32", "float32", "FloatStorage", 4, True),
    DType("F16", "float16", "HalfStorage", 2, True),
    DType("BF16", "bfloat16", "BFloat16Storage", 2, True),
    DType("F8_E4M3", "float8_e4m3fn", None, 1, True),
    DType("F8_E5M2", "float8_e5m2", None, 1, True),
    DType("I64", "int64", "LongStorage", 8, False),
    DType("I32", "int32", "IntStorage", 4, False),
    DType("I16", "int16", "ShortStorage", 2, False),
    DType("I8", "int8", "CharStorage", 1, False),
    DType("U8", "uint8", "ByteStorage", 1, False),
    DType("BOOL", "bool", "BoolStorage", 1, False),
]
BY_SAFETENSORS = {d.safetensors: d for d in DTYPES}
BY_TORCH_NAME = {d.torch_name: d for d in DTYPES}
BY_STORAGE = {d.storage: d for d in DTYPES if d.storage}
BF16, F16, F32 = BY_SAFETENSORS["BF16"], BY_SAFETENSORS["F16"], BY_SAFETENSORS["F32"]


def numel(shape) -> int:
    """Elements in a tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    return n


def dtype_of(dtype) -> DType:
    """A :class:`DType` from a DType, a ``torch.dtype`` or a torch name (``"bfloat16"``)."""
    if isinstance(dtype, DType):
        return dtype
    name = str(dtype).removeprefix("torch.")
    try:
        return BY_TORCH_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}") from None


class FileBacking:
    """A private mapping of a file range that arrays are views of.

    Arrays made from it carry it along (views keep it; copies are simply no longer inside it), so
    a writer can tell that an array's bytes are still exactly a range of the file and copy them
    file to file (``pages.file_range``). It holds the mapping alive and its own descriptor of the
    file, so neither can be reused for something else while an array still points here.
    """

    __slots__ = ("region", "address", "length", "fd", "file_offset")

    @classmethod
    def map(cls, fd: int, offset: int, length: int) -> tuple[memoryview, "FileBacking"]:
        """Map ``length`` bytes of ``fd`` from ``offset``: (those bytes, their backing).

        MAP_PRIVATE + PROT_WRITE: writable (torch wants a writable tensor when a cast needs one),
        and no write ever reaches the file; the page cache is used in place, no copy."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(fd, offset + length - start, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        return memoryview(region)[offset - start:], cls(region, fd, start)

    def __init__(self, region: mmap.mmap, fd: int, file_offset: int):
        self.region = region
        probe = np.frombuffer(region, dtype=np.uint8)
        self.address, self.length = probe.__array_interface__["data"][0], len(region)
        del probe
        self.fd = os.dup(fd)
        self.file_offset = file_offset
        """Offset in the file of the mapping's first byte."""

    def __del__(self):
        os.close(self.fd)


class Array:
    """A tensor of ``dtype`` whose bits are the numpy array ``raw`` (a view wherever possible)."""

    __slots__ = ("raw", "dtype", "meta", "backing")

    def __init__(self, raw: np.ndarray, dtype: DType, meta: bool = False, backing: FileBacking | None = None):
        if raw.dtype.itemsize != dtype.itemsize:
            raise ValueError(f"{raw.dtype} cannot hold {dtype}")
        self.raw, self.dtype, self.meta, self.backing = raw, dtype, meta, backing

    # -- making arrays ------------------------------------------------------------------------
    @classmethod
    def frombuffer(cls, buffer, dtype: DType, shape: tuple[int, ...], offset: int = 0,
                   backing: FileBacking | None = None) -> "Array":
        raw = np.frombuffer(buffer, dtype=dtype.raw, count=numel(shape), offset=offset).reshape(shape)
        return cls(raw, dtype, backing=backing)

    @classmethod
    def empty_meta(cls, shape: tuple[int, ...], dtype: DType) -> "Array":
        """Shape and dtype only; no memory behind it."""
        one = np.zeros(1, dtype=dtype.raw)
        return cls(as_strided(one, tuple(shape), (0,) * len(shape), writeable=False), dtype, meta=True)

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: DType) -> "Array":
        return cls(np.zeros(tuple(shape), dtype=dtype.raw), dtype)  # all-zero bits are +0.0 in every float type

    @classmethod
    def from_torch(cls, tensor) -> "Array":
        """The same memory as a torch tensor (for tests and for casts)."""
        import torch

        dtype = dtype_of(tensor.dtype)
        bits = tensor.detach().cpu().view(getattr(torch, f"int{dtype.itemsize * 8}"))
        return cls(bits.numpy(), dtype)

    def to_torch(self):
        """A torch tensor over the same memory (a meta tensor for a meta array)."""
        import torch

        if self.meta:
            return torch.empty(self.shape, dtype=self.dtype.to_torch(), device="meta")
        raw = self.raw if self.raw.flags.writeable else self.raw.copy()
        return torch.from_numpy(raw).view(self.dtype.to_torch())

    # -- what transforms use (torch's names) ----------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    @property
    def nbytes(self) -> int:
        return self.raw.size * self.dtype.itemsize

    def numel(self) -> int:
        return self.raw.size

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def _like(self, raw: np.ndarray) -> "Array":
        return Array(raw, self.dtype, self.meta, self.backing)

    def __getitem__(self, index) -> "Array":
        return self._like(self.raw[index])

    def reshape(self, *shape) -> "Array":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self._like(self.raw.reshape(shape))

    def t(self) -> "Array":
        if self.ndim != 2:
            raise ValueError(f"t() expects a 2D tensor, got shape {list(self.shape)}")
        return self._like(self.raw.T)

    def unbind(self, dim: int = 0) -> list["Array"]:
        if dim != 0:
            raise ValueError("unbind is only supported along dim 0")
        return [self[i] for i in range(self.shape[0])]

    def is_contiguous(self) -> bool:
        return self.meta or self.raw.flags.c_contiguous

    def contiguous(self) -> "Array":
        return self if self.is_contiguous() else self._like(np.ascontiguousarray(self.raw))

    def new_zeros(self, shape) -> "Array":
        if self.meta:
            return Array.empty_meta(tuple(shape), self.dtype)
        return Array.zeros(tuple(shape), self.dtype)

    def to(self, dtype) -> "Array":
        """Change the dtype (numeric conversion, done by torch: the one place it is needed)."""
        dtype = dtype_of(dtype)
        if dtype == self.dtype:
            return self
        if self.meta:
            return Array.empty_meta(self.shape, dtype)
        return Array.from_torch(self.to_torch().to(dtype.to_torch()))

    def data_ptr(self) -> int:
        return self.raw.__array_interface__["data"][0]

    def file_range(self) -> tuple[int, int] | None:
        """(fd, offset) when this array's bytes are, unchanged and contiguous, a range of the file
        it was mapped from; else None."""
        backing = self.backing
        if backing is None or self.meta or not self.raw.flags.c_contiguous or self.nbytes == 0:
            return None
        start = self.data_ptr()
        if backing.address <= start and start + self.nbytes <= backing.address + backing.length:
            return backing.fd, backing.file_offset + (start - backing.address)
        return None

    def bytes_view(self) -> memoryview:
        """The bytes of a contiguous array, without a copy."""
        if self.meta or not self.raw.flags.c_contiguous:
            raise ValueError("bytes_view needs a contiguous array with data")
        return memoryview(self.raw.reshape(-1).view(np.uint8))

    def __repr__(self) -> str:
        return f"Array(shape={list(self.shape)}, dtype={self.dtype}{', meta' if self.meta else ''})"


def as_array(tensor) -> Array:
    """An :class:`Array` for an Array or a torch tensor (same memory)."""
    return tensor if isinstance(tensor, Array) else Array.from_torch(tensor)


def cat(parts: list, dim: int = 0):
    """Concatenate Arrays (or torch tensors, with torch) along ``dim``."""
    if not isinstance(parts[0], Array):
        import torch

        return torch.cat(parts, dim=dim)
    first = parts[0]
    if any(p.dtype != first.dtype for p in parts):
        raise ValueError("cat: dtypes differ")
    if any(p.meta for p in parts):
        def others(p):
            return p.shape[:dim] + p.shape[dim + 1:]

        if any(others(p) != others(first) for p in parts):
            raise ValueError("cat: shapes differ outside the concatenated dim")
        shape = list(first.shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        return Array.empty_meta(tuple(shape), first.dtype)
    return Array(np.concatenate([p.raw for p in parts], axis=dim), first.dtype)


def stack(parts: list):
    """Stack along a new leading axis."""
    return cat([p.reshape(1, *p.shape) for p in parts], dim=0)


def split(tensor, sizes: list[int], dim: int):
    """Views of consecutive pieces of ``sizes`` along ``dim`` (Arrays and torch tensors alike)."""
    if sum(sizes) != tensor.shape[dim]:
        raise ValueError(f"split sizes {sizes} do not add up to {tensor.shape[dim]}")
    out, start = [], 0
    for size in sizes:
        out.append(tensor[(slice(None),) * dim + (slice(start, start + size),)])
        start += size
    return out


def chunk(tensor, parts: int, dim: int):
    return split(tensor, [tensor.shape[dim] // parts] * parts, dim)
