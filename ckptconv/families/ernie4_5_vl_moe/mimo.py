"""ERNIE-4.5-VL-MoE as megatron-core's own ``MimoModel`` (what a ``--layout mimo`` checkpoint loads into).

* language model: the same GPTModel as :mod:`.model` (dual-pool MoE layers, ERNIE's 3D RoPE module)
  under ``language_model.*``;
* encoder ``ernie_vit``: transformers' ERNIE ViT (``modality_submodules.images.encoders.ernie_vit.*``);
* input projection: transformers' variable-resolution resampler
  (``modality_submodules.images.input_projections.0.*``);
* special token: the image placeholder (``image_token_id``).

What ``MimoModel`` (megatron-core 0.16.1) cannot express, and what is ours instead:

1. **The resampler's grid.** ``VisionModalitySubmodules`` calls the input projection with the encoder
   output only; the resampler also needs ``image_grid_thw`` (it pairs temporal frames per image).
   Encoder and projection share an :class:`ImageGrid`: the encoder records the grid it was called
   with, the projection reads it.
2. **3D positions.** ``forward`` passes ``position_ids=None`` to the language model; ERNIE needs
   ``[3, B, S]`` (t, h, w) positions from HF's ``get_rope_index``.
3. **Which tokens are vision tokens.** The MoE layers send image tokens (and their start/end tokens)
   to the vision experts, text tokens to the text experts; no ``MimoModel`` input carries that. The
   model sets our ``TokenModality`` mask around the language-model call, as :class:`.model.ErnieVLMegatron` does.

So :meth:`ErnieMimoModel.forward` is ours; the embedding of both modalities, their placement by token
id and the checkpoint keys are megatron-core's.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
    Ernie4_5_VLMoeVariableResolutionResamplerModel,
    Ernie4_5_VLMoeVisionTransformerPretrainedModel,
)

from ckptconv.core.spec import ModelSpec
from ckptconv.errors import ConversionError
from ckptconv.families.ernie4_5_vl_moe.model import (
    ErnieVLMegatron,
    TokenModality,
    _quiet_unknown_mlp_warning,
    hf_config,
    keep_router_bias_fp32,
    language_model_kwargs,
    rotary_embedding,
    transformer_config,
)
from ckptconv.megatron.common import causal_mask, check_model_parallel
from ckptconv.megatron.mimo import FamilyMimoModel, mimo_model_config

ENCODER = "ernie_vit"


class ImageGrid:
    """``image_grid_thw`` of the images being encoded, shared by the encoder and the projection."""

    def __init__(self):
        self.grid_thw: torch.Tensor | None = None


class ErnieVisionEncoder(Ernie4_5_VLMoeVisionTransformerPretrainedModel):
    """HF's ERNIE ViT (same names, same forward): patch features ``[num_patches, vision hidden]``."""

    def __init__(self, config, grid: ImageGrid):
        super().__init__(config)
        object.__setattr__(self, "image_grid", grid)  # shared state, not a submodule

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        self.image_grid.grid_thw = grid_thw
        return super().forward(pixel_values.to(self.dtype), grid_thw).last_hidden_state


class ErnieResampler(Ernie4_5_VLMoeVariableResolutionResamplerModel):
    """HF's resampler (same names, same forward), called MimoModel's way: ``projection(features)``."""

    def __init__(self, config, grid: ImageGrid):
        super().__init__(config)
        object.__setattr__(self, "image_grid", grid)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.image_grid.grid_thw is None:
            raise ConversionError("ERNIE resampler called before the encoder recorded image_grid_thw")
        return super().forward(hidden_states, self.image_grid.grid_thw)


class ErnieLanguageModel(GPTModel):
    """The GPTModel of :mod:`.model`, built from one ModuleSpec (MimoModel builds its language model
    with ``build_module``), with ERNIE's 3D RoPE module in place of megatron's mrope."""

    def __init__(self, *, spec: ModelSpec, **gpt_kwargs):
        with _quiet_unknown_mlp_warning():
            super().__init__(**gpt_kwargs)
        self.rotary_pos_emb = rotary_embedding(spec)


class ErnieMimoModel(FamilyMimoModel):
    """``MimoModel`` + 3D positions + token modality; ``forward`` takes :class:`.model.ErnieVLMegatron`'s inputs."""

    def __init__(self, mimo_config, *, spec: ModelSpec, dtype: torch.dtype, modality: TokenModality, grid: ImageGrid):
        super().__init__(mimo_config, spec=spec, dtype=dtype)
        keep_router_bias_fp32(self)
        self.hf_config = hf_config(spec)
        self.modality = modality
        self.image_grid = grid

    # The same code as our own composition: it reads only spec and hf_config.
    normalize_pixels = ErnieVLMegatron.normalize_pixels
    token_types = ErnieVLMegatron.token_types
    position_ids = ErnieVLMegatron.position_ids

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        moe_mm_token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values_are_raw: bool = False,
        labels: torch.Tensor | None = None,
        **_unused,
    ) -> torch.Tensor:
        derived_mm, derived_moe = self.token_types(input_ids)
        mm_token_type_ids = derived_mm if mm_token_type_ids is None else mm_token_type_ids
        moe_mm_token_type_ids = derived_moe if moe_mm_token_type_ids is None else moe_mm_token_type_ids
        encoder_inputs = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ConversionError("pixel_values given without image_grid_thw")
            if pixel_values_are_raw:
                pixel_values = self.normalize_pixels(pixel_values)
            encoder_inputs = {ENCODER: {"pixel_values": pixel_values, "grid_thw": image_grid_thw}}
        try:
            embeddings = self.combined_embeddings(input_ids, encoder_inputs)
        finally:
            self.image_grid.grid_thw = None
        positions = self.position_ids(
            input_ids, mm_token_type_ids, image_grid_thw if pixel_values is not None else None, attention_mask
        )
        mask = causal_mask(input_ids.shape[1], attention_mask, input_ids.device)
        self.modality.vision_mask = moe_mm_token_type_ids.bool().transpose(0, 1)  # [S, B]
        try:
            return self.language_model_logits(embeddings, positions, mask, labels)
        finally:
            self.modality.vision_mask = None


def build_mimo_model(spec: ModelSpec, *, padded_vocab_size: int, dtype: torch.dtype = torch.float32) -> ErnieMimoModel:
    """Build on the CPU (parallel_state must be initialized), in eval mode."""
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import ModuleSpec

    check_model_parallel("ERNIE-4.5-VL", spec, padded_vocab_size)
    if parallel_state.get_context_parallel_world_size() != 1:
        raise ConversionError("the ERNIE-4.5-VL Megatron model does not support context parallelism")
    modality, grid = TokenModality(), ImageGrid()
    config = transformer_config(spec, dtype)
    reference = hf_config(spec)
    mimo_config = mimo_model_config(
        language_model=ModuleSpec(
            module=ErnieLanguageModel,
            params={"spec": spec, **language_model_kwargs(config, spec, padded_vocab_size, modality)},
        ),
        encoder_name=ENCODER,
        encoder=ModuleSpec(module=ErnieVisionEncoder, params={"config": reference.vision_config, "grid": grid}),
        projection=ModuleSpec(module=ErnieResampler, params={"config": reference, "grid": grid}),
        image_token_id=spec.image_token_id,
    )
    return ErnieMimoModel(mimo_config, spec=spec, dtype=dtype, modality=modality, grid=grid).eval()
