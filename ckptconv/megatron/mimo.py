"""megatron-core's own multimodal model, ``MimoModel`` (megatron-core 0.16.1), built for a family.

A ``MimoModel`` is a language model plus ``modality_submodules``; ours have one modality, ``images``,
with one encoder (the family's HF vision tower) and one input projection (its merger / resampler /
projector). Its ``sharded_state_dict()`` is megatron-core's own, not ours: the keys a
``hf-to-mcore --layout mimo`` checkpoint must have (``[key_layouts.mimo]`` in the family's table).

What the families add to the stock model, and why (see each family's ``mimo.py``):

* The stock ``MimoModel.forward`` calls the language model with ``position_ids=None`` and without
  ``runtime_gather_output``; Qwen2.5-VL and ERNIE need 3D positions, ERNIE the per-token modality its
  MoE routes by. :class:`FamilyMimoModel` therefore keeps megatron-core's pieces (the modality
  submodule's encode + project, ``get_text_embeddings``, ``align_embeddings_by_token_positions``) and
  lets a family pass what the language model needs (:meth:`FamilyMimoModel.language_model_logits`).
  Step3.7 needs nothing more: it runs the stock ``forward``.
* megatron-core 0.16.1's ``MimoModel`` has no ``sharded_state_dict`` of its own: ``modality_submodules``
  (a ``ModuleDict``) goes through ``sharded_state_dict_default``, which saves every tensor as
  replicated and whole. A tensor-parallel module there (a ``ColumnParallelLinear`` projection) would be
  saved as one rank's half described as the full tensor. Our encoders and projections are plain torch
  modules, replicated on every rank; :func:`check_replicated_modalities` refuses anything else.
"""

from __future__ import annotations

import warnings

import torch

from ckptconv.errors import ConversionError
from ckptconv.megatron.common import with_te_norm_extra_state

IMAGES = "images"
"""The modality name (``modality_submodules.images``), as in Megatron-LM's MIMO examples."""


def mimo_model_config(*, language_model, encoder_name: str, encoder, projection, image_token_id: int):
    """``MimoModelConfig`` for one image modality: ``encoders = {encoder_name: encoder}``,
    ``input_projections = [projection]`` (ModuleSpecs), image embeddings placed at ``image_token_id``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        from megatron.core.models.mimo import MimoModelConfig
        from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    images = ModuleSpec(
        module=VisionModalitySubmodules,
        submodules={"encoders": {encoder_name: encoder}, "input_projections": [projection]},
    )
    return MimoModelConfig(
        language_model_spec=language_model,
        modality_submodules_spec={IMAGES: images},
        special_token_ids={IMAGES: int(image_token_id)},
    )


def check_replicated_modalities(model: torch.nn.Module) -> None:
    """Refuse a tensor-parallel parameter under ``modality_submodules``: megatron-core 0.16.1 would
    save it whole and replicated (see the module docstring), losing the other ranks' shards."""
    parallel = [
        name for name, param in model.modality_submodules.named_parameters()
        if getattr(param, "tensor_model_parallel", False)
    ]
    if parallel:
        raise ConversionError(
            "megatron-core 0.16.1's MimoModel saves modality submodules as replicated tensors, but "
            f"{', '.join(parallel[:3])} {'is' if len(parallel) == 1 else 'are'} tensor-parallel; "
            "keep encoders and projections replicated (plain torch modules)"
        )


def _mimo_base():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        from megatron.core.models.mimo import MimoModel
    return MimoModel


class FamilyMimoModel(_mimo_base()):
    """A real ``MimoModel`` (its construction, submodules and ``sharded_state_dict`` untouched) with
    the helpers a family's ``forward`` composes. ``forward`` returns logits ``[B, S, vocab_size]``
    (gathered over TP, vocab padding dropped) and takes the family's verify inputs
    (``VerifyInput.mcore_kwargs``), like the family's own Megatron model; given ``labels`` it returns
    the per-token loss ``[B, S]`` instead."""

    def __init__(self, mimo_config, *, spec, dtype: torch.dtype):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*experimental.*", category=UserWarning)
            super().__init__(mimo_config)
        check_replicated_modalities(self)
        # Ask for the keys a Transformer Engine-spec language model asks for (norm `_extra_state`s),
        # as the family's own model does; the HF modules under modality_submodules are left alone.
        with_te_norm_extra_state(self)
        self.spec = spec
        self.to(dtype)

    @property
    def image_encoder(self) -> torch.nn.Module:
        (encoder,) = self.modality_submodules[IMAGES].encoders.values()
        return encoder

    def combined_embeddings(self, input_ids: torch.Tensor, encoder_inputs: dict | None) -> torch.Tensor:
        """``[S, B, H]``: the images modality (encode + project, megatron-core's submodule forward) and
        the text embeddings, placed by token id with megatron-core's own alignment."""
        embeddings = {}
        if encoder_inputs is not None:
            projected = self.modality_submodules[IMAGES](encoder_inputs=encoder_inputs)
            if projected is not None:
                embeddings[IMAGES] = projected
        # Rotary models take no positions in the embedding; 3D positions go to the decoder below.
        embeddings["text"] = self.get_text_embeddings(input_ids, None, self.special_token_ids)
        try:
            return self.align_embeddings_by_token_positions(embeddings, input_ids, self.special_token_ids)
        except ValueError as exc:  # token / feature count mismatch
            raise ConversionError(f"MimoModel: {exc}") from None

    def language_model_logits(self, decoder_input, position_ids, attention_mask, labels=None) -> torch.Tensor:
        """Logits ``[B, S, vocab_size]``; with ``labels`` ``[B, S]``, GPTModel's per-token loss
        ``[B, S]`` instead (what a training step reduces with its loss mask)."""
        output = self.language_model(
            input_ids=None,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            runtime_gather_output=True,
        )
        return output if labels is not None else output[..., : self.spec.vocab_size]
