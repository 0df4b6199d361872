"""Make the training checkpoints in ``tests/data/old_mcore/``: a tiny Qwen2.5-VL saved by
megatron-core 0.12.3, 0.13.1, 0.14.0 and 0.15.3's own ``dist_checkpointing.save``, in the layout a
Megatron-LM training run leaves (``iter_0000010/`` + ``latest_checkpointed_iteration.txt`` = 10).

NOT run by the tests or CI: it needs one scratch interpreter per megatron-core version, each with
``torch==2.13.0`` (install it first: an unpinned torch pulls a CUDA build), ``numpy``, ``psutil``,
``packaging`` and that ``megatron-core`` (e.g. ``python -m venv /tmp/mc0123 && /tmp/mc0123/bin/pip
install torch==2.13.0 && /tmp/mc0123/bin/pip install numpy psutil packaging megatron-core==0.12.3``;
about 1 GB each). The checkpoints it writes are committed (about 500 KiB each); the tests
(tests/test_old_megatron.py) export them with ``mcore-to-hf --hf-config tests/data/old_mcore/hf-config``
and compare with the source tensors' recorded digests.

    .venv/bin/python scripts/make_old_mcore_checkpoints.py tests/data/old_mcore \\
        --python 0.12.3=/tmp/mc0123/bin/python --python 0.13.1=/tmp/mc0131/bin/python \\
        --python 0.14.0=/tmp/mc0140/bin/python --python 0.15.3=/tmp/mc0153/bin/python

Two stages in two kinds of process:

1. here (the project venv): build the deterministic tiny source
   (``make_tiny_qwen2_5_vl(seed=SEED, dtype=bfloat16)``) and convert it with ``ckptconv
   hf-to-mcore`` into a scratch directory; record each source tensor's dtype, shape and sha256 in
   ``source-tensors.json`` (the tests check that the fixture they rebuild is still this one) and
   copy its ``config.json`` to ``hf-config/``;
2. per version (``<python> this-file --save ...``, which imports only torch and megatron-core):
   start TP x PP gloo ranks on the CPU, build that version's own ``GPTModel`` (local spec, RMSNorm,
   SwiGLU, qkv bias, M-RoPE) per pipeline stage plus the replicated ``visual.*`` tensors on the
   first stage, ``dist_checkpointing.load`` the ckptconv checkpoint into it (strict), and save the
   model's ``sharded_state_dict()`` the way Megatron-LM's ``save_checkpoint`` does: under
   ``model``, with ``args`` (an ``argparse.Namespace``), ``iteration``, ``checkpoint_version``,
   ``rng_state`` (a ShardedObject) beside it, through ``FullyParallelSaveStrategyWrapper``.
   Weights are those of the source (a run at learning rate 0), so the export must give back the
   source's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SEED = 13
ITERATION = 10
#: version -> (tp, pp) the training run used: both TP chunkings and a pipeline split are covered.
LAYOUTS = {"0.12.3": (1, 1), "0.13.1": (2, 1), "0.14.0": (1, 2), "0.15.3": (2, 1)}


# ------------------------------------------------------------------------------------------------
# Stage 1: the source and its ckptconv conversion (project venv)


def _tensor_digests(model_dir: Path) -> dict:
    import hashlib

    from safetensors import safe_open

    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                raw = t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
                out[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                             "sha256": hashlib.sha256(raw).hexdigest()}
    return dict(sorted(out.items()))


def make_all(dest: Path, pythons: dict[str, str]) -> None:
    import torch

    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = make_tiny_qwen2_5_vl(tmp / "source", seed=SEED, dtype=torch.bfloat16)
        converted = tmp / "ckptconv"
        subprocess.run([sys.executable, "-m", "ckptconv", "hf-to-mcore", str(source), str(converted)], check=True,
                       stdout=subprocess.DEVNULL)
        digests = _tensor_digests(source)
        lines = ",\n".join(f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in digests.items())
        (dest / "source-tensors.json").write_text(
            f'{{"fixture": "make_tiny_qwen2_5_vl(seed={SEED}, dtype=torch.bfloat16)",\n "tensors": {{\n{lines}\n }}\n}}\n'
        )
        # The config a user passes as --hf-config (a training checkpoint carries none).
        (dest / "hf-config").mkdir(exist_ok=True)
        shutil.copyfile(source / "config.json", dest / "hf-config" / "config.json")
        for version, python in pythons.items():
            tp, pp = LAYOUTS[version]
            out = dest / f"mcore-{version}"
            shutil.rmtree(out, ignore_errors=True)
            # Run inside dest: the checkpoint records the path it was saved to (``storage_meta``),
            # which then reads mcore-<version>/iter_0000010, not a path on this machine.
            subprocess.run([python, str(Path(__file__).resolve()), "--save", str(converted / "release"), out.name,
                            version, str(tp), str(pp)], check=True, cwd=dest)
            print(f"{version}: {out} ({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) // 1024} KiB)")


# ------------------------------------------------------------------------------------------------
# Stage 2: one megatron-core version's own save (its scratch venv; torch + megatron-core only)


def _cpu_shims(version: str) -> None:
    """The few CUDA-only calls a CPU save/load reaches (docs: megatron-core-facts)."""
    import contextlib

    import torch

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # The async writer's results queue would spawn a Manager that re-imports __main__: fork instead.
    filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
    if version.startswith("0.12."):
        # 0.12 calls torch's _write_item without the serialization_format torch >= 2.7 requires
        # (0.13 passes it: filesystem_async.py "if 'serialization_format' in inspect.signature").
        from torch.distributed.checkpoint.filesystem import SerializationFormat, _write_item

        def write_item(*args, **kwargs):
            kwargs.setdefault("serialization_format", SerializationFormat.TORCH_SAVE)
            return _write_item(*args, **kwargs)

        filesystem_async._write_item = write_item


def _language_config(tp: int, pp: int):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    # The tiny Qwen2.5-VL text model (ckptconv.fixtures._qwen_tiny_config), as the family's
    # Megatron model sets it (ckptconv/megatron/common.py decoder_config_kwargs + runtime kwargs).
    return TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=96, normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0,
        attention_dropout=0.0, mrope_section=[2, 3, 3],
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, use_cpu_initialization=True,
        pipeline_dtype=torch.bfloat16, bf16=True, params_dtype=torch.bfloat16,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
    )


def _training_args(version: str, tp: int, pp: int) -> argparse.Namespace:
    """A slice of what Megatron-LM pickles as ``args`` into ``common.pt``."""
    import torch

    return argparse.Namespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
        group_query_attention=True, kv_channels=16, normalization="RMSNorm", swiglu=True,
        add_qkv_bias=True, position_embedding_type="mrope", mrope_section=[2, 3, 3], rotary_base=1000000,
        untie_embeddings_and_output_weights=True, padded_vocab_size=None, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, bf16=True,
        params_dtype=torch.bfloat16, ckpt_format="torch_dist", iteration=ITERATION, train_iters=ITERATION,
        lr=0.0, seed=1234, save=None, megatron_core_version=version,
    )


def _rank_main(rank: int, world: int, port: int, source_ckpt: str, out: str, version: str, tp: int, pp: int) -> None:
    import random

    import numpy as np
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    _cpu_shims(version)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
    from torch.distributed.checkpoint import FileSystemReader

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(1234)
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    metadata = FileSystemReader(source_ckpt).read_metadata()
    padded_vocab = metadata.state_dict_metadata["language_model.embedding.word_embeddings.weight"].size[0]
    model = GPTModel(
        config=_language_config(tp, pp), transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=padded_vocab, max_sequence_length=512, pre_process=first, post_process=last,
        parallel_output=True, share_embeddings_and_output_weights=False, position_embedding_type="mrope",
        rotary_base=1000000,
    ).to(torch.bfloat16)
    # The vision tower (Megatron-Bridge keeps the HF module, replicated, on the first stage): its
    # tensors under their HF names, no TP split.
    visual = {
        key.removeprefix("visual."): torch.zeros(tuple(md.size), dtype=torch.bfloat16)
        for key, md in metadata.state_dict_metadata.items() if key.startswith("visual.")
    } if first else {}

    def model_sharded_state_dict():
        sharded = model.sharded_state_dict(prefix="language_model.")
        sharded.update(make_sharded_tensors_for_checkpoint(visual, "visual.", {}, ()))
        return sharded

    loaded = dist_checkpointing.load(model_sharded_state_dict(), source_ckpt, strict="raise_all")
    language = {k.removeprefix("language_model."): v for k, v in loaded.items() if k.startswith("language_model.")}
    model.load_state_dict(language, strict=True)
    for name, tensor in loaded.items():
        if name.startswith("visual."):
            visual[name.removeprefix("visual.")].copy_(tensor)

    # What Megatron-LM's save_checkpoint hands to dist_checkpointing.save (training/checkpointing.py
    # generate_state_dict + get_rng_state for ckpt_format torch_dist), optimizer state left out.
    rng_state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                 "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None, "rng_tracker_states": {}}
    state_dict = {
        "args": _training_args(version, tp, pp),
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        "num_floating_point_operations_so_far": 0,
        "model": model_sharded_state_dict(),
        "rng_state": ShardedObject(
            "rng_state", [rng_state], (pp, tp),
            (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
            replica_id=parallel_state.get_data_parallel_rank(),
        ),
    }
    iteration_dir = Path(out) / f"iter_{ITERATION:07d}"
    if rank == 0:
        iteration_dir.mkdir(parents=True)
    dist.barrier()
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy("torch_dist"), parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    dist_checkpointing.save(state_dict, str(iteration_dir), strategy)
    dist.barrier()
    if rank == 0:
        (Path(out) / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def save_with_this_megatron(source_ckpt: str, out: str, version: str, tp: int, pp: int) -> None:
    import socket

    import torch.multiprocessing as mp
    from megatron.core.package_info import __version__

    if __version__ != version:
        raise SystemExit(f"this interpreter has megatron-core {__version__}, not {version}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(tp * pp, port, source_ckpt, out, version, tp, pp), nprocs=tp * pp, join=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--save"]:
        _, _, source_ckpt, out, version, tp, pp = sys.argv
        save_with_this_megatron(source_ckpt, out, version, int(tp), int(pp))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="directory to write (tests/data/old_mcore)")
    parser.add_argument("--python", action="append", default=[], metavar="VERSION=PYTHON",
                        help="interpreter of the scratch venv holding that megatron-core (repeat per version)")
    options = parser.parse_args()
    pythons = dict(item.split("=", 1) for item in options.python)
    unknown = set(pythons) - set(LAYOUTS)
    if unknown or not pythons:
        parser.error(f"give --python VERSION=PYTHON for versions among {', '.join(LAYOUTS)}")
    make_all(options.dest, pythons)
