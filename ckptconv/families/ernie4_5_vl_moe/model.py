"""ERNIE-4.5-VL-MoE as a Megatron model: megatron-core GPTModel with dual-pool MoE + the HF vision side.

This is the model verify loads a converted checkpoint into; its ``sharded_state_dict()`` is the key
contract ``mappings/ernie4_5_vl_moe.toml`` writes (the names Megatron-Bridge's ERNIE model uses):

* ``language_model.*`` -- a megatron-core GPTModel built from a heterogeneous layer spec (local
  modules, RMSNorm, SwiGLU, no biases). Dense layers use megatron-core's MLP. MoE layers use
  :class:`ErnieMultiTypeMoE`: ``text_moe_layer`` and ``vision_moe_layer`` (each a megatron-core
  ``MoELayer``, SequentialMLP experts, allgather dispatcher, :class:`ErnieRouter`) plus
  ``shared_experts`` (megatron-core MLP). Mixed layers are keyed per layer (``decoder.layers.N.``).
* ``vision_tower.*`` / ``resampler_model.*`` -- transformers' ERNIE ViT and variable-resolution
  resampler, replicated over TP, keyed by their module names.

What is ERNIE-specific and why:

* Routing (:class:`ErnieRouter`): softmax over the router logits in fp32; the score-correction bias
  is added to those *probabilities* only to pick the top-k; the picked (unbiased) probabilities are
  renormalized to sum 1 (denominator clamped at ``moe_norm_min``). megatron-core 0.16.1 supports an
  expert bias only with sigmoid scores (TransformerConfig refuses softmax + expert bias), so the
  router overrides ``routing`` and owns its ``expert_bias`` buffer (same key as megatron's).
* Modality isolation: text tokens go only to the text pool, vision tokens (``moe_mm_token_type_ids``
  1 or 2: image/video placeholders *and* their start/end tokens) only to the vision pool; the shared
  experts see every token.
* 3D RoPE (:class:`ErnieRotaryEmbedding`): interleaved rotary pairs (GPT-J style, megatron's
  ``rotary_interleaved``); frequency band f < h + w takes the height position when f is even and the
  width position when odd, the last ``freq_allocation`` bands take the temporal position. For text
  tokens (t = h = w) this is plain RoPE.
* Pixels: transformers' processor rescales and normalizes; the released processor leaves pixels raw
  (0..255). ``forward(..., pixel_values_are_raw=True)`` applies /255 and the CLIP mean/std here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
from torch import nn

from ckptconv.errors import ConversionError
from ckptconv.megatron.common import (
    with_te_norm_extra_state,
    causal_mask,
    check_model_parallel,
    decoder_config_kwargs,
    hf_rope_index,
    runtime_config_kwargs,
    text_position_ids,
)
from ckptconv.core.spec import ModelSpec

LANGUAGE_PREFIX = "language_model."
VISION_TOWER = "vision_tower"
RESAMPLER = "resampler_model"

# OPENAI CLIP statistics (transformers.image_utils.OPENAI_CLIP_MEAN / _STD), which ERNIE's ViT uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ============================================================================ configs


def hf_config(spec: ModelSpec):
    """A nested transformers ``Ernie4_5_VLMoeConfig`` for this spec (also for flat checkpoints, whose
    config.json transformers cannot read natively). Builds the HF vision modules here and the HF
    reference model in verify."""
    from transformers import Ernie4_5_VLMoeConfig

    if spec.num_experts[0] != spec.num_experts[1]:
        raise ConversionError(
            f"text and vision pools have {spec.num_experts[0]} and {spec.num_experts[1]} experts; "
            "transformers' ERNIE-4.5-VL model needs equal pools"
        )
    shared = spec.shared_expert_ffn_hidden_size // spec.moe_ffn_hidden_size[0]
    text = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups,
        max_position_embeddings=spec.extra["max_position_embeddings"],
        rms_norm_eps=spec.norm_eps,
        use_bias=False,
        tie_word_embeddings=spec.tie_word_embeddings,
        moe_intermediate_size=list(spec.moe_ffn_hidden_size),
        moe_k=spec.moe_router_topk,
        moe_num_experts=spec.num_experts[0],
        moe_num_shared_experts=shared,
        moe_norm_min=spec.extra["moe_norm_min"],
        mlp_layer_types=["sparse" if k == "moe" else "dense" for k in spec.layer_mlp_kinds],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": spec.rope_theta,
            "mrope_section": list(spec.extra["mrope_section"]),
        },
    )
    tokens = {k: v for k, v in spec.extra["tokens"].items() if v is not None}
    return Ernie4_5_VLMoeConfig(
        text_config=text, vision_config=dict(spec.vision), tie_word_embeddings=spec.tie_word_embeddings, **tokens
    )


def transformer_config(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """The language model's TransformerConfig; the MoE fields describe the text pool (the vision
    pool's config is derived from it in :func:`pool_config`). Parallel sizes come from parallel_state."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    # A list pattern marks the block as non-homogeneous, so layers are keyed per layer; uniform
    # models keep megatron's stacked keys (what the planner expects from spec.stacked_layers).
    kinds = spec.layer_mlp_kinds
    moe_layer_freq = 1 if spec.stacked_layers else [1 if k == "moe" else 0 for k in kinds]
    return TransformerConfig(
        **decoder_config_kwargs(spec),  # ERNIE has no qkv bias: spec.qkv_bias is False
        rotary_interleaved=True,
        mrope_section=list(spec.extra["mrope_section"]),
        # --- MoE (text pool) ---
        num_moe_experts=spec.num_experts[0],
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size[0],
        moe_router_topk=spec.moe_router_topk,
        moe_layer_freq=moe_layer_freq,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",  # HF computes the router in fp32 whatever the model dtype
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",  # runs on CPU/gloo; alltoall needs CUDA streams
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        **runtime_config_kwargs(dtype),
    )


def pool_config(config, spec: ModelSpec, pool: int):
    """The TransformerConfig one expert pool's MoELayer is built with (experts and width per pool)."""
    return dataclasses.replace(
        config, num_moe_experts=spec.num_experts[pool], moe_ffn_hidden_size=spec.moe_ffn_hidden_size[pool]
    )


# ============================================================================ routing


@functools.cache
def _router_class():
    from megatron.core.transformer.moe.router import TopKRouter

    class _ErnieRouter(TopKRouter):
        """TopKRouter with ERNIE's selection: softmax probs (fp32) + correction bias for the top-k
        choice only, weights = the chosen unbiased probs renormalized (``/ max(sum, norm_min)``)."""

        def __init__(self, config, pg_collection=None, *, norm_min: float):
            super().__init__(config=config, pg_collection=pg_collection)
            self.norm_min = norm_min
            # TopKRouter registers `expert_bias` only for sigmoid routing; ERNIE's bias is a persistent
            # fp32 buffer under the same name (Megatron-Bridge's key), never updated here.
            del self.expert_bias
            self.register_buffer("expert_bias", torch.zeros(config.num_moe_experts, dtype=torch.float32))

        def routing(self, logits: torch.Tensor, padding_mask=None):
            logits = logits.view(-1, self.config.num_moe_experts).float()
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            _, top = torch.topk(probs + self.expert_bias.float(), self.topk, dim=-1)
            weights = torch.gather(probs, -1, top)
            weights = weights / torch.clamp(weights.sum(-1, keepdim=True), min=self.norm_min)
            routing_probs = torch.zeros_like(probs).scatter(1, top, weights)
            routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top, True)
            return routing_probs, routing_map

    _ErnieRouter.__name__ = _ErnieRouter.__qualname__ = "ErnieRouter"
    return _ErnieRouter


def make_router(config, pg_collection=None, *, norm_min: float):
    return _router_class()(config, pg_collection, norm_min=norm_min)


# ============================================================================ dual-pool MoE block


class TokenModality:
    """Which tokens are vision tokens for the forward pass in progress.

    megatron's TransformerLayer calls its MLP with the hidden states only, so the model sets the
    mask here before running the decoder and every :class:`ErnieMultiTypeMoE` reads it.
    """

    def __init__(self):
        self.vision_mask: torch.Tensor | None = None  # [S, B] bool, True = vision pool


def _moe_layer(config, spec: ModelSpec, pool: int, pg_collection):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.moe.moe_layer import MoELayer

    moe_spec = get_moe_module_spec_for_backend(backend=LocalSpecProvider(), num_experts=spec.num_experts[pool])
    submodules = dataclasses.replace(
        moe_spec.submodules,
        shared_experts=None,  # ERNIE's shared experts sit beside the two pools, not inside one
        router=functools.partial(make_router, norm_min=float(spec.extra["moe_norm_min"])),
    )
    return MoELayer(pool_config(config, spec, pool), submodules=submodules, pg_collection=pg_collection)


class ErnieMultiTypeMoE(nn.Module):
    """The MLP of an ERNIE MoE layer: ``text_moe_layer`` + ``vision_moe_layer`` + ``shared_experts``."""

    def __init__(self, config, spec: ModelSpec, modality: TokenModality):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLP, MLPSubmodules
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        pg_collection = get_default_pg_collection()
        self.config = config
        self.modality = modality
        self.text_moe_layer = _moe_layer(config, spec, 0, pg_collection)
        self.vision_moe_layer = _moe_layer(config, spec, 1, pg_collection)
        self.shared_experts = None
        if spec.shared_expert_ffn_hidden_size:
            # MLP sizes linear_fc2's input from config.ffn_hidden_size whatever ffn_hidden_size says,
            # so the shared experts get a config of their own width (as SharedExpertMLP does).
            shared_config = dataclasses.replace(config, ffn_hidden_size=spec.shared_expert_ffn_hidden_size)
            self.shared_experts = MLP(
                shared_config,
                MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                ffn_hidden_size=spec.shared_expert_ffn_hidden_size,
                tp_group=pg_collection.tp,
            )

    def set_layer_number(self, layer_number: int) -> None:
        self.text_moe_layer.set_layer_number(layer_number)
        self.vision_moe_layer.set_layer_number(layer_number)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = {}
        for name, module in self.named_children():
            out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata))
        return out

    @staticmethod
    def _run_pool(moe_layer, tokens: torch.Tensor) -> torch.Tensor:
        output, _bias = moe_layer(tokens.unsqueeze(1))  # [n, 1, H]: a "sequence" of the pool's tokens
        return output.squeeze(1)

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **_unused):
        vision = self.modality.vision_mask
        if vision is not None and tuple(vision.shape) != tuple(hidden_states.shape[:2]):
            raise ConversionError(
                f"moe_mm_token_type_ids cover {tuple(vision.shape)} tokens, hidden states {tuple(hidden_states.shape[:2])}"
            )
        if vision is None or not bool(vision.any()):
            output, _bias = self.text_moe_layer(hidden_states)
        else:
            # Each pool sees only its own tokens (HF: text_moe(h[~vision]), vision_moe(h[vision])).
            # A pool with no tokens is skipped; every EP rank gets the same inputs in verify.
            output = torch.zeros_like(hidden_states)
            text = ~vision
            if bool(text.any()):
                output[text] = self._run_pool(self.text_moe_layer, hidden_states[text])
            output[vision] = self._run_pool(self.vision_moe_layer, hidden_states[vision])
        if self.shared_experts is not None:
            shared, _bias = self.shared_experts(hidden_states)
            output = output + shared
        return output, None


# ============================================================================ 3D RoPE


@functools.cache
def _rotary_class():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    class _ErnieRotaryEmbedding(MultimodalRotaryEmbedding):
        """ERNIE's interleaved 3D RoPE; reuses the parent's ``inv_freq``, ignores ``mrope_section``
        (megatron's contiguous t/h/w blocks) in favour of the band -> axis map built here."""

        def __init__(self, *args, mrope_section, **kwargs):
            super().__init__(*args, **kwargs)
            h, w, t = mrope_section
            bands = self.inv_freq.numel()
            if h != w or h + w + t != bands:
                raise ConversionError(f"ERNIE 3D RoPE needs h == w and h + w + t = {bands}, got {mrope_section}")
            # Position axes are ordered (t, h, w) in position_ids: band f < h+w -> h (even) / w (odd).
            axis = [(1 if f % 2 == 0 else 2) if f < h + w else 0 for f in range(bands)]
            self.register_buffer("band_axis", torch.tensor(axis, dtype=torch.long), persistent=False)

        def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None) -> torch.Tensor:
            if cp_group is not None and cp_group.size() > 1 or self.cp_group is not None and self.cp_group.size() > 1:
                raise ConversionError("ERNIE 3D RoPE with context parallelism is not supported")
            pos = position_ids.to(device=self.inv_freq.device, dtype=torch.float32)  # [3, B, S]
            freqs = pos[..., None] * self.inv_freq  # [3, B, S, bands]
            index = self.band_axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
            chosen = torch.gather(freqs, 0, index)[0]  # [B, S, bands]
            emb = chosen.repeat_interleave(2, dim=-1)  # interleaved pairs (x0, x1), (x2, x3), ...
            return emb[:, :, None, :].transpose(0, 1).contiguous()  # [S, B, 1, head_dim]

    _ErnieRotaryEmbedding.__name__ = _ErnieRotaryEmbedding.__qualname__ = "ErnieRotaryEmbedding"
    return _ErnieRotaryEmbedding


# ============================================================================ layer specs


def decoder_block_spec(config, spec: ModelSpec, modality: TokenModality):
    """One layer spec per layer: dense layers are megatron's local GPT layer; MoE layers swap the MLP
    for :class:`ErnieMultiTypeMoE` and keep ``pre_mlp_layernorm.weight`` as its own key (what the
    Transformer Engine spec, and so Megatron-Bridge, saves for MoE layers)."""
    from megatron.core.models.gpt.gpt_layer_specs import LNImpl, get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    dense = get_gpt_layer_local_spec(normalization="RMSNorm")
    moe = dataclasses.replace(
        dense,
        submodules=dataclasses.replace(
            dense.submodules,
            mlp=ModuleSpec(module=ErnieMultiTypeMoE, params={"spec": spec, "modality": modality}),
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
        ),
    )
    layers = [moe if kind == "moe" else dense for kind in spec.layer_mlp_kinds]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=LNImpl)


# ============================================================================ the model


@contextlib.contextmanager
def _quiet_unknown_mlp_warning():
    """TransformerLayer logs "Unknown MLP type" once per MoE layer for any MLP module that is not one
    of megatron's own; ErnieMultiTypeMoE is deliberate, so that line would only be noise in verify."""
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    level = layer_logger.level
    layer_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        layer_logger.setLevel(level)


def language_model_kwargs(config, spec: ModelSpec, padded_vocab_size: int, modality: TokenModality) -> dict:
    """GPTModel arguments of the language model; this model and the MimoModel (``mimo.py``) build the
    same one, then swap in :func:`rotary_embedding`."""
    return dict(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, spec, modality),
        vocab_size=padded_vocab_size,
        max_sequence_length=spec.extra["max_position_embeddings"],
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="mrope",
        rotary_base=spec.rope_theta,
    )


def rotary_embedding(spec: ModelSpec):
    """ERNIE's 3D RoPE module: the same inv_freq as megatron's mrope module, ERNIE's band -> axis map."""
    return _rotary_class()(
        kv_channels=spec.head_dim,
        rotary_percent=1.0,
        rotary_interleaved=True,
        rotary_base=spec.rope_theta,
        mrope_section=list(spec.extra["mrope_section"]),
    )


def keep_router_bias_fp32(model: nn.Module) -> None:
    """Routers: fp32 bias always (selection must not round), like HF's _keep_in_fp32 e_score bias."""
    for module in model.modules():
        if hasattr(module, "expert_bias") and isinstance(module.expert_bias, torch.Tensor):
            module.expert_bias.data = module.expert_bias.data.float()


class ErnieVLMegatron(nn.Module):
    """``.language_model`` (GPTModel) + ``.vision_tower`` + ``.resampler_model`` (HF, replicated)."""

    def __init__(self, spec: ModelSpec, *, padded_vocab_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
            Ernie4_5_VLMoeVariableResolutionResamplerModel,
            Ernie4_5_VLMoeVisionTransformerPretrainedModel,
        )

        if spec.family != "ernie4_5_vl_moe":
            raise ConversionError(f"ERNIE Megatron model given a {spec.family!r} spec")
        check_model_parallel("ERNIE-4.5-VL", spec, padded_vocab_size)
        if parallel_state.get_context_parallel_world_size() != 1:
            raise ConversionError("the ERNIE-4.5-VL Megatron model does not support context parallelism")
        self.spec = spec
        self.padded_vocab_size = padded_vocab_size
        self.hf_config = hf_config(spec)
        self.modality = TokenModality()
        config = transformer_config(spec, dtype)
        with _quiet_unknown_mlp_warning():
            self.language_model = GPTModel(**language_model_kwargs(config, spec, padded_vocab_size, self.modality))
        self.language_model.rotary_pos_emb = rotary_embedding(spec)
        self.vision_tower = Ernie4_5_VLMoeVisionTransformerPretrainedModel._from_config(self.hf_config.vision_config)
        self.resampler_model = Ernie4_5_VLMoeVariableResolutionResamplerModel(self.hf_config)
        self.to(dtype)
        keep_router_bias_fp32(self)

    # ------------------------------------------------------------------ checkpoint keys

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sharded = self.language_model.sharded_state_dict(
            prefix=f"{prefix}{LANGUAGE_PREFIX}", sharded_offsets=sharded_offsets, metadata=metadata
        )
        # Replicated HF modules: no TP axis map, replica_id (0, tp_rank, dp_rank) -> one writer.
        for name in (VISION_TOWER, RESAMPLER):
            module = getattr(self, name)
            sharded.update(
                make_sharded_tensors_for_checkpoint(module.state_dict(keep_vars=True), f"{prefix}{name}.", {}, sharded_offsets)
            )
        return sharded

    # ------------------------------------------------------------------ inputs

    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw 0..255 patches ``[N, C*T*P*P]`` (channel-major, as the processor flattens them) ->
        /255, minus CLIP mean, over CLIP std, per channel."""
        channels = int(self.spec.vision["in_channels"])
        if channels != len(CLIP_MEAN):
            raise ConversionError(f"raw-pixel normalization needs 3 channels, the vision tower has {channels}")
        x = pixel_values.float().reshape(pixel_values.shape[0], channels, -1) / 255.0
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)[None, :, None]
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)[None, :, None]
        return ((x - mean) / std).reshape(pixel_values.shape)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """One row per image placeholder token, images in order (HF get_image_features)."""
        dtype = next(self.vision_tower.parameters()).dtype
        hidden = self.vision_tower(pixel_values.to(dtype), image_grid_thw).last_hidden_state
        return self.resampler_model(hidden, image_grid_thw)

    def token_types(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mm_token_type_ids, moe_mm_token_type_ids) exactly as the HF processor derives them:
        placeholders 1 (image) / 2 (video); the MoE types also mark start/end tokens."""
        tokens = self.spec.extra["tokens"]
        mm = torch.zeros_like(input_ids, dtype=torch.int)
        moe = torch.zeros_like(input_ids, dtype=torch.int)
        for kind, names in ((1, ("image_token_id",)), (2, ("video_token_id",))):
            for name in names:
                if tokens.get(name) is not None:
                    mm[input_ids == tokens[name]] = kind
        for kind, prefix in ((1, "image"), (2, "video")):
            for name in (f"{prefix}_token_id", f"{prefix}_start_token_id", f"{prefix}_end_token_id"):
                if tokens.get(name) is not None:
                    moe[input_ids == tokens[name]] = kind
        return mm, moe

    def position_ids(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
        """3D positions ``[3, B, S]`` (t, h, w), computed by HF's own get_rope_index."""
        if image_grid_thw is None:
            return text_position_ids(input_ids, attention_mask)
        from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeModel

        return hf_rope_index(
            Ernie4_5_VLMoeModel, self.hf_config, input_ids,
            mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask,
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        moe_mm_token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values_are_raw: bool = False,
        **_unused,
    ) -> torch.Tensor:
        """Logits ``[B, S, vocab_size]`` (gathered over TP, vocab padding dropped).

        Token types default to what the HF processor would pass for these ids (:meth:`token_types`).
        """
        derived_mm, derived_moe = self.token_types(input_ids)
        mm_token_type_ids = derived_mm if mm_token_type_ids is None else mm_token_type_ids
        moe_mm_token_type_ids = derived_moe if moe_mm_token_type_ids is None else moe_mm_token_type_ids

        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ConversionError("pixel_values given without image_grid_thw")
            if pixel_values_are_raw:
                pixel_values = self.normalize_pixels(pixel_values)
            features = self.image_features(pixel_values, image_grid_thw).to(embeds.dtype)
            image_mask = input_ids == self.spec.image_token_id  # [B, S]
            if int(image_mask.sum()) != features.shape[0]:
                raise ConversionError(
                    f"image features and image tokens do not match: tokens {int(image_mask.sum())}, features {features.shape[0]}"
                )
            # Batch-first (row-major) fill, as HF's masked_scatter does; then back to [S, B, H].
            embeds = embeds.transpose(0, 1).clone()
            embeds[image_mask] = features
            embeds = embeds.transpose(0, 1).contiguous()
        position_ids = self.position_ids(
            input_ids, mm_token_type_ids, image_grid_thw if pixel_values is not None else None, attention_mask
        )
        mask = causal_mask(input_ids.shape[1], attention_mask, input_ids.device)
        self.modality.vision_mask = moe_mm_token_type_ids.bool().transpose(0, 1)  # [S, B]
        try:
            logits = self.language_model(
                input_ids=None,
                position_ids=position_ids,
                attention_mask=mask,
                decoder_input=embeds,
                runtime_gather_output=True,
            )
        finally:
            self.modality.vision_mask = None
        return logits[..., : self.spec.vocab_size]


def build_model(spec: ModelSpec, *, padded_vocab_size: int, dtype: torch.dtype = torch.float32) -> ErnieVLMegatron:
    """Build on the CPU (parallel_state must be initialized: see ``runtime.init_parallel``), in eval mode."""
    model = ErnieVLMegatron(spec, padded_vocab_size=padded_vocab_size, dtype=dtype)
    # The norms the Transformer Engine spec keeps as modules carry `_extra_state`: ask for those keys too.
    return with_te_norm_extra_state(model).eval()
