"""Prove a conversion right: the Megatron checkpoint's logits against the Hugging Face model's.

``run_verify(HF_DIR, MCORE_CKPT)`` feeds the same inputs (a text-only prompt and a prompt with an
image) to

* the HF reference, ``AutoModelForImageTextToText.from_pretrained(HF_DIR)``, and
* the family's Megatron model (``ckptconv.megatron.<family>``) loaded strictly from the checkpoint
  at the requested TP size,

and compares the logits per input, separately over text tokens and image tokens: max-abs and
mean-abs difference, cosine similarity (worst token), top-1 and top-5 agreement, KL(ref || test).
Every figure has a tolerance (defaults per dtype, overridable); the report passes only when every
figure of every input is inside it.

Both models run in the same dtype on the same device (fp32 unless asked otherwise), so a failure
means different weights or different math, not different precision. Under torchrun every rank runs
the Megatron forward (TP); only rank 0 loads the HF reference and computes the metrics, then shares
the report so every rank returns the same verdict.

``mode="roundtrip"`` also exports the checkpoint back to HF (``ckptconv.pipeline.mcore_to_hf``) and compares
the original HF model against the exported one on the same inputs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ckptconv import interrupt
from ckptconv.errors import ConversionError
from ckptconv.verify.inputs import build_inputs
from ckptconv.verify.metrics import (
    DEFAULT_STAGE_TOLERANCES,
    DEFAULT_TOLERANCES,
    DTYPES,
    StageTolerances,
    Tolerances,
    compare_logits,
)
from ckptconv.verify.report import InputResult, VerifyReport


# --------------------------------------------------------------------------- running the models


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if str(dtype) not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return str(DTYPES[str(dtype)]).removeprefix("torch.")


def _to(kwargs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


@torch.no_grad()
def _megatron_logits(ckpt, hf_src, inputs, dtype, device, megatron_model: str) -> tuple[list[torch.Tensor], str]:
    from ckptconv.megatron.load import build_and_load

    model, spec = build_and_load(ckpt, dtype=dtype, device=device, fallback_config=hf_src, model=megatron_model)
    out = []
    for inp in inputs:
        logits = model(**_to(inp.mcore_kwargs, device))
        out.append(logits[0].float().cpu())
    del model
    return out, spec.family


@torch.no_grad()
def _hf_logits(hf_dir, spec, inputs, dtype, device) -> list[torch.Tensor]:
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The family module builds the transformers config from the spec: flat (ERNIE "Thinking")
    # config.json files are not readable by transformers itself and would silently give defaults.
    from ckptconv.families import get_family

    config = get_family(spec.family).hf_config(spec)
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), config=config, dtype=dtype, trust_remote_code=False)
    except Exception as exc:
        raise ConversionError(f"{hf_dir}: transformers cannot load the reference model: {exc}") from exc
    model = model.to(device).eval()
    out = []
    for inp in inputs:
        logits = model(use_cache=False, **_to(inp.hf_kwargs, device)).logits
        out.append(logits[0].float().cpu())
    del model
    return out


def _compare(inputs, reference, test, comparison, tol) -> list[InputResult]:
    results = []
    for inp, ref, got in zip(inputs, reference, test):
        if ref.shape != got.shape:
            raise ConversionError(f"{inp.name}: logits shapes differ: reference {tuple(ref.shape)}, converted {tuple(got.shape)}")
        groups = {
            group: (compare_logits(ref[mask], got[mask]) if bool(mask.any()) else None)
            for group, mask in inp.token_groups().items()
        }
        failures = [f"{g}: {v}" for g, m in groups.items() if m is not None for v in m.violations(tol)]
        badness = max((m.badness(tol) for m in groups.values() if m is not None), default=0.0)
        results.append(InputResult(inp.name, comparison, groups, failures, badness))
    return results


def _export_to_hf(ckpt, out_dir) -> None:
    from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

    convert_mcore_to_hf(ckpt, out_dir)


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                 "head_dim", "ffn_hidden_size", "num_experts", "moe_ffn_hidden_size")


def _check_same_model(source, checkpoint, hf_src, mcore_ckpt) -> None:
    """Comparing logits of two different architectures is meaningless: refuse up front."""
    if source.family != checkpoint.family:
        raise ConversionError(f"{hf_src} is a {source.family} model but {mcore_ckpt} is {checkpoint.family}")
    for name in _SHAPE_FIELDS:
        a, b = getattr(source, name), getattr(checkpoint, name)
        if a != b:
            raise ConversionError(f"{hf_src} and {mcore_ckpt} are different shapes: {name} {a} vs {b}")


def run_verify(
    hf_src,
    mcore_ckpt,
    *,
    tp: int = 1,
    device: str = "auto",
    dtype=None,
    prompt: str | None = None,
    image=None,
    synthetic_image: bool = True,
    text_only: bool = True,
    tolerances: Tolerances | dict | None = None,
    mode: str = "direct",
    layerwise: bool | None = None,
    stage_tolerances: StageTolerances | dict | None = None,
    megatron_model: str = "auto",
) -> VerifyReport:
    """Compare HF ``hf_src`` with the Megatron checkpoint ``mcore_ckpt``; see the module docstring.

    ``layerwise``: True streams both models stage by stage (:mod:`ckptconv.verify.layerwise`),
    False loads them whole, None (default) streams when the whole models would not fit in memory.
    ``megatron_model``: ``bridge`` (our composition), ``mimo`` (megatron-core's ``MimoModel``) or
    ``auto`` (the one the checkpoint's key layout is for).
    """
    from ckptconv.megatron import runtime
    from ckptconv.families import normalize_config
    from ckptconv.megatron.load import checkpoint_spec, resolve_megatron_model
    from ckptconv.pipeline.source import read_config, resolve_source

    if mode not in ("direct", "roundtrip"):
        raise ConversionError(f"unknown mode {mode!r}; use direct or roundtrip")
    # A local directory or a hub repo id, resolved the way hf-to-mcore resolves its SRC.
    hf_src, mcore_ckpt = resolve_source(str(hf_src)), Path(mcore_ckpt)
    if not (hf_src / "config.json").is_file():
        raise ConversionError(f"{hf_src}: not a Hugging Face checkpoint directory (no config.json)")
    dtype_name = _dtype_name(dtype)
    torch_dtype = DTYPES[dtype_name]
    base = DEFAULT_TOLERANCES[dtype_name]
    tol = tolerances if isinstance(tolerances, Tolerances) else base.overridden(tolerances)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dev = runtime.init_parallel(tp=tp, device=device)
    spec = checkpoint_spec(mcore_ckpt, fallback_config=hf_src)
    source_spec = normalize_config(read_config(hf_src), where=str(hf_src / "config.json"), model_dir=hf_src)
    _check_same_model(source_spec, spec, hf_src, mcore_ckpt)
    megatron_model = resolve_megatron_model(mcore_ckpt, spec.family, megatron_model)
    inputs = build_inputs(
        spec, hf_src, prompt=prompt, image=image, synthetic_image_=synthetic_image, text_only=text_only
    )
    timings["setup"] = time.perf_counter() - t0

    use_layerwise, reason = _choose_path(layerwise, mcore_ckpt, torch_dtype)
    if use_layerwise and megatron_model == "mimo":
        raise ConversionError(
            f"the layerwise path ({reason}) streams ckptconv's own model stages, not megatron-core's MimoModel; "
            "verify a mimo-layout checkpoint with --whole-model"
        )
    if use_layerwise:
        if mode != "direct":
            raise ConversionError(
                f"--mode {mode} compares two whole HF models, which the layerwise path does not load ({reason}); "
                "use --mode direct, or --whole-model where the models fit"
            )
        stage_base = DEFAULT_STAGE_TOLERANCES[dtype_name]
        stage_tol = stage_tolerances if isinstance(stage_tolerances, StageTolerances) else stage_base.overridden(stage_tolerances)
        return _run_layerwise(spec, hf_src, mcore_ckpt, inputs, torch_dtype, dev, tol, stage_tol, reason, timings,
                              tp=tp, dtype_name=dtype_name)

    t0 = time.perf_counter()
    megatron_logits, family = _megatron_logits(mcore_ckpt, hf_src, inputs, torch_dtype, dev, megatron_model)
    timings["megatron"] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="ckptconv-roundtrip-") as tmp, interrupt.removed_if_interrupted(tmp):
        if mode == "roundtrip":
            # The exporter is collective under torchrun (ranks share the shards): every rank calls it,
            # into rank 0's directory.
            t0 = time.perf_counter()
            export_dir = Path(_broadcast(tmp)) / "hf"
            _export_to_hf(mcore_ckpt, export_dir)
            timings["export"] = time.perf_counter() - t0
        outcome = None
        if runtime.is_rank0():
            try:
                t0 = time.perf_counter()
                reference = _hf_logits(hf_src, source_spec, inputs, torch_dtype, dev)
                timings["hf_reference"] = time.perf_counter() - t0
                results = _compare(inputs, reference, megatron_logits, "megatron", tol)
                if mode == "roundtrip":
                    t0 = time.perf_counter()
                    exported = _hf_logits(export_dir, source_spec, inputs, torch_dtype, dev)
                    results += _compare(inputs, reference, exported, "hf-export", tol)
                    timings["hf_export"] = time.perf_counter() - t0
                report = VerifyReport(
                    hf_src=str(hf_src), mcore_ckpt=str(mcore_ckpt), family=family, tp=tp, device=str(dev),
                    dtype=dtype_name, mode=mode, tolerances=tol, results=results, timings=timings,
                    path="whole-model", path_reason=reason,
                    megatron_model=megatron_model,
                )
                outcome = report.as_dict()
            except ConversionError as exc:
                outcome = {"error": str(exc)}
        # Every rank returns rank 0's verdict (or raises its error), so all exit with the same status.
        outcome = _broadcast(outcome)
    if "error" in outcome:
        raise ConversionError(outcome["error"])
    return VerifyReport.from_dict(outcome)


def _choose_path(layerwise: bool | None, mcore_ckpt: Path, dtype) -> tuple[bool, str]:
    """(use layerwise?, why): as asked, else layerwise when the whole models would not fit. Rank 0
    decides for all ranks (their free memory differs a little)."""
    from ckptconv.formats.torch_dist import resolve_checkpoint_dir
    from ckptconv.megatron import runtime
    from ckptconv.verify.layerwise import available_bytes, whole_model_bytes

    if layerwise is not None:
        return layerwise, "layerwise (--layerwise)" if layerwise else "whole-model (--whole-model)"
    decision = None
    if runtime.is_rank0():
        needed, free = whole_model_bytes(resolve_checkpoint_dir(mcore_ckpt), dtype), available_bytes()
        fits = needed <= 0.8 * free
        gib = 2**30
        decision = (
            not fits,
            f"{'whole-model' if fits else 'layerwise'} (auto: the whole models need about {needed / gib:.1f} GiB, "
            f"{free / gib:.1f} GiB available)",
        )
    return tuple(_broadcast(decision))


def _run_layerwise(spec, hf_src, mcore_ckpt, inputs, dtype, dev, tol, stage_tol, reason, timings, *, tp, dtype_name):
    from ckptconv.families import get_family
    from ckptconv.formats.torch_dist import resolve_checkpoint_dir
    from ckptconv.megatron import runtime
    from ckptconv.verify.layerwise import run_layerwise

    t0 = time.perf_counter()
    outcome = None
    try:
        streamed = run_layerwise(get_family(spec.family), spec, hf_src, resolve_checkpoint_dir(mcore_ckpt), inputs,
                                 dtype, dev, stage_tol)
        timings["layerwise"] = time.perf_counter() - t0
        if runtime.is_rank0():
            results = _compare(inputs, streamed.hf_logits, streamed.mcore_logits, "megatron", tol)
            report = VerifyReport(
                hf_src=str(hf_src), mcore_ckpt=str(mcore_ckpt), family=spec.family, tp=tp, device=str(dev),
                dtype=dtype_name, mode="direct", tolerances=tol, results=results, timings=timings,
                path="layerwise", stage_tolerances=stage_tol, stages=streamed.stages,
                path_reason=reason + (f"; not compared (no HF counterpart): {', '.join(streamed.uncompared)}"
                                      if streamed.uncompared else ""),
                largest_stage_bytes=streamed.largest_stage_bytes,
            )
            outcome = report.as_dict()
    except ConversionError as exc:
        if runtime.world_size() == 1:
            raise
        outcome = {"error": str(exc)}
    outcome = _broadcast(outcome)
    if "error" in outcome:
        raise ConversionError(outcome["error"])
    return VerifyReport.from_dict(outcome)


def _broadcast(obj):
    import torch.distributed as dist

    from ckptconv.megatron import runtime

    if runtime.world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
