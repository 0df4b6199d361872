"""The verify report: per input and token group figures, the verdict, the table and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from ckptconv.verify.metrics import StageTolerances, Tolerances, TokenMetrics

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
class StageResult:
    """One stage of layerwise verify, on one input, in one chain."""

    index: int
    """Position in the family's stage order (data flow): what "first" stage means."""
    stage: str
    input: str
    chain: str
    """``teacher-forced`` (Megatron's stage fed HF's input for it) or ``free-running``."""
    max_abs: float
    rel: float
    cosine: float
    routers: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

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
    path: str = "whole-model"
    """``whole-model`` or ``layerwise``."""
    path_reason: str = ""
    """Why that path (``--layerwise``, or the memory estimate that chose it)."""
    stage_tolerances: StageTolerances | None = None
    stages: list[StageResult] = field(default_factory=list)
    largest_stage_bytes: int = 0
    megatron_model: str = "bridge"
    """The Megatron model the checkpoint was loaded into: ``bridge`` (ours) or ``mimo`` (megatron-core's MimoModel)."""

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results) and all(s.passed for s in self.stages)

    def first_failing_stage(self, chain: str | None = None) -> StageResult | None:
        """The earliest stage (data-flow order) outside tolerance: teacher-forced first (the stage
        wrong on its own), else free-running (drift that no single stage explains)."""
        for wanted in ((chain,) if chain else ("teacher-forced", "free-running")):
            failing = [s for s in self.stages if s.chain == wanted and not s.passed]
            if failing:
                return min(failing, key=lambda s: s.index)
        return None

    @property
    def first_failure(self) -> str | None:
        first = self.first_failing_stage()
        return f"{first.stage} ({first.chain}, {first.input})" if first else None

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
            "megatron_model": self.megatron_model,
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
            "path": self.path,
            "path_reason": self.path_reason,
            "first_failing_stage": self.first_failure,
            "stage_tolerances": asdict(self.stage_tolerances) if self.stage_tolerances else None,
            "largest_stage_bytes": self.largest_stage_bytes,
            "stages": [_finite(asdict(st)) for st in self.stages],
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
            path=d.get("path", "whole-model"),
            path_reason=d.get("path_reason", ""),
            stage_tolerances=StageTolerances(**d["stage_tolerances"]) if d.get("stage_tolerances") else None,
            stages=[StageResult(**{k: _unfinite(v) for k, v in st.items()}) for st in d.get("stages", [])],
            largest_stage_bytes=int(d.get("largest_stage_bytes", 0)),
            megatron_model=d.get("megatron_model", "bridge"),
        )


def _finite(row: dict) -> dict:
    """JSON has no inf/nan: write them as strings."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _unfinite(value):
    return float(value) if value in ("inf", "-inf", "nan") else value


def render_table(report: VerifyReport):
    """A rich Table: one row per input and token group; figures outside tolerance in red, verdict in the title."""
    from rich import box
    from rich.table import Table

    tol = report.tolerances
    verdict = "[bold green]PASS[/]" if report.passed else f"[bold red]FAIL[/], worst input: {report.worst_input}"
    table = Table(
        title=f"verify {report.family} ({report.megatron_model} model, tp={report.tp}, {report.dtype}, {report.device}): {verdict}",
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


def render_stage_table(report: VerifyReport):
    """Layerwise: one row per stage, both chains side by side, for each input; failures in red."""
    from rich import box
    from rich.table import Table

    tol = report.stage_tolerances
    first = report.first_failure
    verdict = f"first stage outside tolerance: [bold red]{first}[/]" if first else "[bold green]every stage within tolerance[/]"
    table = Table(
        title=f"stages ({report.path_reason or report.path}): {verdict}",
        caption=(
            f"stage tolerances: rel max-abs <= {tol.max_rel:g}, cosine >= {tol.min_cosine:g}, "
            f"router top-k >= {tol.min_router_agreement:g}; largest stage {report.largest_stage_bytes / 2**30:.2f} GiB"
        ) if tol else None,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    table.add_column("stage", no_wrap=True)
    for col in ("TF rel", "TF cosine", "FR rel", "FR cosine"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("router top-k TF/FR", overflow="fold")
    rows: dict[tuple[str, int], dict[str, StageResult]] = {}
    for st in report.stages:
        rows.setdefault((st.input, st.index), {})[st.chain] = st
    previous = None
    for (input_name, _), chains in rows.items():
        if input_name != previous:  # one heading row per input
            if previous is not None:
                table.add_section()
            table.add_row(f"[bold]{input_name}[/]")
            previous = input_name
        tf, fr = chains.get("teacher-forced"), chains.get("free-running")
        cells = [(tf or fr).stage]
        for st in (tf, fr):
            if st is None:
                cells += ["-", "-"]
                continue
            bad = {f.split(" ")[0] for f in st.failures}
            cells.append(f"[red]{st.rel:.1e}[/]" if "rel" in bad else f"{st.rel:.1e}")
            cells.append(f"[red]{st.cosine:.6f}[/]" if "cosine" in bad else f"{st.cosine:.6f}")
        routers = []
        for pool in (tf or fr).routers:
            figures = "/".join(f"{st.routers[pool]:.2f}" for st in (tf, fr) if st is not None and pool in st.routers)
            failed = any(st is not None and any(f.startswith(f"{pool} ") for f in st.failures) for st in (tf, fr))
            routers.append(f"[red]{pool} {figures}[/]" if failed else f"{pool} {figures}")
        cells.append(" ".join(routers) or "-")
        table.add_row(*cells)
    return table


def report_json(report: VerifyReport) -> str:
    return json.dumps(report.as_dict(), indent=2)
