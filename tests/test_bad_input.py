"""Bad input gets one clear line, a non-zero exit, no traceback, and leaves OUT as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import REPO, cli_env, run_cli
from ckptconv.cli import app
from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore
from ckptconv.pipeline.outdir import staging_path


def invoke(*args) -> tuple[int, str]:
    """The CLI in-process; returns (exit code, everything printed). Exceptions other than a clean
    exit are test failures (they would be tracebacks for the user)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def one_line_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert "Traceback" not in output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(model: Path, edit) -> None:
    path = model / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def shard_into_index(model: Path) -> None:
    """Split model.safetensors into two shards with an index, the way large checkpoints come."""
    tensors = load_file(str(model / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(model / file), metadata={"format": "pt"})
    (model / "model.safetensors").unlink()
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ------------------------------------------------------------------------------ each bad input
def _missing_src(model, tmp):
    return tmp / "does-not-exist", "no such directory"


def _not_a_model_dir(model, tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty", "config.json is missing"


def _hub_id_not_cached(model, tmp):
    return "nobody/not-in-cache", "not in the local hub cache"


def _config_not_json(model, tmp):
    (model / "config.json").write_text("{not json")
    return model, "config.json: not valid JSON"


def _unknown_model_type(model, tmp):
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "llama"
    (model / "config.json").write_text(json.dumps(config))
    return model, "unsupported model_type 'llama'; supported: ernie4_5_moe_vl, ernie4_5_vl_moe, qwen2_5_vl, step3p7"


def _index_names_missing_shard(model, tmp):
    shard_into_index(model)
    (model / "model-00002-of-00002.safetensors").unlink()
    return model, "names shard model-00002-of-00002.safetensors which does not exist"


def _truncated_shard(model, tmp):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return model, "model.safetensors: truncated: tensor"


def _corrupt_header(model, tmp):
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    data[8:8 + length] = b"\x00" * length
    path.write_bytes(bytes(data))
    return model, "corrupt safetensors header"


def _wrong_shape(model, tmp):
    rewrite_weights(model, lambda t: t.__setitem__("model.layers.1.self_attn.o_proj.weight", torch.zeros(64, 60)))
    return model, "model.layers.1.self_attn.o_proj.weight has shape [64, 60], expected [64, 64] from the config"


def _wrong_shape_inside_fused_qkv(model, tmp):
    rewrite_weights(model, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(48, 64)))
    return model, "k has shape [48, 64], expected [32, 64] from the config"


def _wrong_dtype(model, tmp):
    rewrite_weights(model, lambda t: t.__setitem__("model.norm.weight", torch.zeros(64, dtype=torch.int32)))
    return model, "tensor model.norm.weight has non-float dtype I32"


def _unmapped_key(model, tmp):
    rewrite_weights(model, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(3)))
    return model, "1 tensor(s) no qwen2_5_vl table row maps: model.layers.0.mystery.weight"


def _mapped_key_missing(model, tmp):
    rewrite_weights(model, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return model, "1 tensor(s) the qwen2_5_vl table needs are missing: model.layers.1.mlp.up_proj.weight"


def _index_pointing_at(model, shard_path: str):
    """A sharded checkpoint whose index sends its first tensor to ``shard_path``."""
    shard_into_index(model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard_path
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model, f"refusing shard path {shard_path!r} outside the model directory"


def _index_path_escapes(model, tmp):
    return _index_pointing_at(model, "../outside.safetensors")


def _index_absolute_path(model, tmp):
    return _index_pointing_at(model, "/etc/passwd")


def _pickle_weights_only(model, tmp):
    tensors = load_file(str(model / "model.safetensors"))
    torch.save(tensors, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return model, "only pickle weights (pytorch_model.bin); ckptconv never unpickles checkpoints"


BAD_SOURCES = [
    _missing_src, _not_a_model_dir, _hub_id_not_cached, _config_not_json, _unknown_model_type,
    _index_names_missing_shard, _truncated_shard, _corrupt_header, _wrong_shape, _wrong_shape_inside_fused_qkv,
    _wrong_dtype, _unmapped_key, _mapped_key_missing, _index_path_escapes, _index_absolute_path, _pickle_weights_only,
]


@pytest.mark.parametrize("make_bad", BAD_SOURCES, ids=lambda f: f.__name__.strip("_"))
def test_bad_source_fails_cleanly_and_writes_nothing(make_bad, tiny_qwen, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    src, message = make_bad(copy_model(tiny_qwen, tmp_path / "model"), tmp_path)
    out = tmp_path / "out"
    code, output = invoke("hf-to-mcore", src, out)
    assert code == 2
    assert message in one_line_error(output)
    assert not out.exists() and not staging_path(out).exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tp", "3"], "--tp 3 does not divide num_attention_heads 4"),
        (["--tp", "4"], "--tp 4 does not divide the 2 key/value groups"),
        (["--pp", "3"], "--pp 3 does not divide num_hidden_layers 2"),
        (["--ep", "2"], "--ep 2 given but the model has no experts"),
        (["--tp", "0"], "--tp must be >= 1"),
    ],
)
def test_parallel_sizes_that_do_not_divide_the_model_are_refused(flags, message, tiny_qwen, tmp_path):
    code, output = invoke("hf-to-mcore", tiny_qwen, tmp_path / "out", *flags)
    assert code == 2 and message in one_line_error(output)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_force_and_left_untouched(tiny_qwen, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, output = invoke("hf-to-mcore", tiny_qwen, out)
    assert code == 2 and "already exists (pass --force" in one_line_error(output)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_force_replaces_output_only_after_success(tiny_qwen, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    bad = copy_model(tiny_qwen, tmp_path / "bad")
    rewrite_weights(bad, lambda t: t.pop("model.norm.weight"))
    code, _ = invoke("hf-to-mcore", bad, out, "--force")
    assert code == 2 and (out / "precious.txt").read_text() == "keep me"
    code, _ = invoke("hf-to-mcore", tiny_qwen, out, "--force")
    assert code == 0 and (out / "latest_checkpointed_iteration.txt").is_file() and not (out / "precious.txt").exists()


def test_disk_full_mid_write_leaves_nothing_behind(tiny_qwen, tmp_path, monkeypatch):
    """The writer thread hits ENOSPC: one line, exit non-zero, no output and no staging directory."""
    from ckptconv.formats.pages import OutputFile

    budget = {"bytes": 200_000}
    real_write_all, real_copy_range = OutputFile._write_all, OutputFile.copy_range

    def spend(file, nbytes):  # the two places bytes reach the disk: write() and copy_file_range()
        if file.path.endswith(".distcp"):
            budget["bytes"] -= nbytes
            if budget["bytes"] < 0:
                raise OSError(28, "No space left on device")

    def write_all(self, view):
        spend(self, len(view))
        return real_write_all(self, view)

    def copy_range(self, fd, offset, nbytes):
        spend(self, nbytes)
        return real_copy_range(self, fd, offset, nbytes)

    monkeypatch.setattr(OutputFile, "_write_all", write_all)
    monkeypatch.setattr(OutputFile, "copy_range", copy_range)
    out = tmp_path / "out"
    code, output = invoke("hf-to-mcore", tiny_qwen, out)
    assert code == 2 and "No space left on device" in one_line_error(output)
    assert not out.exists() and not staging_path(out).exists()


def test_kill_9_mid_write_leaves_no_valid_looking_checkpoint_and_a_rerun_succeeds(tmp_path):
    """A real process killed with SIGKILL while writing (a ~400 MB model, so there is time)."""
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

    model = make_tiny_qwen2_5_vl(tmp_path / "model", seed=5)
    # Swap in a large vocabulary so the conversion takes a while: 400k x 64 fp32 per embedding.
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["vocab_size"] = 400_000
    (model / "config.json").write_text(json.dumps(config))
    rewrite_weights(model, lambda t: t.update({
        "model.embed_tokens.weight": torch.randn(400_000, 64), "lm_head.weight": torch.randn(400_000, 64),
    }))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "ckptconv", "hf-to-mcore", str(model), str(out)],
                               env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data_file = staging_path(out) / "release" / "__0_0.distcp"
    deadline = time.time() + 120
    while time.time() < deadline and not (data_file.exists() and data_file.stat().st_size > 1_000_000):
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not out.exists()  # only the hidden .out.ckptconv-partial, which no loader looks at
    rerun = run_cli("hf-to-mcore", model, out)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "latest_checkpointed_iteration.txt").is_file() and not staging_path(out).exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run_cli("hf-to-mcore", tmp_path / "nope", tmp_path / "out", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_real_subprocess_prints_one_line_and_no_traceback(tmp_path):
    result = run_cli("hf-to-mcore", tmp_path / "nope", tmp_path / "out")
    assert result.returncode == 2 and result.stdout == ""
    assert "no such directory" in one_line_error(result.stderr)


# ------------------------------------------------------------------------------ mcore-to-hf
@pytest.fixture(scope="module")
def good_checkpoint(tiny_qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "mcore"
    convert_hf_to_mcore(str(tiny_qwen), out)
    return out


def _not_torch_dist(ckpt, tmp):
    (tmp / "plain").mkdir()
    (tmp / "plain" / "model.pt").write_bytes(b"not a checkpoint")
    return tmp / "plain", "not a megatron-core distributed checkpoint (no metadata.json)"


def _other_backend(ckpt, tmp):
    bad = Path(shutil.copytree(ckpt, tmp / "zarr"))
    (bad / "release" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    return bad, "sharded backend is 'zarr'; only torch_dist is supported"


def _missing_data_file(ckpt, tmp):
    bad = Path(shutil.copytree(ckpt, tmp / "nodata"))
    (bad / "release" / "__0_0.distcp").unlink()
    return bad, "checkpoint data file is missing"


def _missing_tensors(ckpt, tmp):
    """The metadata no longer lists one vision tensor."""
    from ckptconv.formats.torch_dist import DistCheckpointReader, dcp_metadata_pickle

    bad = Path(shutil.copytree(ckpt, tmp / "missing"))
    metadata = DistCheckpointReader(bad).metadata
    del metadata.entries["visual.merger.mlp.2.bias"]
    (bad / "release" / ".metadata").write_bytes(dcp_metadata_pickle(metadata, checkpoint_id=str(bad / "release"), save_id="edited"))
    return bad, "not a complete qwen2_5_vl checkpoint of this config: 1 tensor(s) missing, e.g. visual.merger.mlp.2.bias"


def _fewer_layers_than_config(ckpt, tmp):
    """The config asks for 3 layers, the checkpoint holds 2."""
    bad = Path(shutil.copytree(ckpt, tmp / "short"))
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    return bad, "has shape [2, 64]; the config expects leading axes [3]"


def _other_family(ckpt, tmp):
    bad = Path(shutil.copytree(ckpt, tmp / "family"))
    manifest = json.loads((bad / "ckptconv.json").read_text())
    manifest["family"] = "ernie4_5_vl_moe"
    (bad / "ckptconv.json").write_text(json.dumps(manifest))
    return bad, "checkpoint is family 'ernie4_5_vl_moe' but the config is 'qwen2_5_vl'"


def _malicious_metadata_pickle(ckpt, tmp):
    bad = Path(shutil.copytree(ckpt, tmp / "evil"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp / "pwned"),))

    import pickle

    (bad / "release" / ".metadata").write_bytes(pickle.dumps(Evil()))
    return bad, "refusing to load posix.system from checkpoint metadata"


BAD_CHECKPOINTS = [_not_torch_dist, _other_backend, _missing_data_file, _missing_tensors, _fewer_layers_than_config, _other_family, _malicious_metadata_pickle]


@pytest.mark.parametrize("make_bad", BAD_CHECKPOINTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_checkpoint_export_fails_cleanly_and_writes_nothing(make_bad, good_checkpoint, tmp_path):
    ckpt, message = make_bad(good_checkpoint, tmp_path)
    out = tmp_path / "hf"
    code, output = invoke("mcore-to-hf", ckpt, out)
    assert code == 2
    assert message in one_line_error(output)
    assert not out.exists() and not staging_path(out).exists()
    assert not (tmp_path / "pwned").exists()


def test_megatron_checkpoint_without_config_asks_for_hf_config(good_checkpoint, tmp_path):
    code, output = invoke("mcore-to-hf", good_checkpoint / "release", tmp_path / "hf")
    assert code == 0  # OUT/release finds OUT/config.json
    bare = Path(shutil.copytree(good_checkpoint / "release", tmp_path / "bare"))
    code, output = invoke("mcore-to-hf", bare, tmp_path / "hf2")
    assert code == 2 and "pass --hf-config" in one_line_error(output)


def test_check_command_detects_a_corrupted_file(good_checkpoint, tmp_path):
    ckpt = Path(shutil.copytree(good_checkpoint, tmp_path / "ckpt"))
    assert invoke("check", ckpt)[0] == 0
    data = ckpt / "release" / "__0_0.distcp"
    blob = bytearray(data.read_bytes())
    blob[5000] ^= 0xFF
    data.write_bytes(bytes(blob))
    code, output = invoke("check", ckpt, "--json")
    assert code == 1 and json.loads(output)["problems"] == ["release/__0_0.distcp: checksum mismatch"]


def test_no_code_path_trusts_remote_code():
    offenders = [
        str(path.relative_to(REPO)) for path in (REPO / "ckptconv").rglob("*.py")
        if "trust_remote_code=True" in path.read_text()
    ]
    assert offenders == []
