"""The smaller things users ran into by hand (issue 13): ``--version``, ``--force`` over a file,
``--dry-run`` over an existing OUT, a source without a tokenizer. Each test runs the CLI as a user
does and states its oracle."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version

from conftest import run_cli
from ckptconv.pipeline.outdir import staging_path


def test_version_names_ckptconv_and_the_formats_libraries():
    """Oracle: the installed distributions' metadata."""
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"ckptconv {version('ckptconv')} (")
    for name in ("megatron-core", "torch", "transformers", "safetensors"):
        assert f"{name} {version(name)}" in line


def test_force_over_a_plain_file_leaves_only_the_checkpoint(tiny_qwen, tmp_path):
    """OUT is a file; --force replaces it and leaves no .OUT.ckptconv-old or staging behind.
    Oracle: the directory listing."""
    out = tmp_path / "out"
    out.write_text("not a checkpoint")
    result = run_cli("hf-to-mcore", tiny_qwen, out, "--force", "--json")
    assert result.returncode == 0, result.stderr
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dry_run_says_the_real_run_would_be_refused(tiny_qwen, tmp_path):
    """The plan is printed, then the refusal the real run would meet: one line, exit 2, OUT
    untouched. With --force the dry run passes. Oracle: exit status, stderr, OUT's content."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = run_cli("hf-to-mcore", tiny_qwen, out, "--dry-run", "--json")
    assert refused.returncode == 2
    assert json.loads(refused.stdout)["family"] == "qwen2_5_vl"
    assert refused.stderr.strip().splitlines() == [
        f"error: the real run would be refused: {out}: already exists (pass --force to replace it once the new output is complete)"
    ]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not staging_path(out).exists()
    forced = run_cli("hf-to-mcore", tiny_qwen, out, "--dry-run", "--force", "--json")
    assert forced.returncode == 0 and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_source_without_tokenizer_files_is_named_in_the_summary(tiny_qwen, tmp_path):
    """Oracle: the files the source directory holds (tokenizer.json removed by hand)."""
    src = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_qwen, src)
    (src / "tokenizer.json").unlink()
    result = run_cli("hf-to-mcore", src, tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any(note.startswith("the source has no tokenizer files") for note in notes), notes
    with_tokenizer = run_cli("hf-to-mcore", tiny_qwen, tmp_path / "out2", "--json")
    assert not any("tokenizer" in note for note in json.loads(with_tokenizer.stdout)["notes"])
