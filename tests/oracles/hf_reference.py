"""An independent oracle: the Megatron checkpoint tensors each family's HF checkpoint should become,
written by hand in plain torch from the HF on-disk names and the layouts megatron-core documents.

Nothing here imports ckptconv (no mapping table, no transform, no spec): a bug in the converter's
tables or transforms cannot hide in its own expectation. Each function takes the HF tensors (on-disk
names) and returns ``{megatron key: global tensor}`` with the vocabulary *unpadded*; the caller pads
to the checkpoint's padded size (the padding rows must be zero). Layer-stacked keys (Qwen) carry the
layer axis first, expert keys the expert axis first, as in ``sharded_state_dict()``.

Layouts (megatron-core 0.16.1, ``/work/shared/notes/megatron-core-facts.md``):
- ``linear_qkv`` rows per query group g: ``[q heads of g, (Step3.7: the gate rows of those heads,
  each head's g_proj row head_dim times: Megatron-Bridge's merge_qkvg_weights), k_g, v_g]``;
- ``linear_fc1`` = cat(gate, up) along rows; input norm -> ``linear_qkv.layer_norm_weight``,
  pre-MLP norm of a dense layer -> ``linear_fc1.layer_norm_weight``, of a MoE layer -> ``pre_mlp_layernorm``;
- routers ``[E, H]`` (ERNIE stores them transposed), ERNIE's ``[2, E]`` score-correction bias row 0 ->
  text pool, row 1 -> vision pool, HF experts ``0..E-1`` text, ``E..2E-1`` vision.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

LM = "language_model."


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                    gate: torch.Tensor | None = None) -> torch.Tensor:
    """Rows per query group: [q_g, gate_g, k_g, v_g]; head counts read off the shapes."""
    groups = k.shape[0] // head_dim
    per_group = [q.reshape(groups, -1, *q.shape[1:])]
    if gate is not None:
        per_group.append(gate.reshape(groups, -1, *gate.shape[1:]))
    per_group += [k.reshape(groups, head_dim, *k.shape[1:]), v.reshape(groups, head_dim, *v.shape[1:])]
    return torch.cat(per_group, dim=1).reshape(-1, *q.shape[1:])


def _layers(hf: dict, prefix: str = "model.layers.") -> list[int]:
    return sorted({int(m.group(1)) for name in hf if (m := re.match(re.escape(prefix) + r"(\d+)\.", name))})


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


# --------------------------------------------------------------------------------------- Qwen2.5-VL
def qwen2_5_vl(hf: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Uniform layers: stacked keys ``decoder.layers.*`` with the layer axis first; vision tower and
    merger keep their HF names (``visual.*``)."""
    text = _text_config(config)
    d = text["hidden_size"] // text["num_attention_heads"]
    layers = _layers(hf)

    def stack(fn):
        return torch.stack([fn(f"model.layers.{i}.") for i in layers])

    out = {
        LM + "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        LM + "decoder.final_layernorm.weight": hf["model.norm.weight"],
        LM + "decoder.layers.self_attention.linear_qkv.layer_norm_weight": stack(lambda p: hf[p + "input_layernorm.weight"]),
        LM + "decoder.layers.self_attention.linear_proj.weight": stack(lambda p: hf[p + "self_attn.o_proj.weight"]),
        LM + "decoder.layers.mlp.linear_fc1.layer_norm_weight": stack(lambda p: hf[p + "post_attention_layernorm.weight"]),
        LM + "decoder.layers.mlp.linear_fc1.weight": stack(lambda p: torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])),
        LM + "decoder.layers.mlp.linear_fc2.weight": stack(lambda p: hf[p + "mlp.down_proj.weight"]),
    }
    for kind in ("weight", "bias"):
        out[LM + f"decoder.layers.self_attention.linear_qkv.{kind}"] = stack(
            lambda p: _interleave_qkv(*(hf[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"), head_dim=d))
    if "lm_head.weight" in hf:
        out[LM + "output_layer.weight"] = hf["lm_head.weight"]
    out.update({name: t for name, t in hf.items() if name.startswith("visual.")})
    return out


# --------------------------------------------------------------------------------------- ERNIE-4.5-VL
_RESAMPLER_LINEAR = {"0": "fc1", "2": "fc2", "3": "ln"}  # nn.Sequential(Linear, GELU, Linear, LayerNorm)


def ernie4_5_vl_moe(hf: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Per-layer keys (dense and MoE layers mix). A MoE block holds ``text_moe_layer``,
    ``vision_moe_layer`` (router + experts with an expert axis) and ``shared_experts``; the vision
    tower is ``vision_tower.*``, the resampler ``resampler_model.*`` (Megatron-Bridge names)."""
    text = _text_config(config)
    d = text["hidden_size"] // text["num_attention_heads"]
    out = {
        LM + "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        LM + "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if "lm_head.weight" in hf:
        out[LM + "output_layer.weight"] = hf["lm_head.weight"]
    for i in _layers(hf):
        p, m = f"model.layers.{i}.", f"{LM}decoder.layers.{i}."
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _interleave_qkv(*(hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), head_dim=d)
        out[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        if p + "mlp.gate.weight" not in hf:  # dense
            out[m + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
            out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
            out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
            continue
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        n_text = hf[p + "mlp.gate.weight"].shape[1]
        bias = hf[p + "mlp.moe_statics.e_score_correction_bias"]
        for pool, gate_name, first in (("text", "mlp.gate.weight", 0), ("vision", "mlp.gate.weight_1", n_text)):
            n = hf[p + gate_name].shape[1]
            q = f"{m}mlp.{pool}_moe_layer."
            out[q + "router.weight"] = hf[p + gate_name].t()
            out[q + "router.expert_bias"] = bias[0 if pool == "text" else 1]
            experts = [f"{p}mlp.experts.{first + e}." for e in range(n)]
            out[q + "experts.experts.linear_fc1.weight"] = torch.stack(
                [torch.cat([hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"]]) for x in experts])
            out[q + "experts.experts.linear_fc2.weight"] = torch.stack([hf[x + "down_proj.weight"] for x in experts])
        if p + "mlp.shared_experts.gate_proj.weight" in hf:
            out[m + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                [hf[p + "mlp.shared_experts.gate_proj.weight"], hf[p + "mlp.shared_experts.up_proj.weight"]])
            out[m + "mlp.shared_experts.linear_fc2.weight"] = hf[p + "mlp.shared_experts.down_proj.weight"]
    for name, t in hf.items():
        for vision_prefix in ("model.vision_model.", "vision_model."):  # nested / released flat layout
            if name.startswith(vision_prefix):
                out["vision_tower." + name[len(vision_prefix):]] = t
        if name.startswith("model.resampler_model."):
            rest = name[len("model.resampler_model."):]
            if m := re.match(r"(spatial_linear|temporal_linear)\.(\d+)\.(weight|bias)$", rest):
                rest = f"{m.group(1)}.{_RESAMPLER_LINEAR[m.group(2)]}.{m.group(3)}"
            out["resampler_model." + rest] = t
    return out


# --------------------------------------------------------------------------------------- Step3.7
def _step_attention(hf: dict, p: str, m: str, d: int, out: dict) -> None:
    """Attention of one Step3.7 layer. ``linear_qkv`` is Megatron-Bridge's ``merge_qkvg_weights``
    layout for megatron-core's element-wise ``attention_output_gate``: per query group
    ``[q_g, gate_g, k_g, v_g]`` with each head's single ``g_proj`` row repeated head_dim times."""
    gate = hf[p + "self_attn.g_proj.weight"].repeat_interleave(d, dim=0)  # [heads * d, H]
    out[m + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
    out[m + "self_attention.linear_qkv.weight"] = _interleave_qkv(
        *(hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), head_dim=d, gate=gate)
    out[m + "self_attention.q_layernorm.weight"] = hf[p + "self_attn.q_norm.weight"]
    out[m + "self_attention.k_layernorm.weight"] = hf[p + "self_attn.k_norm.weight"]
    out[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]


def _dense_mlp(hf: dict, p: str, m: str, out: dict) -> None:
    out[m + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
    out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]


def step3p7(hf: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Per-layer keys (per-layer head counts); q/k norms are ``q_layernorm`` / ``k_layernorm``;
    experts are stacked by HF already (``moe.{gate,up,down}_proj.weight`` [E, ...]); norms are stored
    as they are (the model applies the ``1 + w``); the vision tower keeps its HF names and the
    projector becomes ``image_insert_embedding.align_projector``. HF layers past
    ``num_hidden_layers`` are the multi-token-prediction layers: ``language_model.mtp.layers.i``."""
    text = _text_config(config)
    d = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    n_layers = text["num_hidden_layers"]
    out = {
        LM + "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        LM + "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if "lm_head.weight" in hf:
        out[LM + "output_layer.weight"] = hf["lm_head.weight"]
    for i in _layers(hf):
        p = f"model.layers.{i}."
        if i >= n_layers:  # an MTP layer: a dense transformer layer plus its input norms, projection and head
            m = f"{LM}mtp.layers.{i - n_layers}."
            out[m + "enorm.weight"] = hf[p + "enorm.weight"]
            out[m + "hnorm.weight"] = hf[p + "hnorm.weight"]
            out[m + "eh_proj.weight"] = hf[p + "eh_proj.weight"]
            out[m + "final_layernorm.weight"] = hf[p + "transformer.shared_head.norm.weight"]
            out[m + "output_layer.weight"] = hf[p + "transformer.shared_head.output.weight"]
            _step_attention(hf, p, m + "transformer_layer.", d, out)
            _dense_mlp(hf, p, m + "transformer_layer.", out)
            continue
        m = f"{LM}decoder.layers.{i}."
        _step_attention(hf, p, m, d, out)
        if p + "moe.gate.weight" not in hf:
            _dense_mlp(hf, p, m, out)
            continue
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[m + "mlp.router.weight"] = hf[p + "moe.gate.weight"]
        out[m + "mlp.router.expert_bias"] = hf[p + "moe.router_bias"]
        out[m + "mlp.experts.experts.linear_fc1.weight"] = torch.cat([hf[p + "moe.gate_proj.weight"], hf[p + "moe.up_proj.weight"]], dim=1)
        out[m + "mlp.experts.experts.linear_fc2.weight"] = hf[p + "moe.down_proj.weight"]
        out[m + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
            [hf[p + "share_expert.gate_proj.weight"], hf[p + "share_expert.up_proj.weight"]])
        out[m + "mlp.shared_experts.linear_fc2.weight"] = hf[p + "share_expert.down_proj.weight"]
    out.update({name: t for name, t in hf.items() if name.startswith("vision_model.")})
    for kind in ("weight", "bias"):
        if f"vit_large_projector.{kind}" in hf:
            out[f"image_insert_embedding.align_projector.{kind}"] = hf[f"vit_large_projector.{kind}"]
    return out


REFERENCES = {"qwen2_5_vl": qwen2_5_vl, "ernie4_5_vl_moe": ernie4_5_vl_moe, "step3p7": step3p7}
"""Family name -> its reference. The conformance suite requires one for every registered family."""


def read_hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def reference_tensors(hf_dir, family: str) -> dict[str, torch.Tensor]:
    """``{megatron key: global tensor}`` (vocab unpadded) for the HF checkpoint in ``hf_dir``."""
    if family not in REFERENCES:
        raise KeyError(f"no independent reference for family {family!r} in tests/oracles/hf_reference.py")
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    return REFERENCES[family](read_hf_tensors(hf_dir), config)
