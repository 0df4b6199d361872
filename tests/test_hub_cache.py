"""Models straight from the Hugging Face hub cache, as users have them: sharded, every snapshot file
a symlink into ``blobs/``. Every command that takes a source (``hf-to-mcore SRC``, ``verify SRC``,
``mcore-to-hf --hf-config SRC``) takes it by repo id and by snapshot path.

Oracles: the source's own tensors read back with the ``safetensors`` library (independent of
ckptconv), and ``verify``'s comparison with the real ``transformers`` model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import read_safetensors_dir, run_cli


@pytest.fixture
def offline_cache(sharded_hub_qwen, monkeypatch):
    cache, repo_id, snapshot, plain = sharded_hub_qwen
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return sharded_hub_qwen


def test_the_fixture_is_the_real_cache_layout(sharded_hub_qwen):
    """Oracle: huggingface_hub's own resolver, and the layout its file_download.py writes."""
    from huggingface_hub import snapshot_download

    cache, repo_id, snapshot, plain = sharded_hub_qwen
    repo = cache / "models--tiny-org--Tiny-Qwen2.5-VL"
    assert (repo / "refs" / "main").read_text() == snapshot.name
    assert snapshot_download(repo_id, cache_dir=cache, local_files_only=True) == str(snapshot)
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 8
    for name in shards + ["config.json"]:
        link = snapshot / name
        assert link.is_symlink() and os.readlink(link).startswith("../../blobs/")
        assert not link.resolve().is_relative_to(snapshot)  # the bytes live outside the snapshot
    # LFS files are named by their sha256 (64 hex), git files by their blob sha1 (40 hex).
    assert len(os.readlink(snapshot / shards[0]).rsplit("/", 1)[1]) == 64
    assert len(os.readlink(snapshot / "config.json").rsplit("/", 1)[1]) == 40


def _assert_same_tensors(exported, plain):
    source, result = read_safetensors_dir(plain), read_safetensors_dir(exported)
    assert sorted(result) == sorted(source)
    for name, tensor in source.items():
        assert result[name].dtype == tensor.dtype and torch.equal(result[name], tensor), name


def _as_a_training_run_leaves_it(ckpt):
    """A checkpoint Megatron trained has no HF config beside it: export must take it from SRC."""
    (ckpt / "config.json").unlink()
    (ckpt / "ckptconv.json").unlink()


def test_convert_and_export_by_repo_id(offline_cache, tmp_path):
    """``hf-to-mcore ORG/NAME`` and ``mcore-to-hf --hf-config ORG/NAME``, run as a user runs them
    (subprocess), give back every source tensor bit for bit (oracle: the shards read with
    safetensors)."""
    cache, repo_id, snapshot, plain = offline_cache
    ckpt, back = tmp_path / "mcore", tmp_path / "back"
    converted = run_cli("hf-to-mcore", repo_id, ckpt, "--json")
    assert converted.returncode == 0, converted.stderr
    assert json.loads(converted.stdout)["tensors_read"] == 57
    # Sidecars are copied as files (a symlink to ../../blobs would dangle in OUT).
    assert (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer.json").is_symlink()
    _as_a_training_run_leaves_it(ckpt)
    exported = run_cli("mcore-to-hf", ckpt, back, "--hf-config", repo_id, "--json")
    assert exported.returncode == 0, exported.stderr
    _assert_same_tensors(back, plain)
    assert json.loads((back / "config.json").read_text()) == json.loads((plain / "config.json").read_text())


def test_convert_and_export_by_snapshot_path(offline_cache, tmp_path):
    """The snapshot directory itself as SRC (its files are symlinks into blobs/). Oracle as above."""
    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore
    from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

    cache, repo_id, snapshot, plain = offline_cache
    ckpt, back = tmp_path / "mcore", tmp_path / "back"
    assert convert_hf_to_mcore(str(snapshot), ckpt).tensors_read == 57
    _as_a_training_run_leaves_it(ckpt)
    convert_mcore_to_hf(ckpt, back, hf_config=str(snapshot))
    _assert_same_tensors(back, plain)


@pytest.fixture(scope="module")
def hub_checkpoint(sharded_hub_qwen, tmp_path_factory):
    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore

    out = tmp_path_factory.mktemp("hub_ckpt") / "mcore"
    convert_hf_to_mcore(str(sharded_hub_qwen[3]), out)
    return out


@pytest.mark.parametrize("by", ["repo id", "snapshot path"])
def test_verify_takes_the_source_from_the_hub_cache(by, offline_cache, hub_checkpoint):
    """Oracle: the real transformers model loaded from the cached snapshot, against the Megatron model."""
    from ckptconv.verify.runner import run_verify

    cache, repo_id, snapshot, plain = offline_cache
    report = run_verify(repo_id if by == "repo id" else snapshot, hub_checkpoint, device="cpu", synthetic_image=False)
    assert report.passed, report.as_dict()
    assert report.hf_src == str(snapshot)


@pytest.mark.parametrize("name", [
    "../outside.safetensors", "/etc/passwd", "shards/../../outside.safetensors", "..\\outside.safetensors",
    "C:\\model.safetensors", "C:/model.safetensors", "", "shards/..",
])
def test_index_names_that_leave_the_model_directory_are_still_refused(name, sharded_hub_qwen, tmp_path):
    """Judging names instead of symlink targets must not let a traversal through. Oracle: hand-written names."""
    import shutil

    from ckptconv.errors import ConversionError
    from ckptconv.pipeline.source import open_hf_checkpoint

    model = tmp_path / "model"
    shutil.copytree(sharded_hub_qwen[3], model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="refusing shard path .* outside the model directory"):
        open_hf_checkpoint(str(model))


def test_a_symlinked_shard_in_a_plain_directory_is_read_where_it_points(sharded_hub_qwen, tmp_path):
    """A local model dir whose shards are symlinks elsewhere (a hand-made copy of a snapshot) converts.
    Oracle: the tensor read through the link equals the tensor read from the target with safetensors."""
    from safetensors.torch import load_file

    from ckptconv.pipeline.source import open_hf_checkpoint

    plain = sharded_hub_qwen[3]
    model = tmp_path / "links"
    model.mkdir()
    for f in plain.iterdir():
        (model / f.name).symlink_to(f.resolve())
    checkpoint = open_hf_checkpoint(str(model))
    name = "model.embed_tokens.weight"
    shard = json.loads((plain / "model.safetensors.index.json").read_text())["weight_map"][name]
    assert torch.equal(checkpoint.read(name).to_torch(), load_file(str(plain / shard))[name])


def test_a_mistyped_local_path_that_looks_like_a_repo_id_says_what_was_tried(tmp_path):
    """``models/qwen-typo`` is neither a local directory nor cached; with the hub unreachable the
    one-line error names all three places (not a bare DNS error). Oracle: the expected wording."""
    import subprocess
    import sys

    from conftest import REPO, cli_env

    env = cli_env()
    env.pop("HF_HUB_OFFLINE")
    env.update(HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_ENDPOINT="http://127.0.0.1:9")  # refuses at once
    result = subprocess.run([sys.executable, "-m", "ckptconv", "hf-to-mcore", "models/qwen-typo", tmp_path / "out"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: models/qwen-typo: no such local directory; not in the local hub cache")
    assert str(tmp_path / "empty-cache") in line and "fetching it from the hub failed" in line
    assert not (tmp_path / "out").exists()
