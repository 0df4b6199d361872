"""The verify report: per input and token group figures, the verdict, the table and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from ckptconv.verify.metrics import Tolerances, TokenMetrics

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


def report_json(report: VerifyReport) -> str:
    return json.dumps(report.as_dict(), indent=2)
