"""Logit comparison figures and their tolerances."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from ckptconv.errors import ConversionError

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


# --------------------------------------------------------------------------- per stage (layerwise)


@dataclass(frozen=True)
class StageTolerances:
    """What one stage's output may differ by (layerwise verify)."""

    max_rel: float
    """max-abs difference over the reference's largest magnitude (scale-free from stage to stage)."""
    min_cosine: float
    """Cosine similarity of the two activation vectors, at the worst token."""
    min_router_agreement: float
    """Mean fraction of each token's top-k experts both routers chose, per expert pool."""

    def overridden(self, overrides: dict | None) -> "StageTolerances":
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ConversionError(f"unknown stage tolerance(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: float(v) for k, v in overrides.items()})


# fp32: both sides differ in summation order only (a few 1e-7 relative per stage on the fixtures,
# ~1e-6 at 7B width). Half precision rounds each side's activations differently.
DEFAULT_STAGE_TOLERANCES: dict[str, StageTolerances] = {
    "float32": StageTolerances(max_rel=1e-4, min_cosine=0.99999, min_router_agreement=0.99),
    "bfloat16": StageTolerances(max_rel=0.1, min_cosine=0.99, min_router_agreement=0.9),
    "float16": StageTolerances(max_rel=0.05, min_cosine=0.995, min_router_agreement=0.9),
}


@dataclass
class StageMetrics:
    max_abs: float
    rel: float
    cosine: float
    routers: dict[str, float]
    """Per expert pool: router top-k agreement (only MoE stages)."""

    def violations(self, tol: StageTolerances) -> list[str]:
        out = []
        if not math.isfinite(self.rel) or self.rel > tol.max_rel:
            out.append(f"rel {self.rel:.3g} > {tol.max_rel:g}")
        if not math.isfinite(self.cosine) or self.cosine < tol.min_cosine:
            out.append(f"cosine {self.cosine:.8g} < {tol.min_cosine:.8g}")
        for pool, agreement in self.routers.items():
            if not agreement >= tol.min_router_agreement:
                out.append(f"{pool} router top-k {agreement:.4f} < {tol.min_router_agreement:g}")
        return out


@torch.no_grad()
def compare_activations(reference: torch.Tensor, test: torch.Tensor) -> tuple[float, float, float]:
    """(max-abs, relative max-abs, worst-token cosine) of two activations of the same shape, in
    float64; rows are tokens (the last axis is the feature axis)."""
    if reference.shape != test.shape:
        raise ConversionError(f"activation shapes differ: reference {tuple(reference.shape)}, converted {tuple(test.shape)}")
    width = reference.shape[-1] if reference.dim() else 1
    a, b = reference.double().reshape(-1, width), test.double().reshape(-1, width)
    if a.numel() == 0:
        return 0.0, 0.0, 1.0
    max_abs = float((a - b).abs().max())
    scale = float(a.abs().max())
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30)
    both_zero = (a == 0).all(-1) & (b == 0).all(-1)  # rows zero on both sides agree
    cosine = torch.where(both_zero, torch.ones_like(cosine), cosine)
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf, math.inf, -math.inf
    return max_abs, rel, float(cosine.min())


def router_agreement(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean over tokens of |experts chosen by both| / |chosen by the reference| (``[N, E]`` bool)."""
    if reference.shape != test.shape:
        raise ConversionError(f"router choices cover {tuple(reference.shape)} vs {tuple(test.shape)} (tokens, experts)")
    if reference.shape[0] == 0:
        return 1.0
    both = (reference & test).sum(-1).double()
    return float((both / reference.sum(-1).clamp(min=1).double()).mean())
