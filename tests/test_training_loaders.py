"""A converted checkpoint is what Megatron-LM and Megatron-Bridge train from, without custom code.

Where the loader's own code imports here (megatron-core 0.16.1: ``load_common_state_dict``,
``dist_checkpointing.load`` with the loaders' default strictness, the TransformerConfig dataclass;
torch's safe unpickler; transformers' config classes) the test runs it. Megatron-LM's training package
and Megatron-Bridge do not install here (CUDA-only dependencies); their checks are reproduced from
their source with file and line (Megatron-LM tag core_v0.16.1, Megatron-Bridge 067f987d; see
docs/training.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from ckptconv.families import FAMILIES, get_family
from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore

FAMILY_NAMES = [family.name for family in FAMILIES]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Each family's tiny random checkpoint (written by the transformers classes), converted at TP=1."""
    root = tmp_path_factory.mktemp("train")
    out = {}
    for family in FAMILIES:
        src = family.make_tiny(root / f"{family.name}_hf")
        convert_hf_to_mcore(str(src), root / f"{family.name}_out")
        out[family.name] = (src, root / f"{family.name}_out")
    return out


def _config(src: Path) -> dict:
    return json.loads((src / "config.json").read_text())


def load_common_pt_safely(path: Path) -> dict:
    """torch.load(weights_only=True) with argparse.Namespace as the only extra allowed global (what
    megatron-core registers, megatron/core/safe_globals.py); the session's own list is restored after."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def _text(config: dict) -> dict:
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


# ------------------------------------------------------------------------------------ common.pt
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_common_pt_loads_with_torchs_safe_unpickler_and_megatron_cores_loader(converted, family):
    """Oracles: torch.load(weights_only=True) admitting only argparse.Namespace, and megatron-core's
    own dist_checkpointing.load_common_state_dict (what both loaders call first)."""
    from megatron.core import dist_checkpointing

    release = converted[family][1] / "release"
    state = load_common_pt_safely(release / "common.pt")
    assert state["iteration"] == 0 and state["checkpoint_version"] == 3.0
    assert isinstance(state["args"], argparse.Namespace)
    loaded = dist_checkpointing.load_common_state_dict(str(release))
    assert vars(loaded["args"]) == vars(state["args"])
    assert loaded["iteration"] == 0 and loaded["checkpoint_version"] == 3.0


# Megatron-LM core_v0.16.1 megatron/training/checkpointing.py:1384-1474 load_args_from_checkpoint:
# the fields it copies (`_set_arg`); a None in the checkpoint means "not provided".
MLM_MODEL_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type",
    "add_position_embedding", "use_rotary_position_embeddings", "rotary_base", "rotary_percent",
    "rotary_interleaved", "add_bias_linear", "add_qkv_bias", "squared_relu", "swiglu",
    "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization", "attention_dropout",
    "hidden_dropout", "tokenizer_model", "tokenizer_type", "padded_vocab_size", "ckpt_format",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
)
MLM_MOE_ARGS = ("num_experts", "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_score_function",
                "moe_router_enable_expert_bias")
# Megatron-LM checkpointing.py:102-140 check_checkpoint_args: read with a bare getattr (no default).
MLM_COMPARED_ARGS = ("num_layers", "hidden_size", "num_attention_heads")
# Megatron-Bridge src/megatron/bridge/training/mlm_compat/arguments.py:67-110 _transformer_config_from_args
# reads these without getattr when a checkpoint has no run_config.yaml.
MB_MLM_COMPAT_ARGS = (
    "multi_latent_attention", "heterogeneous_layers_config_path", "no_persist_layer_norm", "params_dtype",
    "overlap_p2p_comm", "num_experts", "rotary_interleaved", "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers", "fp8_param_gather", "swiglu", "bias_swiglu_fusion", "squared_relu",
    "init_method_xavier_uniform", "group_query_attention", "num_query_groups", "config_logger_dir",
    "cp_comm_type", "is_hybrid_model",
)


def load_args_like_megatron_lm(state: dict, run_args: argparse.Namespace) -> argparse.Namespace:
    """Megatron-LM core_v0.16.1 checkpointing.py:1357-1369 and the `_set_arg` rule (1378-1392): an
    empty state or one without 'args' is ignored; 'iteration' is read unconditionally; a field is
    copied when the checkpoint value is not None (force) or the run's is None (not force)."""
    assert state, "Checkpoint not found to provide arguments"
    assert "args" in state, "Checkpoint provided does not have arguments saved"
    run_args.iteration = state["iteration"]
    for name in MLM_MODEL_ARGS + MLM_MOE_ARGS:
        value = getattr(state["args"], name, None)
        if value is not None:
            setattr(run_args, name, value)
    return run_args


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_megatron_lm_use_checkpoint_args_gets_the_model_from_common_pt(converted, family):
    """Oracle: the source config.json (hand-read values) through Megatron-LM's own copy rule, reproduced
    from its source; check_checkpoint_args's bare getattrs and Megatron-Bridge's mlm_compat reads find
    every field they need."""
    src, out = converted[family]
    state = load_common_pt_safely(out / "release" / "common.pt")
    args = load_args_like_megatron_lm(state, argparse.Namespace(num_layers=None, hidden_size=None))
    text = _text(_config(src))
    spec = get_family(family).normalize(_config(src))
    assert args.iteration == 0
    assert args.num_layers == text["num_hidden_layers"]
    assert args.hidden_size == text["hidden_size"]
    assert args.ffn_hidden_size == text["intermediate_size"]
    assert args.num_query_groups == spec.num_query_groups and args.kv_channels == spec.head_dim
    assert args.swiglu is True and args.normalization == "RMSNorm" and args.add_bias_linear is False
    assert args.untie_embeddings_and_output_weights is (not spec.tie_word_embeddings)
    assert args.padded_vocab_size % 128 == 0 and args.padded_vocab_size >= text["vocab_size"]
    assert args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model == str(src)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 1)
    assert args.ckpt_format == "torch_dist"
    for name in MLM_MODEL_ARGS:
        assert getattr(args, name, None) is not None or name == "use_rotary_position_embeddings", name
    if spec.num_experts:
        assert args.num_experts == spec.num_experts[0]
        assert args.moe_layer_freq == [int(kind == "moe") for kind in spec.layer_mlp_kinds]
        assert args.moe_router_topk == spec.moe_router_topk
    for name in MLM_COMPARED_ARGS + MB_MLM_COMPAT_ARGS:
        assert hasattr(state["args"], name), name
    assert state["args"].params_dtype in (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------------ run_config.yaml
# Megatron-Bridge training/utils/checkpoint_utils.py:157-162: a directory holding one of these is an
# iteration directory (is_checkpoint_iteration_directory, 236-257).
MB_ITERATION_DIR_MARKERS = ("run_config.yaml", "train_state.pt", "metadata.json", ".metadata")
# Megatron-Bridge utils/instantiate_utils.py: allowed _target_ prefixes; private segments refused.
MB_ALLOWED_PREFIXES = ("megatron.", "torch.", "nvidia.", "transformers.", "numpy.", "nemo.")
# Megatron-Bridge models/gpt_provider.py:138-216 GPTModelProvider's own dataclass fields (beyond
# TransformerConfig's) that we write.
MB_GPT_PROVIDER_FIELDS = {
    "share_embeddings_and_output_weights", "make_vocab_size_divisible_by", "position_embedding_type", "rotary_base",
    "rotary_percent", "seq_length", "vocab_size", "should_pad_vocab", "hf_model_id", "scatter_embedding_sequence_parallel",
}
# Provider dataclass fields per family: qwen_vl/qwen25_vl_provider.py:26-47,
# ernie_vl/ernie45_vl_provider.py:52-104, stepfun/step35_provider.py:209-213 + step37_provider.py:53-69.
MB_FAMILY_PROVIDER_FIELDS = {
    "qwen2_5_vl": {"mrope_section", "vision_config", "bos_token_id", "eos_token_id", "vision_start_token_id",
                   "vision_end_token_id", "vision_token_id", "image_token_id", "video_token_id"},
    "ernie4_5_vl_moe": {"mrope_section", "vision_config", "moe_intermediate_size", "image_start_token_id",
                        "image_end_token_id", "image_token_id", "video_start_token_id", "video_end_token_id",
                        "video_token_id"},
    "step3p7": {"layer_types", "attention_other_setting", "sliding_attention_setting", "rotary_base_per_layer",
                "head_wise_attn_gate", "vision_config", "image_token_id", "projector_bias"},
}


def _validate_target(target: str) -> None:
    """Megatron-Bridge utils/instantiate_utils.py _validate_target_prefix."""
    assert target.startswith(MB_ALLOWED_PREFIXES), target
    assert not [segment for segment in target.split(".") if segment.startswith("_")], target


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_run_config_yaml_is_what_megatron_bridge_reads(converted, family):
    """Oracles: Megatron-Bridge's directory and run_config rules reproduced from its source; megatron-core
    0.16.1's TransformerConfig dataclass (field names, and it builds from our fields); transformers'
    vision config class instantiated from the `_target_` as Bridge's instantiate would."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    src, out = converted[family]
    # OUT is a parent directory (tracker + release/), OUT/release an iteration directory.
    assert not any((out / m).exists() for m in MB_ITERATION_DIR_MARKERS)
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (out / "release" / "run_config.yaml").is_file() and (out / "release" / "metadata.json").is_file()

    run_config = yaml.safe_load((out / "release" / "run_config.yaml").read_text())
    model = run_config["model"]
    # training/checkpointing.py:2830-2833 and 2842-2887 read these by name.
    assert (model["tensor_model_parallel_size"], model["pipeline_model_parallel_size"]) == (1, 1)
    assert run_config["checkpoint"]["save_rng"] is False and run_config["checkpoint"]["save_optim"] is False
    assert isinstance(run_config["checkpoint"]["fully_parallel_save"], bool)
    _validate_target(model["_target_"])
    _validate_target(run_config["tokenizer"]["_target_"])
    assert run_config["tokenizer"]["tokenizer_model"] == str(src)
    assert run_config["ckptconv"]["layout"] == "bridge"

    tc_fields = {f.name for f in dataclasses.fields(TransformerConfig) if f.init}
    allowed = tc_fields | MB_GPT_PROVIDER_FIELDS | MB_FAMILY_PROVIDER_FIELDS[family]
    unknown = sorted(set(model) - allowed - {"_target_"})
    assert not unknown, f"not fields of {model['_target_']}: {unknown}"

    # Bridge instantiates nested `_target_` mappings: the vision config is a real transformers config.
    vision = dict(model["vision_config"])
    module, _, name = vision.pop("_target_").rpartition(".")
    vision_config = getattr(importlib.import_module(module), name)(**vision)
    assert vision_config.hidden_size == get_family(family).normalize(_config(src)).vision["hidden_size"]

    # The TransformerConfig part is one megatron-core accepts (its __post_init__ checks MoE, GQA, ...).
    kwargs = {k: v for k, v in model.items() if k in tc_fields and not isinstance(v, dict)}
    kwargs.pop("params_dtype", None)
    kwargs["activation_func"] = getattr(torch.nn.functional, model["activation_func"]["_target_"].rsplit(".", 1)[1])
    config = TransformerConfig(**kwargs)
    assert config.num_layers == _text(_config(src))["num_hidden_layers"]


# ------------------------------------------------------------------------------------ TE-spec keys
# Norms megatron-core's Transformer Engine spec builds as TENorm (a bare te.pytorch.RMSNorm with
# `_extra_state` since TE 1.13: transformer_engine/pytorch/module/rmsnorm.py:16, ops/op.py:528): the
# block's final norm (gpt_layer_specs.py get_gpt_decoder_block_spec), a MoE layer's pre-MLP norm
# (gpt_layer_specs.py:290, `backend.layer_norm() if num_experts else IdentityOp`) and the q/k norms
# when qk_layernorm (gpt_layer_specs.py:271, 282-287). Input norms and dense pre-MLP norms are fused
# into TELayerNormColumnParallelLinear; TEDotProductAttention saves no `_extra_state`
# (extensions/transformer_engine.py:1436-1455) and GPTModel drops output_layer's (gpt_model.py:820-827).
QK_NORM_FAMILIES = {"step3p7"}
NORM_NAMES = ("final_layernorm", "pre_mlp_layernorm", "q_layernorm", "k_layernorm", "input_layernorm", "enorm", "hnorm")


def te_norm_manifest(family: str, spec) -> set[str]:
    """The `_extra_state` keys of TENorm modules, from the rules above (a hand-made manifest)."""
    def layer_key(i: int, name: str) -> str:
        where = "" if spec.stacked_layers else f"{i}."
        return f"language_model.decoder.layers.{where}{name}._extra_state"

    keys = {"language_model.decoder.final_layernorm._extra_state"}
    for i, kind in enumerate(spec.layer_mlp_kinds):
        if kind == "moe":
            keys.add(layer_key(i, "pre_mlp_layernorm"))
        if family in QK_NORM_FAMILIES:
            keys |= {layer_key(i, "self_attention.q_layernorm"), layer_key(i, "self_attention.k_layernorm")}
    # MTP layers: enorm, hnorm and the final norm are the backend's layer_norm (TENorm), the inner
    # transformer layer follows the rules above (multi_token_prediction.py get_mtp_layer_spec_for_backend).
    for i in range(spec.mtp_num_layers):
        mtp = f"language_model.mtp.layers.{i}."
        keys |= {f"{mtp}{name}._extra_state" for name in ("enorm", "hnorm", "final_layernorm")}
        if family in QK_NORM_FAMILIES:
            keys |= {f"{mtp}transformer_layer.self_attention.{n}._extra_state" for n in ("q_layernorm", "k_layernorm")}
    return keys


def _norm_objects(keys) -> set[str]:
    return {k for k in keys if k.endswith("._extra_state") and k.rsplit(".", 2)[-2] in NORM_NAMES}


@pytest.fixture(scope="module")
def parallel():
    from ckptconv.megatron import runtime

    runtime.init_parallel(tp=1, device="cpu")
    yield
    runtime.destroy_parallel()


def _build(family: str, src: Path, out: Path):
    from ckptconv.megatron.load import padded_vocab_size

    spec = get_family(family).normalize(_config(src))
    model = get_family(family).build_model(spec, padded_vocab_size=padded_vocab_size(out / "release"), dtype=torch.float32)
    return spec, model


def load_like_the_training_loaders(model, release: Path, strict: str) -> dict:
    """Megatron-LM core_v0.16.1 checkpointing.py:1130 + 1759-1771 (Megatron-Bridge
    training/checkpointing.py:3572-3577 + 2654-2675 do the same): dist_checkpointing.load of
    {"model": sharded_state_dict} with the configured strictness (default assume_ok_unexpected), then
    module.load_state_dict(strict=True), falling back to strict=False where only `_extra_state`
    entries differ."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(release), strict=strict)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError:
        result = model.load_state_dict(state["model"], strict=False)
        differ = [k for k in result.missing_keys + result.unexpected_keys if not k.endswith("_extra_state")]
        assert not differ, differ
    return state


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_transformer_engine_norm_key_is_written_and_a_te_shaped_model_loads_it(converted, parallel, family):
    """Oracles: a hand manifest of TENorm positions (from megatron-core and TE source, above); the
    family's real megatron-core model with TE-style norms (its sharded_state_dict() is megatron-core's);
    megatron-core's dist_checkpointing.load at the loaders' default strictness and at raise_all."""
    from ckptconv.formats.torch_dist import BytesMeta, DistCheckpointReader
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from ckptconv.megatron.load import _leaves

    src, out = converted[family]
    spec, model = _build(family, src, out)
    manifest = te_norm_manifest(family, spec)
    written = {fqn.split("/")[0] for fqn, md in DistCheckpointReader(out / "release").metadata.entries.items()
               if isinstance(md, BytesMeta)}
    assert _norm_objects(written) == manifest
    requested = {leaf.key for leaf in _leaves(model.sharded_state_dict()) if isinstance(leaf, ShardedObject)}
    assert _norm_objects(requested) == manifest
    for strict in ("assume_ok_unexpected", "raise_all"):  # MLM / MB default, and megatron-core's strictest
        state = load_like_the_training_loaders(model, out / "release", strict)
        assert state["checkpoint_version"] == 3.0 and vars(state["args"])["num_layers"] == spec.num_layers


# ------------------------------------------------------------------------------------ a training step
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_loaded_checkpoint_trains_on_cpu(converted, parallel, family):
    """Load as the training loaders do, then forward, backward and AdamW steps on one text + image
    batch (loss on the text tokens). Oracle: the loss itself -- finite, falling over four steps, every
    parameter of the language model and the vision tower receiving a gradient."""
    from ckptconv.verify.inputs import build_inputs

    src, out = converted[family]
    spec, model = _build(family, src, out)
    load_like_the_training_loaders(model, out / "release", "assume_ok_unexpected")
    batch = build_inputs(spec, src, text_only=False)[-1]  # the input with an image
    ids, image = batch.input_ids, batch.image_mask.reshape(batch.input_ids.shape)
    labels = torch.where(image, -100, ids)[:, 1:]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(4):
        logits = model(**batch.mcore_kwargs)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in model.named_parameters()
                       if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
            assert not no_grad, no_grad[:5]
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------------ --language-model-only
@pytest.fixture(scope="module")
def qwen_language_model(converted, tmp_path_factory):
    """Converted through the command line (the flag's plumbing is part of what is tested)."""
    from conftest import run_cli

    src = converted["qwen2_5_vl"][0]
    out = tmp_path_factory.mktemp("lm") / "out"
    result = run_cli("hf-to-mcore", str(src), str(out), "--language-model-only", "--json")
    assert result.returncode == 0, result.stderr
    assert any("--language-model-only" in note for note in json.loads(result.stdout)["notes"])
    return src, out


def gpt_model_from_args(args: argparse.Namespace):
    """What Megatron-LM's pretrain_gpt builds from `args` (gpt_builders.py: GPTModel with
    vocab_size=args.padded_vocab_size; the config from the args' TransformerConfig fields), on the
    local spec with the TE spec's norm keys."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ckptconv.megatron.common import runtime_config_kwargs, with_te_norm_extra_state

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.layernorm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=torch.nn.functional.silu, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        **runtime_config_kwargs(torch.float32),
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization=args.normalization),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=int(args.rotary_base),
        rotary_percent=args.rotary_percent,
    )
    return with_te_norm_extra_state(model)


def test_language_model_only_is_a_plain_gpt_checkpoint_that_trains_and_matches_the_vl_model(
        converted, qwen_language_model, parallel):
    """Oracles: megatron-core's GPTModel built only from common.pt's args (as pretrain_gpt would)
    loads it strictly; its logits equal the VL model's (another real megatron-core model, loaded from
    the full checkpoint) on the same text; the loss of a few AdamW steps falls."""
    from ckptconv.formats.torch_dist import DistCheckpointReader
    from ckptconv.megatron.common import causal_mask
    from ckptconv.verify.inputs import build_inputs

    src, out = qwen_language_model
    keys = DistCheckpointReader(out / "release").tensor_keys()
    assert keys and not [k for k in keys if k.startswith(("language_model.", "visual."))]
    assert json.loads((out / "ckptconv.json").read_text())["language_model_only"] is True
    run_config = yaml.safe_load((out / "release" / "run_config.yaml").read_text())
    assert run_config["model"]["_target_"].endswith("GPTModelProvider") and "vision_config" not in run_config["model"]

    state = load_common_pt_safely(out / "release" / "common.pt")
    args = load_args_like_megatron_lm(state, argparse.Namespace(num_layers=None))
    assert args.position_embedding_type == "rope"
    gpt = gpt_model_from_args(state["args"])
    load_like_the_training_loaders(gpt, out / "release", "raise_all")

    spec, vl = _build("qwen2_5_vl", src, converted["qwen2_5_vl"][1])
    load_like_the_training_loaders(vl, converted["qwen2_5_vl"][1] / "release", "raise_all")
    text = build_inputs(spec, src, text_only=True)[0]
    ids = text.input_ids
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    mask = causal_mask(ids.shape[1], None, ids.device)
    with torch.no_grad():
        ours = gpt(input_ids=ids, position_ids=positions, attention_mask=mask)[..., : spec.vocab_size]
        reference = vl(**text.mcore_kwargs)
    assert float((ours - reference).abs().max()) < 1e-5

    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    gpt.train()
    losses = []
    for _ in range(4):
        logits = gpt(input_ids=ids, position_ids=positions, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_mcore_to_hf_puts_a_language_model_back_with_the_vision_weights_of_hf_config(qwen_language_model, tmp_path):
    """Oracle: the source safetensors files, byte for byte (language model from the checkpoint,
    vision tower from --hf-config). Without --hf-config: a one-line error, nothing written."""
    from ckptconv.errors import ConversionError
    from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

    src, out = qwen_language_model
    with pytest.raises(ConversionError, match="--hf-config"):
        convert_mcore_to_hf(out, tmp_path / "no_vision")
    assert not (tmp_path / "no_vision").exists()
    convert_mcore_to_hf(out, tmp_path / "hf", hf_config=str(src))
    source_files = sorted(p.name for p in src.glob("*.safetensors"))
    assert source_files == sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    for name in source_files:
        assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes(), name


def test_verify_refuses_a_language_model_only_checkpoint_with_one_clear_line(qwen_language_model):
    """Oracle: the CLI contract (exit code 2, one line naming the cure, no traceback)."""
    from conftest import run_cli

    src, out = qwen_language_model
    result = run_cli("verify", str(src), str(out), "--no-image")
    assert result.returncode == 2
    assert "language-model-only" in result.stderr and "--hf-config" in result.stderr
    assert "Traceback" not in result.stderr
