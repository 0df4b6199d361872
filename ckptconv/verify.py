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

``mode="roundtrip"`` also exports the checkpoint back to HF (``ckptconv.mcore_to_hf``) and compares
the original HF model against the exported one on the same inputs.
"""

from __future__ import annotations

import importlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from ckptconv.errors import ConversionError

DEFAULT_PROMPT = "Describe this picture in one sentence. What colours and shapes can you see, and where are they?"

#: Synthetic image size (width, height). Not square, so a height/width mix-up in the vision grid or
#: the M-RoPE positions changes the result; multiples of 28 (patch 14 x merge 2), so no resizing.
SYNTHETIC_IMAGE_SIZE = (140, 84)

#: User images are resized to at most this many pixels (448x448 -> 256 image tokens) to keep a CPU
#: run short; both models see the same pixels, so the comparison is unaffected.
MAX_IMAGE_PIXELS = 448 * 448

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


# --------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tolerances:
    max_abs: float
    """Largest absolute logit difference allowed at any token."""
    mean_abs: float
    min_cosine: float
    """Cosine similarity of the logit vectors, at the worst token."""
    min_top1: float
    """Fraction of tokens whose argmax agrees."""
    min_top5: float
    """Mean overlap of the two top-5 sets (1.0 = identical sets)."""
    max_kl: float
    """Mean KL(reference || converted) per token, in nats."""

    def overridden(self, overrides: dict | None) -> "Tolerances":
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ConversionError(f"unknown tolerance(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: float(v) for k, v in overrides.items()})


# fp32: the two implementations differ only in summation order (fused qkv, split matmuls), ~1e-7
# on the tiny fixtures. Half precision: rounding of activations differs per layer, so the logits
# differ by up to about one unit on real models while the predictions still agree.
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "float32": Tolerances(max_abs=1e-4, mean_abs=1e-5, min_cosine=0.99999, min_top1=0.99, min_top5=0.98, max_kl=1e-6),
    "bfloat16": Tolerances(max_abs=1.0, mean_abs=0.1, min_cosine=0.99, min_top1=0.9, min_top5=0.85, max_kl=0.05),
    "float16": Tolerances(max_abs=0.25, mean_abs=0.03, min_cosine=0.995, min_top1=0.95, min_top5=0.9, max_kl=0.01),
}


# --------------------------------------------------------------------------- metrics


@dataclass
class TokenMetrics:
    """Agreement of two logit tensors over one group of tokens (text or image)."""

    n_tokens: int
    max_abs: float
    mean_abs: float
    cosine: float
    top1: float
    top5: float
    kl: float

    # (figure, tolerance field, "max" = figure must stay <= tolerance, "min" = >=)
    CHECKS = (
        ("max_abs", "max_abs", "max"),
        ("mean_abs", "mean_abs", "max"),
        ("cosine", "min_cosine", "min"),
        ("top1", "min_top1", "min"),
        ("top5", "min_top5", "min"),
        ("kl", "max_kl", "max"),
    )

    def violations(self, tol: Tolerances) -> list[str]:
        out = []
        for name, tol_name, kind in self.CHECKS:
            value, limit = getattr(self, name), getattr(tol, tol_name)
            bad = not math.isfinite(value) or (value > limit if kind == "max" else value < limit)
            if bad:
                # "min" figures sit just below 1.0: print enough digits to see the gap.
                fmt = ".3g" if kind == "max" else ".8g"
                out.append(f"{name} {value:{fmt}} {'>' if kind == 'max' else '<'} {limit:{fmt}}")
        return out

    def badness(self, tol: Tolerances) -> float:
        """How far outside tolerance the worst figure is (> 1 = failing); ranks the worst input."""
        worst = 0.0
        for name, tol_name, kind in self.CHECKS:
            value, limit = getattr(self, name), getattr(tol, tol_name)
            if not math.isfinite(value):
                return math.inf
            if kind == "max":
                ratio = value / limit if limit > 0 else (math.inf if value > 0 else 0.0)
            else:  # distance from perfect agreement (1.0), relative to what is allowed
                gap, allowed = 1.0 - value, 1.0 - limit
                ratio = gap / allowed if allowed > 0 else (math.inf if gap > 0 else 0.0)
            worst = max(worst, ratio)
        return worst


@torch.no_grad()
def compare_logits(reference: torch.Tensor, test: torch.Tensor) -> TokenMetrics:
    """Metrics over tokens (rows) of two ``[N, V]`` logit tensors, computed in float64."""
    a, b = reference.double(), test.double()
    diff = (a - b).abs()
    k = min(5, a.shape[-1])
    top_a, top_b = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices
    overlap = (top_a[:, :, None] == top_b[:, None, :]).any(-1).double().sum(-1) / k
    log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return TokenMetrics(
        n_tokens=int(a.shape[0]),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        cosine=float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()),
        top1=float((a.argmax(-1) == b.argmax(-1)).double().mean()),
        top5=float(overlap.mean()),
        kl=float(kl.mean()),
    )


# --------------------------------------------------------------------------- report


@dataclass
class InputResult:
    name: str
    """The input, e.g. ``text-only`` or ``image:synthetic``."""
    comparison: str
    """``megatron`` (HF vs the Megatron checkpoint) or ``hf-export`` (HF vs the re-exported HF dir)."""
    groups: dict[str, TokenMetrics | None]
    """``text`` and ``image`` token groups; None where the input has no such tokens."""
    failures: list[str] = field(default_factory=list)
    badness: float = 0.0

    @property
    def label(self) -> str:
        return self.name if self.comparison == "megatron" else f"{self.name} ({self.comparison})"

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class VerifyReport:
    hf_src: str
    mcore_ckpt: str
    family: str
    tp: int
    device: str
    dtype: str
    mode: str
    tolerances: Tolerances
    results: list[InputResult]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def worst_input(self) -> str | None:
        if not self.results:
            return None
        return max(self.results, key=lambda r: r.badness).label

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "worst_input": self.worst_input,
            "hf_src": self.hf_src,
            "mcore_ckpt": self.mcore_ckpt,
            "family": self.family,
            "tp": self.tp,
            "device": self.device,
            "dtype": self.dtype,
            "mode": self.mode,
            "tolerances": asdict(self.tolerances),
            "inputs": [
                {
                    "name": r.name,
                    "comparison": r.comparison,
                    "passed": r.passed,
                    "failures": r.failures,
                    "badness": r.badness if math.isfinite(r.badness) else "inf",
                    "tokens": {g: (asdict(m) if m is not None else None) for g, m in r.groups.items()},
                }
                for r in self.results
            ],
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "VerifyReport":
        results = [
            InputResult(
                name=r["name"],
                comparison=r["comparison"],
                groups={g: (TokenMetrics(**m) if m is not None else None) for g, m in r["tokens"].items()},
                failures=list(r["failures"]),
                badness=float(r["badness"]),
            )
            for r in d["inputs"]
        ]
        return cls(
            hf_src=d["hf_src"], mcore_ckpt=d["mcore_ckpt"], family=d["family"], tp=d["tp"], device=d["device"],
            dtype=d["dtype"], mode=d["mode"], tolerances=Tolerances(**d["tolerances"]), results=results,
            timings=dict(d["timings_s"]),
        )


def render_table(report: VerifyReport):
    """A rich Table: one row per input and token group; figures outside tolerance in red, verdict in the title."""
    from rich import box
    from rich.table import Table

    tol = report.tolerances
    verdict = "[bold green]PASS[/]" if report.passed else f"[bold red]FAIL[/], worst input: {report.worst_input}"
    table = Table(
        title=f"verify {report.family} (tp={report.tp}, {report.dtype}, {report.device}): {verdict}",
        caption=(
            f"reference {report.hf_src} vs {report.mcore_ckpt}\n"
            f"tolerances: max-abs <= {tol.max_abs:g}, mean-abs <= {tol.mean_abs:g}, cosine >= {tol.min_cosine:g}, "
            f"top-1 >= {tol.min_top1:g}, top-5 >= {tol.min_top5:g}, KL <= {tol.max_kl:g}"
        ),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    table.add_column("input", overflow="fold", min_width=9)
    for col in ("tokens", "n", "max-abs", "mean-abs", "cosine", "top-1", "top-5", "KL"):
        table.add_column(col, justify="left" if col == "tokens" else "right", no_wrap=True)
    limits = {c[0]: (getattr(tol, c[1]), c[2]) for c in TokenMetrics.CHECKS}

    def cell(name: str, value: float, fmt: str) -> str:
        limit, kind = limits[name]
        bad = not math.isfinite(value) or (value > limit if kind == "max" else value < limit)
        text = format(value, fmt)
        return f"[red]{text}[/]" if bad else text

    for r in report.results:
        for i, (group, m) in enumerate(r.groups.items()):
            label = r.label if i == 0 else ""  # name each input once
            if m is None:
                table.add_row(label, group, "0", *(["-"] * 6), end_section=i == len(r.groups) - 1)
                continue
            table.add_row(
                label, group, str(m.n_tokens),
                cell("max_abs", m.max_abs, ".2g"), cell("mean_abs", m.mean_abs, ".2g"),
                cell("cosine", m.cosine, ".6f"), cell("top1", m.top1, ".3f"), cell("top5", m.top5, ".3f"),
                cell("kl", m.kl, ".2g"),
                end_section=i == len(r.groups) - 1,
            )
    return table


# --------------------------------------------------------------------------- inputs


@dataclass
class VerifyInput:
    """One input, as each model takes it. The same shape family modules return from their
    ``prepare_verify_inputs(spec, hf_dir, *, prompt, image)``: (hf_kwargs, mcore_kwargs, image mask)."""

    name: str
    hf_kwargs: dict
    """Keyword arguments of the HF model's forward (``input_ids``, pixels, e.g. ``mm_token_type_ids``)."""
    mcore_kwargs: dict
    """Keyword arguments of the family's Megatron model forward."""
    image_mask: torch.Tensor
    """``[1, S]`` (or ``[S]``) bool: the image-token positions (metrics are split text / image on it)."""

    @property
    def input_ids(self) -> torch.Tensor:
        return self.mcore_kwargs["input_ids"]

    def token_groups(self) -> dict[str, torch.Tensor]:
        # Accept [1, S] or [S]: one sequence per input.
        is_image = self.image_mask.bool().reshape(-1)
        if is_image.numel() != self.input_ids.shape[-1]:
            raise ConversionError(
                f"{self.name}: image mask has {is_image.numel()} positions, the sequence {self.input_ids.shape[-1]}"
            )
        return {"text": ~is_image, "image": is_image}


def synthetic_image():
    """Deterministic RGB test card: colour gradients plus a checkerboard (edges for the patches)."""
    from PIL import Image

    w, h = SYNTHETIC_IMAGE_SIZE
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = (((x // 14) + (y // 14)) % 2) * 60
    rgb = torch.stack([(x * 255) // (w - 1), (y * 255) // (h - 1), (255 - (x + y) * 255 // (w + h - 2))], -1)
    rgb = (rgb + checker[..., None]).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.numpy(), mode="RGB")


def _load_tokenizer(hf_src: Path):
    if not ((hf_src / "tokenizer.json").is_file() or (hf_src / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(hf_src), trust_remote_code=False)
    except Exception:  # a broken or remote-code tokenizer: fall back to deterministic ids
        return None


class _TextEncoder:
    """Token ids for text: the checkpoint's tokenizer when it has one, else deterministic ids."""

    def __init__(self, hf_src: Path, vocab_size: int, reserved: set[int]):
        self.tokenizer = _load_tokenizer(hf_src)
        self.vocab_size = vocab_size
        self.reserved = reserved

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if all(0 <= i < self.vocab_size for i in ids):
                return list(ids)
        # No usable tokenizer: one id per byte, spread over the vocab, never a special (vision) id.
        usable = [i for i in range(min(self.vocab_size, 4096)) if i not in self.reserved]
        return [usable[(b * 131 + i * 7) % len(usable)] for i, b in enumerate(text.encode())]

    def has_token(self, token: str) -> bool:
        if self.tokenizer is None:
            return False
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return isinstance(tid, int) and tid != self.tokenizer.unk_token_id and 0 <= tid < self.vocab_size


def _qwen_inputs(spec, hf_src: Path, prompt: str, image, text_only: bool) -> list[VerifyInput]:
    cfg = spec.hf_config
    start, end, pad = cfg.get("vision_start_token_id"), cfg.get("vision_end_token_id"), spec.image_token_id
    if None in (start, end, pad):
        raise ConversionError("config.json lacks vision_start_token_id / vision_end_token_id / image_token_id")
    enc = _TextEncoder(hf_src, spec.vocab_size, {start, end, pad, cfg.get("video_token_id", -1)})
    chat = enc.has_token("<|im_start|>")
    head = "<|im_start|>user\n" if chat else ""
    tail = "<|im_end|>\n<|im_start|>assistant\n" if chat else ""

    inputs = []
    if text_only:
        input_ids = torch.tensor([enc.encode(head + prompt + tail)])
        inputs.append(VerifyInput("text-only", {"input_ids": input_ids}, {"input_ids": input_ids}, input_ids == pad))
    if image is not None:
        name, pil = image
        pixel_values, grid_thw = _qwen_pixels(spec, hf_src, pil)
        merge = int(spec.extra.get("spatial_merge_size", 2))
        n_image_tokens = int(grid_thw.prod()) // merge**2
        ids = enc.encode(head) + [start] + [pad] * n_image_tokens + [end] + enc.encode(prompt + tail)
        input_ids = torch.tensor([ids])
        # The HF model computes 3D (M-RoPE) positions only when told which tokens are image tokens;
        # without mm_token_type_ids it silently falls back to 1D positions.
        mcore = {"input_ids": input_ids, "pixel_values": pixel_values, "image_grid_thw": grid_thw}
        hf = dict(mcore, mm_token_type_ids=(input_ids == pad).int())
        inputs.append(VerifyInput(name, hf, mcore, input_ids == pad))
    return inputs


def _qwen_pixels(spec, hf_src: Path, pil):
    # The PIL processor class: the default Qwen2VLImageProcessor may need torchvision, absent here.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = spec.vision
    if (hf_src / "preprocessor_config.json").is_file():
        processor = Qwen2VLImageProcessorPil.from_pretrained(str(hf_src))
    else:
        processor = Qwen2VLImageProcessorPil(
            patch_size=vision.get("patch_size", 14),
            merge_size=vision.get("spatial_merge_size", 2),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
        )
    size = dict(processor.size)
    size["longest_edge"] = min(int(size.get("longest_edge") or MAX_IMAGE_PIXELS), MAX_IMAGE_PIXELS)
    out = processor(images=[pil.convert("RGB")], size=size, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _family_module_inputs(spec, hf_src: Path, prompt: str, image, text_only: bool) -> list[VerifyInput]:
    """Inputs from the family's Megatron module's ``prepare_verify_inputs`` (ERNIE, Step3.7)."""
    from ckptconv.megatron.load import FAMILY_MODULES

    module = importlib.import_module(FAMILY_MODULES[spec.family])
    prepare = getattr(module, "prepare_verify_inputs", None)
    if prepare is None:
        raise ConversionError(f"{module.__name__} has no prepare_verify_inputs; cannot build verify inputs")
    inputs = []
    if text_only:
        inputs.append(VerifyInput("text-only", *prepare(spec, hf_src, prompt=prompt, image=None)))
    if image is not None:
        name, pil = image
        inputs.append(VerifyInput(name, *prepare(spec, hf_src, prompt=prompt, image=pil.convert("RGB"))))
    return inputs


#: family -> builder of the verify inputs; other families use their module's prepare_verify_inputs.
INPUT_BUILDERS = {"qwen2_5_vl": _qwen_inputs}


def build_inputs(spec, hf_src, *, prompt=None, image=None, synthetic_image_=True, text_only=True) -> list[VerifyInput]:
    hf_src = Path(hf_src)
    prompt = prompt or DEFAULT_PROMPT
    picture = None
    if image is not None:
        from PIL import Image

        path = Path(image)
        if not path.is_file():
            raise ConversionError(f"{path}: image file not found")
        try:
            picture = (f"image:{path.name}", Image.open(path))
        except Exception as exc:
            raise ConversionError(f"{path}: cannot read image ({exc})") from exc
    elif synthetic_image_:
        picture = ("image:synthetic", synthetic_image())
    builder = INPUT_BUILDERS.get(spec.family, _family_module_inputs)
    inputs = builder(spec, hf_src, prompt, picture, text_only)
    if not inputs:
        raise ConversionError("nothing to verify: both the text-only and the image input are disabled")
    return inputs


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
def _megatron_logits(ckpt, hf_src, inputs, dtype, device) -> tuple[list[torch.Tensor], str]:
    from ckptconv.megatron.load import build_and_load

    model, spec = build_and_load(ckpt, dtype=dtype, device=device, fallback_config=hf_src)
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
    from ckptconv.megatron.load import FAMILY_MODULES

    config = importlib.import_module(FAMILY_MODULES[spec.family]).hf_config(spec)
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
    from ckptconv.mcore_to_hf import convert_mcore_to_hf

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
) -> VerifyReport:
    """Compare HF ``hf_src`` with the Megatron checkpoint ``mcore_ckpt``; see the module docstring."""
    from ckptconv.megatron import runtime
    from ckptconv.families import normalize_config
    from ckptconv.megatron.load import checkpoint_spec
    from ckptconv.source import read_config

    if mode not in ("direct", "roundtrip"):
        raise ConversionError(f"unknown mode {mode!r}; use direct or roundtrip")
    hf_src, mcore_ckpt = Path(hf_src), Path(mcore_ckpt)
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
    source_spec = normalize_config(read_config(hf_src), where=str(hf_src / "config.json"))
    _check_same_model(source_spec, spec, hf_src, mcore_ckpt)
    inputs = build_inputs(
        spec, hf_src, prompt=prompt, image=image, synthetic_image_=synthetic_image, text_only=text_only
    )
    timings["setup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    megatron_logits, family = _megatron_logits(mcore_ckpt, hf_src, inputs, torch_dtype, dev)
    timings["megatron"] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="ckptconv-roundtrip-") as tmp:
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
                )
                outcome = report.as_dict()
            except ConversionError as exc:
                outcome = {"error": str(exc)}
        # Every rank returns rank 0's verdict (or raises its error), so all exit with the same status.
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


def report_json(report: VerifyReport) -> str:
    return json.dumps(report.as_dict(), indent=2)
