"""mcore-to-hf: the mapping table read backwards gives back the HF checkpoint bit for bit."""

import json

import pytest
import torch

from conftest import HELPERS, read_safetensors_dir, run_cli, torchrun
from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore
from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf


def assert_same_checkpoint(original_dir, exported_dir):
    original, exported = read_safetensors_dir(original_dir), read_safetensors_dir(exported_dir)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert exported[name].shape == tensor.shape, name
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("fixture", ["tiny_qwen_tied"])  # untied: every family's, in test_conformance.py
def test_round_trip_is_bit_exact(fixture, tp, request, tmp_path):
    hf = request.getfixturevalue(fixture)
    convert_hf_to_mcore(str(hf), tmp_path / "mcore", tp=tp)
    summary = convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "hf")
    assert_same_checkpoint(hf, tmp_path / "hf")
    assert summary.tensors_written == len(read_safetensors_dir(hf))
    for sidecar in ("config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "hf" / sidecar).read_bytes() == (hf / sidecar).read_bytes()


def test_bf16_round_trip_is_bit_exact(tmp_path):
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

    hf = make_tiny_qwen2_5_vl(tmp_path / "src", dtype=torch.bfloat16, seed=3)
    convert_hf_to_mcore(str(hf), tmp_path / "mcore", tp=2)
    convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "hf")
    assert_same_checkpoint(hf, tmp_path / "hf")


def test_export_loads_with_from_pretrained_and_gives_identical_logits(tiny_qwen, tmp_path):
    from transformers import AutoModelForImageTextToText

    convert_hf_to_mcore(str(tiny_qwen), tmp_path / "mcore", tp=2)
    convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "hf")
    original = AutoModelForImageTextToText.from_pretrained(tiny_qwen).eval()
    exported, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.tensor([[1, 5, 9, 33, 120, 7]])
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, exported.eval()(input_ids=ids).logits)


def test_max_shard_size_splits_into_indexed_shards(tiny_qwen, tmp_path):
    convert_hf_to_mcore(str(tiny_qwen), tmp_path / "mcore")
    convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "hf", max_shard_size="200KB")
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in read_safetensors_dir(tiny_qwen).values())
    assert_same_checkpoint(tiny_qwen, tmp_path / "hf")


def test_checkpoints_saved_by_megatron_at_tp1_and_tp2_export_to_the_same_hf_weights(tiny_qwen, tmp_path):
    """Checkpoints written by megatron-core's own dist_checkpointing.save (no ckptconv.json, no
    config.json): export needs --hf-config, and the TP it was saved with does not matter."""
    for tp in (1, 2):
        result = torchrun([HELPERS / "save_with_megatron.py", tiny_qwen, tmp_path / f"saved-tp{tp}", tp], nproc=tp)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not (tmp_path / f"saved-tp{tp}" / "config.json").exists()
        convert_mcore_to_hf(tmp_path / f"saved-tp{tp}", tmp_path / f"hf-tp{tp}", hf_config=str(tiny_qwen))
        assert_same_checkpoint(tiny_qwen, tmp_path / f"hf-tp{tp}")


def test_cli_round_trip_with_json_summary(tiny_qwen, tmp_path):
    assert run_cli("hf-to-mcore", tiny_qwen, tmp_path / "mcore").returncode == 0
    result = run_cli("mcore-to-hf", tmp_path / "mcore", tmp_path / "hf", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["command"] == "mcore-to-hf" and summary["tensors_written"] == 57
    assert_same_checkpoint(tiny_qwen, tmp_path / "hf")


@pytest.mark.parametrize("layout", [dict(tp=2, pp=3, ep=2, etp=2), dict(tp=1, pp=1, ep=4, etp=1)], ids=["tp2-pp3-ep2-etp2", "ep4"])
def test_every_parallel_layout_round_trips_bit_exact(layout, tmp_path):
    """TP/PP/EP/expert-TP only change how tensors are chunked on disk, never their values."""
    from ckptconv.families.ernie4_5_vl_moe.fixtures import make_tiny_ernie4_5_vl_moe
    from ckptconv.formats.torch_dist import DistCheckpointReader

    hf = make_tiny_ernie4_5_vl_moe(tmp_path / "hf")
    convert_hf_to_mcore(str(hf), tmp_path / "mcore", **layout)
    reader = DistCheckpointReader(tmp_path / "mcore")
    fc1 = next(k for k in reader.tensor_keys() if k.endswith("text_moe_layer.experts.experts.linear_fc1.weight"))
    # Each expert's fc1 is cut into gate and up halves, each split over expert-TP ranks.
    assert len(reader.entries[fc1].chunks) == reader.shape(fc1)[0] * 2 * layout["etp"]
    convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    assert_same_checkpoint(hf, tmp_path / "back")


def test_export_rebuilds_the_source_safetensors_files_byte_for_byte(tiny_qwen, tmp_path):
    """ckptconv.json records where every tensor sat; export puts each back there, in the source's
    own files. (It also makes the kernel copy whole pages: docs/benchmarks.md.)"""
    convert_hf_to_mcore(str(tiny_qwen), tmp_path / "mcore", tp=2)
    summary = convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "hf")
    assert summary.layout["shards"] == "as in the source"
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tiny_qwen / "model.safetensors").read_bytes()


def test_a_sharded_source_comes_back_in_the_same_shards(tiny_qwen, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="300KB")
    for sidecar in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        if (tiny_qwen / sidecar).exists():
            (sharded / sidecar).write_bytes((tiny_qwen / sidecar).read_bytes())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 1
    convert_hf_to_mcore(str(sharded), tmp_path / "mcore")
    convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == files
    for name in files:
        assert (tmp_path / "hf" / name).read_bytes() == (sharded / name).read_bytes(), name
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
