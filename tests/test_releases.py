"""Checkpoints shaped like the vendors' releases convert with no flag, export bit-exact, load strictly
into real megatron-core models and verify.

Each fixture is the released ``config.json`` (``tests/data/releases/<release>/``, with its source in
``SOURCE.md``) with only the fields in :data:`SHAPES` cut (depth, experts, widths; the vocabulary
where the test does not run the model), written under the released on-disk tensor names: the
ERNIE "Thinking" layout keeps the vision tower at the top level (``vision_model.*``); some tied
ERNIE conversions also store ``lm_head.weight``. Everything else -- key spellings (``rope_scaling``
with ``type``/``rope_type: mrope``, ``moe_layer_end_index: [29, 28]``, ``im_patch_id``), tie flags,
token ids, ``model_type: ernie4_5_moe_vl`` -- is the release's.

Qwen2.5-VL-32B / -72B have no released file in the stored corpora: their fixtures are the 7B release
file with the 32B / 72B head ratios (40/8, 64/8 in the model cards, kept as 10/2 and 16/2).
The ERNIE files are reconstructed from public sources (see their SOURCE.md), not verbatim copies.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import read_safetensors_dir, torchrun
from ckptconv.errors import ConversionError
from ckptconv.fixtures import make_release_shaped
from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore
from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

RELEASES = Path(__file__).parent / "data" / "releases"
HELPERS = Path(__file__).parent / "helpers"

# ERNIE's special tokens as its tokenizer files declare them (the ids Megatron-Bridge's ERNIE bridge
# defaults to); the flat config names only im_patch_id.
_ERNIE_TOKENIZER_CONFIG = json.dumps({
    "tokenizer_class": "Ernie4_5_Tokenizer",
    "added_tokens_decoder": {
        str(i): {"content": s, "special": True} for s, i in (
            ("<|IMAGE_PLACEHOLDER|>", 100295), ("<|IMAGE_START|>", 101304), ("<|IMAGE_END|>", 101305),
            ("<|VIDEO_START|>", 101306), ("<|VIDEO_END|>", 101307), ("<|VIDEO_PLACEHOLDER|>", 103367),
        )
    },
}, indent=2)

_QWEN_TINY = dict(num_hidden_layers=2, intermediate_size=96, num_key_value_heads=2)
_QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])
_ERNIE_VISION = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2)

# release dir, the fields cut (vision_config merged), the release's spellings, extra files
SHAPES = {
    "Qwen2.5-VL-3B-Instruct": dict(
        release="qwen2_5_vl_3b_instruct",
        cut=dict(_QWEN_TINY, hidden_size=64, num_attention_heads=4, vision_config=dict(_QWEN_VISION, out_hidden_size=64)),
    ),
    "Qwen2.5-VL-7B-Instruct": dict(  # 28/4 heads kept as 14/2
        release="qwen2_5_vl_7b_instruct", vocab=512,
        cut=dict(_QWEN_TINY, hidden_size=224, num_attention_heads=14, vision_config=dict(_QWEN_VISION, out_hidden_size=224)),
    ),
    "Qwen2.5-VL-32B-Instruct": dict(  # 40/8 heads kept as 10/2
        release="qwen2_5_vl_7b_instruct", vocab=512,
        cut=dict(_QWEN_TINY, hidden_size=160, num_attention_heads=10, vision_config=dict(_QWEN_VISION, out_hidden_size=160)),
    ),
    "Qwen2.5-VL-72B-Instruct": dict(  # 64/8 heads kept as 16/2
        release="qwen2_5_vl_7b_instruct", vocab=512,
        cut=dict(_QWEN_TINY, hidden_size=256, num_attention_heads=16, vision_config=dict(_QWEN_VISION, out_hidden_size=256)),
    ),
    "ERNIE-4.5-VL-28B-A3B-Thinking": dict(
        release="ernie_4_5_vl_28b_a3b_thinking",
        cut=dict(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 freq_allocation=2, moe_num_experts=[4, 4], moe_intermediate_size=[48, 32], moe_k=2,
                 pixel_hidden_size=32, vision_config=_ERNIE_VISION),
        spellings={"model.vision_model.": "vision_model."},
        files={"tokenizer_config.json": _ERNIE_TOKENIZER_CONFIG},
    ),
    "ERNIE-4.5-VL-424B-A47B": dict(  # 64/8 heads kept as 16/2; dense layers 0-2 as released
        release="ernie_4_5_vl_424b_a47b", vocab=512,
        cut=dict(num_hidden_layers=5, hidden_size=128, intermediate_size=192, num_attention_heads=16, num_key_value_heads=2,
                 freq_allocation=2, moe_num_experts=[4, 4], moe_intermediate_size=[64, 32], moe_k=2,
                 pixel_hidden_size=32, vision_config=_ERNIE_VISION),
        spellings={"model.vision_model.": "vision_model."},
    ),
}


def _slug(name: str) -> str:
    return re.sub(r"\W", "_", name)


def released_config(release: str) -> dict:
    return json.loads((RELEASES / release / "config.json").read_text())


def cut_config(name: str) -> dict:
    """The released config with the shape's fields cut; Qwen's mrope_section follows the head size
    (it sums to head_dim / 2: [16, 24, 24] / 8 for head_dim 16)."""
    shape = SHAPES[name]
    config = copy.deepcopy(released_config(shape["release"]))
    cut = copy.deepcopy(shape["cut"])
    config["vision_config"].update(cut.pop("vision_config", {}))
    config.update(cut)
    if "vocab" in shape:
        config["vocab_size"] = shape["vocab"]
    if "rope_scaling" in config:  # Qwen: keep the release's spelling (type / rope_type), scale the section
        config["rope_scaling"]["mrope_section"] = [s // 8 for s in config["rope_scaling"]["mrope_section"]]
    return config


@pytest.fixture(scope="module")
def release_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    return {
        name: make_release_shaped(
            cut_config(name), root / _slug(name), spellings=shape.get("spellings"),
            extra_files=shape.get("files"), seed=i,
        )
        for i, (name, shape) in enumerate(SHAPES.items())
    }


@pytest.fixture(scope="module")
def converted(release_dirs, tmp_path_factory) -> dict[str, Path]:
    """Every release shape converted with no flag (TP=1, the dtype of the source)."""
    root = tmp_path_factory.mktemp("converted")
    return {name: _convert(src, root / _slug(name)) for name, src in release_dirs.items()}


def _convert(src: Path, out: Path, **layout) -> Path:
    convert_hf_to_mcore(str(src), out, **layout)
    return out


# =========================================================================== the fixtures are the releases


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_fixture_config_is_the_release_with_only_the_cut_fields_changed(release_dirs, name):
    """Oracle: the released config.json. Only the fields SHAPES cuts (and Qwen's mrope_section, which
    follows the head size) differ; every other key and value is the release's."""
    shape = SHAPES[name]
    release, written = released_config(shape["release"]), json.loads((release_dirs[name] / "config.json").read_text())
    changed = {k for k in release if release[k] != written.get(k)} | (set(written) - set(release))
    allowed = set(shape["cut"]) | {"vocab_size", "rope_scaling"}
    assert changed <= allowed, changed - allowed
    vision_changed = {k for k in written["vision_config"] if written["vision_config"][k] != release["vision_config"].get(k)}
    assert vision_changed <= set(shape["cut"].get("vision_config", {}))


def test_qwen_fixture_tensor_names_are_the_released_index_names(release_dirs):
    """Oracle: the released model.safetensors.index.json of Qwen2.5-VL-3B-Instruct (names as patterns,
    tests/data/releases/qwen2_5_vl_3b_instruct/tensor_names.json)."""
    patterns = json.loads((RELEASES / "qwen2_5_vl_3b_instruct" / "tensor_names.json").read_text())
    config = cut_config("Qwen2.5-VL-3B-Instruct")
    expected = set(patterns["other"])
    expected |= {p.replace("{N}", str(i)) for p in patterns["per_layer"] for i in range(config["num_hidden_layers"])}
    expected |= {p.replace("{N}", str(i)) for p in patterns["per_vision_block"] for i in range(config["vision_config"]["depth"])}
    index = json.loads((release_dirs["Qwen2.5-VL-3B-Instruct"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == expected


def test_ernie_thinking_fixture_keeps_the_vision_tower_at_the_top_level(release_dirs):
    """Oracle: hand value (the released layout, as Megatron-Bridge's ERNIE bridge and vLLM read it)."""
    names = set(json.loads((release_dirs["ERNIE-4.5-VL-28B-A3B-Thinking"] / "model.safetensors.index.json").read_text())["weight_map"])
    assert "vision_model.blocks.0.attn.qkv.weight" in names and "vision_model.patch_embed.proj.weight" in names
    assert not any(n.startswith("model.vision_model.") for n in names)
    assert "model.resampler_model.spatial_linear.0.weight" in names


# =========================================================================== convert, export


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_converts_with_no_flag_and_exports_bit_exact_under_the_released_names(release_dirs, converted, tmp_path, name):
    """Oracle: the source files (self-consistency of the inverse). HF -> torch_dist with no option,
    back to HF: the same tensor names (the release's spellings), bits, dtypes and config.json."""
    src = release_dirs[name]
    convert_mcore_to_hf(str(converted[name]), tmp_path / "back")
    before, after = read_safetensors_dir(src), read_safetensors_dir(tmp_path / "back")
    assert sorted(after) == sorted(before)
    assert [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])] == []
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_ernie_thinking_source_layout_is_recorded_for_export(converted):
    """Oracle: hand value. ckptconv.json says where the source kept its vision tower."""
    manifest = json.loads((converted["ERNIE-4.5-VL-28B-A3B-Thinking"] / "ckptconv.json").read_text())
    assert manifest["source_layout"]["hf_prefixes"] == {"model.vision_model.": "vision_model."}
    assert manifest["source_layout"]["flags"] == {"tied_lm_head_on_disk": False}


def test_a_tied_lm_head_copy_round_trips_and_a_differing_one_is_refused(release_dirs, tmp_path):
    """Oracle: the source files. A tied checkpoint that also stores lm_head.weight (equal to the
    embedding) converts, and the export writes lm_head.weight back; one bit of difference is refused."""
    from safetensors.torch import load_file, save_file

    name = "ERNIE-4.5-VL-28B-A3B-Thinking"
    src = make_release_shaped(cut_config(name), tmp_path / "with_head", spellings=SHAPES[name]["spellings"],
                              extra_files=SHAPES[name]["files"], tied_lm_head_copy=True, shards=1)
    convert_hf_to_mcore(str(src), tmp_path / "mcore")
    convert_mcore_to_hf(str(tmp_path / "mcore"), tmp_path / "back")
    before, after = read_safetensors_dir(src), read_safetensors_dir(tmp_path / "back")
    assert "lm_head.weight" in after and sorted(after) == sorted(before)
    assert all(torch.equal(before[k], after[k]) for k in before)

    (shard,) = src.glob("*.safetensors")
    tensors = load_file(str(shard))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()
    tensors["lm_head.weight"][7, 3] += 1.0
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="differs from the embedding although tie_word_embeddings"):
        convert_hf_to_mcore(str(src), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


# =========================================================================== real megatron-core, TP=2 and EP=2


# (shape, tp, ep): TP=2 where the head grouping is the release's point (GQA 5:1 and 8:1, untied heads;
# ERNIE's dual-pool layers), EP=2 for both ERNIE shapes (each pool's experts split over two ranks).
PARALLEL_CHECKS = [
    ("Qwen2.5-VL-32B-Instruct", 2, 1),
    ("Qwen2.5-VL-72B-Instruct", 2, 1),
    ("ERNIE-4.5-VL-28B-A3B-Thinking", 2, 1),
    ("ERNIE-4.5-VL-28B-A3B-Thinking", 1, 2),
    ("ERNIE-4.5-VL-424B-A47B", 1, 2),
]


def test_tp2_and_ep2_checkpoints_load_strictly_into_megatron_core(release_dirs, tmp_path):
    """Oracles: real megatron-core (dist_checkpointing.load, strict) in two gloo processes; every
    parameter shard equals the source put through the independent reference
    (tests/oracles/hf_reference.py; converted at that TP / EP, as a user would)."""
    jobs = []
    for name, tp, ep in PARALLEL_CHECKS:
        out = _convert(release_dirs[name], tmp_path / f"{_slug(name)}_tp{tp}_ep{ep}", tp=tp, ep=ep)
        jobs += [out, release_dirs[name], tp, ep]
    result = torchrun([HELPERS / "check_loaded_model.py", *jobs], nproc=2, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(re.findall(r"shards checked, 0 differ", result.stdout)) == 2 * (len(jobs) // 4)


# =========================================================================== verify


@pytest.mark.parametrize("name", ["Qwen2.5-VL-3B-Instruct", "ERNIE-4.5-VL-28B-A3B-Thinking"])
def test_verify_passes_on_the_release_shape(release_dirs, converted, name):
    """Oracle: real HF transformers (the reference model from the release-shaped directory, read under
    its released names). Text-only and image inputs; the release's own token ids (151655 / 100295,
    ERNIE's start/end ids from the tokenizer files)."""
    from ckptconv.verify.runner import run_verify

    report = run_verify(release_dirs[name], converted[name])
    assert report.passed, report.as_dict()
    assert {r.name for r in report.results} >= {"text-only"} and len(report.results) == 2


# =========================================================================== the command line, and training checkpoints


def test_the_cli_converts_the_thinking_release_with_no_flag_and_refuses_a_differing_lm_head_in_one_line(release_dirs, tmp_path):
    """Oracle: hand value (exit codes and the message). `ckptconv hf-to-mcore SRC OUT`, nothing else;
    a tied lm_head.weight that differs from the embedding: exit 2, one line, no output directory."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from ckptconv.cli import app

    name = "ERNIE-4.5-VL-28B-A3B-Thinking"
    result = CliRunner().invoke(app, ["hf-to-mcore", str(release_dirs[name]), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "vision_model" in result.output  # the summary says the source's spelling is kept

    src = make_release_shaped(cut_config(name), tmp_path / "bad_head", spellings=SHAPES[name]["spellings"],
                              tied_lm_head_copy=True, shards=1)
    (shard,) = src.glob("*.safetensors")
    tensors = load_file(str(shard))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 2
    save_file(tensors, str(shard), metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["hf-to-mcore", str(src), str(tmp_path / "refused")])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "differs from the embedding" in lines[0], result.output
    assert not (tmp_path / "refused").exists()


def test_a_checkpoint_without_ckptconv_json_exports_under_the_hf_config_models_names(release_dirs, converted, tmp_path):
    """Oracle: the source files. A training run's checkpoint has only release/ (no ckptconv.json, no
    config.json): `mcore-to-hf --hf-config <release dir>` reads the spellings off that model's own
    files and writes `vision_model.*` again. With no record of the source dtypes the export takes the
    config's (`torch_dtype: bfloat16` in the release), so values are the source's rounded to bf16."""
    name = "ERNIE-4.5-VL-28B-A3B-Thinking"
    shutil.copytree(converted[name] / "release", tmp_path / "training" / "release")
    convert_mcore_to_hf(str(tmp_path / "training" / "release"), tmp_path / "back", hf_config=str(release_dirs[name]))
    before, after = read_safetensors_dir(release_dirs[name]), read_safetensors_dir(tmp_path / "back")
    assert sorted(after) == sorted(before)
    assert [k for k in before if not torch.equal(before[k].to(torch.bfloat16), after[k])] == []


def test_a_source_with_both_spellings_of_the_vision_prefix_is_refused():
    """Oracle: hand value. One model uses one spelling; a mix would read some tensors twice or never."""
    from ckptconv.core.mapping import load_table
    from ckptconv.core.source_layout import detect_source_layout
    from ckptconv.families import normalize_config

    spec = normalize_config(cut_config("ERNIE-4.5-VL-28B-A3B-Thinking"))
    table = load_table(spec.family)
    layout = detect_source_layout(table, spec, ["vision_model.ln.weight", "model.embed_tokens.weight"])
    assert layout.prefixes == {"model.vision_model.": "vision_model."}
    with pytest.raises(ConversionError, match="both 'model.vision_model.' and 'vision_model.'"):
        detect_source_layout(table, spec, ["vision_model.ln.weight", "model.vision_model.ln.bias"])
