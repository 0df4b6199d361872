"""hf-to-mcore writes the checkpoint a real megatron-core model asks for, streaming and atomically.

(That every key and shape is megatron-core's, and every parameter the HF one at TP=1/2, is the
conformance suite's: tests/test_conformance.py.)"""

import json

import pytest
import torch

from conftest import run_cli, torchrun
from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore, describe_plan, prepare
from ckptconv.core.layout import ParallelLayout
from ckptconv.formats.torch_dist import DistCheckpointReader



@pytest.fixture(scope="module")
def converted(tiny_qwen, tmp_path_factory):
    """The tiny untied Qwen2.5-VL converted at TP=1 and at TP=2."""
    root = tmp_path_factory.mktemp("converted")
    return {tp: (convert_hf_to_mcore(str(tiny_qwen), root / f"tp{tp}", tp=tp), root / f"tp{tp}") for tp in (1, 2)}


def test_megatron_lm_directory_layout_with_a_self_describing_manifest(converted, tiny_qwen):
    summary, out = converted[2]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    data_files = {f"__0_{lane}.distcp" for lane in range(4)}  # one per writer thread (--io-threads 4)
    assert {p.name for p in (out / "release").iterdir()} == {".metadata", "common.pt", "metadata.json", "run_config.yaml", *data_files}
    assert json.loads((out / "release" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    for sidecar in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (out / sidecar).read_bytes() == (tiny_qwen / sidecar).read_bytes()
    manifest = json.loads((out / "ckptconv.json").read_text())
    assert manifest["family"] == "qwen2_5_vl"
    assert manifest["layout"] == {"tp": 2, "pp": 1, "ep": 1, "etp": 1}
    assert manifest["padded_vocab_size"] == 512  # vocab 320 padded to a multiple of 128 * tp
    assert len(manifest["mapping_table"]["sha256"]) == 64
    assert set(manifest["files"]) >= {"release/.metadata", "config.json", *(f"release/{f}" for f in data_files)}
    assert summary.tensors_read == len(manifest["hf_tensors"]) == 57


def test_tp2_checkpoint_is_chunked_like_a_tp2_training_run(converted):
    reader = DistCheckpointReader(converted[2][1])
    md = reader.entries
    qkv = md["language_model.decoder.layers.self_attention.linear_qkv.weight"]
    assert sorted(tuple(c.offsets) for c in qkv.chunks) == [(0, 0, 0), (0, 64, 0), (1, 0, 0), (1, 64, 0)]
    fc1 = md["language_model.decoder.layers.mlp.linear_fc1.weight"]  # gate and up halves split per rank
    assert sorted(c.offsets[1] for c in fc1.chunks if c.offsets[0] == 0) == [0, 48, 96, 144]
    proj = md["language_model.decoder.layers.self_attention.linear_proj.weight"]  # row parallel
    assert sorted(c.offsets[2] for c in proj.chunks if c.offsets[0] == 0) == [0, 32]
    vision = md["visual.blocks.0.attn.qkv.weight"]  # replicated: one chunk
    assert len(vision.chunks) == 1


def test_vocab_padding_rows_are_zero_and_the_real_rows_are_the_source(converted, tiny_qwen):
    from safetensors import safe_open

    reader = DistCheckpointReader(converted[2][1])
    emb = reader.read("language_model.embedding.word_embeddings.weight").to_torch()
    with safe_open(str(tiny_qwen / "model.safetensors"), framework="pt") as f:
        source = f.get_tensor("model.embed_tokens.weight")
    assert emb.shape == (512, 64) and torch.equal(emb[:320], source) and not emb[320:].any()


def test_tied_embeddings_write_no_output_layer(tiny_qwen_tied, tmp_path):
    """Oracles: real megatron-core (strict load of the tied model) and the independent reference
    (every parameter is the HF one: tests/oracles/hf_reference.py)."""
    from check_loaded_model import check_parameters

    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import build_and_load

    convert_hf_to_mcore(str(tiny_qwen_tied), tmp_path / "out")
    keys = DistCheckpointReader(tmp_path / "out").tensor_keys()
    assert "language_model.embedding.word_embeddings.weight" in keys
    assert "language_model.output_layer.weight" not in keys
    runtime.init_parallel(tp=1, device="cpu")
    model, _ = build_and_load(tmp_path / "out")
    checked, differ = check_parameters(model, tiny_qwen_tied, "qwen2_5_vl")
    assert checked > 0 and differ == []


def test_dtype_option_casts_every_tensor(tiny_qwen, tmp_path):
    convert_hf_to_mcore(str(tiny_qwen), tmp_path / "bf16", dtype="bf16")
    reader = DistCheckpointReader(tmp_path / "bf16")
    assert {str(reader.dtype(k)) for k in reader.tensor_keys()} == {"torch.bfloat16"}


def test_dry_run_lists_every_hf_key_and_writes_nothing(tiny_qwen, tmp_path):
    result = run_cli("hf-to-mcore", tiny_qwen, tmp_path / "out", "--dry-run", "--json", "--tp", "2")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    listed = [name for item in plan["items"] for name in item["hf"]]
    from ckptconv.pipeline.source import open_hf_checkpoint

    assert sorted(listed) == sorted(open_hf_checkpoint(str(tiny_qwen)).tensors)
    qkv = next(i for i in plan["items"] if i["hf"][0] == "model.layers.1.self_attn.q_proj.weight")
    assert qkv == {
        "hf": ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"],
        "mcore": ["language_model.decoder.layers.self_attention.linear_qkv.weight[1]"],
        "transform": "fuse_qkv",
        "shard": "column",
    }
    assert not (tmp_path / "out").exists()


def test_cli_summary_as_json(tiny_qwen, tmp_path):
    result = run_cli("hf-to-mcore", tiny_qwen, tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["family"] == "qwen2_5_vl" and summary["tensors_read"] == 57 and summary["peak_rss_bytes"] > 0
    assert summary["bytes_written"] > summary["bytes_read"]  # + vocab padding and torch.save framing


def test_hub_repo_id_resolves_from_the_local_cache_offline(tiny_qwen, tmp_path, monkeypatch):
    from ckptconv.fixtures import make_hub_cache

    cache = tmp_path / "hub"
    make_hub_cache(cache, "tiny-org/tiny-qwen", tiny_qwen)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = convert_hf_to_mcore("tiny-org/tiny-qwen", tmp_path / "out")
    assert summary.family == "qwen2_5_vl" and summary.tensors_read == 57


def test_torchrun_ranks_share_the_work_and_write_the_same_checkpoint(converted, tiny_qwen, tmp_path):
    out = tmp_path / "two-ranks"
    result = torchrun(["-m", "ckptconv", "hf-to-mcore", tiny_qwen, out, "--tp", "2", "--json"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in (out / "release").glob("__*.distcp")} == {f"__{rank}_{lane}.distcp" for rank in (0, 1) for lane in range(4)}
    single, shared = DistCheckpointReader(converted[2][1]), DistCheckpointReader(out)
    assert sorted(single.tensor_keys()) == sorted(shared.tensor_keys())
    assert sorted(single.object_keys()) == sorted(shared.object_keys())
    for key in single.tensor_keys():
        assert torch.equal(single.read(key).to_torch(), shared.read(key).to_torch()), key


def test_plan_for_stacked_layers_uses_a_layer_axis(tiny_qwen):
    plan = prepare(str(tiny_qwen), ParallelLayout()).plan
    rows = describe_plan(plan)
    fc2 = [r for r in rows if r["mcore"][0].startswith("language_model.decoder.layers.mlp.linear_fc2.weight")]
    assert [r["mcore"][0] for r in fc2] == [
        "language_model.decoder.layers.mlp.linear_fc2.weight[0]",
        "language_model.decoder.layers.mlp.linear_fc2.weight[1]",
    ]
