"""Find, inspect and load Megatron-Core ``torch_dist`` checkpoints into the per-family Megatron models.

Layouts accepted for ``ckpt``:

* Megatron-LM / ckptconv: ``ckpt/latest_checkpointed_iteration.txt`` naming ``release`` or an
  iteration, the checkpoint in ``ckpt/release/`` or ``ckpt/iter_0000123/``;
* a bare checkpoint directory (holds ``.metadata``).

``config.json`` / ``ckptconv.json`` (written by the converter) are looked up in the checkpoint
directory and its parent, so both ``OUT`` and ``OUT/release`` work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ckptconv.errors import ConversionError
from ckptconv.formats.torch_dist import CheckpointMetadata, DistCheckpointReader, TensorMeta, resolve_checkpoint_dir

EMBEDDING_KEY = "language_model.embedding.word_embeddings.weight"

MEGATRON_MODELS = ("bridge", "mimo")
"""The Megatron models a family builds, named by the key layout they load: ``bridge`` (our
composition, Megatron-Bridge's names) and ``mimo`` (megatron-core's own ``MimoModel``)."""


def model_builder(family: str, model: str = "bridge") -> Callable[..., torch.nn.Module]:
    """The family's ``build_model`` / ``build_mimo_model(spec, *, padded_vocab_size, dtype)``; a
    clear error for an unknown family or model."""
    from ckptconv.families import get_family

    builders = {"bridge": "build_model", "mimo": "build_mimo_model"}
    if model not in builders:
        raise ConversionError(f"unknown Megatron model {model!r}; choose one of {', '.join(MEGATRON_MODELS)}")
    return getattr(get_family(family), builders[model])


def checkpoint_key_layout(ckpt: str | Path, family: str) -> str:
    """``bridge`` or ``mimo``: the key layout of the checkpoint's tensor names (the family's table knows both)."""
    from ckptconv.core.mapping import load_table

    return load_table(family).detect_key_layout(checkpoint_tensor_shapes(ckpt))


# --------------------------------------------------------------------------- locating a checkpoint


def find_sidecar(ckpt: str | Path, name: str) -> Path | None:
    """``config.json`` / ``ckptconv.json`` next to the checkpoint: in ``ckpt``, then its parent."""
    root = Path(ckpt)
    for where in (root, root.parent):
        if (where / name).is_file():
            return where / name
    return None


def checkpoint_metadata(ckpt: str | Path) -> CheckpointMetadata:
    """torch.distributed.checkpoint metadata: keys, global shapes, chunks (no process group needed),
    read with the restricted unpickler (a checkpoint's .metadata is a pickle)."""
    return DistCheckpointReader(Path(ckpt)).metadata


def checkpoint_tensor_shapes(ckpt: str | Path) -> dict[str, tuple[int, ...]]:
    meta = checkpoint_metadata(ckpt)
    return {k: tuple(v.size) for k, v in meta.entries.items() if isinstance(v, TensorMeta)}


def padded_vocab_size(ckpt: str | Path, tp: int = 1) -> int:
    """Vocab rows the checkpoint was written with (embedding global shape, else ckptconv.json).

    The padding is fixed at conversion time; a model loading it must use the same size, which must
    divide evenly over ``tp``.
    """
    shapes = checkpoint_tensor_shapes(ckpt)
    if EMBEDDING_KEY in shapes:
        padded = shapes[EMBEDDING_KEY][0]
    else:
        sidecar = find_sidecar(resolve_checkpoint_dir(ckpt), "ckptconv.json")
        if sidecar is None or "padded_vocab_size" not in json.loads(sidecar.read_text()):
            raise ConversionError(f"{ckpt}: no {EMBEDDING_KEY} in the checkpoint and no padded_vocab_size in ckptconv.json")
        padded = int(json.loads(sidecar.read_text())["padded_vocab_size"])
    if padded % tp:
        raise ConversionError(
            f"{ckpt}: padded vocab size {padded} is not divisible by tp={tp}; reconvert with --tp {tp}"
        )
    return padded


def checkpoint_spec(ckpt: str | Path, fallback_config: str | Path | None = None):
    """The ModelSpec for a checkpoint: its own config.json, else ``fallback_config`` (an HF dir or file)."""
    from ckptconv.families import normalize_config

    cfg_path = find_sidecar(resolve_checkpoint_dir(ckpt), "config.json")
    if cfg_path is None and fallback_config is not None:
        p = Path(fallback_config)
        cfg_path = p / "config.json" if p.is_dir() else p
    if cfg_path is None or not cfg_path.is_file():
        raise ConversionError(f"{ckpt}: no config.json next to the checkpoint")
    spec = normalize_config(json.loads(cfg_path.read_text()), where=str(cfg_path), model_dir=cfg_path.parent)
    sidecar = find_sidecar(resolve_checkpoint_dir(ckpt), "ckptconv.json")
    if sidecar is not None:
        manifest = json.loads(sidecar.read_text())
        family = manifest.get("family")
        if family and family != spec.family:
            raise ConversionError(f"{sidecar}: family {family!r} disagrees with config.json ({spec.family!r})")
        if manifest.get("language_model_only"):
            raise ConversionError(
                f"{ckpt}: a language-model-only checkpoint (hf-to-mcore --language-model-only) has no vision weights; "
                "the Megatron model here is the full VL model: export it with mcore-to-hf --hf-config SRC, or convert "
                "without --language-model-only to verify"
            )
    return spec


# --------------------------------------------------------------------------- loading


def _short(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_megatron_checkpoint(model: torch.nn.Module, ckpt: str | Path) -> torch.nn.Module:
    """Strict load: every key the model asks for must be in the checkpoint, and every checkpoint key
    under the model's prefixes (``language_model``, ``visual``, ...) must be one the model asks for.
    Keys outside them -- a training run's ``optimizer.*`` state and ``rng_state`` -- are not the
    model's and are left alone."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt_dir = resolve_checkpoint_dir(ckpt)
    # megatron-core unpickles .metadata with plain pickle; vet it with our restricted unpickler first.
    checkpoint_metadata(ckpt_dir)
    sharded_state_dict = model.sharded_state_dict()
    model_prefixes = {leaf.key.split(".", 1)[0] for leaf in _leaves(sharded_state_dict) if hasattr(leaf, "key")}
    try:
        state_dict, in_checkpoint_only, not_in_checkpoint = dist_checkpointing.load(
            sharded_state_dict, str(ckpt_dir), strict=StrictHandling.RETURN_ALL
        )
    except ConversionError:
        raise
    except Exception as exc:  # shape mismatches etc. surface as CheckpointingException / RuntimeError
        raise ConversionError(f"{ckpt_dir}: cannot load into the {type(model).__name__} model: {exc}") from exc
    # megatron-core's own names for these sets (dist_checkpointing/validation.py) are "missing"
    # (in the checkpoint, not asked for) and "unexpected" (asked for, not in the checkpoint).
    # `_extra_state` objects may be absent: a checkpoint saved with the local spec (or by ckptconv
    # before it wrote them) has none for the norms the Transformer Engine spec keeps; without FP8
    # they hold nothing, and the model keeps its own.
    not_in_checkpoint = sorted(k for k in not_in_checkpoint if not k.endswith("._extra_state"))
    unused = {key for key in in_checkpoint_only if key.split(".", 1)[0] in model_prefixes}
    if unused or not_in_checkpoint:
        parts = []
        if not_in_checkpoint:
            parts.append(f"missing from checkpoint: {_short(not_in_checkpoint)}")
        if unused:
            parts.append(f"not used by the model: {_short(unused)}")
        raise ConversionError(f"{ckpt_dir}: checkpoint keys do not match the model; " + "; ".join(parts))
    # The checkpoint's common part (common.pt: a training run's args, iteration, ...) comes back
    # merged into the state dict; only the model's own entries go into the model.
    state_dict = {key: value for key, value in state_dict.items() if key in sharded_state_dict}
    # The model's non-checkpointed entries (e.g. output_layer._extra_state, which GPTModel leaves out
    # of its sharded state dict) keep their values; everything else must have been loaded.
    result = model.load_state_dict(state_dict, strict=False)
    not_loaded = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if not_loaded or result.unexpected_keys:
        raise ConversionError(
            f"{ckpt_dir}: loaded state does not cover the model: missing {_short(not_loaded)}, "
            f"unexpected {_short(result.unexpected_keys)}"
        )
    return model


def resolve_megatron_model(ckpt: str | Path, family: str, model: str = "auto") -> str:
    """``bridge`` or ``mimo``: ``auto`` -> the model whose keys the checkpoint has; a named model must
    match them (a model never loads the other layout's keys)."""
    key_layout = checkpoint_key_layout(ckpt, family)
    if model == "auto":
        return key_layout
    if model not in MEGATRON_MODELS:
        raise ConversionError(f"unknown Megatron model {model!r}; choose auto, {', '.join(MEGATRON_MODELS)}")
    if model != key_layout:
        raise ConversionError(
            f"{ckpt}: its keys are in the {key_layout!r} layout, the {model} model loads {model!r}-layout keys; "
            f"convert with `ckptconv hf-to-mcore --layout {model}` (or use --model {key_layout})"
        )
    return model


def build_and_load(
    ckpt: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", fallback_config=None,
    model: str = "auto",
):
    """Build the family's Megatron model for ``ckpt`` at the current TP size and load it strictly.
    Returns (model, spec).

    ``model``: ``bridge`` (our composition), ``mimo`` (megatron-core's ``MimoModel``), or ``auto``: the
    one whose keys the checkpoint has. A model never loads the other layout's keys."""
    from megatron.core import parallel_state

    spec = checkpoint_spec(ckpt, fallback_config)
    builder = model_builder(spec.family, resolve_megatron_model(ckpt, spec.family, model))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = builder(spec, padded_vocab_size=padded_vocab_size(ckpt, tp), dtype=dtype)
    load_megatron_checkpoint(model, ckpt)
    return model.to(device).eval(), spec


# --------------------------------------------------------------------------- in-memory helpers


def _leaves(sharded_state_dict):
    """ShardedTensor / ShardedObject leaves, with factories built (e.g. SwiGLU fc1's two chunks)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    stack = [sharded_state_dict]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, ShardedTensorFactory):
            stack.append(node.build())
        else:
            yield node


def sharded_manifest(sharded_state_dict) -> dict[str, dict]:
    """``{key: {"shape", "dtype", "kind"}}`` of the checkpoint a model's sharded state dict describes."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    manifest: dict[str, dict] = {}
    for leaf in _leaves(sharded_state_dict):
        if isinstance(leaf, ShardedTensor):
            entry = {"shape": list(leaf.global_shape), "dtype": str(leaf.dtype).removeprefix("torch."), "kind": "tensor"}
        elif isinstance(leaf, ShardedObject):
            entry = {"shape": list(leaf.global_shape), "dtype": None, "kind": "object"}
        else:
            continue
        if manifest.setdefault(leaf.key, entry) != entry:
            raise ConversionError(f"{leaf.key}: inconsistent shards ({manifest[leaf.key]} vs {entry})")
    return dict(sorted(manifest.items()))


@torch.no_grad()
def fill_from_global_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy each rank's shard out of full (global, checkpoint-keyed) tensors into the model, in place.

    The same slicing ``dist_checkpointing.load`` does, without a checkpoint on disk: lets tests put
    HF weights into a Megatron model at any TP size through the key contract alone.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    needed = set()
    for leaf in _leaves(model.sharded_state_dict()):
        if not isinstance(leaf, ShardedTensor):
            continue
        needed.add(leaf.key)
        if leaf.key not in tensors:
            raise ConversionError(f"{leaf.key}: not among the given tensors")
        full = tensors[leaf.key]
        if tuple(full.shape) != tuple(leaf.global_shape):
            raise ConversionError(f"{leaf.key}: global shape {tuple(full.shape)}, model expects {leaf.global_shape}")
        # local_shape excludes the prepended axes (e.g. the layer axis of stacked layers): extent 1 there.
        p = leaf.prepend_axis_num
        extents = (1,) * p + tuple(leaf.local_shape)
        region = full[tuple(slice(o, o + n) for o, n in zip(leaf.global_offset, extents))]
        leaf.data.copy_(region.reshape(leaf.data.shape))
    extra = set(tensors) - needed
    if extra:
        raise ConversionError(f"tensors the model does not use: {_short(extra)}")
    return model
