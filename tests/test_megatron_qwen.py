"""The Megatron Qwen2.5-VL model: its checkpoint keys are the contract, and it computes what HF computes.

Weights go HF -> Megatron here through an independent, in-memory mapping (q/k/v interleaved per
query group, fc1 = cat(gate, up), vocab padded with zeros) and the model's own sharded_state_dict,
so these tests pin the model, not the converter.

Run as a script under torchrun, this file is also the TP=2 worker (see ``_tp2_worker``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_KEYS = REPO / "tests" / "data" / "qwen2_5_vl_tiny_keys.json"
FP32_MAX_ABS = 1e-4


# --------------------------------------------------------------------------- shared helpers


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // (128 * tp)) * 128 * tp


def hf_to_megatron_tensors(hf: dict[str, torch.Tensor], spec, padded: int) -> dict[str, torch.Tensor]:
    """Global checkpoint tensors (keys of the contract) from the HF on-disk tensors."""
    L, groups, heads, d = spec.num_layers, spec.num_query_groups, spec.num_attention_heads, spec.head_dim

    def layer(l: int, name: str) -> torch.Tensor:
        return hf[f"model.layers.{l}.{name}"]

    def qkv(l: int, kind: str) -> torch.Tensor:
        # rows per query group g: [q_g (heads/groups heads), k_g, v_g]
        q, k, v = (layer(l, f"self_attn.{p}_proj.{kind}") for p in "qkv")
        tail = q.shape[1:]
        per_group = [q.reshape(groups, heads // groups * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)]
        return torch.cat(per_group, dim=1).reshape(-1, *tail)

    def pad_vocab(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, w.new_zeros(padded - w.shape[0], w.shape[1])])

    def stacked(fn) -> torch.Tensor:
        return torch.stack([fn(l) for l in range(L)])

    p = "language_model."
    out = {
        p + "embedding.word_embeddings.weight": pad_vocab(hf["model.embed_tokens.weight"]),
        p + "decoder.final_layernorm.weight": hf["model.norm.weight"],
        p + "decoder.layers.self_attention.linear_qkv.layer_norm_weight": stacked(lambda l: layer(l, "input_layernorm.weight")),
        p + "decoder.layers.self_attention.linear_qkv.weight": stacked(lambda l: qkv(l, "weight")),
        p + "decoder.layers.self_attention.linear_qkv.bias": stacked(lambda l: qkv(l, "bias")),
        p + "decoder.layers.self_attention.linear_proj.weight": stacked(lambda l: layer(l, "self_attn.o_proj.weight")),
        p + "decoder.layers.mlp.linear_fc1.layer_norm_weight": stacked(lambda l: layer(l, "post_attention_layernorm.weight")),
        p + "decoder.layers.mlp.linear_fc1.weight": stacked(
            lambda l: torch.cat([layer(l, "mlp.gate_proj.weight"), layer(l, "mlp.up_proj.weight")])
        ),
        p + "decoder.layers.mlp.linear_fc2.weight": stacked(lambda l: layer(l, "mlp.down_proj.weight")),
    }
    if not spec.tie_word_embeddings:
        out[p + "output_layer.weight"] = pad_vocab(hf["lm_head.weight"])
    out.update({k: v for k, v in hf.items() if k.startswith("visual.")})
    return out


def load_spec(hf_dir):
    from ckptconv.families import normalize_config

    return normalize_config(json.loads((Path(hf_dir) / "config.json").read_text()))


def megatron_from_hf(hf_dir, tp: int):
    """A Megatron model at the current TP size holding the HF checkpoint's weights."""
    from safetensors.torch import load_file

    from ckptconv.megatron.load import fill_from_global_tensors
    from ckptconv.families.qwen2_5_vl.model import build_model

    spec = load_spec(hf_dir)
    padded = padded_vocab(spec.vocab_size, tp)
    model = build_model(spec, padded_vocab_size=padded)
    fill_from_global_tensors(model, hf_to_megatron_tensors(load_file(str(Path(hf_dir) / "model.safetensors")), spec, padded))
    return model, spec


def test_inputs(hf_dir):
    """The verify inputs: text-only, and with the synthetic 6x10-patch image."""
    from ckptconv.verify.inputs import build_inputs

    text, image = build_inputs(load_spec(hf_dir), hf_dir)
    return text, image


test_inputs.__test__ = False  # a helper, not a test


@torch.no_grad()
def max_abs_vs_hf(model, hf_model, inp) -> float:
    ours = model(**inp.mcore_kwargs)
    ref = hf_model(use_cache=False, **inp.hf_kwargs).logits
    assert ours.shape == ref.shape
    return float((ours - ref).abs().max())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [str(REPO / ".venv" / "bin" / "torchrun"), "--nproc-per-node", str(nproc), "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "hf", seed=0)


@pytest.fixture(scope="module")
def parallel():
    from ckptconv.megatron import runtime

    return runtime.init_parallel(tp=1, device="cpu")


@pytest.fixture(scope="module")
def hf_model(tiny_hf):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(tiny_hf)).eval()


# --------------------------------------------------------------------------- the key contract


def test_sharded_state_dict_keys_and_shapes_match_the_golden_manifest(tiny_hf, parallel):
    from ckptconv.megatron.load import sharded_manifest
    from ckptconv.families.qwen2_5_vl.model import build_model

    spec = load_spec(tiny_hf)
    model = build_model(spec, padded_vocab_size=padded_vocab(spec.vocab_size, 1))
    assert sharded_manifest(model.sharded_state_dict()) == json.loads(GOLDEN_KEYS.read_text())


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


def test_text_only_logits_match_hf(tiny_hf, parallel, hf_model):
    model, _ = megatron_from_hf(tiny_hf, tp=1)
    text, _ = test_inputs(tiny_hf)
    assert max_abs_vs_hf(model, hf_model, text) <= FP32_MAX_ABS


def test_image_logits_match_hf(tiny_hf, parallel, hf_model):
    model, _ = megatron_from_hf(tiny_hf, tp=1)
    _, image = test_inputs(tiny_hf)
    assert tuple(image.mcore_kwargs["image_grid_thw"][0].tolist()) == (1, 6, 10)  # not square: h/w mix-ups show
    assert max_abs_vs_hf(model, hf_model, image) <= FP32_MAX_ABS


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


def test_wrong_weights_do_not_match_hf(tiny_hf, parallel, hf_model):
    """The equivalence check itself can fail: a model built from other weights is far off."""
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

    other = make_tiny_qwen2_5_vl(tiny_hf.parent / "other_seed", seed=1, with_processor=False)
    model, _ = megatron_from_hf(other, tp=1)
    text, _ = test_inputs(tiny_hf)
    assert max_abs_vs_hf(model, hf_model, text) > 100 * FP32_MAX_ABS


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


# --------------------------------------------------------------------------- TP=2


def test_logits_match_hf_at_tp2(tiny_hf, tmp_path):
    out = tmp_path / "tp2.json"
    proc = torchrun([str(Path(__file__).resolve()), str(tiny_hf), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["tp"] == 2
    assert results["text_max_abs"] <= FP32_MAX_ABS
    assert results["image_max_abs"] <= FP32_MAX_ABS
    # each rank holds half of the vocab and of the qkv rows; the vision tower whole, main copy on rank 0
    assert results["local_qkv_rows"] == [64, 64]
    assert results["vision_main_replica"] == [True, False]


def _tp2_worker(hf_dir: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from transformers import AutoModelForImageTextToText

    from ckptconv.megatron import runtime

    runtime.init_parallel(tp=2, device="cpu")
    model, _ = megatron_from_hf(hf_dir, tp=2)
    hf_model = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    text, image = test_inputs(Path(hf_dir))
    sharded = model.sharded_state_dict()
    vision = sharded["visual.patch_embed.proj.weight"]
    assert isinstance(vision, ShardedTensor)
    facts = {
        "tp": dist.get_world_size(),
        "text_max_abs": max_abs_vs_hf(model, hf_model, text),
        "image_max_abs": max_abs_vs_hf(model, hf_model, image),
        "local_qkv_rows": model.language_model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0],
        "vision_main_replica": all(r == 0 for r in vision.replica_id),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, facts)
    if dist.get_rank() == 0:
        result = {k: max(g[k] for g in gathered) for k in ("tp", "text_max_abs", "image_max_abs")}
        result["local_qkv_rows"] = [g["local_qkv_rows"] for g in gathered]
        result["vision_main_replica"] = [g["vision_main_replica"] for g in gathered]
        Path(out).write_text(json.dumps(result))
    runtime.destroy_parallel()


if __name__ == "__main__":
    _tp2_worker(sys.argv[1], sys.argv[2])
