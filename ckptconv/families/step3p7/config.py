"""Step3.7 (``model_type`` ``step3p7``; text ``step3p5``, vision ``step3p5_vision``) config normalizer.

The language model is heterogeneous, and every per-layer feature is carried into the spec so the
Megatron model (``model.py`` beside this module) can build each layer exactly:

* ``layer_types``: full vs sliding-window attention, each type with its own RoPE (theta, partial
  rotary factor) -> ``extra["layer_attention"][i]``;
* ``per_layer_config`` head-count overrides -> ``layer_attention[i]`` (read by the ``fuse_qkv_gate``
  transform in ``transforms.py`` and by TP validation);
* ``mlp_layer_types``: dense vs MoE with a shared expert -> ``layer_mlp_kinds``;
* q/k RMSNorm, the per-head sigmoid output gate ``g_proj``, ``query_pre_attn_scalar``,
  ``swiglu_limits`` / ``swiglu_limits_shared`` and the ``(1 + w)`` RMSNorms.

Anything the Megatron model cannot reproduce is refused with a :class:`ConversionError` naming the
field. The config is parsed with transformers' own ``Step3p7Config`` first, so the released
remote-code config (``moe_layers_enum``, ``attention_other_setting``, per-layer ``rope_theta`` lists,
...) and the transformers 5 shape normalize the same way.
"""

from __future__ import annotations

from ckptconv.errors import ConversionError
from ckptconv.core.spec import AttentionGeometry, ModelSpec

FAMILY_NAME = "step3p7"
WHERE = "config.json (step3p7)"

ATTENTION_TYPES = ("full_attention", "sliding_attention")
MLP_TYPES = {"dense": "dense", "sparse": "moe"}
# per_layer_config keys the Megatron model honours (each becomes a per-layer TransformerConfig field).
PER_LAYER_KEYS = {"num_attention_heads", "num_key_value_heads", "head_dim"}


def _fail(message: str) -> ConversionError:
    return ConversionError(f"{WHERE}: {message}")


def _parse(config: dict):
    """transformers' own parse: resolves legacy hub fields into layer_types / per_layer_config / rope."""
    from transformers import Step3p7Config

    if not isinstance(config.get("text_config"), dict) or not isinstance(config.get("vision_config"), dict):
        raise _fail("expected nested `text_config` and `vision_config` objects")
    try:
        return Step3p7Config.from_dict(dict(config))
    except (TypeError, ValueError) as exc:
        raise _fail(f"transformers rejects this config: {exc}") from None


def _layer_rope(text, layer_type: str) -> dict:
    rope = (text.rope_parameters or {}).get(layer_type)
    if not isinstance(rope, dict):
        raise _fail(f"text_config.rope_parameters has no entry for layer type {layer_type!r}")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        # Megatron's RotaryEmbedding here is plain RoPE; YaRN / llama3 scaling would change the
        # frequencies, so converting would give a model that computes something else.
        raise _fail(f"text_config.rope_parameters.{layer_type}.rope_type = {rope_type!r} is not supported (only 'default')")
    return {
        "rope_theta": float(rope["rope_theta"]),
        "rotary_percent": float(rope.get("partial_rotary_factor", 1.0)),
    }


def _per_layer_attention(text) -> dict[int, AttentionGeometry]:
    out = {}
    for i in range(text.num_hidden_layers):
        view = text.per_layer_config[i]
        heads, groups, head_dim = int(view.num_attention_heads), int(view.num_key_value_heads), int(view.head_dim)
        if heads % groups:
            raise _fail(f"layer {i}: num_attention_heads {heads} is not divisible by num_key_value_heads {groups}")
        out[i] = AttentionGeometry(heads, groups, head_dim)
    return out


def _limits(values, n: int, field: str) -> list[float | None]:
    """Per-layer SwiGLU clamp bounds; HF treats None and 0 alike as "no clamp"."""
    if values is None:
        return [None] * n
    if len(values) != n:
        raise _fail(f"text_config.{field} has {len(values)} entries, expected num_hidden_layers = {n}")
    return [float(v) if v else None for v in values]


def _refuse_unsupported(text, raw_text: dict) -> None:
    # First: any other per-layer override would make the global reads below ambiguous.
    for layer, fields in (raw_text.get("per_layer_config") or {}).items():
        unknown = set(fields) - PER_LAYER_KEYS
        if unknown:
            raise _fail(f"text_config.per_layer_config[{layer}] overrides {sorted(unknown)}; supported: {sorted(PER_LAYER_KEYS)}")
    if getattr(text, "use_bidirectional_attention", False):
        raise _fail("text_config.use_bidirectional_attention = true is not supported (Megatron layers here are causal)")
    gating = raw_text.get("gating", getattr(text, "gating", True))
    if not (gating is True or gating == "per-head"):
        raise _fail(f"text_config.gating = {gating!r} is not supported (only the per-head gate, gating = true)")
    if text.attention_bias:
        raise _fail("text_config.attention_bias = true is not supported")
    if text.mlp_bias:
        raise _fail("text_config.mlp_bias = true is not supported")
    if getattr(text, "num_nextn_predict_layers", 0):
        raise _fail(
            f"text_config.num_nextn_predict_layers = {text.num_nextn_predict_layers}: the checkpoint carries "
            "multi-token-prediction layers after the decoder; converting them is not supported, and dropping "
            "them would make export lossy"
        )
    bad = sorted(set(text.layer_types) - set(ATTENTION_TYPES))
    if bad:
        raise _fail(f"text_config.layer_types contains {bad}; supported: {list(ATTENTION_TYPES)}")
    bad = sorted(set(text.mlp_layer_types) - set(MLP_TYPES))
    if bad:
        raise _fail(f"text_config.mlp_layer_types contains {bad}; supported: {sorted(MLP_TYPES)}")
    if "sliding_attention" in text.layer_types and not text.sliding_window:
        raise _fail("text_config.sliding_window is missing but layer_types has sliding_attention layers")
    if text.hidden_act != "silu":
        raise _fail(f"text_config.hidden_act = {text.hidden_act!r} is not supported (only silu)")


def normalize(config: dict) -> ModelSpec:
    parsed = _parse(config)
    text, vision_cfg = parsed.text_config, parsed.vision_config
    raw_text = config["text_config"]
    _refuse_unsupported(text, raw_text)
    n = int(text.num_hidden_layers)
    if len(text.layer_types) != n or len(text.mlp_layer_types) != n:
        raise _fail("text_config.layer_types / mlp_layer_types must have num_hidden_layers entries")

    rope_by_type = {t: _layer_rope(text, t) for t in set(text.layer_types)}
    layer_attention = {}
    for i, layer_type in enumerate(text.layer_types):
        sliding = layer_type == "sliding_attention"
        layer_attention[i] = {
            "type": layer_type,
            # HF masks keys with q - k >= sliding_window; Megatron's window (left, right) keeps
            # k >= q - left, so left = sliding_window - 1.
            "window_size": (int(text.sliding_window) - 1, 0) if sliding else None,
            **rope_by_type[layer_type],
        }

    vision = vision_cfg.to_dict()
    vision.pop("transformers_version", None)
    full_rope = rope_by_type.get("full_attention") or next(iter(rope_by_type.values()))
    # Head geometry may vary per layer; transformers refuses a bare global read, so take the global
    # (default) values from the serialized form and the per-layer ones from per_layer_attention.
    defaults = text.to_dict()
    return ModelSpec(
        family=FAMILY_NAME,
        hf_config=config,
        vocab_size=int(text.vocab_size),
        hidden_size=int(text.hidden_size),
        num_layers=n,
        num_attention_heads=int(defaults["num_attention_heads"]),
        num_query_groups=int(defaults["num_key_value_heads"]),
        head_dim=int(defaults["head_dim"]),
        ffn_hidden_size=int(text.intermediate_size),
        norm_eps=float(text.rms_norm_eps),
        rope_theta=full_rope["rope_theta"],
        qkv_bias=False,
        tie_word_embeddings=bool(text.tie_word_embeddings),
        layer_mlp_kinds=tuple(MLP_TYPES[t] for t in text.mlp_layer_types),
        num_experts=(int(text.n_routed_experts),) if "sparse" in text.mlp_layer_types else (),
        moe_ffn_hidden_size=(int(text.moe_intermediate_size),) if "sparse" in text.mlp_layer_types else (),
        moe_router_topk=int(text.num_experts_per_tok),
        shared_expert_ffn_hidden_size=int(text.share_expert_dim),
        vision=vision,
        image_token_id=parsed.image_token_id,
        # Layers differ (attention type, head counts, dense/MoE): Megatron keys them per layer.
        heterogeneous_layers=True,
        layer_attention=_per_layer_attention(text),
        ranges={"vblock": int(vision_cfg.num_hidden_layers)},
        flags={"projector_bias": bool(parsed.projector_bias)},
        extra={
            "layer_attention": layer_attention,
            "softmax_scale": float(text.query_pre_attn_scalar) ** -0.5,
            "moe_router_scaling_factor": float(text.moe_router_scaling_factor),
            "swiglu_limits": _limits(text.swiglu_limits, n, "swiglu_limits"),
            "swiglu_limits_shared": _limits(text.swiglu_limits_shared, n, "swiglu_limits_shared"),
            "zero_centered_rmsnorm": True,  # every trunk RMSNorm (q/k norms too) scales by (1 + w)
            "projector_bias": bool(parsed.projector_bias),  # the Megatron model reads it too
            # Images are inserted after <im_start>; its id lives in the tokenizer, not in the
            # transformers config, so it is only known here when config.json carries it.
            "im_start_token_id": config.get("im_start_token_id"),
        },
    )
