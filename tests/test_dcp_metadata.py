"""Format fidelity: the ``.metadata`` ckptconv writes is the one torch's own ``FileSystemWriter``
writes for the same chunks, field for field.

Oracle (independent): megatron-core's ``dist_checkpointing.save`` -- what every Megatron-LM and
Megatron-Bridge training save runs, ending in torch's ``FileSystemWriter.finish`` -- given the same
tensors cut into the same chunks (a stacked ``[2, 6, 4]`` weight saved one layer per chunk, a bf16
vector, two ``_extra_state`` objects). Both writers of ours are held to it: the torch-free emitter
(conversion without torch) and DCP's own classes through ``pickle`` (torch already imported).
"""

from __future__ import annotations

import multiprocessing
import pickle
import re

import pytest
import torch

from ckptconv.formats.array import Array
from ckptconv.formats.torch_dist import (
    DCP_VERSION, DistCheckpointWriter, dcp_metadata_pickle, read_dcp_metadata, write_metadata,
)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
WEIGHT = torch.arange(48, dtype=torch.float32).reshape(2, 6, 4)
BIAS = torch.arange(5, dtype=torch.float32).to(torch.bfloat16)


@pytest.fixture(scope="module")
def megatron_saved(tmp_path_factory):
    """The reference checkpoint, saved by megatron-core in this process (a one-rank gloo group)."""
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs_async
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from ckptconv.megatron import runtime

    runtime.init_parallel(tp=1, device="cpu")
    # The async writer's Manager would re-import __main__ (pytest); a fork-context queue avoids it.
    fs_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
    sharded = {f"w{layer}": ShardedTensor.from_rank_offsets("w", WEIGHT[layer].clone(), (0, layer, 2), replica_id=0,
                                                            prepend_axis_num=1) for layer in range(2)}
    sharded.update({f"x{layer}": ShardedObject("w._extra_state", None, (2,), (layer,), replica_id=0) for layer in range(2)})
    sharded["b"] = ShardedTensor.from_rank_offsets("b", BIAS.clone(), replica_id=0)
    out = tmp_path_factory.mktemp("megatron_saved")
    dist_checkpointing.save(sharded, str(out))
    return out


def write_ours(directory, use_torch: bool) -> None:
    """The same chunks through ckptconv's writer; ``use_torch`` picks which writer pickles ``.metadata``."""
    import ckptconv.formats.torch_dist as torch_dist

    writer = DistCheckpointWriter(directory)
    for layer in range(2):
        writer.write_chunk("w", (2, 6, 4), (layer, 0, 0), Array.from_torch(WEIGHT[layer:layer + 1]))
        writer.write_object(f"w._extra_state/shard_{layer}_2", None)
    writer.write_chunk("b", (5,), (0,), Array.from_torch(BIAS))
    real = torch_dist.dcp_metadata_pickle
    torch_dist.dcp_metadata_pickle = lambda *args, **kwargs: real(*args, **kwargs, use_torch=use_torch)
    try:
        write_metadata(directory, [writer.close()])
    finally:
        torch_dist.dcp_metadata_pickle = real


def fields(obj) -> set[str]:
    return set(vars(obj))


@pytest.mark.parametrize("use_torch", [False, True], ids=["torch-free-emitter", "torch-pickler"])
def test_metadata_equals_megatron_cores_field_for_field(megatron_saved, tmp_path, use_torch):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

    write_ours(tmp_path, use_torch)
    theirs = FileSystemReader(str(megatron_saved)).read_metadata()
    ours = FileSystemReader(str(tmp_path)).read_metadata()

    # Every field torch defines; megatron-core adds only its save-plan cache (`all_local_plans`).
    assert fields(theirs) - {"all_local_plans"} == fields(ours)
    assert ours.version == theirs.version == CURRENT_DCP_VERSION == DCP_VERSION
    assert ours.planner_data == theirs.planner_data is None
    assert ours.state_dict_metadata == theirs.state_dict_metadata  # dtypes, global shapes, every chunk
    assert set(ours.storage_data) == set(theirs.storage_data)  # (fqn, chunk offset) of every chunk, objects
    for index, info in ours.storage_data.items():
        reference = theirs.storage_data[index]
        # relative_path / offset / length depend on the archive bytes each writer wrote; the record is the same
        assert type(info) is type(reference) and fields(info) == fields(reference)
        assert info.transform_descriptors is reference.transform_descriptors is None
    # storage_meta: checkpoint_id is the directory (a str, as megatron-core writes it), save_id a uuid
    assert type(ours.storage_meta) is type(theirs.storage_meta)
    assert fields(ours.storage_meta) == fields(theirs.storage_meta)
    assert ours.storage_meta.checkpoint_id == str(tmp_path) and theirs.storage_meta.checkpoint_id == str(megatron_saved)
    assert UUID.match(ours.storage_meta.save_id) and UUID.match(theirs.storage_meta.save_id)
    assert ours.storage_meta.modules == theirs.storage_meta.modules == []


def test_both_writers_pickle_the_same_metadata(tmp_path):
    """Self-consistency: the emitter's and torch's pickles load into equal objects, and our
    restricted reader reads both the same."""
    from torch.distributed.checkpoint import FileSystemReader

    for use_torch in (False, True):
        (tmp_path / str(use_torch)).mkdir()
        write_ours(tmp_path / str(use_torch), use_torch)
    emitted, pickled = (FileSystemReader(str(tmp_path / name)).read_metadata() for name in ("False", "True"))
    for field in ("state_dict_metadata", "storage_data", "version", "planner_data"):
        assert getattr(emitted, field) == getattr(pickled, field), field
    assert emitted.storage_meta.save_id == pickled.storage_meta.save_id  # derived from the data, not drawn
    ours = [read_dcp_metadata(tmp_path / name / ".metadata") for name in ("False", "True")]
    assert ours[0] == ours[1] and ours[0].entries["w"].size == (2, 6, 4)


def test_the_emitter_memoizes_repeated_class_names_and_strings():
    """Hand value: a chunk list repeats ``ChunkStorageMetadata`` and ``torch.Size`` once per chunk;
    spelled out each time (as before the memo: 191 788 bytes here) 1000 chunks cost 190 bytes each."""
    from ckptconv.formats.torch_dist import CheckpointMetadata, ChunkMeta, TensorMeta

    fp32 = Array.from_torch(WEIGHT).dtype
    chunks = [ChunkMeta((i, 0), (1, 4)) for i in range(1000)]
    metadata = CheckpointMetadata({"w": TensorMeta(fp32, (1000, 4), chunks)}, {})
    raw = dcp_metadata_pickle(metadata, checkpoint_id="x", save_id="y", use_torch=False)
    assert raw.count(b"ChunkStorageMetadata") == 1 and raw.count(b"torch\nSize\n") == 1
    assert len(raw) < 80 * len(chunks)


def test_the_writer_is_chosen_by_whether_torch_is_imported(tiny_qwen, tmp_path):
    """The CLI converts without importing torch (test_torch_free.py): its .metadata is the emitter's
    (pickle protocol 2); converting in this process, where torch is loaded, pickles DCP's classes
    (the stdlib's default protocol). Both carry torch's version and the checkpoint's final path."""
    from conftest import run_cli
    from torch.distributed.checkpoint import FileSystemReader

    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore

    assert run_cli("hf-to-mcore", tiny_qwen, tmp_path / "cli").returncode == 0
    convert_hf_to_mcore(str(tiny_qwen), tmp_path / "inproc")
    for name, protocol in (("cli", 2), ("inproc", pickle.DEFAULT_PROTOCOL)):
        release = tmp_path / name / "release"
        assert (release / ".metadata").read_bytes()[:2] == bytes([0x80, protocol]), name
        md = FileSystemReader(str(release)).read_metadata()
        assert md.version == DCP_VERSION and md.storage_meta.checkpoint_id == str(release.resolve())
