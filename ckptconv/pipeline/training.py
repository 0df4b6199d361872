"""What the training loaders read besides tensors, written next to the checkpoint (no torch).

* **Megatron-LM** (``--load OUT --use-checkpoint-args``): ``load_args_from_checkpoint`` reads
  ``args`` (an ``argparse.Namespace``), ``iteration`` and ``checkpoint_version`` from ``common.pt``
  through ``dist_checkpointing.load_common_state_dict`` (Megatron-LM core_v0.16.1
  ``megatron/training/checkpointing.py:1331-1476``); ``load_checkpoint`` compares ``num_layers``,
  ``hidden_size``, ``num_attention_heads`` and ``add_position_embedding`` with the run's flags unless
  ``--finetune`` (``checkpointing.py:102-140``, ``1746-1756``). ``checkpoint_version`` 3.0 is what
  Megatron-LM itself saves (``checkpointing.py:893``).
* **Megatron-Bridge** (``checkpoint.pretrained_checkpoint=OUT``): reads ``run_config.yaml`` inside the
  iteration directory (``release/``), else ``args`` in ``common.pt`` (Megatron-Bridge
  ``training/checkpointing.py:2807-2818, 365-378``); ``load_megatron_model`` instantiates
  ``run_config["model"]`` through its ``_target_`` (``training/model_load_save.py:246-300``).
  ``run_config.yaml`` must not sit at the top of OUT: Bridge would take OUT itself for an iteration
  directory (``training/utils/checkpoint_utils.py:157-162, 236-257``).

Only plain values go into ``args`` (numbers, strings, lists, None) plus one ``Namespace`` record, so
megatron-core's safe loader (``torch.load`` with ``weights_only=True`` and its registered safe
globals, ``megatron/core/safe_globals.py``) reads it. The pickle is emitted by
:mod:`ckptconv.formats.pickles`, like every other one we write.

Each family adds its own fields in ``families/<name>/training.py`` (:class:`FamilyTraining`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ckptconv.core.layout import ParallelLayout
from ckptconv.core.spec import ModelSpec
from ckptconv.formats.pickles import Global, Obj

CHECKPOINT_VERSION = 3.0
RUN_CONFIG_NAME = "run_config.yaml"
DEFAULT_LAYOUT = "bridge"
"""Name of the key layout the checkpoint uses (Megatron-Bridge's model names by default; another
layout, e.g. ``mimo``, comes from the mapping table's ``key_layout``); recorded in ``run_config.yaml``.
Only the default layout names a Megatron-Bridge provider: the family providers load Bridge's keys."""

SILU = {"_target_": "torch.nn.functional.silu", "_call_": False}
"""How Megatron-Bridge writes a function in run_config.yaml (Megatron-LM
``megatron/training/config/yaml_utils.py`` ``_function_representer``)."""
_TORCH_DTYPES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}
BRIDGE_TOKENIZER_CONFIG = "megatron.bridge.training.tokenizers.config.TokenizerConfig"


@dataclass(frozen=True)
class FamilyTraining:
    """What a family adds to the generic decoder fields (``families/<name>/training.py``)."""

    provider_target: str | None
    """Megatron-Bridge's model provider class for the full VL model (``_target_``)."""
    language_model_provider_target: str | None
    """The provider for the bare language model (``--language-model-only``), if Bridge has one."""
    transformer_fields: dict = field(default_factory=dict)
    """TransformerConfig-named fields of the language model beyond the generic ones (both tools)."""
    text_provider_fields: dict = field(default_factory=dict)
    """Provider fields of the language model that are not TransformerConfig's (Step3.7's per-layer
    attention types); written for the VL and the bare language model alike."""
    provider_fields: dict = field(default_factory=dict)
    """Fields only the VL provider has (vision config, token ids); dropped for ``--language-model-only``."""
    megatron_lm_args: dict = field(default_factory=dict)
    """Megatron-LM argument names that differ from TransformerConfig's (``position_embedding_type``,
    ``mrope_section``)."""
    megatron_lm_args_language_model_only: dict = field(default_factory=dict)
    """Overrides of ``megatron_lm_args`` for the bare language model (text positions: ``rope``)."""


@dataclass(frozen=True)
class TrainingMetadata:
    """Everything the two loaders read, for one converted checkpoint."""

    spec: ModelSpec
    family: FamilyTraining
    layout: ParallelLayout
    padded_vocab_size: int
    source: str
    """The HF checkpoint as given (hub id or path): the tokenizer to train with."""
    dtype: str = "auto"
    model_layout: str = DEFAULT_LAYOUT
    language_model_only: bool = False

    # -------------------------------------------------------------- shared by both loaders
    def transformer_fields(self) -> dict:
        """TransformerConfig fields of the language model (plain values)."""
        spec = self.spec
        fields = {
            "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
            "ffn_hidden_size": spec.ffn_hidden_size,
            "num_attention_heads": spec.num_attention_heads,
            "num_query_groups": spec.num_query_groups,
            "kv_channels": spec.head_dim,
            "normalization": "RMSNorm",
            "layernorm_epsilon": spec.norm_eps,
            "gated_linear_unit": True,
            "add_bias_linear": False,
            "add_qkv_bias": spec.qkv_bias,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "tensor_model_parallel_size": self.layout.tp,
            "pipeline_model_parallel_size": self.layout.pp,
            "expert_model_parallel_size": self.layout.ep,
            "expert_tensor_parallel_size": self.layout.etp,
        }
        if spec.num_experts:
            fields.update({
                "num_moe_experts": spec.num_experts[0],
                "moe_ffn_hidden_size": spec.moe_ffn_hidden_size[0],
                "moe_router_topk": spec.moe_router_topk,
                # Megatron's per-layer pattern: 1 = MoE layer, 0 = dense (TransformerConfig.moe_layer_freq).
                "moe_layer_freq": [1 if kind == "moe" else 0 for kind in spec.layer_mlp_kinds],
            })
            if spec.shared_expert_ffn_hidden_size:
                fields["moe_shared_expert_intermediate_size"] = spec.shared_expert_ffn_hidden_size
        if spec.mtp_num_layers:
            fields["mtp_num_layers"] = spec.mtp_num_layers  # multi-token prediction after the decoder
        fields.update(self.family.transformer_fields)
        return fields

    # -------------------------------------------------------------- Megatron-LM: common.pt
    def megatron_lm_args(self) -> dict:
        """The ``args`` namespace's fields, named as Megatron-LM's argument parser names them."""
        t = self.transformer_fields()
        args = {k: v for k, v in t.items() if k not in ("num_moe_experts", "gated_linear_unit")}
        args.update({
            # Megatron-LM names (arguments.py, core_v0.16.1) where they differ from TransformerConfig's.
            "num_experts": t.get("num_moe_experts"),
            "swiglu": True,
            "group_query_attention": t["num_query_groups"] != t["num_attention_heads"],
            "norm_epsilon": t["layernorm_epsilon"],  # the pre-0.16 name (Megatron-Bridge's mlm_compat reads both)
            "untie_embeddings_and_output_weights": not self.spec.tie_word_embeddings,
            "add_position_embedding": True,  # Megatron-LM's default; check_checkpoint_args compares it
            "use_rotary_position_embeddings": False,  # legacy flag: True would force plain rope
            "position_embedding_type": "rope",
            "rotary_base": self.spec.rope_theta,
            "rotary_percent": 1.0,
            "rotary_interleaved": False,
            "apply_layernorm_1p": bool(t.get("layernorm_zero_centered_gamma", False)),
            "squared_relu": False,
            "max_position_embeddings": self.max_position_embeddings,
            "seq_length": self.max_position_embeddings,
            "vocab_size": self.spec.vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "make_vocab_size_divisible_by": self.layout.make_vocab_size_divisible_by,
            "tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_model": self.source,
            "ckpt_format": "torch_dist",
            "params_dtype": Global("torch", _TORCH_DTYPES.get(self.dtype, "torch.bfloat16").split(".")[1]),
            "bf16": self.dtype in ("bf16", "auto"),
            "fp16": self.dtype == "fp16",
            "consumed_train_samples": 0,
            "consumed_valid_samples": 0,
            "num_layers_per_virtual_pipeline_stage": None,
            "virtual_pipeline_model_parallel_size": None,
            # Read without getattr by Megatron-Bridge's mlm_compat (_transformer_config_from_args).
            "multi_latent_attention": False,
            "heterogeneous_layers_config_path": None,
            "no_persist_layer_norm": False,
            "overlap_p2p_comm": False,
            "decoder_first_pipeline_num_layers": None,
            "decoder_last_pipeline_num_layers": None,
            "fp8_param_gather": False,
            "bias_swiglu_fusion": True,
            "bias_gelu_fusion": False,
            "init_method_xavier_uniform": False,
            "config_logger_dir": "",
            "cp_comm_type": ["p2p"],
            "is_hybrid_model": False,
            "moe_grouped_gemm": False,
            "spec": None,
            "ckptconv_layout": self.model_layout,
            "ckptconv_language_model_only": self.language_model_only,
        })
        if not self.spec.num_experts:
            for key in ("moe_ffn_hidden_size", "moe_router_topk", "moe_layer_freq", "moe_shared_expert_intermediate_size"):
                args.pop(key, None)
        args.update(self.family.megatron_lm_args)
        if self.language_model_only:
            args.update(self.family.megatron_lm_args_language_model_only)
        return args

    def common_state(self) -> dict:
        """``common.pt``: what ``load_common_state_dict`` returns for this checkpoint."""
        return {
            "args": Obj(Global("argparse", "Namespace"), self.megatron_lm_args()),
            "iteration": 0,
            "checkpoint_version": CHECKPOINT_VERSION,
        }

    @property
    def max_position_embeddings(self) -> int:
        hf = self.spec.hf_config
        text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else hf
        return int(text.get("max_position_embeddings") or hf.get("max_position_embeddings") or 4096)

    # -------------------------------------------------------------- Megatron-Bridge: run_config.yaml
    def provider_target(self) -> str | None:
        if self.model_layout != DEFAULT_LAYOUT:
            return None  # the family providers build Bridge's key layout, not this one
        if self.language_model_only:
            return self.family.language_model_provider_target
        return self.family.provider_target

    def run_config(self) -> dict:
        """``release/run_config.yaml``: the model provider, the checkpoint and tokenizer sections."""
        model: dict = {}
        target = self.provider_target()
        if target is not None:
            model["_target_"] = target
        model.update(self.transformer_fields())
        model.update({
            "activation_func": SILU,
            "share_embeddings_and_output_weights": self.spec.tie_word_embeddings,
            "vocab_size": self.spec.vocab_size,
            "should_pad_vocab": False,
            "make_vocab_size_divisible_by": self.layout.make_vocab_size_divisible_by,
            "seq_length": self.max_position_embeddings,
            "rotary_base": self.spec.rope_theta,
            "position_embedding_type": "rope",
            "hf_model_id": self.source,
        })
        model.update(self.family.text_provider_fields)
        if self.dtype in _TORCH_DTYPES:
            model["params_dtype"] = {"_target_": _TORCH_DTYPES[self.dtype], "_call_": False}
            model["bf16"] = self.dtype == "bf16"
            model["fp16"] = self.dtype == "fp16"
        if not self.language_model_only:
            model.update(self.family.provider_fields)
        else:
            lm_args = self.family.megatron_lm_args_language_model_only
            if "position_embedding_type" in lm_args:
                model["position_embedding_type"] = lm_args["position_embedding_type"]
        return {
            "model": model,
            # A release checkpoint holds no optimizer or RNG state (Megatron-Bridge reads these keys
            # when deciding what to load, training/checkpointing.py:2842-2887).
            "checkpoint": {"save_optim": False, "save_rng": False, "fully_parallel_save": False, "ckpt_format": "torch_dist"},
            "tokenizer": {
                "_target_": BRIDGE_TOKENIZER_CONFIG,
                "tokenizer_type": "HuggingFaceTokenizer",
                "tokenizer_model": self.source,
            },
            # Ours: ignored by both loaders (they read the sections above by name).
            "ckptconv": {
                "family": self.spec.family,
                "layout": self.model_layout,
                "language_model_only": self.language_model_only,
                "padded_vocab_size": self.padded_vocab_size,
            },
        }

    def write_run_config(self, release: Path) -> bytes:
        """Write ``run_config.yaml`` into the iteration directory; returns the bytes written."""
        import yaml  # PyYAML: safe_dump of plain values, what Bridge's read_run_config safe_loads

        payload = yaml.safe_dump(self.run_config(), sort_keys=False, default_flow_style=False).encode()
        (release / RUN_CONFIG_NAME).write_bytes(payload)
        return payload
