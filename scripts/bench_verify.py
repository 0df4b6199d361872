"""How much memory and time does ``ckptconv verify`` need at real size? Layerwise vs whole-model.

Builds (once, kept under ``--work``) a release-shaped random checkpoint with
``ckptconv.fixtures.make_real_width`` (bf16), converts it with ``ckptconv hf-to-mcore``, then runs

  layerwise     ``ckptconv verify HF MCORE --layerwise --json --dtype D``
  whole-model   ``ckptconv verify HF MCORE --whole-model --json --dtype D`` -- only where the
                whole models fit this machine's memory (the same estimate the automatic switch
                uses); otherwise the row says how much it would need

each in its own subprocess; peak RSS is the job's own ``ru_maxrss`` from ``os.wait4`` (the largest
resident set of any process in the job, file pages mapped by it included), wall time is measured
around the subprocess (imports included). The verify report's verdict, first failing stage, largest
stage and the final-logit figures are printed with it.

Models (``--model``):
  qwen7b     Qwen2.5-VL-7B widths, full depth: 28 layers, 32 vision blocks (15.5 GiB bf16)
  ernie28b   ERNIE-4.5-VL-28B-A3B widths, 64+64 experts, 4 layers (1 dense + 3 MoE), 32 vision blocks
  qwen7b-l2  Qwen2.5-VL-7B widths, 2 layers, 2 vision blocks (small enough for the whole-model path)

Usage:
  scripts/bench_verify.py --model qwen7b --dtype fp32 --work /scratch/bench
  scripts/bench_verify.py --model ernie28b --dtype bf16 --work /scratch/bench --delete
  --delete removes the model's directories after measuring (disks are small).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3

MODELS = {
    "qwen7b": dict(family="qwen2_5_vl", variant="7b", num_layers=28, vision_layers=32),
    "qwen7b-l2": dict(family="qwen2_5_vl", variant="7b", num_layers=2, vision_layers=2),
    "ernie28b": dict(family="ernie4_5_vl_moe", variant=None, num_layers=4, vision_layers=32),
}


def build(name: str, work: Path) -> tuple[Path, Path]:
    hf, mcore = work / f"{name}_hf", work / f"{name}_mcore"
    if not (hf / "config.json").is_file():
        from ckptconv.fixtures import make_real_width

        t0 = time.perf_counter()
        make_real_width(out_dir=hf, **MODELS[name])
        print(f"[{name}] random HF checkpoint: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not (mcore / "ckptconv.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ckptconv", "hf-to-mcore", str(hf), str(mcore), "--force", "--json"],
                       check=True, capture_output=True, cwd=REPO)
        print(f"[{name}] hf-to-mcore: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return hf, mcore


def run(args: list[str]) -> dict:
    """One verify in its own process: wall seconds, peak RSS (GiB), exit status, the JSON report."""
    import tempfile

    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "ckptconv", "verify", *args, "--json"], cwd=REPO, env=env,
                                stdout=out_file, stderr=err_file)
        _, status, usage = os.wait4(proc.pid, 0)  # this job's own peak RSS
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0), err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    peak = usage.ru_maxrss * 1024 / GIB
    row = {"exit": proc.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2)}
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        row["error"] = (err.strip().splitlines() or ["?"])[-1]
        return row
    row.update(
        passed=report["passed"],
        path=report["path_reason"],
        first_failing_stage=report["first_failing_stage"],
        largest_stage_gib=round(report["largest_stage_bytes"] / GIB, 2),
        worst_stage_rel=max((s["rel"] for s in report["stages"]), default=None),
        logits={i["name"]: {g: (m and {"max_abs": m["max_abs"], "top1": m["top1"]}) for g, m in i["tokens"].items()}
                for i in report["inputs"]},
        timings_s=report["timings_s"],
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-whole-model", action="store_true")
    parser.add_argument("--delete", action="store_true", help="remove the checkpoints after measuring")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    hf, mcore = build(args.model, args.work)
    common = [str(hf), str(mcore), "--dtype", args.dtype, "--device", args.device]
    rows = {"model": args.model, **MODELS[args.model], "dtype": args.dtype,
            "hf_bytes_gib": round(sum(f.stat().st_size for f in hf.glob("*.safetensors")) / GIB, 2)}
    rows["layerwise"] = run([*common, "--layerwise"])
    print(json.dumps(rows["layerwise"], indent=1), file=sys.stderr)
    if not args.skip_whole_model:
        import torch

        from ckptconv.formats.torch_dist import resolve_checkpoint_dir
        from ckptconv.verify.layerwise import available_bytes, whole_model_bytes
        from ckptconv.verify.metrics import DTYPES

        needed, free = whole_model_bytes(resolve_checkpoint_dir(mcore), DTYPES[args.dtype]), available_bytes()
        if needed <= 0.8 * free:
            rows["whole_model"] = run([*common, "--whole-model"])
        else:
            rows["whole_model"] = {"skipped": f"needs about {needed / GIB:.1f} GiB, {free / GIB:.1f} GiB available"}
    print(json.dumps(rows, indent=2))
    if args.delete:
        shutil.rmtree(hf, ignore_errors=True)
        shutil.rmtree(mcore, ignore_errors=True)
    return 0 if rows["layerwise"].get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
