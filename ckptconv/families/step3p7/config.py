"""Step3.7 (``model_type`` ``step3p7``; text ``step3p5``, vision ``step3p5_vision``) config normalizer.

The language model is heterogeneous, and every per-layer feature is carried into the spec so the
Megatron model (``model.py`` beside this module) can build each layer exactly:

* ``layer_types``: full vs sliding-window attention, each type with its own RoPE (theta, partial
  rotary factor, and the ``rope_scaling`` of the types named by ``yarn_only_types``, e.g. llama3)
  -> ``extra["layer_attention"][i]``; the scaling is also ``spec.rope_scaling`` (recorded in the
  checkpoint's metadata);
* ``num_nextn_predict_layers``: the multi-token-prediction layers stored after the decoder
  (``model.layers.{n + i}``) -> ``spec.mtp_num_layers``, their geometry at ``layer_attention[n + i]``;
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


# Scaling fields a rope_scaling / rope_parameters entry may carry besides theta and partial rotary.
_ROPE_BASE_KEYS = ("rope_theta", "partial_rotary_factor")


def _scaling_of(params: dict | None) -> dict | None:
    """The scaling part of a rope entry (``rope_type`` + its parameters), None for plain RoPE.
    Legacy entries spell the type ``type``."""
    if not params:
        return None
    out = {k: v for k, v in params.items() if k not in _ROPE_BASE_KEYS}
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    out.pop("type", None)
    if out.get("rope_type", "default") == "default":
        return None
    return dict(sorted(out.items()))


def _rope_scaling(text, raw_text: dict) -> tuple[dict | None, set[str]]:
    """(scaling, layer types it applies to). The released config says it with ``rope_scaling`` plus
    ``yarn_only_types`` (the layer types that get it; vLLM and sglang read it so); transformers'
    own shape has it inside ``rope_parameters[<type>]``."""
    types = set(text.layer_types) | set(getattr(text, "mtp_layer_types", None) or ())
    released = _scaling_of(raw_text.get("rope_scaling"))
    if released is not None:
        scaled = raw_text.get("yarn_only_types")
        # transformers merges rope_scaling into full_attention when yarn_only_types is absent.
        scaled = set(scaled) if scaled is not None else {"full_attention"}
        return released, scaled & types
    per_type = {t: _scaling_of((text.rope_parameters or {}).get(t)) for t in types}
    found = [v for v in per_type.values() if v is not None]
    if not found:
        return None, set()
    if any(v != found[0] for v in found):
        raise _fail(f"text_config.rope_parameters: layer types scale RoPE differently ({per_type}); "
                    "one scaling for the scaled types is supported")
    return found[0], {t for t, v in per_type.items() if v is not None}


def _layer_rope(text, layer_type: str) -> dict:
    rope = (text.rope_parameters or {}).get(layer_type)
    if not isinstance(rope, dict):
        raise _fail(f"text_config.rope_parameters has no entry for layer type {layer_type!r}")
    return {
        "rope_theta": float(rope["rope_theta"]),
        "rotary_percent": float(rope.get("partial_rotary_factor", 1.0)),
    }


def _mtp_layer_rope(raw_text: dict, text, layer: int, layer_type: str) -> dict:
    """RoPE of an MTP layer (a decoder layer past num_hidden_layers): the released per-layer lists
    carry its entry; else the entry of its layer type."""
    out = {}
    thetas, partials = raw_text.get("rope_theta"), raw_text.get("partial_rotary_factors")
    if isinstance(thetas, list) and len(thetas) > layer:
        out["rope_theta"] = float(thetas[layer])
    if isinstance(partials, list) and len(partials) > layer:
        out["rotary_percent"] = float(partials[layer])
    if len(out) < 2:
        if layer_type not in (text.rope_parameters or {}):
            raise _fail(f"MTP layer {layer} ({layer_type}): no RoPE entry in rope_theta / rope_parameters")
        out = {**_layer_rope(text, layer_type), **out}
    return out


def _per_layer_attention(text) -> dict[int, AttentionGeometry]:
    out = {}
    for i in range(text.num_hidden_layers):
        view = text.per_layer_config[i]
        heads, groups, head_dim = int(view.num_attention_heads), int(view.num_key_value_heads), int(view.head_dim)
        if heads % groups:
            raise _fail(f"layer {i}: num_attention_heads {heads} is not divisible by num_key_value_heads {groups}")
        out[i] = AttentionGeometry(heads, groups, head_dim)
    return out


def _limits(values, raw_values, n: int, mtp: int, field: str) -> list[float | None]:
    """Per-layer SwiGLU clamp bounds for the n decoder layers then the MTP layers; HF treats None
    and 0 alike as "no clamp". transformers trims the released n + mtp entries to n: the MTP
    entries come from the raw list."""
    if values is None:
        return [None] * (n + mtp)
    if len(values) != n:
        raise _fail(f"text_config.{field} has {len(values)} entries, expected num_hidden_layers = {n}")
    tail = list(raw_values[n:n + mtp]) if isinstance(raw_values, list) and len(raw_values) == n + mtp else [None] * mtp
    return [float(v) if v else None for v in [*values, *tail]]


def _mtp_layers(text, raw_text: dict) -> list[dict]:
    """The multi-token-prediction layers (HF decoder layers n .. n + k - 1): attention type, head
    geometry. They are dense decoder layers (vLLM's Step3p5MTP builds them from layer_types[n + i])."""
    k = int(getattr(text, "num_nextn_predict_layers", 0) or 0)
    if not k:
        return []
    n = int(text.num_hidden_layers)
    types = list(getattr(text, "mtp_layer_types", None) or [])
    if len(types) != k:
        raise _fail(f"text_config.num_nextn_predict_layers = {k} but layer_types has no entry for layers "
                    f"{n}..{n + k - 1} (expected {n + k} entries)")
    mlp_types = list(getattr(text, "mtp_mlp_layer_types", None) or ["dense"] * k)
    if any(t != "dense" for t in mlp_types):
        raise _fail(f"MTP layers {n}..{n + k - 1} have mlp types {mlp_types}; only dense MTP layers are supported")
    defaults = text.to_dict()
    out = []
    for i, layer_type in enumerate(types):
        if layer_type not in ATTENTION_TYPES:
            raise _fail(f"MTP layer {n + i} has layer type {layer_type!r}; supported: {list(ATTENTION_TYPES)}")
        sliding = layer_type == "sliding_attention"
        heads = int(text.num_sliding_attention_heads if sliding else defaults["num_attention_heads"])
        groups, head_dim = int(defaults["num_key_value_heads"]), int(defaults["head_dim"])
        if heads % groups:
            raise _fail(f"MTP layer {n + i}: {heads} heads are not divisible by {groups} key/value heads")
        out.append({"type": layer_type, "geometry": AttentionGeometry(heads, groups, head_dim)})
    return out


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

    mtp_layers = _mtp_layers(text, raw_text)
    k = len(mtp_layers)
    scaling, scaled_types = _rope_scaling(text, raw_text)
    rope_by_type = {t: _layer_rope(text, t) for t in set(text.layer_types)}
    layer_types = [*text.layer_types, *(m["type"] for m in mtp_layers)]
    layer_attention = {}
    for i, layer_type in enumerate(layer_types):
        sliding = layer_type == "sliding_attention"
        rope = rope_by_type[layer_type] if i < n else _mtp_layer_rope(raw_text, text, i, layer_type)
        layer_attention[i] = {
            "type": layer_type,
            # HF masks keys with q - k >= sliding_window; Megatron's window (left, right) keeps
            # k >= q - left, so left = sliding_window - 1.
            "window_size": (int(text.sliding_window) - 1, 0) if sliding else None,
            **rope,
            # llama3 & co.: only on the layer types the config names (yarn_only_types).
            "rope_scaling": scaling if layer_type in scaled_types else None,
        }
    geometry = _per_layer_attention(text)
    geometry.update({n + i: m["geometry"] for i, m in enumerate(mtp_layers)})

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
        layer_attention=geometry,
        ranges={"vblock": int(vision_cfg.num_hidden_layers), "mtp": k},
        # MTP layer i is HF decoder layer n + i (model.layers.{n + i}.*).
        offsets={"hf_layer": ("mtp", n)},
        mtp_num_layers=k,
        rope_scaling={**scaling, "layer_types": sorted(scaled_types)} if scaling else None,
        flags={"projector_bias": bool(parsed.projector_bias)},
        extra={
            "layer_attention": layer_attention,
            "softmax_scale": float(text.query_pre_attn_scalar) ** -0.5,
            "moe_router_scaling_factor": float(text.moe_router_scaling_factor),
            # n decoder layers, then the MTP layers.
            "swiglu_limits": _limits(text.swiglu_limits, raw_text.get("swiglu_limits"), n, k, "swiglu_limits"),
            "swiglu_limits_shared": _limits(text.swiglu_limits_shared, raw_text.get("swiglu_limits_shared"), n, k,
                                            "swiglu_limits_shared"),
            "zero_centered_rmsnorm": True,  # every trunk RMSNorm (q/k norms too) scales by (1 + w)
            "projector_bias": bool(parsed.projector_bias),  # the Megatron model reads it too
            # Images are inserted after <im_start>; its id lives in the tokenizer, not in the
            # transformers config, so it is only known here when config.json carries it.
            "im_start_token_id": config.get("im_start_token_id"),
        },
    )
