"""`make bench` / `make bench-smoke`: how fast and how lean is ckptconv, side by side with the alternatives.

For every model (real published widths, few layers, random bf16 weights written by
``ckptconv.fixtures.make_real_width``) this times, one job after another and EACH JOB IN ITS OWN
SUBPROCESS (peak RSS is that job's own ``ru_maxrss`` from ``os.wait4``: the largest resident set of
any process in the job's tree, torchrun ranks included):

  copy          ``cat SRC/*.safetensors > DST`` on the same disk: the I/O limit for hf-to-mcore
  hf-to-mcore   ``ckptconv hf-to-mcore SRC OUT --json``
  copy(mcore)   ``cat OUT/release/*.distcp > DST``: the I/O limit for mcore-to-hf
  mcore-to-hf   ``ckptconv mcore-to-hf OUT HF --json``
  naive         ``AutoModelForImageTextToText.from_pretrained(SRC)`` -> ``model.state_dict()`` ->
                ``torch.distributed.checkpoint.save`` (the torch_dist on-disk format, HF key names,
                no Megatron re-layout: a lower bound on what a from_pretrained-based converter costs)
  mbridge       mbridge 0.15.1 (Qwen2.5-VL only): ``AutoBridge`` -> ``get_model(weight_path=SRC)``
                -> ``dist_checkpointing.save``; if it cannot run here, the exact reason is recorded
  torchrun-npN  ``torchrun --nproc-per-node N -m ckptconv hf-to-mcore SRC OUT --json`` (N = 1, 2)

Page cache: before every timed job dirty pages are flushed (``sync``), the job's input is dropped from
the page cache (``posix_fadvise(DONTNEED)``) and read once (all untimed), so every contender starts
from the same warm cache, as if its input had been read from disk, and nobody pays for the previous
job's write-back. Nobody fsyncs its output, ``cat`` included.

Wall time is measured around the subprocess (interpreter start-up and imports included: what a user
waits for); ``in-proc s`` is the converter's own ``seconds`` from its ``--json`` summary.

Usage:
  scripts/bench.py                      # default models, table + docs-style JSON on stdout
  scripts/bench.py --smoke              # tiny model only, a few seconds per job, no mbridge
  scripts/bench.py --models qwen3b-l4,qwen3b-l16 --json-out bench.json --plot docs/benchmarks.png
  scripts/bench.py --plot-only bench.json --plot docs/benchmarks.png
Exit status is non-zero if any measured command failed (an mbridge that cannot run on this machine
is recorded as unavailable, not as a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
BIN = Path(sys.executable).parent
GIB = 1024**3

# name -> how to build it. "tiny" is the Qwen2.5-VL tiny fixture (bf16); the others are
# make_real_width(family, num_layers=..., variant=..., num_experts=...), bf16, 2 vision blocks.
MODELS: dict[str, dict] = {
    "tiny": dict(label="tiny Qwen2.5-VL (2 layers, hidden 64)", tiny=True),
    "qwen3b-l4": dict(label="Qwen2.5-VL-3B widths, 4 layers", family="qwen2_5_vl", variant="3b", num_layers=4),
    "qwen3b-l16": dict(label="Qwen2.5-VL-3B widths, 16 layers", family="qwen2_5_vl", variant="3b", num_layers=16),
    "qwen7b-l4": dict(label="Qwen2.5-VL-7B widths, 4 layers", family="qwen2_5_vl", variant="7b", num_layers=4),
    "ernie-l2": dict(label="ERNIE-4.5-VL-28B-A3B widths, 2 layers (1 dense + 1 MoE, 64+64 experts)",
                     family="ernie4_5_vl_moe", num_layers=2),
    "step3p7-l4": dict(label="Step3.7 widths, 4 layers (3 dense + 1 MoE, 32 of 288 experts)",
                       family="step3p7", num_layers=4, num_experts=32),
}
DEFAULT_MODELS = ["qwen3b-l4", "qwen3b-l16", "qwen7b-l4", "ernie-l2", "step3p7-l4"]
TARGET_MODEL = "qwen3b-l16"  # targets are judged on the 3B-width Qwen2.5-VL (largest one measured)


@dataclass
class Result:
    model: str
    job: str
    command: str
    ok: bool
    wall_s: float | None = None
    bytes: int | None = None  # bytes of input the job converts / copies
    peak_rss_bytes: int | None = None
    inproc_s: float | None = None  # converter's own timing (--json "seconds")
    copy_wall_s: float | None = None  # the copy this row is compared with
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float | None:
        return self.bytes / self.wall_s / 1e9 if self.ok and self.bytes and self.wall_s else None

    @property
    def ratio(self) -> float | None:
        return self.wall_s / self.copy_wall_s if self.ok and self.wall_s and self.copy_wall_s else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(gbps=self.gbps, ratio_to_copy=self.ratio,
                 peak_rss_gib=self.peak_rss_bytes / GIB if self.peak_rss_bytes else None)
        return d


# --------------------------------------------------------------------------- subprocess jobs


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_measured(argv: list[str], *, shell: bool = False) -> tuple[int, float, int, str, str]:
    """Run one job in its own process group; return (rc, wall seconds, peak RSS bytes, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, shell=shell, stdout=out, stderr=err, env=_env(), cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        # ru_maxrss is in KiB on Linux: max over the child and the descendants it waited for
        return proc.returncode, wall, usage.ru_maxrss * 1024, out.read().decode(errors="replace"), \
            err.read().decode(errors="replace")


def warm_and_flush(paths: list[Path]) -> None:
    """Untimed: flush dirty pages, drop the input's pages from the page cache, and read it once.

    Every contender then finds its input cached the way a checkpoint read from disk is (pages
    brought in by readahead), whatever wrote it a moment ago: pages left behind by a write are
    small and measurably slower to copy from (a ``cat`` of a just-written ``.distcp`` took 2x as
    long as the same ``cat`` after a re-read), which would otherwise favour whoever reads files
    that were written long ago."""
    files = [p for path in paths for p in (sorted(path.rglob("*")) if path.is_dir() else [path]) if p.is_file()]
    os.sync()
    for f in files:
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    os.sync()


def dir_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:400] if lines else ""


def error_line(text: str) -> str:
    """The most telling line of a failed job's stderr (torchrun ends with a '=====' banner)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not set(ln.strip()) <= set("=-")]
    for ln in reversed(lines):
        if any(w in ln for w in ("Error", "error:", "Exception", "Traceback")):
            return ln[:400]
    return lines[-1][:400] if lines else ""


def parse_json_stdout(text: str) -> dict | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------- job bodies (run with --job)


def job_build(name: str, out: str) -> None:
    import torch

    from ckptconv import fixtures

    spec = MODELS[name]
    if spec.get("tiny"):
        fixtures.make_tiny("qwen2_5_vl", out, dtype=torch.bfloat16, with_processor=False)
    else:
        fixtures.make_real_width(spec["family"], out, num_layers=spec["num_layers"], dtype=torch.bfloat16,
                                 variant=spec.get("variant"), num_experts=spec.get("num_experts"))


def job_naive(src: str, out: str) -> None:
    """from_pretrained -> state_dict() -> torch.distributed.checkpoint.save (single process, no group)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForImageTextToText

    warnings.filterwarnings("ignore")
    model = AutoModelForImageTextToText.from_pretrained(src, dtype="auto")
    state_dict = model.state_dict()
    dcp.save(state_dict, checkpoint_id=out)
    print(json.dumps({"tensors": len(state_dict), "dtype": str(next(iter(state_dict.values())).dtype)}))


def job_mbridge(src: str, out: str) -> None:
    """mbridge 0.15.1 as its README shows it: AutoBridge -> get_model(weight_path) -> dist_checkpointing.save.

    On CPU: gloo process group, ``use_cpu_initialization=True``. Every blocker met is recorded (JSON on
    stdout, exit 3): first the stock call; if that dies on the transformers-5 config
    (``rope_scaling``/``rope_theta`` moved into ``text_config``), once more with those attributes
    copied to the top-level config, to find out what fails next.
    """
    import traceback
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu

    mpu.initialize_model_parallel(1, 1)
    from transformers import AutoConfig

    from mbridge import AutoBridge

    blockers = []

    def attempt(bridge):
        model = bridge.get_model(weight_path=src, bf16=True, use_cpu_initialization=True)
        dist_checkpointing.save(model[0].sharded_state_dict(), out)

    def where(exc: BaseException) -> str:
        frames = traceback.extract_tb(exc.__traceback__)
        f = frames[-1]
        return f"{type(exc).__name__}: {exc} (at {Path(f.filename).name}:{f.lineno} in {f.name})"

    try:
        attempt(AutoBridge.from_pretrained(src))
        print(json.dumps({"ok": True, "blockers": []}))
        return
    except Exception as exc:  # noqa: BLE001 - recorded, not hidden
        blockers.append("stock: " + where(exc))
    try:
        cfg = AutoConfig.from_pretrained(src)
        text = cfg.text_config
        for key in ("rope_parameters", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
                    "hidden_act", "attention_dropout"):
            if hasattr(text, key):
                object.__setattr__(cfg, key, getattr(text, key))
        object.__setattr__(cfg, "rope_theta", text.rope_parameters["rope_theta"])
        attempt(AutoBridge.from_config(cfg))
        print(json.dumps({"ok": True, "blockers": blockers}))
        return
    except Exception as exc:  # noqa: BLE001
        blockers.append("with the config shim: " + where(exc))
    print(json.dumps({"ok": False, "blockers": blockers}))
    sys.exit(3)


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, workdir: Path, repeat: int, smoke: bool):
        self.workdir = workdir
        self.repeat = repeat
        self.smoke = smoke
        self.results: list[Result] = []
        self.mbridge: dict = {}

    def measure(self, model: str, job: str, argv: list[str], *, inputs: list[Path], outputs: list[Path],
                nbytes: int, copy_wall: float | None = None, shell: bool = False, keep_output: bool = False,
                expect_json: bool = False) -> Result:
        """Best (lowest wall) of ``repeat`` runs; outputs removed before each run (and after, unless kept)."""
        shown = argv if isinstance(argv, str) else " ".join(str(a) for a in argv)
        best: Result | None = None
        for i in range(self.repeat):
            for p in outputs:
                rm(p)
            warm_and_flush(inputs)
            load1 = os.getloadavg()[0]
            rc, wall, rss, out, err = run_measured(argv, shell=shell)
            res = Result(model=model, job=job, command=shown, ok=rc == 0, wall_s=round(wall, 3), bytes=nbytes,
                         peak_rss_bytes=rss, copy_wall_s=copy_wall, extra={"load1_before": round(load1, 2)})
            if rc != 0:
                res.error = f"exit {rc}: {error_line(err) or last_line(out)}"
                res.extra["stdout"] = out[-2000:]
                res.extra["stderr"] = err[-4000:]
            elif expect_json:
                summary = parse_json_stdout(out)
                if summary and "seconds" in summary:
                    res.inproc_s = summary["seconds"]
                    res.extra["bytes_written"] = summary.get("bytes_written")
                    res.extra["inproc_peak_rss_bytes"] = summary.get("peak_rss_bytes")
            log(f"  {model:>11} {job:<13} rc={rc} wall={wall:7.2f}s rss={rss / GIB:6.2f} GiB load={load1:.1f}"
                + (f"  {res.error}" if res.error else ""))
            if not res.ok:  # a failure in any repeat is the result: never hidden behind a good run
                best = res
                break
            if best is None or res.wall_s < best.wall_s:
                best = res
        if not keep_output:
            for p in outputs:
                rm(p)
        self.results.append(best)
        return best

    def run_model(self, name: str, *, mbridge: bool, torchrun: bool) -> None:
        spec = MODELS[name]
        root = self.workdir / name
        rm(root)
        root.mkdir(parents=True)
        src, mc, hf, copy_dst, naive_out = root / "hf", root / "mcore", root / "hf-export", root / "copy.bin", \
            root / "naive"
        py = sys.executable
        log(f"[{name}] building {spec['label']} in {src}")
        t0 = time.perf_counter()
        rc, wall, _, out, err = run_measured([py, str(SCRIPT), "--job", "build", name, str(src)])
        if rc != 0:
            self.results.append(Result(model=name, job="build", command="make_real_width", ok=False,
                                       error=f"exit {rc}: {last_line(err)}"))
            log(f"  build failed: {last_line(err)}")
            return
        src_bytes = dir_bytes(src, "*.safetensors")
        log(f"  built {src_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s")
        ckptconv = str(BIN / "ckptconv")

        copy = self.measure(name, "copy", f"cat {src}/*.safetensors > {copy_dst}", shell=True, inputs=[src],
                            outputs=[copy_dst], nbytes=src_bytes)
        cw = copy.wall_s if copy.ok else None
        h2m = self.measure(name, "hf-to-mcore", [ckptconv, "hf-to-mcore", str(src), str(mc), "--json"],
                           inputs=[src], outputs=[mc], nbytes=src_bytes, copy_wall=cw, keep_output=True,
                           expect_json=True)
        if h2m.ok:
            mc_bytes = dir_bytes(mc / "release", "*.distcp")
            copy_mc = self.measure(name, "copy(mcore)", f"cat {mc}/release/*.distcp > {copy_dst}", shell=True,
                                   inputs=[mc], outputs=[copy_dst], nbytes=mc_bytes)
            self.measure(name, "mcore-to-hf", [ckptconv, "mcore-to-hf", str(mc), str(hf), "--json"], inputs=[mc],
                         outputs=[hf], nbytes=mc_bytes, copy_wall=copy_mc.wall_s if copy_mc.ok else None,
                         expect_json=True)
        rm(mc)
        self.measure(name, "naive", [py, str(SCRIPT), "--job", "naive", str(src), str(naive_out)], inputs=[src],
                     outputs=[naive_out], nbytes=src_bytes, copy_wall=cw)
        if mbridge:
            self.run_mbridge(name, src, root / "mbridge", src_bytes, cw)
        if torchrun:
            for n in ((2,) if self.smoke else (1, 2)):  # smoke: only prove the torchrun path works
                argv = [str(BIN / "torchrun"), "--nproc-per-node", str(n), "--master-port", str(free_port()),
                        "-m", "ckptconv", "hf-to-mcore", str(src), str(mc), "--json"]
                self.measure(name, f"torchrun-np{n}", argv, inputs=[src], outputs=[mc], nbytes=src_bytes,
                             copy_wall=cw, expect_json=True)
        rm(root)

    def run_mbridge(self, name: str, src: Path, out: Path, nbytes: int, copy_wall: float | None) -> None:
        spec = MODELS[name]
        try:
            import importlib.metadata as md

            version = md.version("mbridge")
        except Exception:  # noqa: BLE001
            version = None
        if version is None:
            reason = "mbridge not installed (pip install mbridge==0.15.1 --no-deps)"
        elif spec.get("family") != "qwen2_5_vl" and not spec.get("tiny"):
            reason = (f"mbridge {version} has no {spec.get('family')} bridge (its VL bridges: qwen2_5_vl, glm4v, "
                      "glm4v_moe, internvl_chat, gemma3)")
        else:
            reason = None
        if reason:
            self.results.append(Result(model=name, job="mbridge", command="-", ok=False, error=reason,
                                       extra={"unavailable": True}))
            log(f"  {name:>11} mbridge       n/a: {reason}")
            return
        res = self.measure(name, "mbridge", [sys.executable, str(SCRIPT), "--job", "mbridge", str(src), str(out)],
                           inputs=[src], outputs=[out], nbytes=nbytes, copy_wall=copy_wall)
        if not res.ok:
            info = parse_json_stdout(res.extra.get("stdout", "")) or {}
            res.extra["unavailable"] = True
            res.extra["blockers"] = info.get("blockers", [])
            res.error = "cannot run on this CPU machine: " + " | ".join(info.get("blockers", [])) or res.error
            self.mbridge = {"version": version, "blockers": info.get("blockers", []), "error": res.error}

    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.ok and not r.extra.get("unavailable")]


# --------------------------------------------------------------------------- reporting


def find(results: list[dict], model: str, job: str) -> dict | None:
    return next((r for r in results if r["model"] == model and r["job"] == job), None)


def judge_targets(results: list[dict]) -> list[dict]:
    """The issue's targets on the 3B-width Qwen2.5-VL (bf16), 2-core machine."""
    model = TARGET_MODEL if find(results, TARGET_MODEL, "hf-to-mcore") else "qwen3b-l4"
    h2m, m2h, naive = (find(results, model, j) for j in ("hf-to-mcore", "mcore-to-hf", "naive"))
    l4, l16 = find(results, "qwen3b-l4", "hf-to-mcore"), find(results, "qwen3b-l16", "hf-to-mcore")
    out = []

    def add(name, value, ok, fmt):
        out.append(dict(target=name, model=model, value=value, met=ok if value is not None else None,
                        shown=fmt.format(value) if value is not None else "not measured"))

    ok = lambda r: r is not None and r["ok"]  # noqa: E731
    v = h2m["ratio_to_copy"] if ok(h2m) else None
    add("hf-to-mcore wall / copy <= 1.3", v, v is not None and v <= 1.3, "{:.2f}x")
    v = m2h["ratio_to_copy"] if ok(m2h) else None
    add("mcore-to-hf wall / copy <= 1.3", v, v is not None and v <= 1.3, "{:.2f}x")
    for label, r in (("hf-to-mcore", h2m), ("mcore-to-hf", m2h)):
        v = r["peak_rss_gib"] if ok(r) else None
        add(f"{label} peak RSS <= 1.5 GiB", v, v is not None and v <= 1.5, "{:.2f} GiB")
    v = naive["wall_s"] / h2m["wall_s"] if ok(naive) and ok(h2m) else None
    add(">= 3x faster than naive", v, v is not None and v >= 3, "{:.2f}x")
    v = naive["peak_rss_bytes"] / h2m["peak_rss_bytes"] if ok(naive) and ok(h2m) else None
    add(">= 5x less memory than naive", v, v is not None and v >= 5, "{:.2f}x")
    v = abs(l16["peak_rss_bytes"] / l4["peak_rss_bytes"] - 1) if ok(l4) and ok(l16) else None
    add("peak RSS 16 vs 4 layers differs < 10 %", v, v is not None and v < 0.10, "{:.1%}")
    return out


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False, width=200)
    table = Table(title="ckptconv benchmark (each job in its own process; warm page cache)")
    for col in ("model", "job", "GB", "wall s", "in-proc s", "GB/s", "x copy", "peak RSS GiB", "note"):
        table.add_column(col, justify="left" if col in ("model", "job", "note") else "right")
    f = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in doc["results"]:
        note = "" if r["ok"] else ("[yellow]" if r["extra"].get("unavailable") else "[red]") + (r["error"] or "")[:90]
        table.add_row(r["model"], r["job"], f(r["bytes"] / 1e9 if r["bytes"] else None, ".2f"), f(r["wall_s"], ".2f"),
                      f(r["inproc_s"], ".2f"), f(r["gbps"], ".2f"), f(r["ratio_to_copy"], ".2f"),
                      f(r["peak_rss_gib"], ".2f"), note)
    console.print(table)
    if doc.get("speedup_torchrun"):
        for m, s in doc["speedup_torchrun"].items():
            console.print(f"torchrun hf-to-mcore {m}: np2 is {s:.2f}x the speed of np1")
    if doc.get("targets"):
        t = Table(title="targets (3B-width Qwen2.5-VL, bf16)")
        for col in ("target", "model", "value", "met"):
            t.add_column(col)
        for row in doc["targets"]:
            met = {True: "[green]yes", False: "[red]no", None: "-"}[row["met"]]
            t.add_row(row["target"], row["model"], row["shown"], met)
        console.print(t)


def plot(doc: dict, png: str) -> None:
    """Time and peak memory against model size (not needed by --smoke: matplotlib is imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in doc["results"] if r["ok"] and r["bytes"]]
    jobs = ["copy", "hf-to-mcore", "copy(mcore)", "mcore-to-hf", "naive", "torchrun-np2"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for job in jobs:
        rows = sorted((r for r in results if r["job"] == job), key=lambda r: r["bytes"])
        if not rows:
            continue
        xs = [r["bytes"] / 1e9 for r in rows]
        ax1.plot(xs, [r["wall_s"] for r in rows], "o-", label=job)
        if job not in ("copy", "copy(mcore)"):
            ax2.plot(xs, [r["peak_rss_gib"] for r in rows], "o-", label=job)
    for ax, ylabel in ((ax1, "wall time (s)"), (ax2, "peak RSS (GiB)")):
        ax.set_xlabel("checkpoint size (GB, bf16 safetensors)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title("time vs model size")
    ax2.set_title("peak memory vs model size")
    for r in results:
        if r["job"] == "hf-to-mcore":
            ax1.annotate(r["model"], (r["bytes"] / 1e9, r["wall_s"]), fontsize=7, textcoords="offset points",
                         xytext=(3, 3))
    fig.suptitle(f"ckptconv vs copy vs naive ({doc['machine']['cpus']} CPUs, warm page cache)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    log(f"plot written to {png}")


def git_info() -> dict:
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_ckptconv": bool(git("status", "--porcelain", "ckptconv"))}


def machine_info() -> dict:
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")),
               "0")
    return {"cpus": os.cpu_count(), "mem_gib": round(int(mem) / 1024**2, 1), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_at_start": os.getloadavg()}


def default_workdir() -> Path:
    """A temp dir on the same disk (st_dev) as the repo: next to it if possible, else inside it."""
    for parent in (REPO.parent, REPO):
        try:
            if os.access(parent, os.W_OK) and parent.stat().st_dev == REPO.stat().st_dev:
                return Path(tempfile.mkdtemp(prefix=".ckptconv-bench-", dir=parent))
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix=".ckptconv-bench-", dir=REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model only (seconds); no mbridge; CI proof the script works")
    p.add_argument("--models", help=f"comma-separated, from: {', '.join(MODELS)} (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--workdir", type=Path, help="where checkpoints are written (default: a temp dir on the repo's disk)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (checkpoints are still deleted per model)")
    p.add_argument("--json-out", type=Path, help="write all results as JSON here")
    p.add_argument("--repeat", type=int, default=1, help="runs per timed job; the fastest is kept (default 1)")
    p.add_argument("--torchrun-models", help=f"models that also get torchrun np1/np2 (default: {TARGET_MODEL}; smoke: tiny)")
    p.add_argument("--no-mbridge", action="store_true", help="skip the mbridge contender")
    p.add_argument("--plot", help="write a PNG of time and peak RSS against model size (needs matplotlib)")
    p.add_argument("--plot-only", type=Path, help="do not measure: re-plot / re-print the given --json-out file")
    p.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.job:
        kind, *rest = args.job
        {"build": job_build, "naive": job_naive, "mbridge": job_mbridge}[kind](*rest)
        return 0

    if args.plot_only:
        doc = json.loads(args.plot_only.read_text())
        print_table(doc)
        if args.plot:
            plot(doc, args.plot)
        return 0

    models = ["tiny"] if args.smoke else (args.models.split(",") if args.models else DEFAULT_MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    torchrun_models = set((args.torchrun_models or ("tiny" if args.smoke else TARGET_MODEL)).split(","))

    workdir = args.workdir or default_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir} (warm-up: every job's input is read once and `sync`ed before it is timed)")
    bench = Bench(workdir, max(1, args.repeat), args.smoke)
    t0 = time.perf_counter()
    try:
        for name in models:
            bench.run_model(name, mbridge=not (args.smoke or args.no_mbridge), torchrun=name in torchrun_models)
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(workdir, ignore_errors=True)

    results = [r.as_dict() for r in bench.results]
    speedup = {}
    for m in torchrun_models:
        a, b = find(results, m, "torchrun-np1"), find(results, m, "torchrun-np2")
        if a and b and a["ok"] and b["ok"]:
            speedup[m] = a["wall_s"] / b["wall_s"]
    doc = {
        "command": " ".join(["scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "git": git_info(),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "page_cache": "warm: each job's input read once (untimed) and dirty pages synced before timing; nobody fsyncs",
        "peak_rss": "ru_maxrss of the job's process tree from os.wait4 (largest single process, torchrun ranks included)",
        "naive": "AutoModelForImageTextToText.from_pretrained(dtype='auto') -> state_dict() -> "
                 "torch.distributed.checkpoint.save (torch_dist format, HF key names, no re-layout)",
        "models": {m: MODELS[m]["label"] for m in models},
        "results": results,
        "speedup_torchrun": speedup,
        "mbridge": bench.mbridge,
        "targets": [] if args.smoke else judge_targets(results),
    }
    print_table(doc)
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"JSON written to {args.json_out}")
    if args.plot:
        plot(doc, args.plot)
    failed = bench.failures()
    if failed:
        log(f"FAILED: {len(failed)} measured command(s): " + "; ".join(f"{r.model}/{r.job}: {r.error}" for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
