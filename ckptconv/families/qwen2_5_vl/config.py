"""Qwen2.5-VL config normalizer.

Accepts both shapes the hub uses: nested (``text_config``, as transformers 5 saves it) and flat
(text fields at the top level, ``rope_scaling: {type: mrope, mrope_section}``, nested
``vision_config``; the shape of the released checkpoints).
"""

from __future__ import annotations

from ckptconv.errors import ConversionError
from ckptconv.families.base import require
from ckptconv.core.spec import ModelSpec

FAMILY_NAME = "qwen2_5_vl"


def _text_fields(config: dict) -> dict:
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("hidden_size"):
        return text
    return config  # flat: language-model fields live at the top level


def _mrope_section(text: dict, where: str) -> list[int]:
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key) or {}
        if rope.get("mrope_section"):
            return list(rope["mrope_section"])
    raise ConversionError(f"{where}: rope_parameters.mrope_section is missing (Qwen2.5-VL uses M-RoPE)")


def _rope_theta(text: dict) -> float:
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key) or {}
        if "rope_theta" in rope:
            return float(rope["rope_theta"])
    return float(text.get("rope_theta", 1000000.0))


def normalize(config: dict) -> ModelSpec:
    where = "config.json (qwen2_5_vl)"
    text = _text_fields(config)
    vision = dict(require(config, "vision_config", where))
    hidden = require(text, "hidden_size", where)
    heads = require(text, "num_attention_heads", where)
    kv_heads = text.get("num_key_value_heads") or heads
    num_layers = require(text, "num_hidden_layers", where)
    if hidden % heads:
        raise ConversionError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv_heads:
        raise ConversionError(f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
    head_dim = hidden // heads
    mrope = _mrope_section(text, where)
    if sum(mrope) * 2 != head_dim:
        raise ConversionError(f"{where}: mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    # Qwen2.5-VL ties embeddings only in the small checkpoints; the flag may sit at either level.
    tie = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    vision.setdefault("depth", 32)
    return ModelSpec(
        family=FAMILY_NAME,
        hf_config=config,
        vocab_size=require(text, "vocab_size", where),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=require(text, "intermediate_size", where),
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(text),
        qkv_bias=True,
        tie_word_embeddings=tie,
        layer_mlp_kinds=("dense",) * num_layers,
        vision=vision,
        image_token_id=config.get("image_token_id", text.get("image_token_id")),
        ranges={"vblock": int(vision["depth"])},
        extra={
            "mrope_section": mrope,
            "spatial_merge_size": vision.get("spatial_merge_size", 2),
        },
    )
