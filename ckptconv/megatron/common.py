"""What every family's Megatron model sets the same way."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types

import torch
import torch.nn.functional as F

from ckptconv.errors import ConversionError


def decoder_config_kwargs(spec) -> dict:
    """TransformerConfig fields of a Llama-style decoder (RMSNorm, SwiGLU, GQA, no linear biases,
    no dropout) read from the spec; families add or override what differs."""
    return dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def check_model_parallel(model_name: str, spec, padded_vocab_size: int) -> None:
    """What every verify model needs from parallel_state: one pipeline stage, and a padded
    vocabulary that splits evenly over the TP ranks."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ConversionError(f"the {model_name} Megatron model for verify supports pp=1 only")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if padded_vocab_size < spec.vocab_size or padded_vocab_size % tp:
        raise ConversionError(
            f"padded vocab size {padded_vocab_size} must be >= vocab_size {spec.vocab_size} and divisible by tp={tp}"
        )


_initialize_weights = contextvars.ContextVar("initialize_weights", default=True)


@contextlib.contextmanager
def uninitialized_weights():
    """Models built inside skip megatron's random weight initialization
    (``perform_initialization=False``): on the CPU path it materializes a full master copy of each
    weight to initialize it, wasted work for weights a checkpoint overwrites, and it would defeat
    building on the meta device (layerwise verify)."""
    token = _initialize_weights.set(False)
    try:
        yield
    finally:
        _initialize_weights.reset(token)


def runtime_config_kwargs(dtype: torch.dtype) -> dict:
    """TransformerConfig fields that do not depend on the model: parallel sizes from
    parallel_state, CPU initialization, dtype flags, and the fused kernels switched off (they need
    CUDA / apex / Transformer Engine; the unfused paths compute the same)."""
    from megatron.core import parallel_state

    return dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        perform_initialization=_initialize_weights.get(),
        pipeline_dtype=dtype,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
    )


def causal_mask(seq_len: int, padding_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean ``[B|1, 1, S, S]``, True = masked: causal, plus padded keys when given. Passed
    explicitly because megatron-core's default mask is built on CUDA."""
    mask = torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)
    if padding_mask is not None:
        mask = mask | ~padding_mask.bool()[:, None, None, :]
    return mask


def text_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """3D positions ``[3, B, S]`` without vision inputs, as HF computes them: plain positions
    (counting only unpadded tokens), the same on all three axes."""
    b, s = input_ids.shape
    if attention_mask is not None:
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    else:
        pos = torch.arange(s, device=input_ids.device).expand(b, s)
    return pos.unsqueeze(0).expand(3, b, s).contiguous()


def hf_rope_index(hf_model_class, hf_config, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """3D positions ``[3, B, S]`` from the HF model class's own ``get_rope_index``.

    It reads only ``config`` and ``get_vision_position_ids`` (which ignores self), so it runs on a
    stand-in object instead of a whole HF model."""
    host = types.SimpleNamespace(config=hf_config)
    host.get_vision_position_ids = functools.partial(hf_model_class.get_vision_position_ids, host)
    positions, _ = hf_model_class.get_rope_index(host, input_ids, **kwargs)
    return positions


# Module names under which megatron-core's Transformer Engine spec builds a ``TENorm`` (a bare
# ``te.pytorch.RMSNorm`` / ``LayerNorm``): the final norm of a block, the MoE layers' pre-MLP norm,
# the q/k norms and the MTP norms (megatron-core 0.16.1 ``models/gpt/gpt_layer_specs.py:171-300``,
# ``extensions/transformer_engine_spec_provider.py:48-55``, ``extensions/transformer_engine.py:433-467``).
# A layer's input norm and a dense layer's pre-MLP norm are fused into TE linears instead.
TE_NORM_NAMES = ("final_layernorm", "input_layernorm", "pre_mlp_layernorm", "q_layernorm", "k_layernorm", "enorm", "hnorm")


class _TransformerEngineNormState:
    """The ``_extra_state`` a Transformer Engine norm carries.

    Since TE 1.13 ``te.pytorch.RMSNorm`` / ``LayerNorm`` are fusible ops
    (``transformer_engine/pytorch/module/rmsnorm.py:16``) whose base ``BasicOperation`` defines
    ``get_extra_state`` (``ops/op.py:528`` in TE 2.12; an empty uint8 tensor without FP8) and
    ``set_extra_state`` (``ops/op.py:604``; None or empty is a no-op). Defining the same pair makes
    ``state_dict`` emit ``<norm>._extra_state`` and megatron-core turn it into a ShardedObject
    (``transformer/utils.py`` ``make_sharded_tensors_for_checkpoint``), so this model asks for exactly
    the keys a TE-spec model asks for. FP8 scaling state a TE run may have saved is not used here.
    """

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        return None


_TE_NORM_CLASSES: dict[type, type] = {}


def with_te_norm_extra_state(model: torch.nn.Module) -> torch.nn.Module:
    """Give every norm the Transformer Engine spec would build as a ``TENorm`` its ``_extra_state``.

    Norms stored under a fused linear's name (the layer's ``sharded_state_dict_keys_map`` renames
    them: local spec ``input_layernorm`` -> ``linear_qkv.layer_norm_*``) are left alone, as are
    modules outside megatron-core's (HF vision towers). Returns ``model``.
    """
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.module import MegatronModule

    for parent in list(model.modules()):
        if not isinstance(parent, MegatronModule):
            continue
        remapped = getattr(getattr(parent, "submodules_config", None), "sharded_state_dict_keys_map", None) or {}
        for name, child in list(parent.named_children()):
            if name not in TE_NORM_NAMES or isinstance(child, (IdentityOp, _TransformerEngineNormState)):
                continue
            if f"{name}." in remapped or not any(True for _ in child.parameters(recurse=False)):
                continue
            cls = type(child)
            if cls not in _TE_NORM_CLASSES:
                _TE_NORM_CLASSES[cls] = type(f"TE{cls.__name__}", (_TransformerEngineNormState, cls), {})
            child.__class__ = _TE_NORM_CLASSES[cls]
    return model
