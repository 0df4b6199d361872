"""ERNIE-4.5-VL-MoE config normalizer.

Two config shapes describe the same weights:

* **nested** -- what transformers 5 writes (``model_type: ernie4_5_vl_moe``): ``text_config`` with
  ``mlp_layer_types``, ``moe_num_experts`` an int, ``rope_parameters.mrope_section = [h, w, t]``;
  ``vision_config`` with ``hidden_size`` / ``intermediate_size`` / ``rms_norm_eps`` /
  ``temporal_merge_size``.
* **flat** -- the released "Thinking" checkpoints (remote-code type ``ernie4_5_moe_vl``, or the same
  layout under the native type): every language-model field on the top level,
  ``moe_num_experts`` possibly a list ``[text, vision]``, MoE layers given by
  ``moe_layer_start_index`` / ``moe_layer_end_index`` / ``moe_layer_interval``, 3D RoPE given by
  ``rope_3d`` + ``freq_allocation`` (the temporal rotary pairs), and a vision config with
  ``embed_dim`` + ``mlp_ratio`` whose ``hidden_size`` is the *text* width. That vision config lacks
  ``rms_norm_eps`` and ``temporal_merge_size``; we fill them with the values the transformers
  classes default to (and the released model was trained with) and say so in
  ``spec.filled_defaults``.

Both shapes normalize to the same :class:`ModelSpec` (apart from ``hf_config`` and
``filled_defaults``); ``spec.vision`` is always a nested-style vision config that the transformers
vision classes accept.
"""

from __future__ import annotations

from ckptconv.errors import ConversionError
from ckptconv.families.base import require
from ckptconv.core.spec import ModelSpec

FAMILY_NAME = "ernie4_5_vl_moe"

# Defaults of transformers' Ernie4_5_VLMoeVisionConfig / Ernie4_5_VLMoeTextConfig, used only for
# fields a released flat config omits.
VISION_RMS_NORM_EPS = 1e-6
VISION_TEMPORAL_MERGE_SIZE = 2
VISION_ROPE_THETA = 10000.0
VISION_HIDDEN_ACT = "quick_gelu"
MOE_NORM_MIN = 1e-12

# Token-id fields the Megatron model reads (MoE routing of start/end tokens, image placeholders).
_TOKEN_FIELDS = (
    "image_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "video_token_id",
    "video_start_token_id",
    "video_end_token_id",
)


def _is_nested(config: dict) -> bool:
    text = config.get("text_config")
    return isinstance(text, dict) and bool(text.get("hidden_size"))


# ------------------------------------------------------------------------------------ MoE layout


def _pair(value, what: str, where: str) -> tuple[int, int]:
    """ERNIE writes per-pool fields either as one value (both pools) or as ``[text, vision]``."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConversionError(f"{where}: {what} {list(value)} must be one value or [text, vision]")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _layer_kinds_nested(text: dict, num_layers: int, where: str) -> tuple[str, ...]:
    types = text.get("mlp_layer_types")
    if types is None:
        # transformers' default: layer 0 dense, the rest sparse.
        types = ["dense"] + ["sparse"] * (num_layers - 1)
    if len(types) != num_layers:
        raise ConversionError(f"{where}: mlp_layer_types has {len(types)} entries for {num_layers} layers")
    kinds = []
    for i, kind in enumerate(types):
        if kind not in ("dense", "sparse"):
            raise ConversionError(f"{where}: mlp_layer_types[{i}] = {kind!r}; expected 'dense' or 'sparse'")
        kinds.append("moe" if kind == "sparse" else "dense")
    return tuple(kinds)


def _per_pool_index(cfg: dict, key: str, default: int, where: str) -> tuple[int, int]:
    """``moe_layer_start_index`` / ``moe_layer_end_index``: one value for both pools or ``[text, vision]``."""
    value = cfg.get(key, default)
    if value is None:
        value = default
    return _pair(value, key, where)


def _pool_layers(cfg: dict, num_layers: int, where: str) -> tuple[set[int], set[int]]:
    """The layers holding each pool's experts, by ERNIE's own rule: a layer is MoE when
    ``(layer + 1) % moe_layer_interval == 0`` and ``start <= layer <= end``, an end of -1 meaning the
    last layer. Released configs give ends past the last layer (28B: ``[29, 28]`` over 28 layers); the
    layers stop at the model's depth. This is the rule of transformers' ``convert_ernie4_5_vl_moe_to_hf``
    (``convert_text_config_to_hf``) and sglang's ``Ernie4_5_VLMoeDecoderLayer``, applied per pool."""
    interval = int(cfg.get("moe_layer_interval", 1))
    if interval < 1:
        raise ConversionError(f"{where}: moe_layer_interval must be >= 1, got {interval}")
    starts = _per_pool_index(cfg, "moe_layer_start_index", 0, where)
    ends = _per_pool_index(cfg, "moe_layer_end_index", -1, where)
    pools = []
    for start, end in zip(starts, ends):
        last = num_layers - 1 if end < 0 else min(end, num_layers - 1)
        pools.append({i for i in range(max(start, 0), last + 1) if (i + 1) % interval == 0})
    return pools[0], pools[1]


def _spans(layers: list[int]) -> str:
    """``[21, 22, 23, 25]`` -> ``"21-23, 25"``."""
    out: list[str] = []
    for layer in layers:
        if out and int(out[-1].split("-")[-1]) == layer - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{layer}"
        else:
            out.append(str(layer))
    return ", ".join(out)


def _layer_kinds_flat(cfg: dict, num_layers: int, where: str) -> tuple[str, ...]:
    if "mlp_layer_types" in cfg:
        return _layer_kinds_nested(cfg, num_layers, where)
    if "moe_layer_start_index" not in cfg:
        raise ConversionError(f"{where}: neither mlp_layer_types nor moe_layer_start_index says which layers are MoE")
    text, vision = _pool_layers(cfg, num_layers, where)
    # A layer holds both pools or neither: the Megatron block (text MoE + vision MoE + shared experts,
    # Megatron-Bridge's ErnieMultiTypeMoE) has no one-pool form. Refuse only such layers, by number.
    text_only, vision_only = sorted(text - vision), sorted(vision - text)
    if text_only or vision_only:
        which = "; ".join(
            f"layer(s) {_spans(layers)} only the {pool} pool"
            for pool, layers in (("text", text_only), ("vision", vision_only)) if layers
        )
        raise ConversionError(
            f"{where}: moe_layer_start_index {cfg.get('moe_layer_start_index')} / moe_layer_end_index "
            f"{cfg.get('moe_layer_end_index')} over {num_layers} layers give {which}; a layer with one pool's "
            "experts is not supported (the Megatron ERNIE block holds both pools)"
        )
    return tuple("moe" if i in text else "dense" for i in range(num_layers))


# ------------------------------------------------------------------------------------ 3D RoPE


def _mrope_section(text: dict, head_dim: int, nested: bool, where: str) -> list[int]:
    """``[h, w, t]`` rotary pairs. ERNIE interleaves h/w over the first ``h + w`` frequency bands
    (even band -> h, odd -> w) and gives the last ``t`` (= ``freq_allocation``) to time, so h == w."""
    section = None
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key) or {}
        if rope.get("mrope_section"):
            section = [int(v) for v in rope["mrope_section"]]
            break
    if section is None and not nested:
        if text.get("rope_3d") is False:
            raise ConversionError(f"{where}: rope_3d is false; ERNIE-4.5-VL with 1D RoPE is not supported")
        if "freq_allocation" not in text:
            raise ConversionError(f"{where}: freq_allocation (the temporal rotary pairs of 3D RoPE) is missing")
        t = int(text["freq_allocation"])
        hw = head_dim // 2 - t
        if hw < 0 or hw % 2:
            raise ConversionError(
                f"{where}: freq_allocation {t} leaves {hw} rotary pairs for height/width; must be even and >= 0"
            )
        section = [hw // 2, hw // 2, t]
    if section is None:
        section = [22, 22, 20]  # transformers' Ernie4_5_VLMoeTextRotaryEmbedding default
    if len(section) != 3 or sum(section) * 2 != head_dim:
        raise ConversionError(f"{where}: mrope_section {section} must be [h, w, t] summing to head_dim/2 = {head_dim // 2}")
    if section[0] != section[1]:
        raise ConversionError(f"{where}: mrope_section {section}: ERNIE interleaves h and w, so they must be equal")
    if "freq_allocation" in text and int(text["freq_allocation"]) != section[2]:
        raise ConversionError(
            f"{where}: freq_allocation {text['freq_allocation']} disagrees with mrope_section {section} (t = {section[2]})"
        )
    return section


def _rope_theta(text: dict) -> float:
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key) or {}
        if "rope_theta" in rope:
            return float(rope["rope_theta"])
    return float(text.get("rope_theta", 500000.0))


# ------------------------------------------------------------------------------------ vision


def _vision(config: dict, where: str, notes: list[str]) -> dict:
    """A nested-style vision config (the fields ``Ernie4_5_VLMoeVisionConfig`` reads)."""
    raw = dict(require(config, "vision_config", where))
    vwhere = f"{where} vision_config"
    if "embed_dim" in raw:
        # Released flat form: `hidden_size` there is the *text* width (the resampler's output).
        width = int(raw["embed_dim"])
        ratio = require(raw, "mlp_ratio", vwhere)
        intermediate = width * ratio
        if intermediate != int(intermediate):
            raise ConversionError(f"{vwhere}: embed_dim {width} * mlp_ratio {ratio} is not an integer")
        intermediate = int(intermediate)
    else:
        width = int(require(raw, "hidden_size", vwhere))
        intermediate = int(require(raw, "intermediate_size", vwhere))

    def filled(key: str, default, why: str):
        if key in raw and raw[key] is not None:
            return raw[key]
        notes.append(f"vision_config.{key} missing; using {default!r} ({why})")
        return default

    if "temporal_merge_size" not in raw and "temporal_conv_size" in config:
        temporal = int(config["temporal_conv_size"])
        notes.append(f"vision_config.temporal_merge_size missing; using top-level temporal_conv_size = {temporal}")
    else:
        temporal = int(filled("temporal_merge_size", VISION_TEMPORAL_MERGE_SIZE, "transformers default"))
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope:
        theta = float(rope["rope_theta"])
    else:
        theta = VISION_ROPE_THETA
        notes.append(f"vision_config.rope_parameters missing; using axial RoPE with rope_theta {theta} (transformers default)")
    if rope.get("rope_type", "axial") != "axial":
        raise ConversionError(f"{vwhere}: rope_type {rope['rope_type']!r}; the ERNIE vision tower uses axial RoPE")
    heads = int(require(raw, "num_heads", vwhere))
    if width % heads:
        raise ConversionError(f"{vwhere}: width {width} is not divisible by num_heads {heads}")
    return {
        "depth": int(require(raw, "depth", vwhere)),
        "hidden_size": width,
        "intermediate_size": intermediate,
        "num_heads": heads,
        "hidden_act": filled("hidden_act", VISION_HIDDEN_ACT, "transformers default"),
        "in_channels": int(raw.get("in_channels", raw.get("in_chans", 3))),
        "patch_size": int(raw.get("patch_size", raw.get("spatial_patch_size", 14))),
        "spatial_merge_size": int(raw.get("spatial_merge_size", config.get("spatial_conv_size", 2))),
        "temporal_merge_size": temporal,
        "rms_norm_eps": float(filled("rms_norm_eps", VISION_RMS_NORM_EPS, "transformers default")),
        "rope_parameters": {"rope_type": "axial", "rope_theta": theta},
    }


# ------------------------------------------------------------------------------------ entry point


def normalize(config: dict) -> ModelSpec:
    where = f"config.json ({config.get('model_type', FAMILY_NAME)})"
    nested = _is_nested(config)
    text = config["text_config"] if nested else config
    notes: list[str] = []

    hidden = int(require(text, "hidden_size", where))
    heads = int(require(text, "num_attention_heads", where))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    num_layers = int(require(text, "num_hidden_layers", where))
    if hidden % heads:
        raise ConversionError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv_heads:
        raise ConversionError(f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
    head_dim = int(text.get("head_dim") or hidden // heads)
    if head_dim * heads != hidden:
        raise ConversionError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
    if text.get("use_bias"):
        raise ConversionError(f"{where}: use_bias = true; ERNIE-4.5-VL checkpoints with linear biases are not supported")
    if text.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {text['hidden_act']!r}; the Megatron model uses SwiGLU (silu)")

    kinds = _layer_kinds_nested(text, num_layers, where) if nested else _layer_kinds_flat(text, num_layers, where)
    experts = _pair(require(text, "moe_num_experts", where), "moe_num_experts", where)
    moe_ffn = _pair(require(text, "moe_intermediate_size", where), "moe_intermediate_size", where)
    shared = int(text.get("moe_num_shared_experts", 0))
    topk = int(require(text, "moe_k", where))
    if any(topk > e for e in experts):
        raise ConversionError(f"{where}: moe_k {topk} exceeds the experts per pool {list(experts)}")
    if "moe_norm_min" in text:
        norm_min = float(text["moe_norm_min"])
    else:
        norm_min = MOE_NORM_MIN
        notes.append(f"moe_norm_min missing; using {MOE_NORM_MIN} (transformers default)")

    mrope = _mrope_section(text, head_dim, nested, where)
    vision = _vision(config, where, notes)

    tokens = {}
    for key in _TOKEN_FIELDS:
        value = config.get(key, text.get(key))
        if value is None and key == "image_token_id":
            value = config.get("im_patch_id")  # the released flat config's name for it
        tokens[key] = None if value is None else int(value)
    # Conversion needs no token id; verify does, and fills what config.json lacks from the tokenizer
    # files first (Family.complete_config), then refuses in its inputs if still missing.

    tie = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
    return ModelSpec(
        family=FAMILY_NAME,
        hf_config=config,
        vocab_size=int(require(text, "vocab_size", where)),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=int(require(text, "intermediate_size", where)),
        norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        rope_theta=_rope_theta(text),
        qkv_bias=False,
        tie_word_embeddings=tie,
        layer_mlp_kinds=kinds,
        num_experts=experts,
        moe_ffn_hidden_size=moe_ffn,
        moe_router_topk=topk,
        shared_expert_ffn_hidden_size=moe_ffn[0] * shared,
        vision=vision,
        image_token_id=tokens["image_token_id"],
        ranges={"vblock": vision["depth"]},
        flags={"has_shared_experts": shared > 0},
        # Named widths for the table's `shape` checks (per-pool tuples cannot be named there).
        dims={
            "text_moe_ffn": moe_ffn[0],
            "vision_moe_ffn": moe_ffn[1],
            "text_experts": experts[0],
            "vision_experts": experts[1],
            "resampler_width": vision["hidden_size"] * vision["spatial_merge_size"] ** 2,
            "resampler_temporal_width": vision["hidden_size"] * vision["spatial_merge_size"] ** 2 * vision["temporal_merge_size"],
        },
        extra={
            "mrope_section": mrope,
            "freq_allocation": mrope[2],
            "moe_norm_min": norm_min,
            "max_position_embeddings": int(text.get("max_position_embeddings", 131072)),
            "tokens": tokens,
        },
        filled_defaults=tuple(notes),
    )
