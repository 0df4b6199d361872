"""Step3.7 as megatron-core's own ``MimoModel`` (what a ``--layout mimo`` checkpoint loads into).

* language model: the same heterogeneous GPTModel as :mod:`.model` (``language_model.*``, MTP layers
  and their output heads included), built with ``parallel_output=False`` so it returns whole logits
  at any TP;
* encoder ``step_vit``: our :class:`.model.Step37VisionTower` (transformers' computation on the
  on-disk names; ``modality_submodules.images.encoders.step_vit.*``), ``[images, L, 4·hidden]``;
* input projection: the align projector, an ``nn.Linear``
  (``modality_submodules.images.input_projections.0.*``; HF ``vit_large_projector``);
* special token: ``<im_patch>`` (``image_token_id``).

Step3.7 needs nothing beyond the stock model: each attention layer applies its own RoPE from the
sequence length (no ``position_ids``), and its "insert after ``<im_start>``" is placement by token id
because the prompt puts the ``<im_patch>`` run right after each ``<im_start>``. :meth:`Step37MimoModel.forward`
checks that layout, then runs ``MimoModel.forward`` unchanged (with the MTP block switched off, as in
:class:`.model.Step37Megatron`: with MTP layers GPTModel wants ``labels`` for their losses).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from torch import nn

from ckptconv.core.spec import ModelSpec
from ckptconv.errors import ConversionError
from ckptconv.families.step3p7.inputs import image_feature_count
from ckptconv.families.step3p7.model import (
    Step37VisionTower,
    _without_mtp,
    attach_mtp_output_heads,
    hf_config,
    language_model_kwargs,
)
from ckptconv.megatron.common import causal_mask, check_model_parallel
from ckptconv.megatron.mimo import IMAGES, FamilyMimoModel, mimo_model_config

ENCODER = "step_vit"


def check_patches_follow_start(input_ids: torch.Tensor, start_id: int, patch_id: int, per_image: int) -> None:
    """Every ``<im_start>`` is followed by exactly ``per_image`` ``<im_patch>`` tokens and no
    ``<im_patch>`` stands elsewhere: then placing features by ``<im_patch>`` (MimoModel) is the same
    as inserting them after ``<im_start>`` (HF Step3.7)."""
    expected = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, s in (input_ids == start_id).nonzero().tolist():
        if s + per_image >= input_ids.shape[1]:
            raise ConversionError(f"image features after <im_start> at position {s} run past the sequence end")
        expected[b, s + 1 : s + 1 + per_image] = True
    if not torch.equal(expected, input_ids == patch_id):
        raise ConversionError(
            f"<im_patch> tokens (id {patch_id}) must be exactly the {per_image} positions after each <im_start> (id {start_id})"
        )


class Step37LanguageModel(GPTModel):
    """The GPTModel of :mod:`.model` from one ModuleSpec (MimoModel builds its language model with
    ``build_module``), with the MTP layers' own output heads attached."""

    def __init__(self, *, spec: ModelSpec, dtype: torch.dtype, **gpt_kwargs):
        super().__init__(**gpt_kwargs)
        attach_mtp_output_heads(self, spec, gpt_kwargs["vocab_size"], dtype)


class Step37MimoModel(FamilyMimoModel):
    """The stock ``MimoModel.forward``; this ``forward`` takes :class:`.model.Step37Megatron`'s inputs."""

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        image_start_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, S, vocab_size]``, or with ``labels`` the stock forward's per-token loss
        ``[B, S]`` (MTP layers then add their losses, as in training)."""
        if image_grid_thw is not None:
            raise ConversionError("Step3.7 takes no image_grid_thw: images are fixed-size views")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ConversionError("padding masks are not supported by the Step3.7 Megatron model; pass unpadded sequences")
        modality_inputs = None
        if pixel_values is not None:
            start = image_start_token_id if image_start_token_id is not None else self.spec.extra.get("im_start_token_id")
            if start is None:
                raise ConversionError("pixel_values given without image_start_token_id (the <im_start> token id)")
            check_patches_follow_start(input_ids, start, self.spec.image_token_id, image_feature_count(self.spec))
            modality_inputs = {IMAGES: {ENCODER: {"pixel_values": pixel_values.to(self.image_encoder.conv1.weight.dtype)}}}
        causal = causal_mask(input_ids.shape[1], None, input_ids.device)
        stock_forward = super().forward
        try:
            if labels is not None:
                loss, _loss_mask = stock_forward(input_ids, attention_mask=causal, labels=labels, modality_inputs=modality_inputs)
                return loss
            with _without_mtp(self.language_model):
                logits, _loss_mask = stock_forward(input_ids, attention_mask=causal, modality_inputs=modality_inputs)
        except ValueError as exc:  # token / feature count mismatch in align_embeddings_by_token_positions
            raise ConversionError(f"MimoModel: {exc}") from None
        return logits[..., : self.spec.vocab_size]


def build_mimo_model(spec: ModelSpec, *, padded_vocab_size: int, dtype: torch.dtype = torch.float32) -> Step37MimoModel:
    """Build on the CPU (parallel_state must be initialized), in eval mode."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    check_model_parallel("Step3.7", spec, padded_vocab_size)
    vision = hf_config(spec).vision_config
    config = mimo_model_config(
        language_model=ModuleSpec(
            module=Step37LanguageModel,
            params={"spec": spec, "dtype": dtype,
                    **language_model_kwargs(spec, padded_vocab_size, dtype, parallel_output=False)},
        ),
        encoder_name=ENCODER,
        encoder=ModuleSpec(module=Step37VisionTower, params={"vision_config": vision, "dtype": dtype}),
        projection=ModuleSpec(
            module=nn.Linear,
            params={"in_features": 4 * vision.hidden_size, "out_features": spec.hidden_size,
                    "bias": spec.extra["projector_bias"]},
        ),
        image_token_id=spec.image_token_id,
    )
    return Step37MimoModel(config, spec=spec, dtype=dtype).eval()
