"""Step3.7: the config normalizer, the mapping table and the heterogeneous Megatron model.

The tiny fixture has every feature the released model has: layers [full, sliding, sliding, full]
(sliding window 8, per-layer RoPE theta and partial rotary), 4 query heads on full layers and 6 on
sliding ones (per_layer_config), dense/dense/MoE/MoE with a shared expert, q/k norms, the per-head
output gate g_proj, (1 + w) RMSNorms, and the vision tower with its RoPE-ordered fused in_proj.

Golden keys, coverage, round trips at TP=1/2 and EP=2, strict loads, logits against HF and verify's
rejection of swapped gate rows are the conformance suite's (tests/test_conformance.py), the same
for every family; this file holds what is particular to Step3.7.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckptconv.errors import ConversionError
from ckptconv.families import normalize_config
from ckptconv.core.layout import ParallelLayout
from ckptconv.core.mapping import load_table
from ckptconv.core.plan import build_plan
from ckptconv.core.transforms import TransformContext
from ckptconv.families.step3p7.transforms import TRANSFORMS as STEP_TRANSFORMS

TOLERANCE = 1e-4  # max |logit difference| in fp32


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_step(case) -> Path:
    """The conformance suite's Step3.7 checkpoint (conftest.FamilyCase)."""
    return case("step3p7").hf_dir


@pytest.fixture(scope="module")
def raw_config(tiny_step) -> dict:
    return json.loads((tiny_step / "config.json").read_text())


@pytest.fixture(scope="module")
def spec(raw_config):
    return normalize_config(raw_config)


@pytest.fixture(scope="module")
def hf_tensors(tiny_step) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_step / "model.safetensors"))


def _hf_model(directory: Path):
    from transformers import Step3p7ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return Step3p7ForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32).eval()


def _megatron_model(spec, tensors_from: Path, tp: int = 1):
    from ckptconv.pipeline.hf_to_mcore import global_tensors_in_memory
    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import fill_from_global_tensors
    from ckptconv.families.step3p7.model import build_model

    runtime.init_parallel(tp=tp, device="cpu")
    layout = ParallelLayout(tp=tp)
    model = build_model(spec, padded_vocab_size=layout.padded_vocab_size(spec.vocab_size))
    return fill_from_global_tensors(model, global_tensors_in_memory(str(tensors_from), layout))


@pytest.fixture(scope="module")
def megatron_model(spec, tiny_step):
    return _megatron_model(spec, tiny_step)


@pytest.fixture(scope="module")
def hf_model(tiny_step):
    return _hf_model(tiny_step)


def _synthetic_image(spec) -> torch.Tensor:
    size = int(spec.vision["image_size"])
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(7))


PROMPT = "Describe the picture: what is in it, and where? Answer in one sentence."


# ---------------------------------------------------------------------------------------------- normalizer
def test_every_per_layer_feature_reaches_the_spec(spec):
    assert spec.layer_mlp_kinds == ("dense", "dense", "moe", "moe")
    assert spec.heterogeneous_layers is True and not spec.stacked_layers
    assert [spec.attention(i).num_attention_heads for i in range(4)] == [4, 6, 6, 4]
    assert {spec.attention(i).num_query_groups for i in range(4)} == {2}
    attention = spec.extra["layer_attention"]
    assert [attention[i]["window_size"] for i in range(4)] == [None, (7, 0), (7, 0), None]
    assert [(attention[i]["rope_theta"], attention[i]["rotary_percent"]) for i in range(4)] == [
        (5e6, 0.5), (1e4, 1.0), (1e4, 1.0), (5e6, 0.5)]
    assert spec.extra["softmax_scale"] == 16 ** -0.5
    assert (spec.num_experts, spec.moe_ffn_hidden_size, spec.moe_router_topk) == ((4,), (32,), 2)
    assert spec.shared_expert_ffn_hidden_size == 40
    assert spec.extra["swiglu_limits"] == [None] * 4 and spec.extra["zero_centered_rmsnorm"] is True
    assert spec.ranges == {"vblock": 2, "mtp": 0} and spec.image_token_id == 299
    assert spec.mtp_num_layers == 0 and spec.rope_scaling is None


def test_the_released_remote_code_config_shape_normalizes_the_same(raw_config, spec):
    """Hub configs spell the same model with legacy fields (moe_layers_enum, attention_other_setting,
    per-layer rope_theta / partial_rotary_factors lists)."""
    text = {k: v for k, v in raw_config["text_config"].items()
            if k not in ("layer_types", "mlp_layer_types", "per_layer_config", "rope_parameters", "num_sliding_attention_heads")}
    text.update(
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        moe_layers_enum="2,3",
        attention_other_setting={"num_attention_heads": 6, "num_attention_groups": 2},
        rope_theta=[5e6, 1e4, 1e4, 5e6],
        partial_rotary_factors=[0.5, 1.0, 1.0, 0.5],
    )
    legacy = normalize_config({**raw_config, "text_config": text})
    assert legacy.layer_attention == spec.layer_attention
    for field in ("layer_attention", "softmax_scale", "swiglu_limits"):
        assert legacy.extra[field] == spec.extra[field], field
    assert legacy.layer_mlp_kinds == spec.layer_mlp_kinds


@pytest.mark.parametrize("change,field", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"gating": "elementwise"}, "gating"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"per_layer_config": {"1": {"num_attention_heads": 6, "intermediate_size": 8}}}, "per_layer_config"),
])
def test_features_the_megatron_model_cannot_reproduce_are_refused_by_name(raw_config, change, field):
    text = {**raw_config["text_config"], **change}
    text = {k: v for k, v in text.items() if v is not None}
    with pytest.raises(ConversionError, match=field):
        normalize_config({**raw_config, "text_config": text})


def test_rope_scaling_never_stops_a_conversion_and_verify_builds_only_what_it_implements(raw_config):
    """Oracle: hand values. A YaRN-scaled config normalizes (the scaling is recorded, not refused);
    the Megatron model implements default and llama3 RoPE and refuses to build YaRN, naming it."""
    from ckptconv.families.step3p7.model import layer_rotary_embedding

    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}
    text = {**raw_config["text_config"], "rope_parameters": {
        "full_attention": {"rope_theta": 5e6, "partial_rotary_factor": 0.5, **yarn},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    spec = normalize_config({**raw_config, "text_config": text})
    assert spec.rope_scaling == {**dict(sorted(yarn.items())), "layer_types": ["full_attention"]}
    attention = spec.extra["layer_attention"]
    assert attention[0]["rope_scaling"]["rope_type"] == "yarn" and attention[1]["rope_scaling"] is None
    with pytest.raises(ConversionError, match="yarn"):
        layer_rotary_embedding(16, 0.5, 5e6, attention[0]["rope_scaling"])


# ---------------------------------------------------------------------------------------------- table
def _items_round_trip(plan, hf_tensors):
    for item in plan.items:
        ctx = TransformContext(spec=plan.spec, indices=item.indices, padded_vocab_size=plan.padded_vocab_size,
                               where=item.label, params=item.rule.params)
        transform = plan.table.transform_of(item.rule)
        sources = [hf_tensors[n] for n in item.hf_names]
        produced = transform.forward(sources, ctx)
        assert len(produced) == len(item.targets), item.label
        yield item, sources, produced, transform.inverse(produced, ctx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_then_export_through_the_table_is_bit_exact(spec, hf_tensors, dtype):
    plan = build_plan(spec, load_table("step3p7"), ParallelLayout(tp=2, ep=2))
    tensors = {k: v.to(dtype) for k, v in hf_tensors.items()}
    for item, sources, _, restored in _items_round_trip(plan, tensors):
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(sources, restored)), item.label


def test_one_plus_w_norm_weights_are_stored_unchanged(spec, hf_tensors):
    """(w + 1) - 1 != w in floating point: the +1 is applied by the Megatron norm, never folded in."""
    plan = build_plan(spec, load_table("step3p7"), ParallelLayout(tp=1))
    norms = 0
    for item, sources, produced, _ in _items_round_trip(plan, hf_tensors):
        if item.hf_names[0].endswith(("layernorm.weight", "norm.weight")):
            assert torch.equal(produced[0], sources[0]), item.label
            norms += 1
    assert norms == 4 * 4 + 1  # input, post-attention, q and k norm per layer; the final norm


def test_gate_rows_travel_with_their_query_group_laid_out_as_megatron_bridge_does(spec):
    """Oracle: Megatron-Bridge's merge_qkvg_weights for megatron-core's attention_output_gate
    (param_mapping.py), re-stated by hand. Layer 1 (sliding): 6 heads in 2 groups, head_dim 16 ->
    per group [q (3*16), gate (3 heads x 16 copies of the head's g_proj row), k (16), v (16)]."""
    heads, groups, d, hidden = 6, 2, 16, 64
    q = torch.arange(heads * d, dtype=torch.float32)[:, None].expand(-1, hidden) + 1000
    k = torch.arange(groups * d, dtype=torch.float32)[:, None].expand(-1, hidden) + 2000
    v = torch.arange(groups * d, dtype=torch.float32)[:, None].expand(-1, hidden) + 3000
    g = torch.arange(heads, dtype=torch.float32)[:, None].expand(-1, hidden) + 4000
    ctx = TransformContext(spec=spec, indices={"layer": 1}, where="test")
    fuse = STEP_TRANSFORMS["fuse_qkv_gate"]
    (fused,) = fuse.forward([q, k, v, g], ctx)
    block = 2 * 3 * d + 2 * d
    assert fused.shape == (groups * block, hidden)
    for group in range(groups):
        rows = fused[group * block:(group + 1) * block, 0]
        assert torch.equal(rows[:3 * d], q[group * 3 * d:(group + 1) * 3 * d, 0])
        assert torch.equal(rows[3 * d:6 * d], g[group * 3:(group + 1) * 3, 0].repeat_interleave(d))
        assert torch.equal(rows[6 * d:7 * d], k[group * d:(group + 1) * d, 0])
        assert torch.equal(rows[7 * d:], v[group * d:(group + 1) * d, 0])
    with pytest.raises(ConversionError, match="g_proj"):
        fuse.forward([q, k, v, g[:4]], ctx)
    # A checkpoint whose copies of a gate row diverged (trained with an element-wise gate) is refused on export.
    trained = fused.clone()
    trained[3 * d + 1, 5] += 1.0
    with pytest.raises(ConversionError, match="element-wise"):
        fuse.inverse([trained], ctx)


# ---------------------------------------------------------------------------------------------- megatron model
def _logits_diff(hf_model, megatron_model, spec, tiny_step, image):
    from ckptconv.families.step3p7.inputs import prepare_verify_inputs

    hf_kwargs, mcore_kwargs, image_mask = prepare_verify_inputs(spec, tiny_step, prompt=PROMPT, image=image)
    with torch.no_grad():
        reference = hf_model(**hf_kwargs, use_cache=False).logits
        got = megatron_model(**mcore_kwargs)
    assert got.shape == reference.shape == (1, hf_kwargs["input_ids"].shape[1], spec.vocab_size)
    return (reference - got).abs().max().item(), image_mask, reference


def test_image_logits_match_transformers(hf_model, megatron_model, spec, tiny_step):
    diff, mask, reference = _logits_diff(hf_model, megatron_model, spec, tiny_step, _synthetic_image(spec))
    assert int(mask.sum()) == 1  # 56x56 image, patch 14, two stride-2 downsamplers: one feature
    assert diff <= TOLERANCE
    # The image really reaches the decoder (the placeholder row is replaced, not left as an embedding).
    from ckptconv.families.step3p7.inputs import prepare_verify_inputs

    hf_kwargs, _, _ = prepare_verify_inputs(spec, tiny_step, prompt=PROMPT, image=_synthetic_image(spec))
    with torch.no_grad():
        text_only = hf_model(input_ids=hf_kwargs["input_ids"], use_cache=False).logits
    assert (reference - text_only).abs().max().item() > 100 * TOLERANCE


def test_swiglu_limits_clamp_like_transformers(tiny_step, tmp_path):
    """Small limits so that the clamps really bite, on routed experts and on dense/shared MLPs."""
    import shutil

    clamped = tmp_path / "clamped"
    shutil.copytree(tiny_step, clamped)
    config = json.loads((clamped / "config.json").read_text())
    config["text_config"].update(swiglu_limits=[0, 0, 0.02, 0.03], swiglu_limits_shared=[0.02, 0, 0, 0.02])
    (clamped / "config.json").write_text(json.dumps(config))
    clamped_spec = normalize_config(config)
    assert clamped_spec.extra["swiglu_limits"] == [None, None, 0.02, 0.03]
    hf = _hf_model(clamped)
    diff, _, reference = _logits_diff(hf, _megatron_model(clamped_spec, clamped), clamped_spec, clamped, None)
    assert diff <= TOLERANCE
    _, _, unclamped_reference = _logits_diff(_hf_model(tiny_step), _megatron_model(normalize_config(json.loads(
        (tiny_step / "config.json").read_text())), tiny_step), clamped_spec, clamped, None)
    assert (reference - unclamped_reference).abs().max().item() > 100 * TOLERANCE  # the limits matter


def test_megatron_model_refuses_inputs_it_would_compute_differently(megatron_model, spec):
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ConversionError, match="padding"):
        megatron_model(ids, attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ConversionError, match="image_start_token_id"):
        megatron_model(ids, pixel_values=_synthetic_image(spec))


# ---------------------------------------------------------------------------------------------- converter
# ---------------------------------------------------------------------------------------------- torchrun worker
