"""Qwen2.5-VL as a Megatron model: megatron-core GPTModel (language) + the HF vision tower (replicated).

This is the model verify loads a converted checkpoint into. Its ``sharded_state_dict()`` defines the
checkpoint key contract the converter writes:

* ``language_model.*`` -- a GPTModel (local spec, RMSNorm, SwiGLU, qkv bias, M-RoPE), keys as
  megatron-core names them (stacked layers ``language_model.decoder.layers.<name>``, shape ``[L, ...]``);
* ``visual.*`` -- the HF ``Qwen2_5_VisionTransformerPretrainedModel`` under its on-disk HF names,
  replicated on every TP rank (TP rank 0 / DP rank 0 is the main replica).

The forward pass mirrors ``Qwen2_5_VLModel.forward``: embed tokens, scatter the vision features into
the ``<|image_pad|>`` positions, compute 3D M-RoPE position ids with HF's own ``get_rope_index``, run
the decoder with an explicit causal mask, gather logits over TP and drop the vocab padding.
"""

from __future__ import annotations


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
VISION_PREFIX = "visual."


def transformer_config(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """The TransformerConfig for the language model; TP size comes from parallel_state."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        **decoder_config_kwargs(spec),
        mrope_section=list(spec.extra["mrope_section"]),
        **runtime_config_kwargs(dtype),
    )


def hf_config(spec: ModelSpec):
    """The transformers config object (nested or flat config.json both load)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_dict(dict(spec.hf_config))


def language_model_kwargs(spec: ModelSpec, padded_vocab_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """GPTModel arguments of the language model (local spec, RMSNorm, M-RoPE); this model and the
    MimoModel (``mimo.py``) build the same one."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return dict(
        config=transformer_config(spec, dtype),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=padded_vocab_size,
        max_sequence_length=int(hf_config(spec).text_config.max_position_embeddings),
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="mrope",
        rotary_base=spec.rope_theta,
    )


class QwenVLMegatron(nn.Module):
    """``.language_model`` (GPTModel) + ``.visual`` (HF vision tower with merger)."""

    def __init__(self, spec: ModelSpec, *, padded_vocab_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron.core.models.gpt import GPTModel
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        check_model_parallel("Qwen2.5-VL", spec, padded_vocab_size)
        if spec.image_token_id is None:
            raise ConversionError("config.json: image_token_id is missing")
        self.spec = spec
        self.padded_vocab_size = padded_vocab_size
        self.hf_config = hf_config(spec)
        self.language_model = GPTModel(**language_model_kwargs(spec, padded_vocab_size, dtype))
        # The HF module is used as is (same math as the reference, same names as on disk). Its
        # attention implementation is the one from_pretrained would pick for the reference model.
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(self.hf_config.vision_config).to(dtype)
        self.language_model.to(dtype)

    # ------------------------------------------------------------------ checkpoint keys

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sharded = self.language_model.sharded_state_dict(
            prefix=f"{prefix}{LANGUAGE_PREFIX}", sharded_offsets=sharded_offsets, metadata=metadata
        )
        # No TP axis map: every vision tensor is replicated, replica_id (0, tp_rank, dp_rank), so
        # only TP rank 0 / DP rank 0 writes it. Module-relative names + "visual." = HF on-disk names.
        sharded.update(
            make_sharded_tensors_for_checkpoint(
                self.visual.state_dict(keep_vars=True), f"{prefix}{VISION_PREFIX}", {}, sharded_offsets
            )
        )
        return sharded

    # ------------------------------------------------------------------ forward

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged patch features, one row per ``<|image_pad|>`` token, images in order."""
        dtype = next(self.visual.parameters()).dtype
        out = self.visual(pixel_values.to(dtype), grid_thw=image_grid_thw)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 text, 1 image, 2 video -- what the HF processor returns and get_rope_index reads."""
        types_ = torch.zeros_like(input_ids, dtype=torch.int)
        types_[input_ids == self.spec.image_token_id] = 1
        video_id = self.spec.hf_config.get("video_token_id")
        if video_id is not None:
            types_[input_ids == video_id] = 2
        return types_

    def position_ids(
        self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """3D M-RoPE positions ``[3, B, S]``, computed exactly as HF does."""
        if image_grid_thw is None:
            return text_position_ids(input_ids, attention_mask)
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        return hf_rope_index(
            Qwen2_5_VLModel,
            self.hf_config,
            input_ids,
            mm_token_type_ids=self.mm_token_type_ids(input_ids),
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = input_ids.device
        # [S, B, H]; VocabParallelEmbedding all-reduces over TP, so every rank holds full embeddings.
        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ConversionError("pixel_values given without image_grid_thw")
            features = self.image_features(pixel_values, image_grid_thw).to(embeds.dtype)
            image_mask = input_ids == self.spec.image_token_id  # [B, S]
            n_tokens = int(image_mask.sum())
            if n_tokens != features.shape[0]:
                raise ConversionError(
                    f"image features and image tokens do not match: tokens {n_tokens}, features {features.shape[0]}"
                )
            # Fill in batch-first (row-major) order, as HF's masked_scatter does, then back to [S, B, H].
            embeds = embeds.transpose(0, 1).clone()
            embeds[image_mask] = features
            embeds = embeds.transpose(0, 1).contiguous()
        position_ids = self.position_ids(input_ids, image_grid_thw if pixel_values is not None else None, attention_mask)
        mask = causal_mask(input_ids.shape[1], attention_mask, device)
        logits = self.language_model(
            input_ids=None,
            position_ids=position_ids,
            attention_mask=mask,
            decoder_input=embeds,
            runtime_gather_output=True,
        )
        return logits[..., : self.spec.vocab_size]


def build_model(spec: ModelSpec, *, padded_vocab_size: int, dtype: torch.dtype = torch.float32) -> QwenVLMegatron:
    """Build on the CPU (parallel_state must be initialized: see ``runtime.init_parallel``), in eval mode."""
    model = QwenVLMegatron(spec, padded_vocab_size=padded_vocab_size, dtype=dtype)
    # The norms the Transformer Engine spec keeps as modules carry `_extra_state`: ask for those keys too.
    return with_te_norm_extra_state(model).eval()
