"""Tests for ckptconv.fixtures: tiny random HF checkpoints load and run."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ckptconv import fixtures as F
from ckptconv.families.ernie4_5_vl_moe import fixtures as FE
from ckptconv.families.qwen2_5_vl import fixtures as FQ
from ckptconv.families.step3p7 import fixtures as FS


def _load(path):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    return model, info


def _assert_clean_load_and_forward(path, vocab_size):
    model, info = _load(path)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[3, 4, 5, 6, 7]]))
    assert out.logits.shape == (1, 5, vocab_size)
    assert torch.isfinite(out.logits).all()
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_5_vl_tiny(tmp_path, tie):
    t0 = time.perf_counter()
    path = FQ.make_tiny_qwen2_5_vl(tmp_path / "q", tie_word_embeddings=tie)
    assert time.perf_counter() - t0 < 10  # includes first-time imports
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"
    tc = cfg["text_config"]
    assert tc["vocab_size"] % 128 != 0
    assert tc["num_attention_heads"] // tc["num_key_value_heads"] >= 2
    assert sum(tc["rope_parameters"]["mrope_section"]) == tc["hidden_size"] // tc["num_attention_heads"] // 2
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert cfg[key] < tc["vocab_size"]
    names = F.list_disk_tensors(path)
    assert ("lm_head.weight" in names) is (not tie)
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "visual.blocks.0.attn.qkv.weight" in names
    model = _assert_clean_load_and_forward(path, tc["vocab_size"])
    if tie:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    else:
        assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


def test_qwen2_5_vl_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    path = FQ.make_tiny_qwen2_5_vl(tmp_path / "q")
    tok = AutoTokenizer.from_pretrained(path)
    for token, idx in FQ.QWEN_TINY_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == idx
    ids = tok("hi <|vision_start|><|image_pad|><|vision_end|>").input_ids
    assert FQ.QWEN_TINY_SPECIAL_TOKENS["<|image_pad|>"] in ids
    assert max(ids) < 320
    assert tok.decode(tok("hello world").input_ids) == "hello world"


def test_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = FQ.make_tiny_qwen2_5_vl(tmp_path / "a", seed=3, with_processor=False)
    b = FQ.make_tiny_qwen2_5_vl(tmp_path / "b", seed=3, with_processor=False)
    c = FQ.make_tiny_qwen2_5_vl(tmp_path / "c", seed=4, with_processor=False)
    sa, sb, sc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    # norm weights are randomised around 1, not left at the init constant
    norm = sa["model.layers.0.input_layernorm.weight"]
    assert not torch.all(norm == 1) and abs(norm.mean().item() - 1) < 0.1


def test_bf16_dtype(tmp_path):
    path = FE.make_tiny_ernie4_5_vl_moe(tmp_path / "e", dtype=torch.bfloat16)
    shapes = F.list_disk_tensors(path)
    assert {dt for _, dt in shapes.values()} == {"BF16"}


def test_ernie_nested(tmp_path):
    path = FE.make_tiny_ernie4_5_vl_moe(tmp_path / "e")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "ernie4_5_vl_moe"
    tc = cfg["text_config"]
    assert tc["mlp_layer_types"] == ["dense", "sparse", "sparse"]
    assert len(tc["moe_intermediate_size"]) == 2 and tc["moe_intermediate_size"][0] != tc["moe_intermediate_size"][1]
    assert cfg["tie_word_embeddings"] is True
    names = F.list_disk_tensors(path)
    assert "lm_head.weight" not in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense first layer
    e = tc["moe_num_experts"]
    # text experts 0..E-1, vision experts E..2E-1 with their own width
    assert names["model.layers.1.mlp.experts.0.up_proj.weight"][0] == (tc["moe_intermediate_size"][0], 64)
    assert names[f"model.layers.1.mlp.experts.{e}.up_proj.weight"][0] == (tc["moe_intermediate_size"][1], 64)
    assert f"model.layers.1.mlp.experts.{2 * e}.up_proj.weight" not in names
    assert names["model.layers.1.mlp.gate.weight"][0] == (64, e)
    assert names["model.layers.1.mlp.gate.weight_1"][0] == (64, e)
    _assert_clean_load_and_forward(path, tc["vocab_size"])


def test_ernie_flat(tmp_path):
    nested = FE.make_tiny_ernie4_5_vl_moe(tmp_path / "n")
    flat = FE.make_tiny_ernie4_5_vl_moe(tmp_path / "f", flat=True)
    cfg = json.loads((flat / "config.json").read_text())
    assert "text_config" not in cfg
    assert cfg["model_type"] == "ernie4_5_vl_moe"
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 3
    assert cfg["moe_num_experts"] == [4, 4]
    assert cfg["moe_layer_start_index"] == 1
    assert "mlp_layer_types" not in cfg
    vc = cfg["vision_config"]
    assert vc["embed_dim"] == 32 and vc["mlp_ratio"] == 4
    assert "rms_norm_eps" not in vc and "temporal_merge_size" not in vc
    assert (flat / "model.safetensors").read_bytes() == (nested / "model.safetensors").read_bytes()


def test_step3p7(tmp_path):
    path = FS.make_tiny_step3p7(tmp_path / "s")
    cfg = json.loads((path / "config.json").read_text())
    tc = cfg["text_config"]
    assert set(tc["layer_types"]) == {"full_attention", "sliding_attention"}
    assert set(tc["mlp_layer_types"]) == {"dense", "sparse"}
    assert tc["per_layer_config"]
    names = F.list_disk_tensors(path)
    assert names["model.layers.0.self_attn.q_proj.weight"][0] == (64, 64)  # full: 4 heads x 16
    assert names["model.layers.1.self_attn.q_proj.weight"][0] == (96, 64)  # sliding override: 6 heads
    assert names["model.layers.1.self_attn.g_proj.weight"][0] == (6, 64)
    assert "model.layers.0.self_attn.q_norm.weight" in names
    assert "model.layers.2.share_expert.gate_proj.weight" in names
    assert names["model.layers.2.moe.gate_proj.weight"][0] == (4, 32, 64)
    _assert_clean_load_and_forward(path, tc["vocab_size"])


def test_hf_disk_layout_matches_save_pretrained(tmp_path):
    """The meta-device layout used by make_real_width equals what save_pretrained writes."""
    from transformers import Ernie4_5_VLMoeForConditionalGeneration, Step3p7ForConditionalGeneration

    for builder, cls, cfg_fn in (
        (FE.make_tiny_ernie4_5_vl_moe, Ernie4_5_VLMoeForConditionalGeneration, FE._ernie_tiny_config),
        (FS.make_tiny_step3p7, Step3p7ForConditionalGeneration, FS._step3p7_tiny_config),
    ):
        path = builder(tmp_path / cls.__name__)
        cfg = cfg_fn(3) if cfg_fn is FE._ernie_tiny_config else cfg_fn()
        with torch.device("meta"):
            model = cls(cfg)
        layout = {k: tuple(v.shape) for k, v in F.hf_disk_layout(model).items()}
        disk = {k: s for k, (s, _) in F.list_disk_tensors(path).items()}
        assert layout == disk


def test_real_width_writer_sharded(tmp_path, monkeypatch):
    """make_real_width's meta-model -> sharded safetensors writer, on a tiny config (fast)."""
    from transformers import Step3p7ForConditionalGeneration

    monkeypatch.setattr(FS, "real_width_config", lambda *a, **k: (Step3p7ForConditionalGeneration, FS._step3p7_tiny_config()))
    path = F.make_real_width("step3p7", tmp_path / "rw", num_layers=4, max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2 and all((path / f).exists() for f in files)
    names = F.list_disk_tensors(path)
    assert set(names) == set(index["weight_map"])
    assert {dt for _, dt in names.values()} == {"BF16"}
    # Step3.7 trunk norms are zero-centred (scale = 1 + w): stored around 0, not 1
    from safetensors import safe_open

    f = index["weight_map"]["model.layers.0.input_layernorm.weight"]
    with safe_open(str(path / f), "pt") as sf:
        assert sf.get_tensor("model.layers.0.input_layernorm.weight").float().mean().abs() < 0.1
    _assert_clean_load_and_forward(path, 300)


def test_hub_cache(tmp_path):
    from huggingface_hub import snapshot_download

    model_dir = FS.make_tiny_step3p7(tmp_path / "m")
    cache = tmp_path / "hub"
    snap = F.make_hub_cache(cache, "org/tiny-step", model_dir)
    resolved = snapshot_download("org/tiny-step", cache_dir=cache, local_files_only=True)
    assert str(snap) == resolved
    assert (cache / "models--org--tiny-step" / "refs" / "main").read_text() == snap.name
    for f in model_dir.iterdir():
        assert (snap / f.name).read_bytes() == f.read_bytes()
        assert (snap / f.name).is_symlink()
