"""``ckptconv verify --layerwise``: both models streamed one stage at a time, each stage compared in a
teacher-forced and a free-running chain, the first stage outside tolerance named.

Oracles. The reference side is independent of ckptconv: transformers' own classes, each stage's
weights loaded by transformers' own loader (``convert_and_load_state_dict_in_model``) from the
safetensors. The Megatron side is megatron-core's modules, loaded from the torch_dist checkpoint
through the model's own ``sharded_state_dict()`` boxes. Diagnosis tests corrupt one stored chunk
of a correct conversion in one place (a hand-made fault whose stage we know) and check that
exactly that stage is named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_verify import rewrite_chunk

STACKED_QKV = "language_model.decoder.layers.self_attention.linear_qkv.weight"


def verify(*args, **kwargs):
    from ckptconv.verify.runner import run_verify

    kwargs.setdefault("layerwise", True)
    return run_verify(*args, device="cpu", **kwargs)


def _convert(src: Path, out: Path) -> Path:
    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore

    convert_hf_to_mcore(str(src), out)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("layerwise")


@pytest.fixture(scope="module")
def qwen(work):
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

    hf = make_tiny_qwen2_5_vl(work / "qwen_hf", seed=0)
    return hf, _convert(hf, work / "qwen_mcore")


@pytest.fixture(scope="module")
def ernie(work):
    from ckptconv.families.ernie4_5_vl_moe.fixtures import make_tiny_ernie4_5_vl_moe

    hf = make_tiny_ernie4_5_vl_moe(work / "ernie_hf", seed=0)
    return hf, _convert(hf, work / "ernie_mcore")


@pytest.fixture(scope="module")
def step(work):
    from ckptconv.families.step3p7.fixtures import make_tiny_step3p7

    hf = make_tiny_step3p7(work / "step_hf", seed=0)
    return hf, _convert(hf, work / "step_mcore")


def corrupted(ckpt: Path, name: str, key: str, edit, first_axis_offset: int = 0) -> Path:
    copy = ckpt.parent / f"{ckpt.name}-{name}"
    shutil.copytree(ckpt, copy)
    rewrite_chunk(copy, key, edit, first_axis_offset)
    return copy


def failing_stages(report, chain: str, input_name: str) -> list[str]:
    return [s.stage for s in sorted(report.stages, key=lambda s: s.index)
            if s.chain == chain and s.input == input_name and not s.passed]


# --------------------------------------------------------------------------- right conversions pass


@pytest.mark.parametrize("family", ["qwen", "ernie", "step"])
def test_a_right_conversion_passes_every_stage_in_both_chains(family, request):
    """Oracle: transformers (independent) vs megatron-core, stage by stage. Every stage of the
    family's list runs for the image input (vision ones only there), in both chains, within fp32
    tolerance; the final logits pass today's checks."""
    from ckptconv.families import get_family
    from ckptconv.megatron.load import checkpoint_spec

    hf, ckpt = request.getfixturevalue(family)
    report = verify(hf, ckpt)
    assert report.passed, [(s.stage, s.chain, s.input, s.failures) for s in report.stages if not s.passed]
    assert report.path == "layerwise" and report.first_failure is None
    names = [s.name for s in get_family(checkpoint_spec(ckpt).family).layerwise_stages(checkpoint_spec(ckpt))]
    for chain in ("teacher-forced", "free-running"):
        ran = [s.stage for s in sorted(report.stages, key=lambda s: s.index) if s.chain == chain and s.input == "image:synthetic"]
        assert ran == names
    assert max(s.rel for s in report.stages) < 1e-5
    moe = [s for s in report.stages if s.routers]
    assert (family == "qwen") == (not moe)
    assert all(v == 1.0 for s in moe for v in s.routers.values())
    if family == "ernie":  # the vision pool routes only on the image input
        assert {p for s in moe if s.input == "image:synthetic" for p in s.routers} == {"text", "vision"}


def test_layerwise_logits_equal_the_whole_model_path(qwen):
    """Oracle: the whole-model verify (from_pretrained + dist_checkpointing.load, strict). Streaming
    the weights changes nothing in the math: the logit figures agree to float precision."""
    hf, ckpt = qwen
    streamed = verify(hf, ckpt)
    whole = verify(hf, ckpt, layerwise=False)
    assert whole.path == "whole-model"
    for a, b in zip(streamed.results, whole.results):
        for group in ("text", "image"):
            if a.groups[group] is None:
                assert b.groups[group] is None
                continue
            assert abs(a.groups[group].max_abs - b.groups[group].max_abs) < 1e-6
            assert a.groups[group].top1 == b.groups[group].top1 == 1.0


# --------------------------------------------------------------------------- caught at their stage


def test_two_swapped_kv_heads_are_caught_at_their_layer(qwen):
    """Layer 1 only: the k and v rows of query group 0 exchanged with those of group 1 (per group
    the fused qkv holds q: 2 heads x 16 rows, then k 16, v 16). Hand-placed fault: layer 1 must be
    the first stage outside tolerance in both chains; the teacher-forced chain passes every other stage."""
    hf, ckpt = qwen

    def swap_kv_groups(t):  # t: [1, 128, 64], layer 1 of the stacked qkv
        group0 = t[0, 32:64].clone()
        t[0, 32:64] = t[0, 96:128]
        t[0, 96:128] = group0

    bad = corrupted(ckpt, "kv", STACKED_QKV, swap_kv_groups, first_axis_offset=1)
    report = verify(hf, bad)
    assert not report.passed
    assert report.first_failing_stage().stage == "decoder.layer.1"
    assert report.first_failing_stage("free-running").stage == "decoder.layer.1"
    for name in ("text-only", "image:synthetic"):
        assert failing_stages(report, "teacher-forced", name) == ["decoder.layer.1"]


def test_a_nudged_vision_block_bias_is_caught_at_its_block(qwen):
    """visual.blocks.1.mlp.down_proj.bias + 0.01 (hand-placed): vision.block.1 is the first stage
    outside tolerance, only on the image input; the text-only input passes every stage."""
    hf, ckpt = qwen
    bad = corrupted(ckpt, "vbias", "visual.blocks.1.mlp.down_proj.bias", lambda t: t.add_(0.01))
    report = verify(hf, bad)
    assert report.first_failing_stage().stage == "vision.block.1"
    assert report.first_failing_stage().input == "image:synthetic"
    assert failing_stages(report, "teacher-forced", "text-only") == []
    assert failing_stages(report, "teacher-forced", "image:synthetic") == ["vision.block.1"]
    # free-running: the error flows on through the merger into the language model
    assert failing_stages(report, "free-running", "image:synthetic")[:2] == ["vision.block.1", "vision.merger"]


def test_a_perturbed_vision_pool_expert_is_caught_at_its_layer_and_only_with_an_image(ernie):
    """ERNIE layer 2, vision pool, expert 0's linear_fc2 scaled by 1.5 (hand-placed): decoder.layer.2
    fails on the image input only (text tokens never reach the vision pool); the routers still agree
    (their weights are untouched)."""
    hf, ckpt = ernie
    key = "language_model.decoder.layers.2.mlp.vision_moe_layer.experts.experts.linear_fc2.weight"
    bad = corrupted(ckpt, "vexpert", key, lambda t: t.mul_(1.5), first_axis_offset=0)
    report = verify(hf, bad)
    assert failing_stages(report, "teacher-forced", "text-only") == []
    assert failing_stages(report, "teacher-forced", "image:synthetic") == ["decoder.layer.2"]
    assert report.first_failing_stage().stage == "decoder.layer.2"
    (layer2,) = [s for s in report.stages
                 if s.stage == "decoder.layer.2" and s.chain == "teacher-forced" and s.input == "image:synthetic"]
    assert layer2.routers == {"text": 1.0, "vision": 1.0}


def test_a_nudged_step3p7_gate_row_is_caught_at_its_layer(step):
    """Step3.7 layer 1 (sliding attention): head 0's output-gate row (HF g_proj row 0, stored in
    linear_qkv after query group 0's q rows and repeated head_dim times, megatron-core's
    attention_output_gate layout) + 0.5 (hand-placed): decoder.layer.1 is the first stage outside
    tolerance in both chains."""
    from ckptconv.megatron.load import checkpoint_spec

    hf, ckpt = step
    attention = checkpoint_spec(ckpt).attention(1)
    d = attention.head_dim
    gate = attention.num_attention_heads // attention.num_query_groups * d  # group 0: q rows, then the gate rows
    bad = corrupted(ckpt, "gate", "language_model.decoder.layers.1.self_attention.linear_qkv.weight",
                    lambda t: t[gate: gate + d].add_(0.5))
    report = verify(hf, bad)
    assert report.first_failing_stage().stage == "decoder.layer.1"
    assert report.first_failing_stage("free-running").stage == "decoder.layer.1"
    assert failing_stages(report, "teacher-forced", "text-only") == ["decoder.layer.1"]


def test_cli_exits_1_and_names_the_first_stage(qwen):
    """The command-line face: exit 1, the stage table, the named stage on stderr, JSON field."""
    from typer.testing import CliRunner
    import typer

    from ckptconv.cli_verify import verify_command

    hf, ckpt = qwen
    bad = corrupted(ckpt, "cli", "visual.blocks.0.mlp.down_proj.bias", lambda t: t.add_(0.01))
    app = typer.Typer()
    app.command()(verify_command)
    result = CliRunner().invoke(app, [str(hf), str(bad), "--layerwise", "--device", "cpu", "--json"])
    assert result.exit_code == 1, result.output
    d = json.loads(result.stdout)
    assert d["path"] == "layerwise" and d["first_failing_stage"].startswith("vision.block.0 (teacher-forced")
    result = CliRunner().invoke(app, [str(hf), str(bad), "--layerwise", "--device", "cpu"])
    assert result.exit_code == 1
    assert "first stage outside tolerance" in result.output and "vision.block.0" in result.output


# --------------------------------------------------------------------------- choosing the path


def test_auto_streams_when_the_whole_models_would_not_fit(qwen, monkeypatch):
    """The default path follows a memory estimate; the report says which and why. Oracle: hand
    values for the available memory (monkeypatched)."""
    import ckptconv.verify.layerwise as layerwise

    hf, ckpt = qwen
    roomy = verify(hf, ckpt, layerwise=None, synthetic_image=False)
    assert roomy.path == "whole-model" and roomy.path_reason.startswith("whole-model (auto:")
    monkeypatch.setattr(layerwise, "available_bytes", lambda: 1 << 20)
    tight = verify(hf, ckpt, layerwise=None, synthetic_image=False)
    assert tight.path == "layerwise" and "auto" in tight.path_reason and "GiB available" in tight.path_reason
    assert tight.passed


def test_roundtrip_mode_is_refused_layerwise(qwen):
    from ckptconv.errors import ConversionError

    hf, ckpt = qwen
    with pytest.raises(ConversionError, match="roundtrip.*layerwise"):
        verify(hf, ckpt, mode="roundtrip")


def test_tp2_under_torchrun_loads_each_ranks_slice(qwen):
    """Two gloo ranks, each building its TP=2 half and reading its own boxes of a checkpoint written
    at TP=1; rank 0 runs HF and hands its stage inputs to both ranks. Passes, printed once."""
    from tests.conftest import torchrun

    hf, ckpt = qwen
    proc = torchrun(["-m", "ckptconv.cli_verify", hf, ckpt, "--tp", "2", "--device", "cpu", "--layerwise", "--json"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["passed"] and report["tp"] == 2 and report["path"] == "layerwise"
    assert max(s["rel"] for s in report["stages"]) < 1e-5


def test_release_shaped_step3p7_with_mtp_layers_passes_and_lists_them_as_not_compared(tmp_path):
    """Step-3.7-Flash as released (remote-code config, released names, MTP layers; cut): transformers
    has no module for the MTP layers, so layerwise verify checks their keys against the checkpoint,
    says they are not compared, and every other stage passes both chains (oracle: transformers)."""
    from tests.test_step3p7_release import RELEASE_CONFIG
    from ckptconv.families.step3p7.fixtures import cut_release_config, make_release_step3p7

    hf = make_release_step3p7(cut_release_config(json.loads(RELEASE_CONFIG.read_text())), tmp_path / "hf")
    report = verify(hf, _convert(hf, tmp_path / "mcore"))
    assert report.passed, [(s.stage, s.chain, s.failures) for s in report.stages if not s.passed]
    assert "not compared (no HF counterpart): mtp" in report.path_reason
    assert "mtp" not in {s.stage for s in report.stages}


def test_a_stage_list_that_misses_parameters_is_refused(qwen, monkeypatch):
    """Every parameter must belong to a stage (one left on meta would be used unloaded): a family
    whose list forgets the final norm gets a clear error naming the parameter, before any forward."""
    from ckptconv.errors import ConversionError
    from ckptconv.families import get_family

    hf, ckpt = qwen
    family = get_family("qwen2_5_vl")
    full = family.layerwise_stages
    monkeypatch.setattr(type(family), "layerwise_stages",
                        lambda self, spec: [s for s in full(spec) if s.name != "final_norm"])
    with pytest.raises(ConversionError, match="parameters in no stage: language_model.decoder.final_layernorm.weight"):
        verify(hf, ckpt, synthetic_image=False)
