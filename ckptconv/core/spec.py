"""The one description of a model that every other module reads.

Each family's normalizer (``ckptconv/families/<family>.py``) turns the HF ``config.json`` -- nested
(``text_config`` / ``vision_config``) or flat -- into a :class:`ModelSpec`. Nothing downstream reads
the raw config for language-model fields; that is what lets flat and nested configs share one code
path.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AttentionGeometry:
    """One decoder layer's attention shape: what the QKV transforms and the TP checks need."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int


@dataclass(frozen=True)
class ModelSpec:
    family: str
    """Key of the family registry and name of the mapping table (``mappings/<family>.toml``)."""
    hf_config: dict
    """``config.json`` exactly as read; kept so export and verify can rebuild the HF model."""

    # --- language model (a megatron-core GPTModel) ---
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_word_embeddings: bool
    layer_mlp_kinds: tuple[str, ...]
    """Per layer: ``"dense"`` or ``"moe"``. Uniform layers are stacked in the checkpoint."""

    # --- mixture of experts (empty / zero for dense models) ---
    num_experts: tuple[int, ...] = ()
    """Experts per pool. ERNIE has two pools (text, vision); Step3.7 one."""
    moe_ffn_hidden_size: tuple[int, ...] = ()
    """FFN width of one expert, per pool."""
    moe_router_topk: int = 0
    shared_expert_ffn_hidden_size: int = 0

    # --- multimodal ---
    vision: dict = field(default_factory=dict)
    """The vision config as a dict, with missing fields filled (see ``filled_defaults``)."""
    image_token_id: int | None = None

    # --- what the mapping table and the planner may name (typed: the core reads only these) ---
    ranges: dict[str, int] = field(default_factory=dict)
    """Sizes of the table's extra placeholders, e.g. ``{"vblock": 32}`` for ``{vblock}``."""
    offsets: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Placeholders derived from a range by a fixed offset: ``{"hf_layer": ("mtp", 45)}`` makes
    ``{hf_layer}`` = ``{mtp}`` + 45 (Step3.7's MTP layers are HF decoder layers 45-47)."""
    flags: dict[str, bool] = field(default_factory=dict)
    """Conditions a table row's ``when`` may name besides the spec's own fields
    (``has_shared_experts``, ``projector_bias``)."""
    dims: dict[str, int] = field(default_factory=dict)
    """Named widths a table row's ``shape`` may name besides the spec's own fields
    (ERNIE's per-pool ``text_moe_ffn``: a per-pool tuple cannot be named there)."""
    layer_attention: dict[int, AttentionGeometry] = field(default_factory=dict)
    """Per-layer attention geometry where layers differ (Step3.7's sliding layers have more heads);
    layers not listed use the model-wide fields above."""
    heterogeneous_layers: bool = False
    """Layers differ in more than their MLP kind (attention type, head counts): Megatron keys them
    per layer, never stacked."""

    mtp_num_layers: int = 0
    """Multi-token-prediction layers after the decoder (megatron-core's ``mtp_num_layers``)."""
    rope_scaling: dict | None = None
    """Position-embedding scaling the model applies (not a weight): recorded in the checkpoint's
    ``ckptconv.json``, e.g. ``{"rope_type": "llama3", "factor": 2.0, ..., "layer_types": [...]}``."""

    extra: dict = field(default_factory=dict)
    """Family-private facts read only by the family's own package (its Megatron model and verify
    inputs: ``mrope_section``, token ids, ...). Core modules never read it."""
    filled_defaults: tuple[str, ...] = ()
    """Human-readable notes on fields we filled in; shown in the summary."""

    @property
    def stacked_layers(self) -> bool:
        """megatron-core stacks layers under one key (``decoder.layers.<name>``, layer axis first)
        only when every layer has the same structure; mixed layers are keyed per layer
        (``decoder.layers.<N>.<name>``). See TransformerBlock.sharded_state_dict."""
        return len(set(self.layer_mlp_kinds)) <= 1 and not self.heterogeneous_layers

    def attention(self, layer: int | None) -> AttentionGeometry:
        """The attention geometry of ``layer`` (the model-wide one when ``layer`` is None)."""
        if layer is not None and layer in self.layer_attention:
            return self.layer_attention[layer]
        return AttentionGeometry(self.num_attention_heads, self.num_query_groups, self.head_dim)
