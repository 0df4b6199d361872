"""The ``mimo`` key layout: checkpoints for megatron-core's own multimodal model, ``MimoModel``.

For every family, a tiny random checkpoint converted with ``--layout mimo``:

* has exactly the keys a real megatron-core 0.16.1 ``MimoModel`` built for the family asks for
  (oracle: the model's own ``sharded_state_dict()``, live and as the golden dump in tests/data);
* loads strictly into that ``MimoModel`` at TP=1 and TP=2 and gives transformers' logits on a text and
  an image input (oracles: real megatron-core loading, real transformers forward);
* exports back to the source safetensors bit for bit, also when the checkpoint was written by
  megatron-core's own ``dist_checkpointing.save`` from a TP=2 ``MimoModel`` (oracle: the source bytes).

Wrong checkpoints still fail verify, and the two layouts never load into each other's model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ckptconv.errors import ConversionError
from ckptconv.formats.torch_dist import DistCheckpointReader
from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore
from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_5_vl", "ernie4_5_vl_moe", "step3p7")
ENCODERS = {"qwen2_5_vl": "qwen_vit", "ernie4_5_vl_moe": "ernie_vit", "step3p7": "step_vit"}
FP32_MAX_ABS = 1e-4  # verify's fp32 tolerance; measured 2e-7 .. 4e-7


def golden_keys(family: str) -> dict:
    return json.loads((REPO / "tests" / "data" / f"{family}_mimo_tiny_keys.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family: the HF source, and its conversion with --layout mimo at TP=1 and at TP=2."""
    from ckptconv.fixtures import make_tiny

    root = tmp_path_factory.mktemp("mimo")
    out = {}
    for family in FAMILIES:
        hf = make_tiny(family, root / family / "hf")
        for tp in (1, 2):
            convert_hf_to_mcore(str(hf), root / family / f"mimo-tp{tp}", tp=tp, key_layout="mimo")
        out[family] = {"hf": hf, "tp1": root / family / "mimo-tp1", "tp2": root / family / "mimo-tp2", "root": root / family}
    return out


def manifest_of(ckpt: Path) -> dict:
    reader = DistCheckpointReader(ckpt)
    entries = {}
    for key in reader.tensor_keys():
        entries[key] = {"shape": list(reader.shape(key)), "dtype": str(reader.dtype(key)).removeprefix("torch."), "kind": "tensor"}
    for fqn in reader.object_keys():
        key, shard = fqn.split("/shard_")
        entries[key] = {"shape": [int(x) for x in shard.split("_")[1].split(".")], "dtype": None, "kind": "object"}
    return dict(sorted(entries.items()))


def verify(*args, **kwargs):
    from ckptconv.verify.runner import run_verify

    return run_verify(*args, device="cpu", **kwargs)


# --------------------------------------------------------------------------- the key contract


@pytest.mark.parametrize("family", FAMILIES)
def test_mimo_checkpoint_has_exactly_the_keys_of_megatron_cores_mimo_model(tiny, family):
    """Oracle: a real MimoModel's sharded_state_dict() (live at TP=1, and its golden dump)."""
    from ckptconv.families import get_family, normalize_config
    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import sharded_manifest
    from ckptconv.pipeline.source import read_config

    runtime.init_parallel(tp=1, device="cpu")
    spec = normalize_config(read_config(tiny[family]["hf"]))
    model = get_family(family).build_mimo_model(spec, padded_vocab_size=-(-spec.vocab_size // 128) * 128, dtype=torch.float32)
    live = sharded_manifest(model.sharded_state_dict())
    assert live == golden_keys(family)
    assert manifest_of(tiny[family]["tp1"]) == live
    # The language model keeps its names; the vision parts are the images encoder and its projection.
    assert {key.split(".")[0] for key in live} == {"language_model", "modality_submodules"}
    assert {key.split(".")[2] for key in live if key.startswith("modality_submodules.")} == {"encoders", "input_projections"}
    assert any(k.startswith(f"modality_submodules.images.encoders.{ENCODERS[family]}.") for k in live)
    assert json.loads((tiny[family]["tp1"] / "ckptconv.json").read_text())["key_layout"] == "mimo"
    # Megatron-Bridge's run_config.yaml names no Bridge provider for these keys and records the layout.
    import yaml

    run_config = yaml.safe_load((tiny[family]["tp1"] / "release" / "run_config.yaml").read_text())
    assert run_config["ckptconv"]["layout"] == "mimo" and "_target_" not in run_config["model"]


def test_the_layout_is_one_prefix_map_over_the_bridge_table():
    """Oracle: the bridge table itself. Every mimo name is a bridge name with one declared prefix
    replaced; the language model rows are untouched; the HF side is identical."""
    from ckptconv.core.mapping import load_table

    for family in FAMILIES:
        bridge = load_table(family)
        mimo = bridge.with_key_layout("mimo")
        assert [r.hf for r in mimo.rules] == [r.hf for r in bridge.rules]
        for b, m in zip(bridge.rules, mimo.rules):
            for b_name, m_name in zip(b.mcore, m.mcore):
                if b_name.startswith("language_model."):
                    assert m_name == b_name
                else:
                    assert m_name.startswith("modality_submodules.images.") and m_name != b_name
        assert mimo.detect_key_layout([n for r in mimo.rules for n in r.mcore]) == "mimo"
        assert bridge.detect_key_layout([n for r in bridge.rules for n in r.mcore]) == "bridge"


def test_a_layout_prefix_that_renames_nothing_is_refused(tmp_path):
    table = (REPO / "mappings" / "qwen2_5_vl.toml").read_text().replace('"visual.merger." =', '"visual.mergr." =')
    (tmp_path / "qwen2_5_vl.toml").write_text(table)
    from ckptconv.core.mapping import load_table

    with pytest.raises(ConversionError, match="'visual.mergr.' matches no row"):
        load_table("qwen2_5_vl", tmp_path)
    with pytest.raises(ConversionError, match="key layout 'llava' is not defined for qwen2_5_vl; choose one of bridge, mimo"):
        load_table("qwen2_5_vl").with_key_layout("llava")


# --------------------------------------------------------------------------- loading and logits


@pytest.mark.parametrize("family", FAMILIES)
def test_mimo_model_loads_strictly_and_matches_transformers_on_text_and_image(tiny, family):
    """Oracles: megatron-core's strict dist_checkpointing load into a real MimoModel, and
    transformers' forward on the source checkpoint."""
    report = verify(tiny[family]["hf"], tiny[family]["tp1"], megatron_model="mimo")
    assert report.passed, report.as_dict()
    assert report.megatron_model == "mimo"
    by_name = {r.name: r for r in report.results}
    assert set(by_name) == {"text-only", "image:synthetic"}
    assert by_name["image:synthetic"].groups["image"].n_tokens > 0
    assert max(m.max_abs for r in report.results for m in r.groups.values() if m is not None) <= FP32_MAX_ABS


def test_tp2_mimo_model_loads_matches_transformers_and_its_own_save_exports_bit_exact(tiny, tmp_path):
    """One torchrun (2 ranks) for all families. Oracles: megatron-core loading TP=2 shards, transformers'
    logits, and the source tensors (bit for bit) for checkpoints written by megatron-core's own
    dist_checkpointing.save from a TP=2 MimoModel (no ckptconv.json: the layout is read from the keys)."""
    from conftest import HELPERS, torchrun

    args = []
    for family in FAMILIES:
        args += [tiny[family]["hf"], tiny[family]["tp2"], tmp_path / f"{family}-saved"]
    result = torchrun([HELPERS / "mimo_tp2.py", *args], nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["family"] for line in lines] == list(FAMILIES)
    for line in lines:
        assert line["passed"] and line["megatron_model"] == "mimo", line
        assert line["max_abs"] <= FP32_MAX_ABS and line["image_tokens"] > 0, line
    for family in FAMILIES:
        saved = tmp_path / f"{family}-saved"
        assert not (saved / "ckptconv.json").exists()
        summary = convert_mcore_to_hf(saved, tmp_path / f"{family}-hf", hf_config=str(tiny[family]["hf"]))
        assert summary.layout["key_layout"] == "mimo"
        assert_same_tensors(tiny[family]["hf"], tmp_path / f"{family}-hf")


# --------------------------------------------------------------------------- export


def assert_same_tensors(original: Path, exported: Path) -> None:
    """Same names, dtypes and bits (without ckptconv.json the file layout is export's own)."""
    from conftest import read_safetensors_dir

    want, got = read_safetensors_dir(original), read_safetensors_dir(exported)
    assert sorted(want) == sorted(got)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def assert_same_safetensors(original: Path, exported: Path) -> None:
    """Byte-identical safetensors files (ckptconv.json records the source's file layout)."""
    names = sorted(p.name for p in original.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in exported.glob("*.safetensors"))
    for name in names:
        assert (exported / name).read_bytes() == (original / name).read_bytes(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_mimo_checkpoint_exports_back_bit_exact(tiny, family, tmp_path):
    """Oracle: the source safetensors bytes (TP=2 chunks, mimo names)."""
    summary = convert_mcore_to_hf(tiny[family]["tp2"], tmp_path / "hf")
    assert summary.layout["key_layout"] == "mimo"
    assert_same_safetensors(tiny[family]["hf"], tmp_path / "hf")


def test_export_refuses_a_manifest_that_disagrees_with_the_keys(tiny, tmp_path):
    ckpt = shutil.copytree(tiny["qwen2_5_vl"]["tp1"], tmp_path / "mcore")
    manifest = json.loads((ckpt / "ckptconv.json").read_text())
    (ckpt / "ckptconv.json").write_text(json.dumps({**manifest, "key_layout": "bridge"}))
    with pytest.raises(ConversionError, match="ckptconv.json records key layout 'bridge' but the checkpoint keys are 'mimo'"):
        convert_mcore_to_hf(ckpt, tmp_path / "hf")


# --------------------------------------------------------------------------- rejections


def test_a_nudged_projection_fails_only_the_image_input(tiny, tmp_path):
    """Oracle: transformers' logits. The merger's last bias (the MimoModel input projection) moved
    by 0.01 on disk: text tokens never see it, image tokens do."""
    from test_verify import rewrite_chunk

    ckpt = shutil.copytree(tiny["qwen2_5_vl"]["tp1"], tmp_path / "mcore")
    rewrite_chunk(ckpt, "modality_submodules.images.input_projections.0.mlp.2.bias", lambda t: t.add_(0.01))
    report = verify(tiny["qwen2_5_vl"]["hf"], ckpt, megatron_model="mimo")
    by_name = {r.name: r for r in report.results}
    assert by_name["text-only"].passed
    assert not by_name["image:synthetic"].passed
    assert any(f.startswith("image: max_abs") for f in by_name["image:synthetic"].failures)


def test_a_model_never_loads_the_other_layouts_keys(tiny, tmp_path):
    bridge = tmp_path / "bridge"
    convert_hf_to_mcore(str(tiny["step3p7"]["hf"]), bridge)
    with pytest.raises(ConversionError, match="keys are in the 'bridge' layout.*hf-to-mcore --layout mimo"):
        verify(tiny["step3p7"]["hf"], bridge, megatron_model="mimo")
    with pytest.raises(ConversionError, match="keys are in the 'mimo' layout.*--layout bridge"):
        verify(tiny["step3p7"]["hf"], tiny["step3p7"]["tp1"], megatron_model="bridge")


def test_step3p7_image_placeholders_must_follow_im_start():
    """MimoModel places features by <im_patch>; HF Step3.7 inserts them after <im_start>. The two
    agree only when the placeholders are the run right after <im_start>; anything else is refused."""
    from ckptconv.families.step3p7.mimo import check_patches_follow_start

    start, patch = 9, 7
    check_patches_follow_start(torch.tensor([[1, start, patch, patch, 2, 3]]), start, patch, per_image=2)
    for bad in ([1, start, patch, 2, patch, 3], [1, start, patch, patch, patch, 3], [1, 2, 3, 4, start, patch]):
        with pytest.raises(ConversionError):
            check_patches_follow_start(torch.tensor([bad]), start, patch, per_image=2)


def test_a_tensor_parallel_modality_module_is_refused(tiny):
    """megatron-core 0.16.1's MimoModel has no sharded_state_dict of its own: a ColumnParallelLinear
    projection would be saved as one rank's half described as the whole tensor. Oracle: megatron-core's
    own parameter attribute ``tensor_model_parallel`` on that linear."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    from ckptconv.families import normalize_config
    from ckptconv.families.qwen2_5_vl.mimo import ENCODER, QwenVisionEncoder
    from ckptconv.families.qwen2_5_vl.model import hf_config, language_model_kwargs
    from ckptconv.megatron import runtime
    from ckptconv.megatron.mimo import FamilyMimoModel, mimo_model_config
    from ckptconv.pipeline.source import read_config

    runtime.init_parallel(tp=1, device="cpu")
    spec = normalize_config(read_config(tiny["qwen2_5_vl"]["hf"]))
    lm = language_model_kwargs(spec, 384)
    vision = hf_config(spec).vision_config
    config = mimo_model_config(
        language_model=ModuleSpec(module=GPTModel, params=lm),
        encoder_name=ENCODER,
        encoder=ModuleSpec(module=QwenVisionEncoder, params={"config": vision}),
        projection=ModuleSpec(module=ColumnParallelLinear, params=dict(
            input_size=vision.hidden_size, output_size=spec.hidden_size, config=lm["config"],
            init_method=torch.nn.init.zeros_, bias=True, gather_output=True)),
        image_token_id=spec.image_token_id,
    )
    with pytest.raises(ConversionError, match="input_projections.0.weight.*tensor-parallel"):
        FamilyMimoModel(config, spec=spec, dtype=torch.float32)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "step3p7"])
def test_with_labels_the_mimo_model_returns_the_training_loss(tiny, family):
    """What a training step uses: with labels, the per-token loss of GPTModel (through our forward for
    Qwen/ERNIE, through the stock MimoModel.forward for Step3.7). Oracle: torch's cross entropy on the
    same model's logits (the vocab padding rows are zero in the checkpoint but still take part in the
    softmax, as in Megatron training)."""
    from ckptconv.families import get_family
    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import build_and_load, padded_vocab_size
    from ckptconv.verify.inputs import synthetic_image

    runtime.init_parallel(tp=1, device="cpu")
    model, spec = build_and_load(tiny[family]["tp1"], model="mimo")
    (inp,) = get_family(family).verify_inputs(spec, tiny[family]["hf"], prompt="a cat", image=("image", synthetic_image()), text_only=False)
    labels = torch.roll(inp.input_ids, -1, dims=1)
    with torch.no_grad():
        loss = model(**inp.mcore_kwargs, labels=labels)
        logits = model(**inp.mcore_kwargs)
    assert loss.shape == labels.shape and torch.isfinite(loss).all()
    # Over the padded vocabulary: the padding rows are zero, so their logits are exactly 0.
    padded_vocab = padded_vocab_size(tiny[family]["tp1"])
    full = torch.cat([logits, logits.new_zeros(*logits.shape[:-1], padded_vocab - logits.shape[-1])], dim=-1)
    expected = torch.nn.functional.cross_entropy(full.transpose(1, 2), labels, reduction="none")
    assert torch.allclose(loss, expected, atol=1e-5)


def test_layerwise_verify_refuses_the_mimo_model(tiny):
    """The layerwise path streams ckptconv's own model stages; for a MimoModel it would compare
    something else, so it says so instead."""
    with pytest.raises(ConversionError, match="not megatron-core's MimoModel; verify a mimo-layout checkpoint with --whole-model"):
        verify(tiny["qwen2_5_vl"]["hf"], tiny["qwen2_5_vl"]["tp1"], layerwise=True)


def test_language_model_only_does_not_combine_with_the_mimo_layout(tiny, tmp_path):
    with pytest.raises(ConversionError, match="--language-model-only .* --layout mimo does not apply"):
        convert_hf_to_mcore(str(tiny["qwen2_5_vl"]["hf"]), tmp_path / "out", language_model_only=True, key_layout="mimo")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["Qwen2.5-VL-3B-Instruct", "ERNIE-4.5-VL-28B-A3B-Thinking"])
def test_release_shaped_sources_convert_to_the_mimo_layout_and_back(name, tmp_path):
    """What users have: the released config and on-disk names (sharded files; ERNIE Thinking's flat
    config and top-level vision_model.*), cut to a few layers. Oracles: transformers' logits through
    a strictly loaded MimoModel, and the source bytes after export."""
    from test_releases import SHAPES, cut_config

    from ckptconv.fixtures import make_release_shaped

    shape = SHAPES[name]
    src = make_release_shaped(cut_config(name), tmp_path / "hf", spellings=shape.get("spellings"),
                              extra_files=shape.get("files"), seed=3)
    convert_hf_to_mcore(str(src), tmp_path / "mimo", key_layout="mimo")
    report = verify(src, tmp_path / "mimo", megatron_model="mimo")
    assert report.passed and report.megatron_model == "mimo", report.as_dict()
    convert_mcore_to_hf(tmp_path / "mimo", tmp_path / "back")
    assert_same_safetensors(src, tmp_path / "back")
    assert len(list(src.glob("*.safetensors"))) > 1
