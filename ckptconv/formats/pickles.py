"""Write the few pickles a torch_dist checkpoint holds, without importing the classes they name.

A chunk's ``data.pkl`` names ``torch._utils._rebuild_tensor_v2`` and ``torch.BFloat16Storage``; the
``.metadata`` file names DCP's dataclasses. ``pickle.dumps`` can only name a class it has imported,
and importing those costs 2.3 s of a conversion that otherwise needs neither. The pickle format is a
small stack language (PEP 307, protocol 2), so we emit the opcodes ourselves: :class:`Global` names a
class or function by module and name, :class:`Call` applies one (``REDUCE``), :class:`Obj` builds an
instance the way the stdlib pickles dataclasses (``NEWOBJ`` + ``BUILD``), :class:`PersistentId` is
torch's storage reference. Tensor ``data.pkl`` comes out byte-identical to ``torch.save``'s (tested),
including the memo entries, so checkpoints stay byte-comparable with torch-written ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True, eq=False)  # hashed by identity: an Obj may be a dict key (DCP's MetadataIndex)
class Call:
    func: Global
    args: tuple


@dataclass(frozen=True, eq=False)
class Obj:
    cls: Global
    state: object = None
    """``__dict__`` contents (a dict) or a ``__setstate__`` argument; None: no BUILD."""


@dataclass(frozen=True)
class PersistentId:
    value: tuple


class _Emitter:
    def __init__(self):
        self.out: list[bytes] = [b"\x80\x02"]
        self.memo = 0
        self.seen: dict = {}
        """Globals and strings already on the memo -> their memo slot. The stdlib pickler emits an
        object it has seen as a memo reference (BINGET); so do we, for class names and strings, which
        repeat once per chunk in a checkpoint's ``.metadata`` (3x smaller, docs/benchmarks.md)."""

    def put(self, seen_as=None) -> None:
        """Memoize the object on top of the stack, as the stdlib pickler does."""
        self.out.append(b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo))
        if seen_as is not None:
            self.seen[seen_as] = self.memo
        self.memo += 1

    def get(self, seen_as) -> bool:
        """Push the memoized object again (BINGET / LONG_BINGET); False when it is not on the memo."""
        slot = self.seen.get(seen_as)
        if slot is None:
            return False
        self.out.append(b"h" + bytes([slot]) if slot < 256 else b"j" + struct.pack("<I", slot))
        return True

    def emit(self, value) -> None:
        out = self.out
        if value is None:
            out.append(b"N")
        elif value is True or value is False:
            out.append(b"\x88" if value else b"\x89")
        elif isinstance(value, float):
            out.append(b"G" + struct.pack(">d", value))  # BINFLOAT, as the stdlib writes it
        elif isinstance(value, int):
            if 0 <= value <= 0xFF:
                out.append(b"K" + bytes([value]))
            elif 0 <= value <= 0xFFFF:
                out.append(b"M" + struct.pack("<H", value))
            elif -(2**31) <= value < 2**31:
                out.append(b"J" + struct.pack("<i", value))
            else:
                raw = value.to_bytes((value.bit_length() >> 3) + 1, "little", signed=True)
                out.append(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(value, str):
            if self.get(("str", value)):
                return
            raw = value.encode("utf-8")
            out.append(b"X" + struct.pack("<I", len(raw)) + raw)
            self.put(("str", value))
        elif isinstance(value, tuple):
            if not value:
                out.append(b")")
                return
            if len(value) <= 3:
                for item in value:
                    self.emit(item)
                out.append(b"\x85\x86\x87"[len(value) - 1:len(value)])
            else:
                out.append(b"(")
                for item in value:
                    self.emit(item)
                out.append(b"t")
            self.put()
        elif isinstance(value, list):
            out.append(b"]")
            self.put()
            for batch in _batches(value):  # as the stdlib does: APPEND for one, APPENDS per 1000
                if len(batch) == 1:
                    self.emit(batch[0])
                    out.append(b"a")
                else:
                    out.append(b"(")
                    for item in batch:
                        self.emit(item)
                    out.append(b"e")
        elif isinstance(value, dict):
            out.append(b"}")
            self.put()
            for batch in _batches(list(value.items())):
                if len(batch) == 1:
                    self.emit(batch[0][0])
                    self.emit(batch[0][1])
                    out.append(b"s")
                else:
                    out.append(b"(")
                    for key, item in batch:
                        self.emit(key)
                        self.emit(item)
                    out.append(b"u")
        elif isinstance(value, Global):
            if self.get(value):
                return
            out.append(f"c{value.module}\n{value.name}\n".encode())
            self.put(value)
        elif isinstance(value, Call):
            self.emit(value.func)
            self.emit(tuple(value.args))
            out.append(b"R")
            self.put()
        elif isinstance(value, Obj):
            self.emit(value.cls)
            out.append(b")\x81")  # cls.__new__(cls)
            self.put()
            if value.state is not None:
                self.emit(value.state)
                out.append(b"b")
        elif isinstance(value, PersistentId):
            self.emit(value.value)
            out.append(b"Q")
        else:
            raise TypeError(f"cannot pickle {type(value).__name__}")


def _batches(items: list, size: int = 1000) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def dumps(value) -> bytes:
    emitter = _Emitter()
    emitter.emit(value)
    emitter.out.append(b".")
    return b"".join(emitter.out)


def tensor_data_pkl(dtype, shape: tuple[int, ...]) -> bytes:
    """``data.pkl`` of ``torch.save(t)`` for a contiguous tensor ``t`` of ``dtype`` (a
    :class:`~ckptconv.formats.array.DType`) whose storage (record ``data/0``) holds exactly its elements."""
    numel, strides, stride = 1, [], 1
    for d in reversed(shape):
        strides.append(stride)
        stride *= d
        numel *= d
    hooks = Call(Global("collections", "OrderedDict"), ())
    geometry = (0, tuple(shape), tuple(reversed(strides)), False, hooks)
    if dtype.storage is None:  # newer dtypes: an untyped storage of bytes, the dtype passed along
        storage = PersistentId(("storage", Global("torch.storage", "UntypedStorage"), "0", "cpu", numel * dtype.itemsize))
        return dumps(Call(Global("torch._utils", "_rebuild_tensor_v3"), (storage, *geometry, Global("torch", dtype.torch_name))))
    storage = PersistentId(("storage", Global("torch", dtype.storage), "0", "cpu", numel))
    return dumps(Call(Global("torch._utils", "_rebuild_tensor_v2"), (storage, *geometry)))
