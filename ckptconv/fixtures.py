"""Tiny random Hugging Face VL checkpoints for tests, demos and benchmarks.

Every builder writes a directory that ``transformers`` 5.x can load with
``from_pretrained`` (config.json + safetensors, written by the real config and
model classes), is seeded (same seed -> byte-identical tensors) and is small
enough to build in well under two seconds on a 2-core CPU.

Each family's own builders live in ``ckptconv/families/<name>/fixtures.py`` (``make_tiny`` through
``Family.make_tiny``); this module holds what they share:

* :func:`make_tiny` -- a family's tiny random checkpoint, by family name.
* :func:`make_real_width` -- real hidden widths, few layers, written
  shard-by-shard from a ``meta``-device model (never materialised in memory).
* :func:`make_hub_cache` -- a Hugging Face hub cache layout that
  ``huggingface_hub.snapshot_download(..., local_files_only=True)`` resolves.

Weight randomisation: after the model is built, every tensor in the state dict
is overwritten from a seeded generator. Tensors the initialiser leaves constant
(norm weights = 1, zero-centred norm weights = 0, biases = 0, layer scales,
router correction biases) become ``c + 0.05 * N(0, 1)`` so a converter that
drops, swaps or mis-offsets them is caught; all other tensors become
``0.02 * N(0, 1)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

__all__ = [
    "make_tiny",
    "make_real_width",
    "make_release_shaped",
    "make_hub_cache",
    "build_and_save",
    "randomize_state_dict_",
    "hf_disk_layout",
    "list_disk_tensors",
]

_SHARD_BYTES = 2 * 1024**3  # 2 GiB per safetensors shard for real-width fixtures


# --------------------------------------------------------------------------- helpers


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _tensor_seed(seed: int, name: str) -> int:
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _random_like(name: str, ref: torch.Tensor, seed: int, dtype: torch.dtype, const: float | None) -> torch.Tensor:
    """Random tensor for ``name`` with ``ref``'s shape; independent of iteration order."""
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    out = torch.empty(ref.shape, dtype=dtype)
    flat = out.view(-1) if out.dim() > 0 else out.view(1)
    # fill in chunks so that big bf16 tensors never need a full fp32 copy
    chunk = 1 << 24
    for start in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - start)
        if const is None:
            flat[start : start + n].normal_(0.0, 0.02, generator=g)
        else:
            flat[start : start + n].normal_(const, 0.05, generator=g)
    return out


def _constant_value(t: torch.Tensor) -> float | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    f = t.detach().float().reshape(-1)
    c = float(f[0])
    return c if bool(torch.all(f == c)) else None


@torch.no_grad()
def randomize_state_dict_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every floating parameter / persistent buffer of ``model`` in place (seeded)."""
    sd = model.state_dict()
    seen: set[int] = set()
    for name, t in sd.items():
        if not torch.is_floating_point(t):
            continue
        key = t.data_ptr()
        if key in seen:  # tied weights: randomise once
            continue
        seen.add(key)
        const = _constant_value(t)
        t.copy_(_random_like(name, t, seed, t.dtype, const))


def _reset_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_tiny(family: str, out_dir: str | os.PathLike, *, seed: int = 0, **options) -> Path:
    """The tiny random checkpoint of ``family`` (see its ``fixtures.py`` for the options)."""
    from ckptconv.families import get_family

    return get_family(family).make_tiny(out_dir, seed=seed, **options)


def build_and_save(model_cls, config, out_dir, seed: int, dtype: torch.dtype, max_shard_size: str | None = None) -> Path:
    """Build ``model_cls(config)``, randomize it (seeded), save with ``save_pretrained``; with
    ``max_shard_size`` (e.g. ``"100KB"``) as transformers shards big checkpoints: several
    ``model-0000i-of-0000n.safetensors`` and a ``model.safetensors.index.json``."""
    _quiet_transformers()
    out = _reset_dir(out_dir)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    randomize_state_dict_(model, seed)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out


# --------------------------------------------------------------------------- real widths


def hf_disk_layout(model) -> dict[str, torch.Tensor]:
    """Names/shapes (as meta tensors) that ``model.save_pretrained`` would write.

    Works on a ``meta``-device model: applies transformers' own tied-weight
    removal and reverse weight conversion (hub key names, fused/split expert
    layouts) without materialising anything.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = model.state_dict()
    if getattr(model, "_keys_to_ignore_on_save", None):
        for k in model._keys_to_ignore_on_save:
            sd.pop(k, None)
    sd = remove_tied_weights_from_state_dict(sd, model)
    sd = revert_weight_conversion(model, sd)
    return {k: (v[0] if isinstance(v, list) else v) for k, v in sd.items()}


def _plan_shards(layout: dict[str, torch.Tensor], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    esize = torch.empty((), dtype=dtype).element_size()
    for name, t in layout.items():
        nbytes = t.numel() * esize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def make_real_width(
    family: str,
    out_dir: str | os.PathLike,
    *,
    num_layers: int,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    variant: str | None = None,
    vision_layers: int = 2,
    num_experts: int | None = None,
    max_shard_bytes: int = _SHARD_BYTES,
) -> Path:
    """Random checkpoint with published widths but only ``num_layers`` decoder layers.

    ``family``: a registered family's name; its ``Family.real_width_config`` gives the published
    widths (``variant`` picks a size where the family has several, e.g. Qwen2.5-VL's 3B and 7B).
    ``vision_layers`` vision blocks (default 2).
    ``num_experts`` optionally shrinks the routed-expert count of MoE families
    (a single real-width Step3.7 MoE layer with all 288 experts is ~9 GB in bf16).

    The model is only ever built on the ``meta`` device; tensors are generated
    one by one (seeded per tensor name) and written in shards of at most
    ``max_shard_bytes`` with a ``model.safetensors.index.json``. Key names and
    shapes are exactly what ``save_pretrained`` would write (transformers' reverse
    weight conversion is applied to the meta state dict).
    """
    from safetensors.torch import save_file

    _quiet_transformers()
    from ckptconv.families import get_family

    family_ = get_family(family)
    model_cls, cfg = family_.real_width_config(variant, num_layers, vision_layers, num_experts)
    cfg.dtype = dtype
    with torch.device("meta"):
        model = model_cls(cfg)
    layout = hf_disk_layout(model)
    out = _reset_dir(out_dir)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    model.config.save_pretrained(out)
    shards = _plan_shards(layout, dtype, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name in names:
            ref = layout[name]
            zero_centered = family_.zero_centered_norm(name)
            const = 1.0 if (ref.dim() == 1 and _is_norm_like(name) and not zero_centered) else None
            if const is None and (ref.dim() == 1 and (zero_centered or name.endswith("bias"))):
                const = 0.0
            t = _random_like(name, ref, seed, dtype, const)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def make_release_shaped(
    config: dict,
    out_dir: str | os.PathLike,
    *,
    spellings: dict[str, str] | None = None,
    tied_lm_head_copy: bool = False,
    extra_files: dict[str, str] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 2,
) -> Path:
    """A random checkpoint laid out as a vendor released it: ``config`` is written as ``config.json``
    exactly as given (the released file with depth, experts and widths cut), and the tensors carry the
    released on-disk names: transformers' names for the model ``config`` describes, with
    ``spellings`` (``{"model.vision_model.": "vision_model."}``: transformers' prefix -> the
    release's) applied and, with ``tied_lm_head_copy``, ``lm_head.weight`` stored as a copy of the
    tied embedding. Written in ``shards`` files with a ``model.safetensors.index.json``, as the hub has
    them; ``extra_files`` (tokenizer, processor files) beside them.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    from ckptconv.families import get_family, normalize_config

    _quiet_transformers()
    spec = normalize_config(config)
    family = get_family(spec.family)
    hf_cfg = family.hf_config(spec)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_cfg)
    layout = hf_disk_layout(model)

    def released(name: str) -> str:
        for ours, theirs in (spellings or {}).items():
            if name.startswith(ours):
                return theirs + name[len(ours):]
        return name

    tensors: dict[str, torch.Tensor] = {}
    for name, ref in layout.items():
        zero_centered = family.zero_centered_norm(name)
        const = 1.0 if (ref.dim() == 1 and _is_norm_like(name) and not zero_centered) else None
        if const is None and ref.dim() == 1 and (zero_centered or name.endswith("bias")):
            const = 0.0
        tensors[released(name)] = _random_like(name, ref, seed, dtype, const)
    if tied_lm_head_copy:
        if not spec.tie_word_embeddings or "lm_head.weight" in tensors:
            raise ValueError("tied_lm_head_copy needs a tied model without its own lm_head.weight")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    out = _reset_dir(out_dir)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups = _plan_shards(tensors, dtype, max(1, -(-total // shards)))
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    return out


def _is_norm_like(name: str) -> bool:
    return "norm" in name or ".ln" in name or name.startswith("ln") or "layernorm" in name


# --------------------------------------------------------------------------- hub cache


#: Files the hub stores with Git LFS (its default ``.gitattributes``): their blob is named by the
#: sha256 of the content; every other file's blob by its git blob sha1.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".tiktoken", ".msgpack", ".h5", ".onnx")


def _blob_name(path: Path) -> str:
    """The etag huggingface_hub names a blob by (``file_download.py``: ``blobs/<etag>``)."""
    if path.name.endswith(_LFS_SUFFIXES):
        digest = hashlib.sha256()
    else:  # a git blob id: sha1 over "blob <size>\0" + content
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def make_hub_cache(
    cache_dir: str | os.PathLike,
    repo_id: str,
    model_dir: str | os.PathLike,
    *,
    commit: str | None = None,
    revision: str = "main",
) -> Path:
    """Lay out ``model_dir``'s files as a Hugging Face hub cache entry for ``repo_id``, exactly as
    ``huggingface_hub`` writes a download.

    Creates ``<cache_dir>/models--org--name/`` with ``blobs/<etag>`` (sha256 for LFS files such as
    safetensors shards, the git blob sha1 for config and tokenizer files),
    ``snapshots/<commit>/<file>`` -> a *relative* symlink ``../../blobs/<etag>`` (one more ``../``
    per subdirectory), and ``refs/<revision>`` holding the commit, so that
    ``huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)``
    returns the snapshot directory offline. Returns the snapshot directory. ``commit`` defaults to
    a deterministic 40-hex digest of the file contents. Blobs are hard links to ``model_dir``'s
    files where the filesystem allows (no extra disk for big fixtures), copies otherwise.
    """
    src = Path(model_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    blob_names = {p: _blob_name(p) for p in files}
    tree = hashlib.sha1()
    for p in files:
        tree.update(f"{p.relative_to(src).as_posix()}\0{blob_names[p]}\n".encode())
    commit = commit or tree.hexdigest()
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError("commit must be 40 lowercase hex characters")
    repo_root = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    blobs = repo_root / "blobs"
    snap = repo_root / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo_root / "refs").mkdir(exist_ok=True)
    for p in files:
        blob = blobs / blob_names[p]
        if not blob.exists():
            try:
                os.link(p, blob)
            except OSError:
                shutil.copyfile(p, blob)
        link = snap / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            shutil.copyfile(blob, link)
    (repo_root / "refs" / revision).write_text(commit)
    return snap


def list_disk_tensors(model_dir: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of all safetensors tensors in ``model_dir`` (header only)."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out
