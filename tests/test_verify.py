"""``ckptconv verify``: passes a right conversion at any TP, and is not fooled by a wrong one.

A wrong checkpoint here is (a) a conversion of different weights (another seed) and (b) a correct
conversion with one chunk of one tensor rewritten on disk (one vision bias nudged). Each must fail
with a non-zero exit and name the worst input. Every family's rejections (another seed, two KV heads
swapped, swapped expert pools or gate rows) are the conformance suite's (tests/test_conformance.py).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("verify")


@pytest.fixture(scope="module")
def tiny_hf(case):
    """The conformance suite's Qwen checkpoint and its conversions (conftest.FamilyCase)."""
    return case("qwen2_5_vl").hf_dir


@pytest.fixture(scope="module")
def ckpt_tp1(case):
    return case("qwen2_5_vl").converted(1, 1)


@pytest.fixture(scope="module")
def ckpt_tp2(case):
    return case("qwen2_5_vl").converted(2, 1)


@pytest.fixture(scope="module")
def ckpt_other_seed(case):
    return case("qwen2_5_vl").converted_other_seed()


def rewrite_chunk(ckpt: Path, key: str, edit, first_axis_offset: int = 0) -> None:
    """Rewrite one stored chunk of ``key`` in place: torch_dist stores each chunk as a torch.save'd
    tensor at (file, offset, length) given by the metadata; ``edit`` changes values, not shapes,
    and the new bytes overwrite the archive's storage record."""
    from torch.distributed.checkpoint import FileSystemReader

    from ckptconv.formats.torch_save import _central_directory

    release = ckpt / "release"
    meta = FileSystemReader(str(release)).read_metadata()
    (info,) = [s for i, s in meta.storage_data.items() if i.fqn == key and i.offset[0] == first_axis_offset]
    with open(release / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        archive = f.read(info.length)
        tensor = torch.load(io.BytesIO(archive), weights_only=True).clone()
        edit(tensor)
        (storage,) = [v for name, v in _central_directory(memoryview(archive)).items() if name.endswith("data/0")]
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        assert len(data) == storage[1]
        f.seek(info.offset + storage[0])
        f.write(data)


def _copy(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def ckpt_vision_nudged(ckpt_tp1, work):
    """The merger's last bias moved by 0.01: only image tokens see it."""
    ckpt = _copy(ckpt_tp1, work / "mcore_vision_nudged")
    rewrite_chunk(ckpt, "visual.merger.mlp.2.bias", lambda t: t.add_(0.01))
    return ckpt


def torchrun(args: list[str], nproc: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [str(REPO / ".venv" / "bin" / "torchrun"), "--nproc-per-node", str(nproc), "--master-port", str(port), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def verify(*args, **kwargs):
    from ckptconv.verify.runner import run_verify

    return run_verify(*args, device="cpu", **kwargs)


def cli(*args):
    """Run the verify command in this process; returns (exit code, stdout)."""
    import typer
    from typer.testing import CliRunner

    from ckptconv.cli_verify import verify_command

    app = typer.Typer()
    app.command()(verify_command)
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout


# --------------------------------------------------------------------------- passing


def test_a_right_conversion_passes_text_only_and_with_image(tiny_hf, ckpt_tp1):
    report = verify(tiny_hf, ckpt_tp1)
    assert report.passed, report.as_dict()
    assert [r.name for r in report.results] == ["text-only", "image:synthetic"]
    text_only, with_image = report.results
    assert text_only.groups["image"] is None and text_only.groups["text"].n_tokens > 50
    assert with_image.groups["image"].n_tokens == 15  # 6x10 patches merged 2x2
    for r in report.results:
        for m in filter(None, r.groups.values()):
            assert m.max_abs <= 1e-4 and m.top1 == 1.0 and m.cosine > 0.99999


def test_report_serializes_every_figure(tiny_hf, ckpt_tp1):
    d = verify(tiny_hf, ckpt_tp1, synthetic_image=False).as_dict()
    json.dumps(d)
    assert d["passed"] is True and d["dtype"] == "float32" and d["tp"] == 1
    (inp,) = d["inputs"]
    assert set(inp["tokens"]["text"]) == {"n_tokens", "max_abs", "mean_abs", "cosine", "top1", "top5", "kl"}


def test_cli_exits_zero_and_prints_the_table(tiny_hf, ckpt_tp1):
    code, out = cli(tiny_hf, ckpt_tp1, "--no-image")
    assert code == 0, out
    assert "PASS" in out and "max-abs" in out


def test_tp2_under_torchrun_passes_and_prints_once(tiny_hf, ckpt_tp2):
    proc = torchrun(["-m", "ckptconv.cli_verify", str(tiny_hf), str(ckpt_tp2), "--tp", "2", "--device", "cpu", "--json"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one JSON document: only rank 0 printed
    assert report["passed"] and report["tp"] == 2
    assert [i["name"] for i in report["inputs"]] == ["text-only", "image:synthetic"]


# --------------------------------------------------------------------------- not fooled


def test_different_weights_fail_and_name_the_worst_input(tiny_hf, ckpt_other_seed):
    report = verify(tiny_hf, ckpt_other_seed)
    assert not report.passed
    assert all(not r.passed for r in report.results)
    assert report.worst_input in ("text-only", "image:synthetic")
    code, out = cli(tiny_hf, ckpt_other_seed, "--json")
    assert code == 1
    assert json.loads(out)["worst_input"] == report.worst_input


def test_a_nudged_vision_tensor_fails_only_the_image_input(tiny_hf, ckpt_vision_nudged):
    report = verify(tiny_hf, ckpt_vision_nudged)
    by_name = {r.name: r for r in report.results}
    assert by_name["text-only"].passed
    assert not by_name["image:synthetic"].passed
    assert report.worst_input == "image:synthetic"
    assert any(f.startswith("image: max_abs") for f in by_name["image:synthetic"].failures)


def test_tolerances_can_be_overridden(tiny_hf, ckpt_tp1):
    tight = verify(tiny_hf, ckpt_tp1, synthetic_image=False, tolerances={"max_abs": 1e-12})
    assert not tight.passed and tight.tolerances.max_abs == 1e-12
    assert tight.tolerances.min_top1 == 0.99  # the rest keep their fp32 defaults


# --------------------------------------------------------------------------- errors


def test_errors_are_one_line_with_exit_2(tiny_hf, tmp_path):
    code, out = cli(tiny_hf, tmp_path / "missing")
    assert code == 2
    from ckptconv.errors import ConversionError

    with pytest.raises(ConversionError, match="no such checkpoint directory"):
        verify(tiny_hf, tmp_path / "missing")


def test_roundtrip_compares_the_reexported_hf_model_too(tiny_hf, ckpt_tp1):
    report = verify(tiny_hf, ckpt_tp1, mode="roundtrip")
    assert report.passed, report.as_dict()
    assert [r.label for r in report.results] == [
        "text-only", "image:synthetic", "text-only (hf-export)", "image:synthetic (hf-export)"
    ]
    exported = [r for r in report.results if r.comparison == "hf-export"]
    assert all(m.max_abs == 0.0 for r in exported for m in r.groups.values() if m is not None)


def test_verify_refuses_a_checkpoint_of_another_family_or_shape(tmp_path):
    """Issue 9: SRC and checkpoint of different families or shapes -> one clear error, exit 2."""
    from ckptconv.families.ernie4_5_vl_moe.fixtures import make_tiny_ernie4_5_vl_moe
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl
    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore

    qwen = make_tiny_qwen2_5_vl(tmp_path / "qwen")
    convert_hf_to_mcore(str(qwen), tmp_path / "qwen-mcore")
    ernie = make_tiny_ernie4_5_vl_moe(tmp_path / "ernie")
    deeper = make_tiny_qwen2_5_vl(tmp_path / "deeper", num_layers=3)
    for src, message in [(ernie, "is a ernie4_5_vl_moe model but"), (deeper, "different shapes: num_layers 3 vs 2")]:
        result = subprocess.run(
            [sys.executable, "-m", "ckptconv", "verify", str(src), str(tmp_path / "qwen-mcore"), "--no-image"],
            capture_output=True, text=True, cwd=REPO,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
