"""Qwen2.5-VL as megatron-core's own ``MimoModel`` (what a ``--layout mimo`` checkpoint loads into).

* language model: the same GPTModel as :mod:`.model` (``language_model.*``);
* encoder ``qwen_vit``: transformers' vision tower without its merger
  (``modality_submodules.images.encoders.qwen_vit.*``);
* input projection: transformers' ``Qwen2_5_VLPatchMerger`` unchanged
  (``modality_submodules.images.input_projections.0.*``);
* special token: ``<|image_pad|>`` (``image_token_id``).

Splitting the merger off is exact: HF's tower runs its blocks in window order and puts the merged
tokens back with ``merged[argsort(window_index)]``, an order over *merge units* (``spatial_merge_size²``
consecutive patches). The merger (RMSNorm per patch, then an MLP per merge unit) acts on each unit
alone, so restoring the unit order before it, as the encoder does here, gives the same rows.

What the stock ``MimoModel.forward`` cannot do here: pass the 3D M-RoPE positions ``[3, B, S]``
(it calls the language model with ``position_ids=None``, and its ``get_text_embeddings`` indexes
positions as ``[B, S]``). :meth:`QwenMimoModel.forward` computes them with HF's ``get_rope_index``
(the code :class:`.model.QwenVLMegatron` uses) and passes them on.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLPatchMerger,
)

from ckptconv.core.spec import ModelSpec
from ckptconv.errors import ConversionError
from ckptconv.families.qwen2_5_vl.model import QwenVLMegatron, hf_config, language_model_kwargs
from ckptconv.megatron.common import causal_mask, check_model_parallel
from ckptconv.megatron.mimo import FamilyMimoModel, mimo_model_config

ENCODER = "qwen_vit"


class _MergeUnits(nn.Module):
    """Stands in for the merger inside HF's tower: one row per merge unit, so HF's own reverse
    window permutation (which indexes merge units) applies. No parameters, no checkpoint keys."""

    def __init__(self, unit: int):
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.unit * x.shape[-1])


class QwenVisionEncoder(Qwen2_5_VisionTransformerPretrainedModel):
    """HF's vision tower (same module names, same forward) minus the merger: patch features
    ``[num_patches, vision hidden]`` in merge-unit order, what the merger takes."""

    def __init__(self, config):
        super().__init__(config)
        self.merger = _MergeUnits(config.spatial_merge_size**2)

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs) -> torch.Tensor:
        units = super().forward(hidden_states.to(self.dtype), grid_thw=grid_thw, **kwargs).pooler_output
        return units.reshape(-1, self.config.hidden_size)


class QwenMimoModel(FamilyMimoModel):
    """``MimoModel`` + M-RoPE positions; ``forward`` takes :class:`.model.QwenVLMegatron`'s inputs."""

    def __init__(self, mimo_config, *, spec: ModelSpec, dtype: torch.dtype):
        super().__init__(mimo_config, spec=spec, dtype=dtype)
        self.hf_config = hf_config(spec)

    # The same HF get_rope_index code as our own composition (it reads only spec and hf_config).
    position_ids = QwenVLMegatron.position_ids
    mm_token_type_ids = QwenVLMegatron.mm_token_type_ids

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        encoder_inputs = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ConversionError("pixel_values given without image_grid_thw")
            encoder_inputs = {ENCODER: {"hidden_states": pixel_values, "grid_thw": image_grid_thw}}
        embeddings = self.combined_embeddings(input_ids, encoder_inputs)
        positions = self.position_ids(input_ids, image_grid_thw if pixel_values is not None else None, attention_mask)
        mask = causal_mask(input_ids.shape[1], attention_mask, input_ids.device)
        return self.language_model_logits(embeddings, positions, mask, labels)


def build_mimo_model(spec: ModelSpec, *, padded_vocab_size: int, dtype: torch.dtype = torch.float32) -> QwenMimoModel:
    """Build on the CPU (parallel_state must be initialized), in eval mode."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec

    check_model_parallel("Qwen2.5-VL", spec, padded_vocab_size)
    if spec.image_token_id is None:
        raise ConversionError("config.json: image_token_id is missing")
    vision = hf_config(spec).vision_config
    config = mimo_model_config(
        language_model=ModuleSpec(module=GPTModel, params=language_model_kwargs(spec, padded_vocab_size, dtype)),
        encoder_name=ENCODER,
        encoder=ModuleSpec(module=QwenVisionEncoder, params={"config": vision}),
        projection=ModuleSpec(
            module=Qwen2_5_VLPatchMerger,
            params={"dim": vision.out_hidden_size, "context_dim": vision.hidden_size,
                    "spatial_merge_size": vision.spatial_merge_size},
        ),
        image_token_id=spec.image_token_id,
    )
    return QwenMimoModel(config, spec=spec, dtype=dtype).eval()
