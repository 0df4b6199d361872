"""``ckptconv verify SRC CKPT``: the command-line face of :mod:`ckptconv.verify.runner`.

Exit status: 0 when every figure of every input is inside tolerance, 1 when any is not (the table
or JSON says which, and names the worst input), 2 on errors (one line; ``--debug`` for the traceback).
Under torchrun only rank 0 prints; every rank exits with the same status.

Registered into the main app by ``ckptconv/cli.py``; ``python -m ckptconv.cli_verify`` runs it alone.
"""

from __future__ import annotations

import logging
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ckptconv.errors import ConversionError

EXIT_PASSED, EXIT_FAILED = 0, 1


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Mode(str, Enum):
    direct = "direct"
    roundtrip = "roundtrip"


class MegatronModel(str, Enum):
    auto = "auto"
    bridge = "bridge"
    mimo = "mimo"


class VerifyDType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def _quiet() -> None:
    """Library warnings (no TE / apex, deprecations) and megatron's info logs would bury the table."""
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _is_rank0() -> bool:
    from ckptconv.megatron import runtime

    return runtime.is_rank0()


def verify_command(
    src: str = typer.Argument(..., help="The Hugging Face model the conversion started from: a local directory, or a hub repo id (org/name) resolved through the huggingface_hub cache."),
    ckpt: Path = typer.Argument(..., help="The Megatron torch_dist checkpoint (OUT with latest_checkpointed_iteration.txt, or the checkpoint dir itself)."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size to load the checkpoint at; run under torchrun --nproc-per-node TP."),
    device: Device = typer.Option(Device.auto, "--device", help="auto picks CUDA when available; fp32 on CPU is the default elsewhere."),
    dtype: VerifyDType = typer.Option(VerifyDType.fp32, "--dtype", help="Both models run in this dtype; sets the default tolerances."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text of the prompt (a built-in one by default)."),
    image: Optional[Path] = typer.Option(None, "--image", help="An image file to use instead of the synthetic test card."),
    no_image: bool = typer.Option(False, "--no-image", help="Text-only: skip the image input."),
    mode: Mode = typer.Option(Mode.direct, "--mode", help="direct: HF vs Megatron. roundtrip: also export to HF and compare HF vs re-exported HF."),
    model: MegatronModel = typer.Option(MegatronModel.auto, "--model", help="Megatron model to load CKPT into: bridge = ckptconv's composition (Megatron-Bridge names); mimo = megatron-core's own MimoModel (a --layout mimo checkpoint); auto = the one CKPT's key layout is for."),
    max_abs: Optional[float] = typer.Option(None, "--max-abs", help="Override: largest allowed absolute logit difference."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Override: smallest allowed per-token cosine similarity."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Override: smallest allowed top-1 agreement (0..1)."),
    layerwise: Optional[bool] = typer.Option(
        None, "--layerwise/--whole-model",
        help="--layerwise: stream both models one stage (embedding, vision block, decoder layer, norm, output) at a time, "
             "report each stage in a teacher-forced and a free-running chain and name the first stage outside tolerance. "
             "--whole-model: load both models whole. Default: layerwise when the whole models would not fit in memory.",
        show_default=False,
    ),
    stage_rel: Optional[float] = typer.Option(None, "--stage-rel", help="Override (layerwise): largest allowed per-stage max-abs difference relative to the reference's largest magnitude."),
    stage_cosine: Optional[float] = typer.Option(None, "--stage-cosine", help="Override (layerwise): smallest allowed per-stage cosine similarity at the worst token."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library warnings."),
) -> None:
    """Compare the logits of SRC (Hugging Face) and CKPT (Megatron) on a text prompt and an image."""
    if not debug:
        _quiet()
    if image is not None and no_image:
        _error("--image and --no-image contradict each other", 2)
    try:
        from ckptconv.verify.report import render_stage_table, render_table, report_json
        from ckptconv.verify.runner import run_verify

        report = run_verify(
            src,
            ckpt,
            tp=tp,
            device=device.value,
            dtype=dtype.value,
            prompt=prompt,
            image=image,
            synthetic_image=not no_image,
            text_only=True,
            tolerances={"max_abs": max_abs, "min_cosine": min_cosine, "min_top1": min_top1},
            mode=mode.value,
            layerwise=layerwise,
            stage_tolerances={"max_rel": stage_rel, "min_cosine": stage_cosine},
            megatron_model=model.value,
        )
    except ConversionError as exc:
        if debug:
            raise
        _error(str(exc), exc.exit_code)
    if _is_rank0():
        if as_json:
            print(report_json(report))
        else:
            from rich.console import Console

            console = Console()
            if report.stages:
                console.print(render_stage_table(report))
            console.print(render_table(report))
            console.print(f"path: {report.path_reason or report.path}")
            if not report.passed:
                failing = [r for r in report.results if not r.passed]
                for r in failing:
                    print(f"FAIL {r.label}: {'; '.join(r.failures)}", file=sys.stderr)
                first = report.first_failing_stage()
                if first is not None:
                    print(f"FAIL first stage outside tolerance: {first.stage} ({first.chain}, {first.input}): "
                          f"{'; '.join(first.failures)}", file=sys.stderr)
    raise typer.Exit(EXIT_PASSED if report.passed else EXIT_FAILED)


def _error(message: str, code: int) -> None:
    if _is_rank0():
        print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def main() -> None:
    from ckptconv import interrupt

    interrupt.install()
    typer.run(verify_command)


if __name__ == "__main__":
    main()
