"""``ckptconv`` command line: hf-to-mcore, mcore-to-hf, verify, check.

Errors a user can cause (bad input, bad flags) print as one line and exit 2; ``--debug`` shows the
traceback. Progress goes to stderr; the summary table (or ``--json``) to stdout.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ckptconv.errors import ConversionError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Convert vision-language checkpoints between Hugging Face safetensors and Megatron-Core "
    "torch_dist, and prove the conversion is right. Families: Qwen2.5-VL, ERNIE-4.5-VL-MoE, Step3.7.",
)


def _versions() -> str:
    """ckptconv's version and those of the libraries whose formats it reads and writes (from the
    installed distributions' metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    from ckptconv import __version__

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("megatron-core", "torch", "transformers", "safetensors"))
    return f"ckptconv {__version__} ({libraries})"


def _print_version(value: bool) -> None:
    if value:
        print(_versions())
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print ckptconv's version (and megatron-core's, torch's, transformers', safetensors') and exit."),
) -> None:
    """Convert vision-language checkpoints between Hugging Face safetensors and Megatron-Core
    torch_dist, and prove the conversion is right."""


class _LazyConsole:
    """A rich Console made on first use: runs that print JSON never import rich."""

    def __init__(self, **options):
        self._options, self._console = options, None

    def print(self, *args, **kwargs) -> None:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        self._console.print(*args, **kwargs)


stdout = _LazyConsole()
stderr = _LazyConsole(stderr=True)


class DType(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class KeyLayout(str, Enum):
    """Which Megatron model the checkpoint keys are named for (see ckptconv.core.mapping)."""

    bridge = "bridge"
    mimo = "mimo"


def _fail(message: str, code: int = 2) -> None:
    stderr.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_reporting_errors(debug: bool, fn):
    """Run ``fn``; turn the errors a user can cause into one line and a non-zero exit."""
    try:
        return fn()
    except ConversionError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output", 130)
    except OSError as exc:  # disk full, permissions: still one line
        if debug:
            raise
        _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1)


def _print_summary(summary, as_json: bool) -> None:
    from ckptconv.pipeline import distributed
    from ckptconv.pipeline.report import summary_table

    if distributed.rank_and_world()[0] != 0:
        return
    if as_json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        stdout.print(summary_table(summary))


@app.command("hf-to-mcore")
def hf_to_mcore(
    src: str = typer.Argument(..., help="HF model: a local directory, or a hub repo id (org/name) resolved through the huggingface_hub cache."),
    out: Path = typer.Argument(..., help="Output directory (Megatron-LM layout: latest_checkpointed_iteration.txt + release/). Must not exist unless --force."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size the checkpoint is laid out for; must divide attention heads, KV groups and FFN width."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size; must divide the number of layers (keys are the same for any PP: global layer numbers)."),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel size; must divide the number of experts in every pool."),
    etp: int = typer.Option(1, "--etp", help="Expert tensor-parallel size (Megatron's expert_tensor_parallel_size)."),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="Parameter dtype in the checkpoint; auto keeps each tensor's source dtype (needed for a bit-exact round trip)."),
    vocab_multiple: int = typer.Option(128, "--make-vocab-size-divisible-by", help="Megatron pads the vocabulary to a multiple of this times --tp (zeros, dropped on export)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only after the new checkpoint is complete)."),
    io_threads: int = typer.Option(4, "--io-threads", min=1, help="Writer threads per process (per torchrun rank), each appending to its own __<rank>_<n>.distcp file; copies run in parallel."),
    language_model_only: bool = typer.Option(
        False, "--language-model-only",
        help="Write only the language model, keyed as a plain megatron-core GPTModel (no language_model. prefix: "
             "what Megatron-LM's pretrain_gpt loads); the vision parts are left out. mcore-to-hf --hf-config SRC puts it "
             "back into the full HF model."),
    key_layout: KeyLayout = typer.Option(KeyLayout.bridge, "--layout", help="Megatron names to write: bridge = Megatron-Bridge's (language_model.* + the HF vision modules' names); mimo = megatron-core's own MimoModel (vision tower under modality_submodules.images.encoders.<name>.*, merger/projector under modality_submodules.images.input_projections.0.*)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (every HF key -> Megatron key and transform) and write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or the dry-run plan) as JSON instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
):
    """Convert a Hugging Face checkpoint to a Megatron-Core torch_dist checkpoint, streaming."""
    from ckptconv.pipeline import distributed

    distributed.init_from_env()

    def work():
        from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore, describe_plan, prepare
        from ckptconv.core.layout import ParallelLayout

        if dry_run:
            planned = prepare(src, ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp, make_vocab_size_divisible_by=vocab_multiple),
                              language_model_only, key_layout=key_layout.value)
            rows = describe_plan(planned.plan)
            if as_json:
                print(json.dumps({"family": planned.plan.spec.family, "items": rows}, indent=2))
            else:
                from rich.table import Table

                table = Table(title=f"plan: {planned.plan.spec.family} ({len(rows)} items)")
                for column in ("hf", "mcore", "transform", "shard"):
                    table.add_column(column)
                for row in rows:
                    table.add_row("\n".join(row["hf"]), "\n".join(row["mcore"]), row["transform"], row["shard"])
                stdout.print(table)
            # The plan is what the run would do; say so when the run itself would be refused.
            from ckptconv.pipeline.outdir import check_output

            try:
                check_output(out, force)
            except ConversionError as exc:
                raise ConversionError(f"the real run would be refused: {exc}") from None
            return
        summary = convert_hf_to_mcore(
            src, out, tp=tp, pp=pp, ep=ep, etp=etp, dtype=dtype.value, force=force, io_threads=io_threads,
            make_vocab_size_divisible_by=vocab_multiple, progress=not as_json and sys.stderr.isatty(),
            language_model_only=language_model_only,
            key_layout=key_layout.value,
        )
        _print_summary(summary, as_json)

    try:
        run_reporting_errors(debug, work)
    finally:
        distributed.shutdown()


@app.command("mcore-to-hf")
def mcore_to_hf(
    ckpt: Path = typer.Argument(..., help="Megatron-Core torch_dist checkpoint: a Megatron-LM directory (tracker file + release/ or iter_NNNNNNN/) or a bare torch_dist directory."),
    out: Path = typer.Argument(..., help="Output HF directory (safetensors + index + config + tokenizer). Must not exist unless --force."),
    hf_config: Optional[str] = typer.Option(None, "--hf-config", help="HF model (dir or repo id) whose config/tokenizer to use when the checkpoint has none (trained in Megatron); for a language-model-only checkpoint also the source of the vision weights."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Largest safetensors shard, e.g. 5GB, 500MB. Default: the source's own shard files and tensor order when ckptconv.json records them (every tensor back at its source offset), else 5GB."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only after the export is complete)."),
    io_threads: int = typer.Option(4, "--io-threads", min=1, help="Writer threads per process; each writes whole tensors at their offsets in the shards, in parallel."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
):
    """Export a Megatron-Core torch_dist checkpoint back to Hugging Face safetensors, streaming."""
    from ckptconv.pipeline import distributed

    distributed.init_from_env()

    def work():
        from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

        summary = convert_mcore_to_hf(
            ckpt, out, hf_config=hf_config, max_shard_size=max_shard_size, force=force, io_threads=io_threads,
            progress=not as_json and sys.stderr.isatty(),
        )
        _print_summary(summary, as_json)

    try:
        run_reporting_errors(debug, work)
    finally:
        distributed.shutdown()


@app.command("check")
def check(
    ckpt: Path = typer.Argument(..., help="A checkpoint written by ckptconv hf-to-mcore."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
):
    """Re-hash every file of a ckptconv checkpoint against the checksums in its ckptconv.json."""

    def work():
        from ckptconv.pipeline.manifest import check_checkpoint

        problems = check_checkpoint(ckpt)
        if as_json:
            print(json.dumps({"checkpoint": str(ckpt), "ok": not problems, "problems": problems}))
        elif problems:
            for problem in problems:
                stderr.print(f"[red]{problem}[/]")
        else:
            stdout.print(f"{ckpt}: every file matches its checksum")
        if problems:
            raise typer.Exit(1)

    run_reporting_errors(debug, work)


def _register_verify() -> None:
    from ckptconv.cli_verify import verify_command

    app.command("verify")(verify_command)


_register_verify()


def main() -> None:
    """The console script's entry point is :func:`ckptconv.entry.main` (Ctrl-C handling first)."""
    from ckptconv.entry import main as entry_main

    entry_main()


if __name__ == "__main__":
    main()
