"""The Megatron Qwen2.5-VL model: what its key contract spells out, and what is particular to Qwen.

Weights go HF -> Megatron here through the independent reference (tests/oracles/hf_reference.py:
q/k/v interleaved per query group, fc1 = cat(gate, up); vocab padded with zeros) and the model's own
sharded_state_dict,
so these tests pin the model, not the converter. Golden keys, logits against HF at TP=1/2, strict
loads and wrong-weight rejection are the conformance suite's (tests/test_conformance.py), the
same for every family.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_KEYS = REPO / "tests" / "data" / "qwen2_5_vl_tiny_keys.json"


# --------------------------------------------------------------------------- shared helpers


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // (128 * tp)) * 128 * tp


def load_spec(hf_dir):
    from ckptconv.families import normalize_config

    return normalize_config(json.loads((Path(hf_dir) / "config.json").read_text()))


def megatron_from_hf(hf_dir, tp: int):
    """A Megatron model at the current TP size holding the HF checkpoint's weights, placed through
    the independent reference (tests/oracles/hf_reference.py), not the converter."""
    from check_loaded_model import PADDED_ROWS
    from oracles.hf_reference import reference_tensors

    from ckptconv.families.qwen2_5_vl.model import build_model
    from ckptconv.megatron.load import fill_from_global_tensors

    spec = load_spec(hf_dir)
    padded = padded_vocab(spec.vocab_size, tp)
    model = build_model(spec, padded_vocab_size=padded)
    tensors = {key: torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])]) if key.endswith(PADDED_ROWS) else t
               for key, t in reference_tensors(hf_dir, "qwen2_5_vl").items()}
    fill_from_global_tensors(model, tensors)
    return model, spec


def test_inputs(hf_dir):
    """The verify inputs: text-only, and with the synthetic 6x10-patch image."""
    from ckptconv.verify.inputs import build_inputs

    text, image = build_inputs(load_spec(hf_dir), hf_dir)
    return text, image


test_inputs.__test__ = False  # a helper, not a test


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "hf", seed=0)


@pytest.fixture(scope="module")
def parallel():
    from ckptconv.megatron import runtime

    return runtime.init_parallel(tp=1, device="cpu")


# --------------------------------------------------------------------------- the key contract


def test_manifest_spells_out_the_contract(tiny_hf):
    keys = json.loads(GOLDEN_KEYS.read_text())
    # stacked layers, fused-norm names, qkv rows for 4 q heads + 2 k + 2 v of 16, fc1 = gate+up rows
    assert keys["language_model.decoder.layers.self_attention.linear_qkv.weight"]["shape"] == [2, (4 + 2 + 2) * 16, 64]
    assert keys["language_model.decoder.layers.mlp.linear_fc1.weight"]["shape"] == [2, 2 * 96, 64]
    assert keys["language_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight"]["shape"] == [2, 64]
    assert keys["language_model.embedding.word_embeddings.weight"]["shape"] == [384, 64]  # 320 padded to 128
    assert keys["language_model.decoder.layers.self_attention.linear_qkv._extra_state"]["kind"] == "object"
    # the vision tower keeps its HF on-disk names, every one of them
    from ckptconv.fixtures import list_disk_tensors

    on_disk = {k: list(shape) for k, (shape, _) in list_disk_tensors(tiny_hf).items() if k.startswith("visual.")}
    assert {k: v["shape"] for k, v in keys.items() if k.startswith("visual.")} == on_disk


def test_tied_embeddings_have_no_output_layer(tmp_path, parallel):
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl
    from ckptconv.megatron.load import sharded_manifest
    from ckptconv.families.qwen2_5_vl.model import build_model

    spec = load_spec(make_tiny_qwen2_5_vl(tmp_path / "tied", tie_word_embeddings=True, with_processor=False))
    keys = sharded_manifest(build_model(spec, padded_vocab_size=384).sharded_state_dict())
    assert "language_model.output_layer.weight" not in keys
    assert "language_model.embedding.word_embeddings.weight" in keys


def test_padded_vocab_must_cover_the_vocab(tiny_hf, parallel):
    from ckptconv.errors import ConversionError
    from ckptconv.families.qwen2_5_vl.model import build_model

    with pytest.raises(ConversionError, match="padded vocab size 256"):
        build_model(load_spec(tiny_hf), padded_vocab_size=256)


# --------------------------------------------------------------------------- forward equivalence, TP=1


def test_image_positions_are_3d_like_hf(tiny_hf, parallel):
    """Image tokens get (t, h, w) positions; the text after them resumes at max + 1."""
    model, spec = megatron_from_hf(tiny_hf, tp=1)
    _, image = test_inputs(tiny_hf)
    pos = model.position_ids(image.input_ids, image.mcore_kwargs["image_grid_thw"], None)[:, 0]
    is_image = image.input_ids[0] == spec.image_token_id
    first = int(is_image.nonzero()[0])
    img = pos[:, is_image]
    assert img[0].unique().numel() == 1  # one temporal step
    assert img[1].max() - img[1].min() == 2 and img[2].max() - img[2].min() == 4  # 3 x 5 merged grid
    after = int(is_image.nonzero()[-1]) + 1
    assert torch.equal(pos[:, after], torch.full((3,), int(img.max()) + 1))
    assert torch.equal(pos[:, :first], torch.arange(first).expand(3, first))


# --------------------------------------------------------------------------- loading checkpoints


def test_saved_checkpoint_loads_back_bit_exact(tiny_hf, parallel, tmp_path):
    import multiprocessing

    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs_async
    from megatron.core import dist_checkpointing

    from ckptconv.megatron.load import build_and_load
    from ckptconv.formats.torch_dist import resolve_checkpoint_dir

    model, _ = megatron_from_hf(tiny_hf, tp=1)
    out = tmp_path / "mcore"
    (out / "iter_0000123").mkdir(parents=True)
    # The async writer's Manager would re-import __main__ (pytest); a fork-context queue avoids it.
    fs_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
    dist_checkpointing.save(model.sharded_state_dict(), str(out / "iter_0000123"))
    (out / "latest_checkpointed_iteration.txt").write_text("123\n")
    (out / "config.json").write_text((tiny_hf / "config.json").read_text())
    assert resolve_checkpoint_dir(out) == out / "iter_0000123"

    loaded, _ = build_and_load(out)
    text, _ = test_inputs(tiny_hf)
    with torch.no_grad():
        assert torch.equal(loaded(text.input_ids), model(text.input_ids))


def test_checkpoint_layout_errors_are_one_clear_line(tmp_path):
    from ckptconv.errors import ConversionError
    from ckptconv.formats.torch_dist import resolve_checkpoint_dir

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(ConversionError, match="names 'release' but .*release does not exist"):
        resolve_checkpoint_dir(tmp_path)
    (tmp_path / "release").mkdir()
    with pytest.raises(ConversionError, match="not a megatron-core distributed checkpoint"):
        resolve_checkpoint_dir(tmp_path / "release")
    with pytest.raises(ConversionError, match="no such checkpoint directory"):
        resolve_checkpoint_dir(tmp_path / "nowhere")


def test_family_registry_names_missing_models():
    from ckptconv.errors import ConversionError
    from ckptconv.families import QWEN2_5_VL
    from ckptconv.megatron.load import model_builder

    assert model_builder("qwen2_5_vl") == QWEN2_5_VL.build_model
    with pytest.raises(ConversionError, match="unknown family 'llama'"):
        model_builder("llama")


