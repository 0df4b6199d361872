"""Ctrl-C (SIGINT) sent to a real ``ckptconv`` process at several moments -- inside ``import torch``, in
the middle of writing OUT -- ends with exactly one line, exit
status 130, no traceback, and no OUT or staging directory left behind. (The first milliseconds of
interpreter start-up, before ckptconv's entry point runs, keep Python's own Ctrl-C behaviour.)

Oracle: the process's own exit status and stderr, and the filesystem afterwards. A moment is hit
deterministically: the test watches the process (``/proc/<pid>/maps`` shows libtorch being mapped;
the staging directory appears), stops it there with SIGSTOP, queues SIGINT, and lets it go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env
from ckptconv.pipeline.outdir import staging_path


def _start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ckptconv", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=cwd)


def _mapped(process: subprocess.Popen) -> str:
    try:
        return Path(f"/proc/{process.pid}/maps").read_text()
    except OSError:
        return ""


def _torch_loading(process: subprocess.Popen) -> bool:
    """``import torch`` has begun: its core library is mapped."""
    return "libtorch_cpu" in _mapped(process)


def _deep_in_torch_import(marker: str):
    """Later in ``import torch``: an extension module torch's own imports load (``cmath`` with its
    symbolic-math modules, ``_posixshmem`` with torch.multiprocessing) is mapped after libtorch."""
    return lambda process: "libtorch_cpu" in (maps := _mapped(process)) and marker in maps


def _interrupt_when(process: subprocess.Popen, moment, timeout: float = 120) -> bool:
    """Stop the process as soon as ``moment(process)`` holds, queue SIGINT, resume it. False if the
    process ended before the moment came."""
    deadline = time.monotonic() + timeout
    while not moment(process):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    return True


def _assert_clean_interrupt(process: subprocess.Popen, out: Path) -> None:
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, stderr[-3000:])
    assert stderr.strip().splitlines() == ["error: interrupted; nothing was written to the output"], stderr[-3000:]
    assert not out.exists() and not staging_path(out).exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("moment", ["libtorch_cpu", "cmath", "_posixshmem"])
def test_inside_import_torch_during_a_dtype_cast(moment, tiny_qwen, tmp_path):
    """The reported crash: ``--dtype bf16`` on an fp32 source imports torch for the cast, mid-run;
    a Ctrl-C inside that import used to print ~300 lines and die with SIGSEGV."""
    out = tmp_path / "out"
    process = _start("hf-to-mcore", tiny_qwen, out, "--dtype", "bf16", cwd=tmp_path)
    assert _interrupt_when(process, _deep_in_torch_import(moment)), "torch was never imported"
    _assert_clean_interrupt(process, out)


@pytest.mark.parametrize("command", ["hf-to-mcore", "mcore-to-hf"])
def test_while_writing_the_output(command, tiny_qwen, tmp_path):
    """OUT is being written (its staging directory exists): the staging directory goes, OUT never appears."""
    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore

    src = tiny_qwen
    if command == "mcore-to-hf":
        src = tmp_path / "mcore"
        convert_hf_to_mcore(str(tiny_qwen), src)
    for attempt in range(5):  # the tiny model writes in ~0.05 s: retry if the moment was missed
        out = tmp_path / f"out{attempt}"
        process = _start(command, src, out, cwd=tmp_path)
        if _interrupt_when(process, lambda p: staging_path(out).exists()) and not out.exists():
            _assert_clean_interrupt(process, out)
            return
        process.communicate(timeout=120)
    pytest.fail("never caught the process while it wrote OUT")


def test_verify_inside_import_torch(tiny_qwen, tmp_path):
    """verify imports torch and megatron-core first thing."""
    process = _start("verify", tiny_qwen, tmp_path / "no-checkpoint-needed", cwd=tmp_path)
    assert _interrupt_when(process, _torch_loading)
    _assert_clean_interrupt(process, tmp_path / "nothing")
