"""Layer-streamed verify: both models run their own forward, one stage's weights in memory at a time.

Both the Hugging Face model and the family's Megatron model are built with every parameter on the
meta device (no memory; buffers such as RoPE frequencies stay real). Each *stage* the family lists
(:mod:`ckptconv.verify.stages`) is a module on each side; forward hooks on it

* before it runs, read that stage's weights -- HF: its on-disk tensors from the safetensors, loaded
  by transformers' own conversion (``convert_and_load_state_dict_in_model``, as ``from_pretrained``
  does); Megatron: the box of each checkpoint tensor this rank's stage parameters cover (one layer's
  slice of a stacked key, this rank's TP shard), read chunk by chunk from the torch_dist checkpoint
  as a pipeline stage loads it;
* after it ran, record its input and output and put the meta parameters back (the weights are freed).

The forward passes are the models' own -- the code the whole-model verify runs -- so the layerwise
path adds no model code of its own. Two chains are recorded per input:

* *free-running*: each side feeds itself (the end-to-end drift);
* *teacher-forced*: while a Megatron stage's weights are loaded it runs a second time, on the input
  HF gave the same stage, so each stage's own error is measured alone.

Memory: one stage of one side at a time (HF runs the input first, then Megatron), plus activations.
Under torchrun each rank builds its TP model and reads its own TP slices; rank 0 alone runs HF and
hands the recorded stage inputs to every rank for the teacher-forced runs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ckptconv.errors import ConversionError
from ckptconv.verify.stages import SEQ_FIRST, Stage

TEACHER_FORCED, FREE_RUNNING = "teacher-forced", "free-running"


# =========================================================================== building on meta


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with every parameter on the meta device and every buffer real.

    ``nn.Module.register_parameter`` is wrapped for the duration: a parameter is re-registered as a
    meta tensor keeping its attributes (megatron's ``tensor_model_parallel``, ``partition_dim``...).
    Tied weights stay tied (assigning an existing meta parameter keeps the object).
    """
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.data.to("meta"), requires_grad=False)
            meta.__dict__.update(param.__dict__)
            param = meta
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def move_buffers(model: nn.Module, device) -> None:
    """``model.to(device)`` would try to copy the meta parameters; buffers alone move."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != torch.device(device):
                module._buffers[name] = buf.to(device)


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split(".") if path else ():
        try:
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError):
            raise ConversionError(f"layerwise verify: {type(root).__name__} has no module {path!r}") from None
    return module


class ParameterSlots:
    """Every distinct parameter of a model, every place it is attached (tied weights: several), and
    its meta original, so a stage's parameters can be swapped for loaded tensors and back."""

    def __init__(self, model: nn.Module):
        self.owners: dict[int, list[tuple[nn.Module, str]]] = {}
        self.meta: dict[int, nn.Parameter] = {}
        self.names: dict[int, list[str]] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for name, param in module._parameters.items():
                if param is None:
                    continue
                pid = id(param)
                owners = self.owners.setdefault(pid, [])
                if not any(m is module and n == name for m, n in owners):
                    owners.append((module, name))
                    self.names.setdefault(pid, []).append(f"{module_name}.{name}" if module_name else name)
                self.meta[pid] = param
        real = [names[0] for pid, names in self.names.items() if self.meta[pid].device.type != "meta"]
        if real:
            raise ConversionError(f"layerwise verify: parameters were not built on meta: {', '.join(real[:5])}")

    def of(self, modules) -> list[int]:
        pids: list[int] = []
        for module in modules:
            for param in module.parameters():
                pid = self._pid(param)
                if pid is not None and pid not in pids:
                    pids.append(pid)
        return pids

    def _pid(self, param) -> int | None:
        if id(param) in self.meta:
            return id(param)
        for pid, owners in self.owners.items():  # a loaded parameter: find its slot by place
            if any(m._parameters.get(n) is param for m, n in owners):
                return pid
        return None

    def set(self, pid: int, tensor: torch.Tensor) -> None:
        loaded = nn.Parameter(tensor, requires_grad=False)
        loaded.__dict__.update(self.meta[pid].__dict__)
        for module, name in self.owners[pid]:
            module._parameters[name] = loaded

    def current(self, pid: int) -> torch.Tensor:
        module, name = self.owners[pid][0]
        return module._parameters[name]

    def release(self, pids) -> None:
        for pid in pids:
            for module, name in self.owners[pid]:
                module._parameters[name] = self.meta[pid]


# =========================================================================== loading one stage


class MegatronStageLoader:
    """A stage's parameters from the torch_dist checkpoint: for each, the boxes of checkpoint tensors
    the model's own ``sharded_state_dict()`` says this rank's shard is (layer offset of a stacked
    key, TP offsets; SwiGLU fc1's gate and up pieces)."""

    def __init__(self, model: nn.Module, reader, device):
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

        self.slots = ParameterSlots(model)
        self.reader = reader
        self.device = device
        self.pieces: dict[int, list[tuple[ShardedTensor, int]]] = {}
        self.buffer_pieces: dict[int, list[ShardedTensor]] = {}
        expected: dict[str, tuple[int, ...]] = {}
        stack = [model.sharded_state_dict()]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, (list, tuple)):
                stack.extend(node)
            elif isinstance(node, ShardedTensorFactory):
                param = node.data
                built = node.build()
                for leaf in built.values() if isinstance(built, dict) else built:
                    # The pieces are row views of the parameter; on meta tensors the storage offset
                    # still says where each one starts.
                    row = leaf.data.storage_offset() // max(param.stride(0), 1) if param.dim() else 0
                    self.pieces.setdefault(id(param), []).append((leaf, row))
                    expected[leaf.key] = tuple(leaf.global_shape)
            elif isinstance(node, ShardedTensor):
                if id(node.data) in self.slots.meta:
                    self.pieces.setdefault(id(node.data), []).append((node, 0))
                else:  # a persistent buffer (a router's expert bias): filled in place
                    self.buffer_pieces.setdefault(id(node.data), []).append(node)
                expected[node.key] = tuple(node.global_shape)
            elif not isinstance(node, ShardedObject):
                continue
        self._check_keys(expected)
        unkeyed = [self.slots.names[pid][0] for pid in self.slots.meta if pid not in self.pieces]
        if unkeyed:
            raise ConversionError(f"layerwise verify: Megatron parameters with no checkpoint key: {', '.join(unkeyed[:5])}")

    def _check_keys(self, expected: dict[str, tuple[int, ...]]) -> None:
        """What a strict ``dist_checkpointing.load`` checks, up front: same keys, same global shapes."""
        stored = {k: tuple(self.reader.shape(k)) for k in self.reader.tensor_keys()}
        missing = sorted(set(expected) - set(stored))
        unused = sorted(set(stored) - set(expected))
        where = self.reader.directory
        if missing:
            raise ConversionError(f"{where}: checkpoint keys do not match the model; missing from checkpoint: {_short(missing)}")
        if unused:
            raise ConversionError(f"{where}: checkpoint keys do not match the model; not used by the model: {_short(unused)}")
        for key, shape in expected.items():
            if stored[key] != shape:
                raise ConversionError(f"{where}: {key} has global shape {list(stored[key])}, the model expects {list(shape)}")

    def _box(self, leaf, out: torch.Tensor | None = None) -> torch.Tensor:
        extents = (1,) * leaf.prepend_axis_num + tuple(leaf.local_shape)
        target = None if out is None else out.view(extents)
        box = read_box(self.reader, leaf.key, tuple(leaf.global_offset), extents, leaf.dtype, out=target)
        return box.reshape(leaf.local_shape)

    def load(self, modules) -> list[int]:
        pids = self.slots.of(modules)
        for pid in pids:
            meta = self.slots.meta[pid]
            real = torch.empty(meta.shape, dtype=meta.dtype)
            for leaf, row in self.pieces[pid]:
                # Read straight into the parameter (its rows for a piece): no second full-size buffer.
                rows = math.prod(leaf.local_shape[:1]) if leaf.local_shape else 1
                self._box(leaf, out=real[row: row + rows] if real.dim() else real)
            self.slots.set(pid, real.to(self.device))
        for module in modules:
            for buf in module.buffers():
                for leaf in self.buffer_pieces.get(id(buf), ()):
                    buf.copy_(self._box(leaf).to(dtype=buf.dtype, device=buf.device))
        return pids

    def release(self, pids) -> None:
        self.slots.release(pids)


def read_box(reader, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``key[offsets : offsets + sizes]``, assembled from every stored chunk that overlaps it --
    whatever TP/PP/EP layout wrote the checkpoint. Each chunk is a private mapping of just its
    byte range (:class:`ckptconv.formats.torch_dist.DistCheckpointReader`), gone once copied."""
    shape = reader.shape(key)
    if len(offsets) != len(shape):
        raise ConversionError(f"{key}: stored with shape {list(shape)}, the model asks for a {len(offsets)}-D box")
    if out is None:
        out = torch.empty(sizes, dtype=dtype)
    elif tuple(out.shape) != tuple(sizes) or out.dtype != dtype:
        raise ConversionError(f"{key}: box {list(sizes)} {dtype} does not fit the parameter's {list(out.shape)} {out.dtype}")
    filled = 0
    for chunk in reader.chunks(key):
        lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
        hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        stored = reader.read_chunk(key, chunk)
        part = stored.to_torch()[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))]
        _copy_dropping_pages(out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))], part, stored.backing)
        filled += part.numel()
        del stored, part
    if filled != out.numel():
        raise ConversionError(f"{key}{list(offsets)}: the checkpoint's chunks cover {filled} of {out.numel()} elements")
    return out


COPY_BLOCK_BYTES = 64 << 20
"""Bytes of source converted at a time: a stage's weights never sit in memory twice (source dtype +
compute dtype), only the block in flight does."""


def _copy_dropping_pages(out: torch.Tensor, source: torch.Tensor, backing) -> None:
    """``out[...] = source`` (casting) block by block along the first axis. ``source`` is a view of
    a private file mapping: the pages read are dropped after each block (``MADV_DONTNEED``; a
    private, never-written mapping re-reads them from the file if touched again), so a 1 GiB chunk
    does not stay resident next to its converted copy."""
    import mmap

    if source.dim() == 0 or backing is None or not hasattr(mmap, "MADV_DONTNEED"):
        out.copy_(source)
        return
    row_bytes = max(1, source[0].numel() * source.element_size())
    step = max(1, COPY_BLOCK_BYTES // row_bytes)
    for start in range(0, source.shape[0], step):
        block = source[start: start + step]
        out[start: start + step] = block
        first = block.data_ptr() - backing.address
        last = (block[-1].data_ptr() - backing.address) + row_bytes
        first -= first % mmap.PAGESIZE
        last = min(last - last % mmap.PAGESIZE, backing.length)
        if last > first:
            backing.region.madvise(mmap.MADV_DONTNEED, first, last - first)


class SafetensorsFile:
    """One safetensors file read tensor by tensor with ``pread`` (no whole-file mapping, whose pages
    would stay resident): the 8-byte header length, the JSON header, then each tensor's byte range,
    converted to the wanted dtype one block at a time."""

    DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: str):
        import json
        import os
        import struct

        self.path = path
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries = header
        self.size = os.path.getsize(path)

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        import os

        entry = self.entries[key]
        stored = self.DTYPES.get(entry["dtype"])
        if stored is None:
            raise ConversionError(f"{self.path}: {key} has dtype {entry['dtype']}, which verify cannot read")
        begin, end = (self.data_start + o for o in entry["data_offsets"])
        shape = tuple(entry["shape"])
        if end > self.size:
            raise ConversionError(f"{self.path}: truncated ({key} needs bytes up to {end}, the file has {self.size})")
        out = torch.empty(shape, dtype=dtype or stored)
        flat = out.view(-1)
        itemsize = torch.empty((), dtype=stored).element_size()
        step = max(1, COPY_BLOCK_BYTES // itemsize)
        if flat.numel() == 0:
            return out
        buffer = bytearray(min(step, flat.numel()) * itemsize)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for first in range(0, flat.numel(), step):
                n = min(step, flat.numel() - first)
                view = memoryview(buffer)[: n * itemsize]
                if os.preadv(fd, [view], begin + first * itemsize) != len(view):
                    raise ConversionError(f"{self.path}: short read of {key}")
                flat[first: first + n] = torch.frombuffer(buffer, dtype=stored, count=n)
        finally:
            os.close(fd)
        return out


class HFStageLoader:
    """A stage's parameters from the safetensors, through transformers' own loading: the stage's
    on-disk tensors (found by transformers' renaming of every on-disk key) are handed to
    ``convert_and_load_state_dict_in_model``, which applies the model's conversions (expert fusion,
    q/k/v splits and permutations) exactly as ``from_pretrained`` does."""

    def __init__(self, model: nn.Module, hf_dir: Path, dtype, device):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        self.model = model
        self.slots = ParameterSlots(model)
        self.dtype, self.device = dtype, device
        self.mapping = get_model_conversion_mapping(model)
        renamings = [m for m in self.mapping if not isinstance(m, WeightConverter)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta_state = model.state_dict(keep_vars=True)
        pid_of = {name: pid for pid, names in self.slots.names.items() for name in names}
        self.module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.keys_of: dict[int, list[tuple[str, str]]] = {}
        self.buffer_keys: dict[str, list[tuple[str, str]]] = {}
        paths = sorted(Path(hf_dir).glob("*.safetensors"))
        if not paths:
            raise ConversionError(f"{hf_dir}: no *.safetensors files")
        self.files: dict[str, SafetensorsFile] = {}
        self.cast_to: dict[str, torch.dtype] = {}
        """On-disk key -> the dtype transformers would give it (a renamed parameter keeps its model
        dtype, e.g. fp32 routers; converter inputs are read as stored and cast by transformers)."""
        for path in paths:
            handle = self.files[str(path)] = SafetensorsFile(str(path))
            for key in handle.keys():
                target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
                targets = [target]
                if pattern is None and target in meta_state:
                    self.cast_to[key] = meta_state[target].dtype
                if pattern is not None:  # one tensor, several parameters (q/k/v; text/vision bias rows)
                    converter = by_pattern[pattern]
                    targets = [target.replace(converter.target_patterns[0], t) for t in converter.target_patterns]
                for name in targets:
                    if name in pid_of:
                        self.keys_of.setdefault(pid_of[name], []).append((str(path), key))
                    elif name in meta_state:  # a persistent buffer (a router's score-correction bias)
                        self.buffer_keys.setdefault(name, []).append((str(path), key))
                    # anything else the model does not use, and transformers ignores it too

    def load(self, modules) -> list[int]:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        pids = self.slots.of(modules)
        wanted: dict[str, str] = {}  # on-disk key -> file
        for pid in pids:
            if pid not in self.keys_of:
                raise ConversionError(f"layerwise verify: no safetensors tensor holds HF parameter {self.slots.names[pid][0]}")
            wanted.update({key: path for path, key in self.keys_of[pid]})
        for module in modules:
            prefix = self.module_names[id(module)]
            for name, _ in module.named_buffers():
                wanted.update({key: path for path, key in self.buffer_keys.get(f"{prefix}.{name}" if prefix else name, ())})
        # A converter also makes the sibling parameters of what it reads; other stages' go back.
        siblings = {p for p, keys in self.keys_of.items() if p not in pids and any(k in wanted for _, k in keys)}
        config = LoadStateDictConfig(weight_mapping=self.mapping, dtype=self.dtype, device_map={"": str(self.device)})
        hf_logging.disable_progress_bar()
        state = {key: self.files[path].read(key, self.cast_to.get(key)) for key, path in wanted.items()}
        convert_and_load_state_dict_in_model(self.model, state, config)
        del state
        for pid in pids:  # tied parameters: transformers set one place; attach it to all
            loaded = [m._parameters[n] for m, n in self.slots.owners[pid] if m._parameters[n].device.type != "meta"]
            if not loaded:
                raise ConversionError(f"layerwise verify: transformers did not load {self.slots.names[pid][0]}")
            self.slots.set(pid, loaded[0].data)
        self.slots.release(siblings)
        return pids

    def release(self, pids) -> None:
        self.slots.release(pids)


# =========================================================================== hooks


def primary(output) -> torch.Tensor:
    """The activation a module hands on: itself, or the first element of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        return output[0]
    raise ConversionError(f"layerwise verify: no activation in a {type(output).__name__}")


def _activation(args, kwargs):
    """The activation input: the first positional tensor (HF blocks), else ``hidden_states=``
    (megatron's TransformerBlock calls its layers with keywords)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("hidden_states")


def _replace_activation(args, kwargs, value):
    if args and isinstance(args[0], torch.Tensor):
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


@dataclass
class Recording:
    """What one model did on one input, stage by stage (every call, in order)."""

    inputs: dict[str, list] = field(default_factory=dict)
    outputs: dict[str, list] = field(default_factory=dict)
    teacher: dict[str, list] = field(default_factory=dict)
    routers: dict[tuple[str, str], list] = field(default_factory=dict)
    teacher_routers: dict[tuple[str, str], list] = field(default_factory=dict)
    stage_bytes: int = 0
    """Largest weight bytes held for one stage."""


class StageHooks:
    """Hooks one model's stage modules for one forward pass: load before, record and free after;
    on the Megatron side with a reference recording, also the teacher-forced re-run."""

    def __init__(self, model, loader, stages: list[Stage], side: str, reference_inputs: dict | None = None, progress=None):
        self.loader, self.side, self.progress = loader, side, progress
        self.reference_inputs = reference_inputs
        self.record = Recording()
        self.handles = []
        self.rerunning = False
        self.loaded: dict[str, list[int]] = {}
        for stage in stages:
            if stage.hf_module is None:
                continue  # not run by the compared forward
            path, extra = (stage.hf_module, stage.hf_extra) if side == "hf" else (stage.mcore_module, stage.mcore_extra)
            module = get_module(model, path)
            weights = [module, *(get_module(model, p) for p in extra)]
            self.handles.append(module.register_forward_pre_hook(self._before(stage, weights), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._after(stage, module), with_kwargs=True))
            for probe in stage.routers:
                router = get_module(module, probe.hf_module if side == "hf" else probe.mcore_module)
                self.handles.append(router.register_forward_hook(self._router(stage.name, probe.pool)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        for pids in self.loaded.values():
            self.loader.release(pids)
        self.loaded.clear()

    def _before(self, stage, weights):
        def hook(module, args, kwargs):
            if self.rerunning:
                return None
            pids = self.loader.load(weights)
            self.loaded[stage.name] = pids
            slots = self.loader.slots
            self.record.stage_bytes = max(self.record.stage_bytes, sum(slots.current(p).nbytes for p in pids))

            # A weight the caller fetched before the call (GPTModel's tied output weight) is still
            # the meta parameter: hand the module the loaded one.
            def swap(value):
                return slots.current(id(value)) if isinstance(value, nn.Parameter) and id(value) in slots.meta else value

            return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

        return hook

    def _after(self, stage, module):
        def hook(mod, args, kwargs, output):
            if self.rerunning:
                return None
            x = _activation(args, kwargs)
            floating = isinstance(x, torch.Tensor) and x.is_floating_point()
            self.record.inputs.setdefault(stage.name, []).append(x.detach().float().cpu() if floating else None)
            self.record.outputs.setdefault(stage.name, []).append(primary(output).detach().float().cpu())
            if self.reference_inputs is not None:
                self._teacher_forced(stage, module, args, kwargs)
            self.loader.release(self.loaded.pop(stage.name))
            if self.progress is not None:
                self.progress.update(1)
            return None

        return hook

    def _teacher_forced(self, stage, module, args, kwargs):
        calls = self.record.outputs[stage.name]
        reference = self.reference_inputs.get(stage.name, [])
        index = len(calls) - 1
        x = _activation(args, kwargs)
        if index >= len(reference) or reference[index] is None or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            # No activation input (the token embedding): teacher-forced is free-running.
            self.record.teacher.setdefault(stage.name, []).append(calls[-1])
            return
        forced = reference[index].transpose(0, 1) if stage.layout == SEQ_FIRST else reference[index]
        if tuple(forced.shape) != tuple(x.shape):
            raise ConversionError(
                f"{stage.name}: HF's input {tuple(reference[index].shape)} does not map onto Megatron's {tuple(x.shape)}"
            )
        forced = forced.to(dtype=x.dtype, device=x.device).contiguous()
        if torch.equal(forced, x):
            # Megatron's own input is HF's, bit for bit (vision stages of a tower both sides run as
            # the same module): the re-run would compute the same output (and router choices).
            self.record.teacher.setdefault(stage.name, []).append(calls[-1])
            for (name, pool), choices in self.record.routers.items():
                if name == stage.name:
                    self.record.teacher_routers.setdefault((name, pool), []).append(choices[-1])
            return
        args, kwargs = _replace_activation(args, kwargs, forced)
        self.rerunning = True
        try:
            out = module(*args, **kwargs)
        finally:
            self.rerunning = False
        self.record.teacher.setdefault(stage.name, []).append(primary(out).detach().float().cpu())

    def _router(self, stage_name: str, pool: str):
        def hook(mod, args, output):
            if self.side == "hf":  # (logits, weights, chosen expert indices [N, k])
                logits, chosen_index = output[0], output[2]
                chosen = torch.zeros(chosen_index.shape[0], logits.shape[-1], dtype=torch.bool)
                chosen.scatter_(1, chosen_index.detach().cpu().long(), True)
            else:  # megatron-core: (probs, routing_map [N, E])
                chosen = output[1].detach().cpu().bool()
            target = self.record.teacher_routers if self.rerunning else self.record.routers
            target.setdefault((stage_name, pool), []).append(chosen)

        return hook


def _short(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# =========================================================================== the run


@dataclass
class LayerwiseOutcome:
    hf_logits: list[torch.Tensor] | None
    """Per input, rank 0 only."""
    mcore_logits: list[torch.Tensor]
    stages: list
    """:class:`ckptconv.verify.report.StageResult` rows (rank 0 only)."""
    largest_stage_bytes: int = 0
    uncompared: tuple[str, ...] = ()
    """Stages with no HF counterpart (keys checked, values not compared)."""


def check_stage_coverage(stages: list[Stage], model: nn.Module, slots: ParameterSlots, side: str) -> None:
    """Every parameter belongs to some stage (else it would be used while still on meta)."""
    covered: set[int] = set()
    for stage in stages:
        if stage.hf_module is None and side == "hf":
            continue
        paths = (stage.hf_module, *stage.hf_extra) if side == "hf" else (stage.mcore_module, *stage.mcore_extra)
        covered.update(slots.of([get_module(model, p) for p in paths]))
    left = [slots.names[pid][0] for pid in slots.meta if pid not in covered]
    if left:
        raise ConversionError(f"layerwise verify: {side} parameters in no stage: {_short(left)}")


def build_meta_models(family, spec, ckpt_dir: Path, dtype, device, with_hf: bool):
    """The Megatron model (this rank's TP part) and, on rank 0, the HF model: parameters on meta."""
    from megatron.core import parallel_state

    from ckptconv.megatron.common import uninitialized_weights
    from ckptconv.megatron.load import padded_vocab_size

    tp = parallel_state.get_tensor_model_parallel_world_size()
    with parameters_on_meta(), uninitialized_weights():
        mcore = family.build_model(spec, padded_vocab_size=padded_vocab_size(ckpt_dir, tp), dtype=dtype).eval()
    move_buffers(mcore, device)
    hf = None
    if with_hf:
        from transformers import AutoModelForImageTextToText

        with parameters_on_meta():
            hf = AutoModelForImageTextToText.from_config(family.hf_config(spec), dtype=dtype).eval()
        move_buffers(hf, device)
    return mcore, hf


@torch.no_grad()
def run_layerwise(family, spec, hf_src: Path, ckpt_dir: Path, inputs, dtype, device, stage_tol) -> LayerwiseOutcome:
    from ckptconv.formats.torch_dist import DistCheckpointReader
    from ckptconv.megatron import runtime

    rank0 = runtime.is_rank0()
    mcore, hf = build_meta_models(family, spec, ckpt_dir, dtype, device, with_hf=rank0)
    stages = family.layerwise_stages(spec)
    reader = DistCheckpointReader(ckpt_dir)
    mcore_loader = MegatronStageLoader(mcore, reader, device)
    check_stage_coverage(stages, mcore, mcore_loader.slots, "mcore")
    hf_loader = None
    if rank0:
        hf_loader = HFStageLoader(hf, hf_src, dtype, device)
        check_stage_coverage(stages, hf, hf_loader.slots, "hf")

    hf_logits, mcore_logits, rows, largest = [], [], [], 0
    try:
        for inp in inputs:
            reference = None
            if rank0:
                with _progress(f"HF {inp.name}", len(stages)) as bar, StageHooks(hf, hf_loader, stages, "hf", progress=bar) as hooks:
                    hf_logits.append(hf(use_cache=False, **_to(inp.hf_kwargs, device)).logits[0].float().cpu())
                reference = hooks.record
                largest = max(largest, reference.stage_bytes)
            reference_inputs = _broadcast(reference.inputs if rank0 else None)
            ran = len(reference.outputs) if rank0 else None  # the stages this input runs (no vision ones without an image)
            with _progress(f"Megatron {inp.name}", ran) as bar, \
                    StageHooks(mcore, mcore_loader, stages, "mcore", reference_inputs, progress=bar) as hooks:
                mcore_logits.append(mcore(**_to(inp.mcore_kwargs, device))[0].float().cpu())
            largest = max(largest, hooks.record.stage_bytes)
            if rank0:
                rows += stage_rows(stages, inp.name, reference, hooks.record, stage_tol)
    finally:
        reader.close()
    uncompared = tuple(s.name for s in stages if s.hf_module is None)
    return LayerwiseOutcome(hf_logits if rank0 else None, mcore_logits, rows, largest, uncompared)


@contextlib.contextmanager
def _progress(description: str, total: int | None):
    """A progress bar over stages on stderr (rank 0 only; ``total`` None: no bar)."""
    import sys

    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="stage", leave=False, file=sys.stderr, disable=total is None)
    try:
        yield bar
    finally:
        bar.close()


def stage_rows(stages: list[Stage], input_name: str, reference: Recording, test: Recording, tol) -> list:
    """One row per stage that ran on this input and chain: figures over every call of the stage."""
    from ckptconv.verify.metrics import StageMetrics, compare_activations, router_agreement
    from ckptconv.verify.report import StageResult

    rows = []
    for index, stage in enumerate(stages):
        if stage.name not in reference.outputs:
            continue  # e.g. vision stages on the text-only input
        expected = reference.outputs[stage.name]
        for chain, got_calls, router_calls in (
            (TEACHER_FORCED, test.teacher.get(stage.name, []), test.teacher_routers),
            (FREE_RUNNING, test.outputs.get(stage.name, []), test.routers),
        ):
            if len(got_calls) != len(expected):
                raise ConversionError(
                    f"{stage.name}: HF ran it {len(expected)} time(s) on {input_name}, Megatron {len(got_calls)}"
                )
            max_abs, rel, cosine = 0.0, 0.0, 1.0
            for ref, got in zip(expected, got_calls):
                a, r, c = compare_activations(ref, to_hf_layout(stage, got, ref))
                max_abs, rel, cosine = max(max_abs, a), max(rel, r), min(cosine, c)
            routers = {}
            for probe in stage.routers:
                ref_choice = reference.routers.get((stage.name, probe.pool), [])
                got_choice = router_calls.get((stage.name, probe.pool), [])
                if ref_choice or got_choice:
                    routers[probe.pool] = router_agreement(_cat(ref_choice), _cat(got_choice))
            metrics = StageMetrics(max_abs=max_abs, rel=rel, cosine=cosine, routers=routers)
            rows.append(StageResult(index=index, stage=stage.name, input=input_name, chain=chain, max_abs=max_abs,
                                    rel=rel, cosine=cosine, routers=routers, failures=metrics.violations(tol)))
    return rows


def _cat(choices: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(choices) if choices else torch.zeros(0, 0, dtype=torch.bool)


def to_hf_layout(stage: Stage, mcore: torch.Tensor, hf: torch.Tensor) -> torch.Tensor:
    """A Megatron activation in HF's layout: ``[S, B, ...]`` -> ``[B, S, ...]`` for sequence-first
    stages, and the last axis cut to HF's width (the output layer's vocab padding)."""
    out = mcore.transpose(0, 1) if stage.layout == SEQ_FIRST else mcore
    if out.dim() == hf.dim() and out.shape[:-1] == hf.shape[:-1] and out.shape[-1] > hf.shape[-1]:
        out = out[..., : hf.shape[-1]]
    if out.shape != hf.shape:
        raise ConversionError(f"{stage.name}: Megatron output {tuple(mcore.shape)} does not match HF's {tuple(hf.shape)}")
    return out


def _to(kwargs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _broadcast(obj):
    from ckptconv.megatron import runtime

    if runtime.world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# =========================================================================== choosing the path


def whole_model_bytes(ckpt_dir: Path, dtype) -> int:
    """What the whole-model path needs, about: it builds the Megatron model (random init on the CPU
    path keeps a full master copy of each weight while it initializes it) and loads the checkpoint
    into it, then does the same with the HF model -- measured at about twice the model's bytes."""
    from ckptconv.formats.torch_dist import DistCheckpointReader

    reader = DistCheckpointReader(ckpt_dir)
    try:
        elements = sum(math.prod(reader.shape(k)) for k in reader.tensor_keys())
    finally:
        reader.close()
    return 2 * elements * torch.empty((), dtype=dtype).element_size()


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
