"""Step-3.7-Flash as released: the remote-code config (``perception_encoder`` vision config, 45 decoder
layers + ``num_nextn_predict_layers: 3`` with 48-entry per-layer lists, llama3 ``rope_scaling`` on the
``yarn_only_types``) and the released on-disk names, MTP layers ``model.layers.{45,46,47}.*`` included.

``tests/data/releases/step_3_7_flash/config.json`` is the release's config as public sources state it
(a reconstruction; see its SOURCE.md). The full-size config is checked without weights; the
checkpoint tests use it with depth, experts and widths cut (``cut_release_config``: vocabulary, token
ids, RoPE and its scaling and every per-layer value kept), written with the released names and a
sharded index by ``make_release_step3p7``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckptconv.core.layout import ParallelLayout
from ckptconv.core.mapping import load_table
from ckptconv.core.plan import build_plan
from ckptconv.families import normalize_config

RELEASE_CONFIG = Path(__file__).parent / "data" / "releases" / "step_3_7_flash" / "config.json"
TOLERANCE = 1e-4  # max |logit difference| in fp32

# The 17 tensors of one MTP layer on disk (issue 14; vLLM step3p5_mtp.py loads exactly these).
MTP_HF_SUFFIXES = (
    "enorm.weight", "hnorm.weight", "eh_proj.weight",
    "transformer.shared_head.norm.weight", "transformer.shared_head.output.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.g_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
# Megatron-Bridge's names for them (step35_bridge.py / step37_bridge.py mapping_registry, MTP part, with
# the `language_model.` prefix and megatron-core 0.16.1's `transformer_layer`), transcribed by hand.
MB_MTP_MCORE_SUFFIXES = {
    "enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight",
    "transformer_layer.self_attention.linear_qkv.layer_norm_weight",
    "transformer_layer.self_attention.linear_qkv.weight",
    "transformer_layer.self_attention.q_layernorm.weight",
    "transformer_layer.self_attention.k_layernorm.weight",
    "transformer_layer.self_attention.linear_proj.weight",
    "transformer_layer.mlp.linear_fc1.layer_norm_weight",
    "transformer_layer.mlp.linear_fc1.weight",
    "transformer_layer.mlp.linear_fc2.weight",
}


@pytest.fixture(scope="module")
def released() -> dict:
    return json.loads(RELEASE_CONFIG.read_text())


@pytest.fixture(scope="module")
def release_dir(released, tmp_path_factory) -> Path:
    from ckptconv.families.step3p7.fixtures import cut_release_config, make_release_step3p7

    return make_release_step3p7(cut_release_config(released), tmp_path_factory.mktemp("step37_release") / "hf")


@pytest.fixture(scope="module")
def spec(release_dir):
    return normalize_config(json.loads((release_dir / "config.json").read_text()))


# ---------------------------------------------------------------------------------------------- full-size config
def test_the_released_config_normalizes_with_its_mtp_layers_and_llama3_rope(released):
    """Oracle: the released config's own numbers (45 + 3 layers, sliding MTP layers with 96 heads,
    llama3 only on full-attention layers)."""
    spec = normalize_config(released)
    assert (spec.num_layers, spec.mtp_num_layers, spec.vocab_size) == (45, 3, 128896)
    assert [tuple(vars(spec.attention(layer)).values()) for layer in (0, 1, 45, 46, 47)] == [
        (64, 8, 128), (96, 8, 128), (96, 8, 128), (96, 8, 128), (96, 8, 128)]
    assert spec.rope_scaling == {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 131072,
                                 "low_freq_factor": 1.0, "high_freq_factor": 32.0, "layer_types": ["full_attention"]}
    attention = spec.extra["layer_attention"]
    scaled = [i for i in range(48) if attention[i]["rope_scaling"]]
    assert scaled == list(range(0, 45, 4))  # the full-attention layers; no MTP layer (all sliding)
    assert [attention[i]["window_size"] for i in (45, 46, 47)] == [(511, 0)] * 3
    assert spec.extra["swiglu_limits"][43:] == [7.0, 7.0, None, None, None]
    assert spec.extra["swiglu_limits_shared"][44:] == [16.0, None, None, None]


def test_the_released_mtp_tensors_map_onto_megatron_bridge_names(released):
    """Oracle: issue 14's list of the 17 on-disk MTP tensors and Megatron-Bridge's MTP mapping
    (transcribed by hand). Each MTP layer's own output head has no megatron-core key (MB drops it);
    ckptconv keeps it as ``output_layer.weight`` so export gives it back."""
    spec = normalize_config(released)
    plan = build_plan(spec, load_table("step3p7"), ParallelLayout(tp=8, ep=8))  # a layout the release trains at
    for i in range(3):
        items = [item for item in plan.items if item.indices.get("mtp") == i]
        hf = {name for item in items for name in item.hf_names}
        assert hf == {f"model.layers.{45 + i}.{suffix}" for suffix in MTP_HF_SUFFIXES}
        mcore = {t.key for item in items for t in item.targets}
        prefix = f"language_model.mtp.layers.{i}."
        assert mcore == {prefix + s for s in MB_MTP_MCORE_SUFFIXES | {"output_layer.weight"}}


# ---------------------------------------------------------------------------------------------- real megatron-core
def test_mtp_keys_and_shapes_are_those_megatron_core_builds_for_mtp_num_layers_3(spec):
    """Oracle: a stock megatron-core GPTModel (local spec, q/k norm, attention_output_gate) with
    mtp_num_layers=3 and the MTP layers' widths: every MTP key, global shape and extra-state object
    of our model is one of its, and it has no other (ours adds only the MTP output heads)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ckptconv.families.step3p7.model import build_model
    from ckptconv.megatron import runtime
    from ckptconv.megatron.common import with_te_norm_extra_state
    from ckptconv.megatron.load import sharded_manifest

    runtime.init_parallel(tp=1, device="cpu")
    padded = ParallelLayout().padded_vocab_size(spec.vocab_size)
    mtp = spec.attention(spec.num_layers)
    config = TransformerConfig(
        num_layers=1, hidden_size=spec.hidden_size, num_attention_heads=mtp.num_attention_heads,
        num_query_groups=mtp.num_query_groups, kv_channels=mtp.head_dim, ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False, qk_layernorm=True,
        attention_output_gate=True, mtp_num_layers=3, use_cpu_initialization=True,
    )
    layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True)
    stock = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=padded, max_sequence_length=64,
                     mtp_block_spec=get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False))
    # The local spec's modules, with the `_extra_state` the Transformer Engine spec's norms carry
    # (TENorm: enorm, hnorm, final_layernorm, q/k_layernorm; docs/training.md).
    stock = with_te_norm_extra_state(stock)

    def mtp_entries(manifest, prefix=""):
        return {k[len(prefix):]: (v["kind"], tuple(v["shape"])) for k, v in manifest.items() if k.startswith(prefix + "mtp.")}

    theirs = mtp_entries(sharded_manifest(stock.sharded_state_dict()))
    ours = mtp_entries(sharded_manifest(build_model(spec, padded_vocab_size=padded).sharded_state_dict()),
                       "language_model.")
    heads = {f"mtp.layers.{i}.output_layer.weight" for i in range(3)}
    assert set(ours) - set(theirs) == heads
    assert {k: v for k, v in ours.items() if k not in heads} == theirs
    assert len(theirs) == 3 * 22  # 12 tensors, 5 linear and 5 TE-norm extra-state objects per layer


# ---------------------------------------------------------------------------------------------- converted
@pytest.fixture(scope="module")
def converted(release_dir, tmp_path_factory) -> dict[tuple[int, int], Path]:
    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("step37_release_mcore")
    out = {}
    for tp, ep in ((1, 1), (2, 1), (1, 2)):
        out[(tp, ep)] = root / f"tp{tp}_ep{ep}"
        kwargs = {} if (tp, ep) == (1, 1) else {"tp": tp, "ep": ep}  # TP=1: no flag at all
        convert_hf_to_mcore(str(release_dir), out[(tp, ep)], **kwargs)
    return out


def test_the_release_converts_with_no_flag_recording_rope_scaling_and_mtp(converted, spec):
    """Oracle: the released config's values, read back from the checkpoint's metadata and its keys."""
    from ckptconv.megatron.load import checkpoint_tensor_shapes

    manifest = json.loads((converted[(1, 1)] / "ckptconv.json").read_text())
    assert manifest["rope_scaling"] == spec.rope_scaling
    assert manifest["rope_scaling"]["rope_type"] == "llama3" and manifest["rope_scaling"]["layer_types"] == ["full_attention"]
    assert manifest["mtp_num_layers"] == 3
    shapes = checkpoint_tensor_shapes(converted[(1, 1)] / "release")
    assert shapes["language_model.mtp.layers.2.eh_proj.weight"] == (64, 128)
    # 6 sliding heads in 2 groups, head_dim 16: [q (3*16), gate (3*16), k 16, v 16] per group.
    assert shapes["language_model.mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight"] == (2 * 128, 64)


@pytest.fixture(scope="module")
def loaded(converted):
    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import build_and_load

    runtime.init_parallel(tp=1, device="cpu")
    return build_and_load(converted[(1, 1)])


def test_the_converted_release_loads_strictly_and_verifies_against_transformers(loaded, converted, release_dir):
    """Oracle: transformers' Step3p7ForConditionalGeneration reading the release-shaped directory
    (it ignores the MTP layers, as it does for the release) through ``ckptconv verify``'s runner,
    text-only and with an image; the strict load (every key both ways, MTP included) is ``build_and_load``."""
    from ckptconv.verify.runner import run_verify

    model, loaded_spec = loaded
    assert loaded_spec.mtp_num_layers == 3 and len(model.language_model.mtp.layers) == 3
    report = run_verify(release_dir, converted[(1, 1)], device="cpu")
    assert report.passed, report.as_dict()
    assert {r.name for r in report.results} >= {"text-only"} and len(report.results) == 2


def test_tp2_and_ep2_ranks_load_the_release_strictly_and_match_transformers(converted, release_dir):
    """Oracles: real megatron-core (strict load in two gloo processes), the independent reference
    (each rank's shards equal the source through tests/oracles/hf_reference.py, MTP included) and
    real HF (logits on text and image); tests/helpers/check_loaded_model.py."""
    from conftest import HELPERS, torchrun

    runs = []
    for tp, ep in ((2, 1), (1, 2)):
        runs += [converted[(tp, ep)], release_dir, tp, ep]
    result = torchrun([HELPERS / "check_loaded_model.py", "--logits", *runs], nproc=2, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("shards checked, 0 differ") == 4, result.stdout


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)])
def test_export_gives_back_the_release_bit_for_bit_mtp_included(converted, release_dir, tmp_path, layout):
    """Oracle: the source files themselves (self-consistency of import + export, compared bytewise)."""
    from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

    convert_mcore_to_hf(converted[layout], tmp_path / "hf")
    source = json.loads((release_dir / "model.safetensors.index.json").read_text())["weight_map"]
    exported = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert exported == source
    assert sum(".transformer.shared_head.output." in name for name in exported) == 3
    for file in sorted(set(source.values())):
        assert (tmp_path / "hf" / file).read_bytes() == (release_dir / file).read_bytes(), file


def test_rotary_tables_agree_with_transformers_beyond_original_max_position_embeddings(loaded, release_dir):
    """Oracle: transformers' Step3p7RotaryEmbedding (llama3 on full_attention, plain on sliding) at
    positions past original_max_position_embeddings (131072) up to max_position_embeddings; the
    Megatron side is the loaded model's own per-layer rotary embedding."""
    from transformers import Step3p7Config
    from transformers.models.step3p7.modeling_step3p7 import Step3p7RotaryEmbedding

    model, spec = loaded
    text = Step3p7Config.from_dict(json.loads((release_dir / "config.json").read_text())).text_config
    hf = Step3p7RotaryEmbedding(config=text)
    positions = [0, 4095, 131071, 131072, 131073, 200003, 262143]
    layers = model.language_model.decoder.layers
    checked = set()
    for layer, layer_type in enumerate(text.layer_types):
        if layer_type in checked:
            continue
        checked.add(layer_type)
        cos, sin = hf(torch.zeros(1, 1, 1), torch.tensor([positions]), layer_type)
        rotary = layers[layer].self_attention.layer_rotary_emb
        emb = torch.cat([rotary(1, offset=p) for p in positions])[:, 0, 0, :]  # [positions, rotary dim]
        assert torch.equal(emb.cos(), cos[0]) and torch.equal(emb.sin(), sin[0]), layer_type
        if layer_type == "full_attention":  # the scaling is really applied (unscaled tables differ)
            plain = 1.0 / (spec.extra["layer_attention"][layer]["rope_theta"] ** (
                torch.arange(0, emb.shape[-1], 2, dtype=torch.float32) / emb.shape[-1]))
            assert not torch.equal(rotary.inv_freq, plain)
    assert checked == {"full_attention", "sliding_attention"}


def test_an_mtp_layer_computes_what_vllm_computes_from_the_released_tensors(loaded, release_dir):
    """Oracle: vLLM's Step3p5MTP layer (step3p5_mtp.py: ``eh_proj(cat(enorm(embed(token i+1)),
    hnorm(h_i)))``, the MTP decoder layer, ``shared_head.norm``) re-stated with transformers' own
    Step3p7 decoder layer and (1 + w) RMSNorm modules, loaded with MTP layer 0's released tensors;
    12 positions, past the sliding window of 8. The Megatron side is megatron-core's
    MultiTokenPredictionLayer of the loaded checkpoint."""
    from safetensors import safe_open
    from transformers import Step3p7ForConditionalGeneration

    from ckptconv.megatron.common import causal_mask

    model, spec = loaded
    hf = Step3p7ForConditionalGeneration.from_pretrained(str(release_dir), dtype=torch.float32).eval()
    text = hf.model.language_model
    files = json.loads((release_dir / "model.safetensors.index.json").read_text())["weight_map"]

    def released(suffix):
        name = f"model.layers.{spec.num_layers}.{suffix}"
        with safe_open(str(release_dir / files[name]), "pt") as f:
            return f.get_tensor(name).float()

    assert text.config.layer_types[1] == spec.extra["layer_attention"][spec.num_layers]["type"] == "sliding_attention"
    layer = type(text.layers[1])(text.config, 1).eval()  # a dense sliding layer, like the MTP layer
    layer.load_state_dict({name: released(name) for name in layer.state_dict()}, strict=True)
    layer.self_attn.config._attn_implementation = "eager"  # takes the additive mask below
    norms = {}
    for name, suffix in (("enorm", "enorm.weight"), ("hnorm", "hnorm.weight"), ("final", "transformer.shared_head.norm.weight")):
        norms[name] = type(text.norm)(spec.hidden_size, eps=spec.norm_eps)
        norms[name].weight.data = released(suffix)

    seq = 12
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, seq), generator=generator)
    hidden = torch.randn(1, seq, spec.hidden_size, generator=generator)
    positions = torch.arange(seq)[None]
    window = spec.extra["layer_attention"][spec.num_layers]["window_size"][0] + 1
    q, k = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    mask = torch.where((k <= q) & (q - k < window), 0.0, float("-inf"))[None, None]
    with torch.no_grad():
        def reference(embedding_first: bool):
            parts = [norms["enorm"](text.embed_tokens(torch.roll(ids, -1, dims=1))), norms["hnorm"](hidden)]
            x = torch.nn.functional.linear(torch.cat(parts if embedding_first else parts[::-1], -1), released("eh_proj.weight"))
            y = layer(x, attention_mask=mask, position_embeddings=text.rotary_emb(x, positions, "sliding_attention"),
                      position_ids=positions)
            return norms["final"](y[0] if isinstance(y, tuple) else y)[0]

        got = model.language_model.mtp.layers[0](
            input_ids=ids, position_ids=positions, hidden_states=hidden.transpose(0, 1).contiguous(),
            attention_mask=causal_mask(seq, None, ids.device), embedding=model.language_model.embedding)
        got = (got[0] if isinstance(got, tuple) else got)[:, 0]
        expected = reference(embedding_first=True)
        # The last position has no next token (megatron-core rolls in a zero id): compared up to it.
        assert (expected[:-1] - got[:-1]).abs().max().item() <= TOLERANCE
        assert (reference(embedding_first=False)[:-1] - got[:-1]).abs().max().item() > 100 * TOLERANCE
