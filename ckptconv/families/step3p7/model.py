"""Step3.7 as a Megatron model: a heterogeneous megatron-core GPTModel + the HF vision tower.

Its ``sharded_state_dict()`` is the checkpoint key contract ``mappings/step3p7.toml`` writes:

* ``language_model.*`` -- a GPTModel built from one layer spec per layer, each with its own
  TransformerConfig (``heterogeneous_block_specs``), so keys are per layer (``decoder.layers.N.``):

  - attention: full or sliding window (``window_size``), per-layer head counts, q/k RMSNorm, own
    RoPE per layer (theta, partial rotary, llama3 scaling on the ``yarn_only_types``), and Step3.7's
    per-head sigmoid output gate as megatron-core's ``attention_output_gate``: per query group
    ``[q_g, gate_g, k_g, v_g]`` with each head's ``g_proj`` row repeated head_dim times (the layout
    Megatron-Bridge's ``merge_qkvg_weights`` writes);
  - MLP: dense SwiGLU, or MoE (sigmoid router with expert bias, top-k renormalized, shared
    expert); ``swiglu_limits`` clamps become a clamped SwiGLU activation on the layers that have them;
  - every RMSNorm (q/k norms and the final norm too) computes ``x / rms(x) * (1 + w)`` with the
    stored ``w`` (megatron's ``layernorm_zero_centered_gamma`` semantics; the local norm refuses it).
  - the multi-token-prediction layers (``num_nextn_predict_layers``) as megatron-core's
    ``MultiTokenPredictionBlock`` (``mtp.layers.N.{enorm,hnorm,eh_proj,transformer_layer,final_layernorm}``),
    each also holding its released output head (``output_layer``; megatron-core uses the main one).
    Forward computes next-token logits only (the MTP block is skipped).

* ``vision_model.*`` -- the vision tower under its HF *on-disk* names (``conv1``,
  ``transformer.resblocks.N.attn.in_proj_weight``, ...), replicated over TP. The forward pass runs
  transformers' own ``Step3p7VisionModel`` code on these tensors (``functional_call``), renaming
  them and reordering the q/k rows of ``in_proj`` from the checkpoint's RoPE order exactly as
  transformers does when it loads the checkpoint.
* ``image_insert_embedding.align_projector.*`` -- the projector (HF ``vit_large_projector``).

``forward`` embeds the tokens ([S, B, H], sequence-first), inserts the projected image features
after each ``<im_start>`` (+1, onto the ``<im_patch>`` placeholders) and runs the decoder with that
``decoder_input``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ckptconv.errors import ConversionError
from ckptconv.megatron.common import (
    causal_mask,
    check_model_parallel,
    decoder_config_kwargs,
    runtime_config_kwargs,
    with_te_norm_extra_state,
)
from ckptconv.core.spec import ModelSpec

LANGUAGE_PREFIX = "language_model."
VISION_PREFIX = "vision_model."
PROJECTOR_PREFIX = "image_insert_embedding."
IM_START_TOKEN = "<im_start>"
IM_PATCH_TOKEN = "<im_patch>"


# ============================================================================ building blocks
class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm scaling by ``(1 + w)``, computed as transformers' ``Step3p7RMSNorm`` does (in fp32).

    Keeping ``w`` as stored (instead of folding the +1 into it) is what makes export bit-exact.
    Takes megatron's norm constructor arguments so specs can name it like any norm.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if not config.layernorm_zero_centered_gamma:
            raise ConversionError("ZeroCenteredRMSNorm needs config.layernorm_zero_centered_gamma = True")
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        # Megatron all-reduces grads of sequence-parallel norm weights; mirror its attribute.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class ClampedSwiGLU(nn.Module):
    """Step3.7's ``swiglu_limits``: ``silu(gate).clamp(max=L) * up.clamp(-L, L)``.

    megatron's own ``activation_func_clamp_value`` clamps the gate *before* silu (gpt-oss style),
    which is a different function; this module is plugged in as the MLP's ``activation_func``
    submodule (megatron then applies it to the whole fc1 output [gate | up] of the local rank).
    ``limit=None`` is plain SwiGLU, for the MLPs of a clamped layer that are not clamped themselves.
    """

    def __init__(self, config=None, limit: float | None = None):
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        gate = F.silu(gate)
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        return gate * up

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        return {}  # stateless: nothing in the checkpoint (MLP asks every child)


#: rope_type values the Megatron model implements (others convert, but verify refuses to build).
SUPPORTED_ROPE_TYPES = ("default", "llama3")


def layer_rotary_embedding(kv_channels: int, rotary_percent: float, rope_theta: float, rope_scaling: dict | None,
                           use_cpu_initialization: bool = True):
    """megatron-core's RotaryEmbedding for one layer, with the layer's RoPE scaling.

    llama3: megatron-core's own ``RotaryEmbedding._apply_scaling`` (the formula of transformers'
    ``_compute_llama3_parameters``) with all four of the config's parameters; its constructor's
    ``rope_scaling=True`` path would pass only ``factor`` and use Llama-3.1's defaults for the rest
    (low 1, high 4, original 8192), which is not Step-3.7-Flash's (1, 32, 131072).
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(
            f"rope_type {rope_type!r}: the Step3.7 Megatron model implements {', '.join(SUPPORTED_ROPE_TYPES)} "
            "(conversion does not depend on it; verify does)"
        )
    rotary = RotaryEmbedding(
        kv_channels=kv_channels,
        rotary_percent=rotary_percent,
        rotary_base=rope_theta,
        use_cpu_initialization=use_cpu_initialization,
    )
    if rope_type == "llama3":
        try:
            rotary.inv_freq = rotary._apply_scaling(
                rotary.inv_freq,
                factor=float(rope_scaling["factor"]),
                low_freq_factor=float(rope_scaling["low_freq_factor"]),
                high_freq_factor=float(rope_scaling["high_freq_factor"]),
                original_max_position_embeddings=int(rope_scaling["original_max_position_embeddings"]),
            )
        except KeyError as missing:
            raise ConversionError(f"rope_scaling (llama3) lacks {missing}") from None
    return rotary


def _gated_self_attention_class():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.enums import AttnMaskType

    class Step37GatedSelfAttention(SelfAttention):
        """megatron-core's SelfAttention with its own (per-layer) RoPE.

        Step3.7's per-head sigmoid gate is megatron-core's own ``attention_output_gate``: its gate
        rows in ``linear_qkv`` repeat each head's ``g_proj`` row head_dim times (the layout
        Megatron-Bridge writes), so the element-wise gate is one sigmoid per head, as in HF.
        Full and sliding layers differ in RoPE (theta, partial rotary, llama3 scaling on the
        ``yarn_only_types``), so each layer owns its rotary embedding instead of GPTModel's one.
        """

        def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal,
                     cp_comm_type=None, pg_collection=None, *, rope_theta: float, rotary_percent: float,
                     rope_scaling: dict | None = None):
            super().__init__(config, submodules, layer_number, attn_mask_type, cp_comm_type, pg_collection)
            self.layer_rotary_emb = layer_rotary_embedding(
                config.kv_channels, rotary_percent, rope_theta, rope_scaling, config.use_cpu_initialization
            )

        def forward(self, hidden_states, attention_mask, *args, inference_context=None, **kwargs):
            if inference_context is not None or kwargs.get("inference_params") is not None:
                raise ConversionError("the Step3.7 Megatron model supports full-sequence forward only (no KV cache)")
            kwargs.pop("rotary_pos_emb", None)
            rotary = self.layer_rotary_emb(hidden_states.shape[0])
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary, **kwargs)

    return Step37GatedSelfAttention


# ============================================================================ configs and specs
def _base_config_kwargs(spec: ModelSpec, dtype: torch.dtype) -> dict:
    from megatron.core import parallel_state

    moe = "moe" in spec.layer_mlp_kinds
    kwargs = dict(
        **decoder_config_kwargs(spec),  # Step3.7 has no qkv bias: spec.qkv_bias is False
        layernorm_zero_centered_gamma=True,
        qk_layernorm=True,
        softmax_scale=spec.extra["softmax_scale"],
        attention_output_gate=True,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        heterogeneous_block_specs=True,
        mtp_num_layers=spec.mtp_num_layers or None,
        **runtime_config_kwargs(dtype),
    )
    if moe:
        kwargs.update(
            num_moe_experts=spec.num_experts[0],
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size[0],
            moe_router_topk=spec.moe_router_topk,
            moe_shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size,
            moe_layer_freq=[1 if kind == "moe" else 0 for kind in spec.layer_mlp_kinds],
            # HF: sigmoid scores, top-k chosen on score + bias, weights = scores renormalized over
            # the top-k, times the routed scaling factor.
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_topk_scaling_factor=spec.extra["moe_router_scaling_factor"],
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
        )
    return kwargs


def _has_limits(spec: ModelSpec, layer: int) -> bool:
    return spec.extra["swiglu_limits"][layer] is not None or spec.extra["swiglu_limits_shared"][layer] is not None


def transformer_config(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """The block config; per-layer configs come from ``get_config_for_layer`` (megatron's
    ``heterogeneous_block_specs`` hook)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    @dataclass
    class Step37TransformerConfig(TransformerConfig):
        layer_configs: list | None = None

        def get_config_for_layer(self, layer_number: int) -> TransformerConfig:
            return self.layer_configs[layer_number - 1]

    base = _base_config_kwargs(spec, dtype)
    layer_configs = []
    for i in range(spec.num_layers + spec.mtp_num_layers):  # the MTP layers' configs follow the decoder's
        attn = spec.attention(i)
        layer_configs.append(
            TransformerConfig(
                **{
                    **base,
                    "num_attention_heads": attn.num_attention_heads,
                    "num_query_groups": attn.num_query_groups,
                    "kv_channels": attn.head_dim,
                    "window_size": spec.extra["layer_attention"][i]["window_size"],
                    # The clamped SwiGLU is an activation submodule; megatron calls submodule
                    # activations only under this flag (named for TE, but generic).
                    "use_te_activation_func": _has_limits(spec, i),
                }
            )
        )
    return Step37TransformerConfig(**base, layer_configs=layer_configs)


def _mtp_transformer_layer_class():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class Step37MTPTransformerLayer(TransformerLayer):
        """An MTP layer's decoder layer with that layer's own config (megatron's MTP block builds
        every sub-layer with the block config; Step-3.7-Flash's MTP layers are sliding-window
        layers with the sliding head count)."""

        def __init__(self, config, submodules, *args, layer_config=None, **kwargs):
            super().__init__(layer_config, submodules, *args, **kwargs)

    return Step37MTPTransformerLayer


def _layer_spec(spec: ModelSpec, layer: int, layer_config=None):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    attention = spec.extra["layer_attention"][layer]
    self_attention = ModuleSpec(
        module=_gated_self_attention_class(),
        params={
            "attn_mask_type": AttnMaskType.causal,
            "rope_theta": attention["rope_theta"],
            "rotary_percent": attention["rotary_percent"],
            "rope_scaling": attention.get("rope_scaling"),
        },
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=DotProductAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=ZeroCenteredRMSNorm,
            k_layernorm=ZeroCenteredRMSNorm,
        ),
    )

    def mlp_submodules(limit):
        activation = ModuleSpec(module=ClampedSwiGLU, params={"limit": limit}) if _has_limits(spec, layer) else None
        return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=activation)

    # HF: the dense MLP and the shared expert clamp with swiglu_limits_shared, routed experts with swiglu_limits.
    shared_limit = spec.extra["swiglu_limits_shared"][layer]
    mtp = layer >= spec.num_layers  # an MTP layer: dense, built by megatron's MTP block
    if not mtp and spec.layer_mlp_kinds[layer] == "moe":
        mlp = ModuleSpec(
            module=MoELayer,
            submodules=MoESubmodules(
                experts=ModuleSpec(module=SequentialMLP, submodules=mlp_submodules(spec.extra["swiglu_limits"][layer])),
                shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=mlp_submodules(shared_limit)),
            ),
        )
        # No fused fc1 to host the pre-MLP norm in an MoE layer: it keeps its own key.
        keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    else:
        mlp = ModuleSpec(module=MLP, submodules=mlp_submodules(shared_limit))
        keys_map = {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    return ModuleSpec(
        module=_mtp_transformer_layer_class() if mtp else TransformerLayer,
        params={"layer_config": layer_config} if mtp else {},
        submodules=TransformerLayerSubmodules(
            input_layernorm=ZeroCenteredRMSNorm,
            self_attention=self_attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=ZeroCenteredRMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def mtp_block_spec(spec: ModelSpec, config):
    """megatron-core's MultiTokenPredictionBlock for the MTP layers (None without them): per layer
    enorm, hnorm, eh_proj, a dense decoder layer and final_layernorm -- keys
    ``mtp.layers.<i>.{enorm,hnorm,eh_proj,transformer_layer.*,final_layernorm}`` as Megatron-Bridge
    maps them. Every norm is a (1 + w) RMSNorm as in vLLM's Step3p5MTP (GemmaRMSNorm)."""
    if not spec.mtp_num_layers:
        return None
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlockSubmodules,
        MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec

    layer_specs = []
    for i in range(spec.mtp_num_layers):
        layer = spec.num_layers + i
        layer_specs.append(ModuleSpec(
            module=MultiTokenPredictionLayer,
            submodules=MultiTokenPredictionLayerSubmodules(
                enorm=ZeroCenteredRMSNorm,
                hnorm=ZeroCenteredRMSNorm,
                eh_proj=ColumnParallelLinear,
                transformer_layer=_layer_spec(spec, layer, config.get_config_for_layer(layer + 1)),
                layer_norm=ZeroCenteredRMSNorm,
            ),
        ))
    return MultiTokenPredictionBlockSubmodules(layer_specs=layer_specs)


class MTPOutputHead(nn.Module):
    """One MTP layer's own output head (HF ``transformer.shared_head.output``), vocab-sharded over TP
    like ``output_layer``. megatron-core's MTP computes its logits with the main output layer and
    has no such weight; it is held here so the checkpoint carries the released heads (they differ
    from ``lm_head``) and export gives them back. Not used in forward."""

    def __init__(self, padded_vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.weight = nn.Parameter(torch.zeros(padded_vocab_size // tp, hidden_size, dtype=dtype))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(keep_vars=True), prefix, {"weight": 0}, sharded_offsets)


@contextmanager
def _without_mtp(gpt):
    """Next-token logits only: GPTModel would run its MTP block and then require ``labels`` for
    the MTP losses (gpt_model.py ``_postprocess``), which a logits comparison has none of."""
    saved = gpt.mtp_process, gpt.config.mtp_num_layers
    gpt.mtp_process, gpt.config.mtp_num_layers = False, None
    try:
        yield
    finally:
        gpt.mtp_process, gpt.config.mtp_num_layers = saved


def block_spec(spec: ModelSpec):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    return TransformerBlockSubmodules(
        layer_specs=[_layer_spec(spec, i) for i in range(spec.num_layers)],
        layer_norm=ZeroCenteredRMSNorm,
    )


# ============================================================================ vision tower
def hf_config(spec: ModelSpec):
    from transformers import Step3p7Config

    return Step3p7Config.from_dict(dict(spec.hf_config))


def _disk_name(hf_name: str) -> str:
    """transformers' in-memory vision name -> the checkpoint's on-disk name (under ``vision_model.``);
    the reverse of transformers' ``step3p5_vision`` conversion rules. q/k/v all map to in_proj."""
    import re

    rules = [
        (r"^embeddings\.patch_embedding\.weight$", "conv1.weight"),
        (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
        (r"^pre_layernorm\.", "ln_pre."),
        (r"^downsampler([12])\.", r"vit_downsampler\1."),
        (r"^layers\.(\d+)\.layernorm_before\.", r"transformer.resblocks.\1.ln_1."),
        (r"^layers\.(\d+)\.layernorm_after\.", r"transformer.resblocks.\1.ln_2."),
        (r"^layers\.(\d+)\.lambda_1$", r"transformer.resblocks.\1.ls_1.gamma"),
        (r"^layers\.(\d+)\.lambda_2$", r"transformer.resblocks.\1.ls_2.gamma"),
        (r"^layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
        (r"^layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
        (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
        (r"^layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$", r"transformer.resblocks.\1.attn.in_proj_\2"),
    ]
    for pattern, repl in rules:
        if re.search(pattern, hf_name):
            return re.sub(pattern, repl, hf_name)
    raise ConversionError(f"Step3.7 vision tower: no on-disk name for transformers parameter {hf_name!r}")


def _rope_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Checkpoint (interleaved-pair) RoPE row order -> transformers' half-split order, per head;
    transformers' ``PermuteForRope`` on load."""
    half = t.shape[0] // heads // 2
    return t.reshape(heads, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class Step37VisionTower(nn.Module):
    """The vision tower's tensors under their on-disk names; computes with transformers' module."""

    def __init__(self, vision_config, dtype: torch.dtype):
        super().__init__()
        from transformers.models.step3p7.modeling_step3p7 import Step3p7VisionModel

        with torch.device("meta"):
            hf = Step3p7VisionModel._from_config(vision_config)
        hf.eval()
        # Buffers (RoPE frequencies, position ids) are not in the checkpoint: rebuild them for real.
        inv_freq, _ = hf.rotary_emb.compute_axial_rope_parameters(vision_config)
        hf.rotary_emb.inv_freq = inv_freq
        hf.rotary_emb.original_inv_freq = inv_freq.clone()
        hf.embeddings.position_ids = torch.arange(hf.embeddings.num_positions).expand((1, -1))
        # Held outside the module tree: its (meta) parameters are stand-ins, never state.
        object.__setattr__(self, "_hf", hf)
        self.num_heads = vision_config.num_attention_heads

        shapes: dict[str, tuple[int, ...]] = {}
        for name, p in hf.named_parameters():
            disk = _disk_name(name)
            rows = p.shape[0] * (3 if disk.endswith(("in_proj_weight", "in_proj_bias")) else 1)
            shapes[disk] = (rows, *p.shape[1:])
        self._names = sorted(shapes)
        self._hf_names = [name for name, _ in hf.named_parameters()]
        for disk, shape in shapes.items():
            owner = self
            *path, leaf = disk.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=dtype)))

    def hf_parameters(self) -> dict[str, torch.Tensor]:
        """The tensors under transformers' names, q/k rows in transformers' order."""
        disk = dict(self.named_parameters())
        out = {}
        for name in self._hf_names:
            t = disk[_disk_name(name)]
            if "self_attn." in name and name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
                index = ("q_proj", "k_proj", "v_proj").index(name.rsplit(".", 2)[-2])
                t = t.chunk(3, dim=0)[index]
                if index < 2:
                    t = _rope_rows(t, self.num_heads)
            out[name] = t
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(self._hf, self.hf_parameters(), (pixel_values,), strict=False)
        return out.last_hidden_state  # [N, L, 4 * vision hidden]


class ImageInsertEmbedding(nn.Module):
    """Projects image features (``align_projector``) and writes them into the word embeddings
    right after each ``<im_start>`` token (+1: the first ``<im_patch>`` placeholder)."""

    def __init__(self, encoder_output_dim: int, hidden_size: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.align_projector = nn.Linear(encoder_output_dim, hidden_size, bias=bias, dtype=dtype)

    @staticmethod
    def insert_features(embeds: torch.Tensor, features: list[torch.Tensor], input_ids: torch.Tensor, flag: int) -> torch.Tensor:
        """embeds [S, B, H] (sequence-first); features, one [L, H] per image, consumed in
        batch-major order of the ``flag`` tokens (the order HF's masked_scatter fills)."""
        out = embeds.clone()
        starts = (input_ids == flag).nonzero().tolist()  # [(b, s)], batch-major
        if len(starts) != len(features):
            raise ConversionError(f"{len(starts)} <im_start> tokens (id {flag}) but {len(features)} images")
        for (b, s), feature in zip(starts, features):
            first, last = s + 1, s + 1 + feature.shape[0]
            if last > embeds.shape[0]:
                raise ConversionError(f"image features at position {first} run past the sequence end ({embeds.shape[0]})")
            out[first:last, b] = feature.to(out.dtype)
        return out


# ============================================================================ the model
def language_model_kwargs(spec: ModelSpec, padded_vocab_size: int, dtype: torch.dtype = torch.float32,
                          *, parallel_output: bool = True) -> dict:
    """GPTModel arguments of the language model; this model and the MimoModel (``mimo.py``) build the
    same one. ``parallel_output=False`` gathers the logits over TP inside GPTModel (the stock
    ``MimoModel.forward`` does not ask for them gathered)."""
    config = transformer_config(spec, dtype)
    return dict(
        config=config,
        transformer_layer_spec=block_spec(spec),
        mtp_block_spec=mtp_block_spec(spec, config),
        vocab_size=padded_vocab_size,
        max_sequence_length=int(hf_config(spec).text_config.max_position_embeddings),
        pre_process=True,
        post_process=True,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        # RoPE differs per layer type: each attention layer applies its own (see above).
        position_embedding_type="none",
    )


def attach_mtp_output_heads(language_model, spec: ModelSpec, padded_vocab_size: int, dtype: torch.dtype) -> None:
    """Give each MTP layer its released output head (:class:`MTPOutputHead`) after GPTModel is built."""
    if spec.mtp_num_layers:
        for mtp_layer in language_model.mtp.layers:
            mtp_layer.output_layer = MTPOutputHead(padded_vocab_size, spec.hidden_size, dtype)


class Step37Megatron(nn.Module):
    """``.language_model`` (GPTModel), ``.vision_model`` (HF tower, on-disk names),
    ``.image_insert_embedding.align_projector``."""

    def __init__(self, spec: ModelSpec, *, padded_vocab_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron.core.models.gpt import GPTModel

        check_model_parallel("Step3.7", spec, padded_vocab_size)
        self.spec = spec
        self.padded_vocab_size = padded_vocab_size
        self.hf_config = hf_config(spec)
        self.language_model = GPTModel(**language_model_kwargs(spec, padded_vocab_size, dtype)).to(dtype)
        attach_mtp_output_heads(self.language_model, spec, padded_vocab_size, dtype)
        vision = self.hf_config.vision_config
        self.vision_model = Step37VisionTower(vision, dtype)
        self.image_insert_embedding = ImageInsertEmbedding(
            4 * vision.hidden_size, spec.hidden_size, spec.extra["projector_bias"], dtype
        )

    # ------------------------------------------------------------------ checkpoint keys
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sharded = self.language_model.sharded_state_dict(
            prefix=f"{prefix}{LANGUAGE_PREFIX}", sharded_offsets=sharded_offsets, metadata=metadata
        )
        # Replicated on every TP rank (replica_id (0, tp_rank, dp_rank): TP rank 0 / DP rank 0 writes).
        for module, module_prefix in ((self.vision_model, VISION_PREFIX), (self.image_insert_embedding, PROJECTOR_PREFIX)):
            sharded.update(
                make_sharded_tensors_for_checkpoint(
                    module.state_dict(keep_vars=True), f"{prefix}{module_prefix}", {}, sharded_offsets
                )
            )
        return sharded

    # ------------------------------------------------------------------ forward
    def image_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """One ``[L, H]`` tensor of projected features per image."""
        dtype = self.image_insert_embedding.align_projector.weight.dtype
        features = self.vision_model(pixel_values.to(dtype))
        return list(self.image_insert_embedding.align_projector(features).unbind(0))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        image_start_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, S, vocab_size]``. Image features go after each ``image_start_token_id``
        (``<im_start>``; default: the id in the config, ``spec.extra["im_start_token_id"]``).
        ``image_grid_thw`` is accepted for a uniform call signature and must be None (every
        Step3.7 image is one fixed-size view)."""
        if image_grid_thw is not None:
            raise ConversionError("Step3.7 takes no image_grid_thw: images are fixed-size views")
        if image_start_token_id is None:
            image_start_token_id = self.spec.extra.get("im_start_token_id")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            # Sliding-window layers build their own causal window mask inside megatron and would
            # ignore a padding mask; refuse rather than attend to padding there.
            raise ConversionError("padding masks are not supported by the Step3.7 Megatron model; pass unpadded sequences")
        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        if pixel_values is not None:
            if image_start_token_id is None:
                raise ConversionError(
                    "pixel_values given without image_start_token_id (the <im_start> token id; "
                    "prepare_verify_inputs finds it in the tokenizer)"
                )
            embeds = ImageInsertEmbedding.insert_features(
                embeds, self.image_features(pixel_values), input_ids, image_start_token_id
            )
        causal = causal_mask(input_ids.shape[1], None, input_ids.device)
        with _without_mtp(self.language_model):
            logits = self.language_model(
                input_ids=None,
                position_ids=None,
                attention_mask=causal,
                decoder_input=embeds,
                runtime_gather_output=True,
            )
        return logits[..., : self.spec.vocab_size]


def build_model(spec: ModelSpec, *, padded_vocab_size: int, dtype: torch.dtype = torch.float32) -> Step37Megatron:
    """Build on the CPU (parallel_state must be initialized: see ``runtime.init_parallel``), in eval mode."""
    model = Step37Megatron(spec, padded_vocab_size=padded_vocab_size, dtype=dtype)
    # The norms the Transformer Engine spec keeps as modules carry `_extra_state`: ask for those keys too.
    return with_te_norm_extra_state(model).eval()
