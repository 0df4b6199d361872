"""ERNIE-4.5-VL-MoE: what the converter must get right, as executable statements.

* nested (transformers) and flat (released "Thinking") configs of one model normalize to one spec;
* the dual-pool MoE block has Megatron-Bridge's names; routers are the HF gates transposed;
* ERNIE's 3D RoPE matches HF band for band; image tokens are routed to the vision experts, text tokens
  to the text experts; ignoring the token types or swapping the pools' router biases is caught;
* the released flat config round-trips bit-exactly too.

Golden keys, coverage, round trips at TP=1/2 and EP=2, strict loads, logits against HF and verify's
rejection of swapped pools are the conformance suite's (tests/test_conformance.py), the same for
every family.
"""

from __future__ import annotations

import copy
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
from ckptconv.core.transforms import get as get_transform

FAMILY = "ernie4_5_vl_moe"
TOLERANCE = 1e-4  # fp32 max-abs logit difference; the implementations differ only in summation order
PROMPT = "Describe the picture: colours, shapes, and where they are."


# =========================================================================== shared helpers


def read_spec(hf_dir: Path):
    return normalize_config(json.loads((Path(hf_dir) / "config.json").read_text()))


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def plan_for(spec, tp: int = 1, ep: int = 1):
    return build_plan(spec, load_table(FAMILY), ParallelLayout(tp=tp, ep=ep))


def global_tensors(plan, hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every Megatron tensor of the plan, whole, made from the HF files by the table's transforms."""
    source = hf_tensors(hf_dir)
    out: dict[str, torch.Tensor] = {}
    for item in plan.items:
        ctx = TransformContext(
            spec=plan.spec, indices=item.indices, padded_vocab_size=plan.padded_vocab_size,
            where=item.label, params=item.rule.params,
        )
        made = get_transform(item.rule.transform).forward([source[n] for n in item.hf_names], ctx)
        for target, tensor in zip(item.targets, made):
            full = out.setdefault(target.key, torch.zeros(*target.axis_sizes, *tensor.shape, dtype=tensor.dtype))
            full[target.axis_index] = tensor
    return out


def model_manifest(model) -> dict[str, tuple[str, list[int]]]:
    from ckptconv.megatron.load import sharded_manifest

    return {k: (v["kind"], v["shape"]) for k, v in sharded_manifest(model.sharded_state_dict()).items()}


def build_filled_model(spec, tensors: dict[str, torch.Tensor], padded_vocab_size: int):
    from ckptconv.families.ernie4_5_vl_moe.model import build_model
    from ckptconv.megatron.load import fill_from_global_tensors

    model = build_model(spec, padded_vocab_size=padded_vocab_size)
    return fill_from_global_tensors(model, tensors)


def load_hf_reference(hf_dir: Path, spec):
    """transformers' model; the config comes from the spec so flat checkpoints load as well."""
    from transformers import Ernie4_5_VLMoeForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from ckptconv.families.ernie4_5_vl_moe.model import hf_config

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(hf_dir), config=hf_config(spec)).eval()


def verify_inputs(spec, hf_dir: Path) -> dict[str, tuple[dict, dict, torch.Tensor]]:
    from ckptconv.families.ernie4_5_vl_moe.inputs import prepare_verify_inputs
    from ckptconv.verify.inputs import synthetic_image

    return {
        "text-only": prepare_verify_inputs(spec, hf_dir, prompt=PROMPT, image=None),
        "image": prepare_verify_inputs(spec, hf_dir, prompt=PROMPT, image=synthetic_image()),
    }


@torch.no_grad()
def max_abs_diffs(hf_model, model, inputs) -> dict[str, float]:
    return {
        name: float((hf_model(**hf_kwargs).logits - model(**mcore_kwargs)).abs().max())
        for name, (hf_kwargs, mcore_kwargs, _mask) in inputs.items()
    }


# =========================================================================== fixtures


@pytest.fixture(scope="module")
def ernie_dirs(case, tmp_path_factory) -> dict[str, Path]:
    """The nested checkpoint is the conformance suite's (conftest.FamilyCase); the flat one the same
    weights with the released "Thinking" config."""
    from ckptconv.families.ernie4_5_vl_moe.fixtures import make_tiny_ernie4_5_vl_moe

    return {
        "nested": case("ernie4_5_vl_moe").hf_dir,
        "flat": make_tiny_ernie4_5_vl_moe(tmp_path_factory.mktemp("ernie") / "flat", flat=True),
    }


@pytest.fixture(scope="module")
def parallel_state_tp1():
    from ckptconv.megatron.runtime import init_parallel

    init_parallel(tp=1, pp=1, ep=1, device="cpu")


@pytest.fixture(scope="module")
def tiny(ernie_dirs, parallel_state_tp1):
    """The nested tiny checkpoint: spec, plan, global tensors, the filled Megatron model, the HF model."""
    hf_dir = ernie_dirs["nested"]
    spec = read_spec(hf_dir)
    plan = plan_for(spec)
    tensors = global_tensors(plan, hf_dir)
    return {
        "dir": hf_dir,
        "spec": spec,
        "plan": plan,
        "tensors": tensors,
        "model": build_filled_model(spec, tensors, plan.padded_vocab_size),
        "hf": load_hf_reference(hf_dir, spec),
        "inputs": verify_inputs(spec, hf_dir),
    }


# =========================================================================== config normalization


def test_flat_and_nested_configs_of_one_model_normalize_to_the_same_spec(ernie_dirs):
    nested, flat = read_spec(ernie_dirs["nested"]), read_spec(ernie_dirs["flat"])
    same = lambda spec: {**vars(spec), "hf_config": None, "filled_defaults": None}  # noqa: E731
    assert same(flat) == same(nested)
    assert nested.layer_mlp_kinds == ("dense", "moe", "moe")
    assert nested.num_experts == (4, 4)
    assert nested.moe_ffn_hidden_size == (48, 32)
    assert nested.moe_router_topk == 2
    assert nested.shared_expert_ffn_hidden_size == 48
    assert nested.extra["mrope_section"] == [3, 3, 2] and nested.extra["freq_allocation"] == 2
    assert nested.vision["hidden_size"] == 32 and nested.vision["intermediate_size"] == 128  # not the text width


def test_flat_config_reports_every_filled_default(ernie_dirs):
    nested, flat = read_spec(ernie_dirs["nested"]), read_spec(ernie_dirs["flat"])
    assert nested.filled_defaults == ()
    notes = "\n".join(flat.filled_defaults)
    for field in ("vision_config.rms_norm_eps", "vision_config.temporal_merge_size", "vision_config.rope_parameters"):
        assert field in notes
    assert flat.vision["rms_norm_eps"] == 1e-6 and flat.vision["temporal_merge_size"] == 2


def _flat_config(ernie_dirs) -> dict:
    return json.loads((ernie_dirs["flat"] / "config.json").read_text())


def test_flat_moe_layers_come_from_start_end_and_interval(ernie_dirs):
    config = _flat_config(ernie_dirs)
    config.update(num_hidden_layers=6, moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=2)
    assert normalize_config(config).layer_mlp_kinds == ("dense", "moe", "dense", "moe", "dense", "moe")
    config.update(moe_layer_start_index=[2, 2], moe_layer_end_index=[4, 4], moe_layer_interval=1)
    assert normalize_config(config).layer_mlp_kinds == ("dense", "dense", "moe", "moe", "moe", "dense")


@pytest.mark.parametrize("num_layers", [28, 3])
def test_released_pool_end_indices_past_the_last_layer_stop_at_the_depth(ernie_dirs, num_layers):
    """Oracle: hand value. ERNIE-4.5-VL-28B-A3B-Thinking says start [1, 1], end [29, 28] over 28
    layers: both ends lie past layer 27, so both pools cover layers 1..27 (ERNIE's own rule, as in
    transformers' convert_ernie4_5_vl_moe_to_hf and sglang's decoder layer). A depth cut to 3 layers
    keeps the rule."""
    config = _flat_config(ernie_dirs)
    config.update(num_hidden_layers=num_layers, moe_layer_start_index=[1, 1], moe_layer_end_index=[29, 28],
                  moe_layer_interval=1)
    assert normalize_config(config).layer_mlp_kinds == ("dense",) + ("moe",) * (num_layers - 1)


def test_only_layers_with_one_pool_are_refused_and_named(ernie_dirs):
    """Oracle: hand value. Vision experts ending at layer 20 of 28 leave layers 21-27 with text experts
    only: refused, naming exactly those layers."""
    config = _flat_config(ernie_dirs)
    config.update(num_hidden_layers=28, moe_layer_start_index=[1, 1], moe_layer_end_index=[29, 20])
    with pytest.raises(ConversionError, match=r"layer\(s\) 21-27 only the text pool;"):
        normalize_config(config)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"moe_layer_start_index": [1, 2]}, r"layer\(s\) 1 only the text pool"),
        ({"rope_3d": False}, "rope_3d is false"),
        ({"freq_allocation": 3}, "height/width; must be even"),
        ({"use_bias": True}, "use_bias"),
        ({"moe_k": 5}, "exceeds the experts"),
    ],
)
def test_normalizer_refuses_what_the_megatron_model_cannot_express(ernie_dirs, change, message):
    config = copy.deepcopy(_flat_config(ernie_dirs))
    config.update(change)
    with pytest.raises(ConversionError, match=message):
        normalize_config(config)


# =========================================================================== table vs megatron-core


def test_megatron_bridge_names_for_the_moe_block(tiny):
    actual = model_manifest(tiny["model"])
    layer = "language_model.decoder.layers.1."
    assert actual[layer + "mlp.text_moe_layer.router.weight"] == ("tensor", [4, 64])
    assert actual[layer + "mlp.text_moe_layer.router.expert_bias"] == ("tensor", [4])
    assert actual[layer + "mlp.vision_moe_layer.router.expert_bias"] == ("tensor", [4])
    assert actual[layer + "mlp.text_moe_layer.experts.experts.linear_fc1.weight"] == ("tensor", [4, 96, 64])
    assert actual[layer + "mlp.vision_moe_layer.experts.experts.linear_fc2.weight"] == ("tensor", [4, 64, 32])
    assert actual[layer + "mlp.vision_moe_layer.experts.experts.linear_fc1._extra_state"] == ("object", [4])
    assert actual[layer + "mlp.shared_experts.linear_fc1.weight"] == ("tensor", [96, 64])
    assert actual[layer + "pre_mlp_layernorm.weight"] == ("tensor", [64])
    assert actual["language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] == ("tensor", [64])
    assert actual["vision_tower.blocks.1.attn.qkv.weight"] == ("tensor", [96, 32])
    assert actual["resampler_model.spatial_linear.fc1.weight"] == ("tensor", [128, 128])


def test_router_weights_are_the_hf_gates_transposed_and_bias_rows_split(tiny):
    hf = hf_tensors(tiny["dir"])
    tensors, layer = tiny["tensors"], "language_model.decoder.layers.2.mlp."
    assert torch.equal(tensors[layer + "text_moe_layer.router.weight"], hf["model.layers.2.mlp.gate.weight"].t())
    assert torch.equal(tensors[layer + "vision_moe_layer.router.weight"], hf["model.layers.2.mlp.gate.weight_1"].t())
    bias = hf["model.layers.2.mlp.moe_statics.e_score_correction_bias"]
    assert torch.equal(tensors[layer + "text_moe_layer.router.expert_bias"], bias[0])
    assert torch.equal(tensors[layer + "vision_moe_layer.router.expert_bias"], bias[1])
    # vision expert 1 of the Megatron pool is HF expert E + 1, gate rows first
    fc1 = tensors[layer + "vision_moe_layer.experts.experts.linear_fc1.weight"][1]
    assert torch.equal(fc1[:32], hf["model.layers.2.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(fc1[32:], hf["model.layers.2.mlp.experts.5.up_proj.weight"])


# =========================================================================== forward equivalence


@torch.no_grad()
def test_3d_rope_matches_hf_band_for_band_and_is_plain_rope_for_text(tiny):
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeTextRotaryEmbedding

    rotary = tiny["model"].language_model.rotary_pos_emb
    hf_rotary = Ernie4_5_VLMoeTextRotaryEmbedding(tiny["hf"].config.text_config)
    positions = torch.randint(0, 50, (3, 2, 9), generator=torch.Generator().manual_seed(0))  # distinct t, h, w
    emb = rotary(positions)  # [S, B, 1, head_dim]
    hf_cos, hf_sin = hf_rotary(torch.zeros(1), positions)  # [B, S, head_dim]
    assert torch.allclose(emb.cos()[:, :, 0].transpose(0, 1), hf_cos, atol=1e-6)
    assert torch.allclose(emb.sin()[:, :, 0].transpose(0, 1), hf_sin, atol=1e-6)

    text_positions = torch.arange(9).expand(3, 1, 9)  # t = h = w
    plain = text_positions[0, 0, :, None].float() * rotary.inv_freq  # [S, bands]
    assert torch.equal(rotary(text_positions)[:, 0, 0], plain.repeat_interleave(2, dim=-1))


@torch.no_grad()
def test_image_tokens_reach_the_vision_experts_and_text_tokens_the_text_experts(tiny):
    model, (_, mcore_kwargs, _) = tiny["model"], tiny["inputs"]["image"]
    routed = {"text": 0, "vision": 0}

    def count(pool):
        def hook(_module, args):  # SequentialMLP(dispatched_input, tokens_per_expert, probs)
            routed[pool] += int(args[1].sum())
        return hook

    hooks = []
    for layer in model.language_model.decoder.layers:
        if hasattr(layer.mlp, "vision_moe_layer"):
            hooks.append(layer.mlp.text_moe_layer.experts.register_forward_pre_hook(count("text")))
            hooks.append(layer.mlp.vision_moe_layer.experts.register_forward_pre_hook(count("vision")))
    try:
        model(**mcore_kwargs)
    finally:
        for h in hooks:
            h.remove()
    vision_tokens = int(mcore_kwargs["moe_mm_token_type_ids"].sum())  # placeholders + start/end
    text_tokens = mcore_kwargs["input_ids"].numel() - vision_tokens
    moe_layers, topk = tiny["spec"].layer_mlp_kinds.count("moe"), tiny["spec"].moe_router_topk
    assert routed == {"text": moe_layers * text_tokens * topk, "vision": moe_layers * vision_tokens * topk}


@torch.no_grad()
def test_ignoring_the_token_types_would_be_caught(tiny):
    hf_kwargs, mcore_kwargs, _ = tiny["inputs"]["image"]
    everything_text = {**mcore_kwargs, "moe_mm_token_type_ids": torch.zeros_like(mcore_kwargs["moe_mm_token_type_ids"])}
    diff = float((tiny["hf"](**hf_kwargs).logits - tiny["model"](**everything_text)).abs().max())
    assert diff > 100 * TOLERANCE


def _swap_pools(tensors: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    swapped = dict(tensors)
    for key in tensors:
        if key.endswith("text_moe_layer." + suffix):
            other = key.replace("text_moe_layer", "vision_moe_layer")
            swapped[key], swapped[other] = tensors[other], tensors[key]
    return swapped


@pytest.mark.parametrize("swapped", ["router.expert_bias"])
def test_swapping_the_text_and_vision_pools_is_caught(tiny, swapped):
    """Oracle: real HF. (Swapped router weights: the conformance suite's pool-swap, through verify.)"""
    model = build_filled_model(tiny["spec"], _swap_pools(tiny["tensors"], swapped), tiny["plan"].padded_vocab_size)
    diffs = max_abs_diffs(tiny["hf"], model, tiny["inputs"])
    assert min(diffs.values()) > 100 * TOLERANCE, diffs


@torch.no_grad()
def test_raw_pixels_are_normalized_inside_the_model(tiny):
    hf_kwargs, mcore_kwargs, _ = tiny["inputs"]["image"]
    assert float(mcore_kwargs["pixel_values"].max()) > 2  # raw 0..255
    raw = tiny["model"](**mcore_kwargs)
    normalized = tiny["model"](**{**mcore_kwargs, "pixel_values": hf_kwargs["pixel_values"], "pixel_values_are_raw": False})
    assert float((raw - normalized).abs().max()) <= 1e-5


# =========================================================================== through the converter


def test_round_trip_of_the_released_flat_config_is_bit_exact(ernie_dirs, parallel_state_tp1, tmp_path):
    """Oracle: the source files (real HF); the nested config's round trips are the conformance suite's."""
    shape = "flat"
    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore
    from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

    src = ernie_dirs[shape]
    convert_hf_to_mcore(str(src), tmp_path / "mcore")
    convert_mcore_to_hf(str(tmp_path / "mcore"), tmp_path / "back")
    before, after = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert sorted(after) == sorted(before)
    assert [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])] == []
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


# =========================================================================== tensor / expert parallel




def test_dtype_bf16_keeps_the_routers_in_their_source_dtype(ernie_dirs, tmp_path):
    """--dtype bf16 casts weights, but router weights and score-correction biases keep fp32."""
    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore
    from ckptconv.formats.torch_dist import DistCheckpointReader

    convert_hf_to_mcore(str(ernie_dirs["nested"]), tmp_path / "bf16", dtype="bf16")
    reader = DistCheckpointReader(tmp_path / "bf16")
    dtypes = {key: reader.dtype(key) for key in reader.tensor_keys()}
    router_keys = [k for k in dtypes if ".router." in k]
    assert router_keys and all(dtypes[k] == torch.float32 for k in router_keys)
    assert all(dtypes[k] == torch.bfloat16 for k in dtypes if ".router." not in k)


@pytest.mark.parametrize("layout", ["tokenizer_config.json", "tokenizer.json", "added_tokens.json"])
def test_special_token_ids_missing_from_config_come_from_the_tokenizer_files(ernie_dirs, tmp_path, layout):
    """Oracle: hand value. The released flat config names only im_patch_id; verify takes the
    start/end/video ids from whichever tokenizer file declares them, and ids in config.json win."""
    from ckptconv.families import normalize_config as normalize

    tokens = {"<|IMAGE_START|>": 101304, "<|IMAGE_END|>": 101305, "<|VIDEO_START|>": 101306,
              "<|VIDEO_END|>": 101307, "<|VIDEO_PLACEHOLDER|>": 103367, "<|IMAGE_PLACEHOLDER|>": 100295}
    if layout == "tokenizer_config.json":
        body = {"added_tokens_decoder": {str(i): {"content": s} for s, i in tokens.items()}}
    elif layout == "tokenizer.json":
        body = {"added_tokens": [{"id": i, "content": s} for s, i in tokens.items()]}
    else:
        body = tokens
    (tmp_path / layout).write_text(json.dumps(body))
    config = _flat_config(ernie_dirs)
    for key in ("image_start_token_id", "image_end_token_id", "video_token_id", "video_start_token_id", "video_end_token_id"):
        config.pop(key, None)
    config["im_patch_id"] = config.pop("image_token_id")
    spec = normalize(config, model_dir=tmp_path)
    assert spec.extra["tokens"] == {
        "image_token_id": config["im_patch_id"], "image_start_token_id": 101304, "image_end_token_id": 101305,
        "video_token_id": 103367, "video_start_token_id": 101306, "video_end_token_id": 101307,
    }
    assert normalize(config).extra["tokens"]["image_start_token_id"] is None  # without the files: unknown
