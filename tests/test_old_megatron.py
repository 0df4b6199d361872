"""Training checkpoints written by the megatron-core versions most training runs used (0.12.3,
0.13.1, 0.14.0, 0.15.3), saved by each version's own ``dist_checkpointing.save`` in the layout a
Megatron-LM run leaves (``latest_checkpointed_iteration.txt`` = 10, ``iter_0000010/``, ``args`` and
``rng_state`` beside the model). They live in ``tests/data/old_mcore/`` and were made by
``scripts/make_old_mcore_checkpoints.py`` (one scratch venv per version; not run here) from
``make_tiny_qwen2_5_vl(seed=13, dtype=bfloat16)``: 0.12.3 at TP1, 0.13.1 at TP2, 0.14.0 at PP2,
0.15.3 at TP2.

Their ``.metadata`` pickles classes megatron-core added on top of DCP's: ``MCoreSavePlan`` (all four),
``MCoreMetadata`` (0.15) and ``pathlib.PosixPath`` (0.12). The restricted unpickler admits exactly
those, as inert stand-ins, and still refuses everything else.

Oracle for the exports: the sha256 of every source tensor's bytes, recorded when the source was
built (``source-tensors.json``; a test below rebuilds the source and checks the record)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import REPO, read_safetensors_dir, run_cli
from ckptconv.errors import ConversionError
from ckptconv.formats.pickles import Call, Global, Obj, dumps
from ckptconv.formats.torch_dist import read_dcp_metadata

DATA = REPO / "tests" / "data" / "old_mcore"
MCORE_TORCH = "megatron.core.dist_checkpointing.strategies.torch"
#: version -> the class names its .metadata adds to DCP's own (measured; see the module docstring)
EXTRA_CLASSES = {
    "0.12.3": [b"MCoreSavePlan", b"PosixPath"],
    "0.13.1": [b"MCoreSavePlan"],
    "0.14.0": [b"MCoreSavePlan"],
    "0.15.3": [b"MCoreSavePlan", b"MCoreMetadata"],
}
SOURCE = json.loads((DATA / "source-tensors.json").read_text())


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("old_mcore_source"), seed=13, dtype=torch.bfloat16)


def test_the_recorded_source_is_the_tiny_fixture(source_dir):
    """The digests the exports are checked against are those of the fixture the script names."""
    source = read_safetensors_dir(source_dir)
    assert {name: _sha256(t) for name, t in source.items()} == {n: e["sha256"] for n, e in SOURCE["tensors"].items()}


@pytest.mark.parametrize("version", sorted(EXTRA_CLASSES))
def test_the_checkpoint_is_what_the_version_wrote(version):
    """The data exercises what it should: a training run's layout, and the version's own classes in
    .metadata (oracle: the bytes of the pickle)."""
    root = DATA / f"mcore-{version}"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    metadata = (root / "iter_0000010" / ".metadata").read_bytes()
    for name in EXTRA_CLASSES[version]:
        assert name in metadata
    assert (b"MCoreMetadata" in metadata) == (version == "0.15.3")
    assert (b"PosixPath" in metadata) == (version == "0.12.3")


@pytest.mark.parametrize("version", sorted(EXTRA_CLASSES))
def test_a_training_checkpoint_of_this_version_exports_bit_exact(version, tmp_path):
    """mcore-to-hf CKPT OUT --hf-config DIR, as a user runs it: every HF tensor comes back with the
    source's dtype, shape and bytes."""
    out = tmp_path / "hf"
    result = run_cli("mcore-to-hf", DATA / f"mcore-{version}", out, "--hf-config", DATA / "hf-config", "--json")
    assert result.returncode == 0, result.stderr
    exported = read_safetensors_dir(out)
    assert sorted(exported) == sorted(SOURCE["tensors"])
    for name, tensor in exported.items():
        expected = SOURCE["tensors"][name]
        assert (str(tensor.dtype).removeprefix("torch."), list(tensor.shape)) == (expected["dtype"], expected["shape"]), name
        assert _sha256(tensor) == expected["sha256"], name


@pytest.mark.parametrize("version", ["0.12.3", "0.15.3"])
def test_verify_compares_a_training_checkpoint_with_its_source(version, source_dir):
    """verify loads the training checkpoint (optimizer-free, with args, iteration and rng_state
    beside the model) into megatron-core's model and matches the source. Oracle: the real
    transformers model of the source."""
    from ckptconv.verify.runner import run_verify

    report = run_verify(source_dir, DATA / f"mcore-{version}", device="cpu", synthetic_image=False)
    assert report.passed, report.as_dict()


def _metadata_with(storage_meta_checkpoint_id) -> bytes:
    """A minimal DCP Metadata pickle whose ``storage_meta.checkpoint_id`` is the given object."""
    dcp = "torch.distributed.checkpoint.metadata"
    storage_meta = Obj(Global(dcp, "StorageMeta"), {"checkpoint_id": storage_meta_checkpoint_id, "save_id": "x",
                                                   "load_id": None, "modules": []})
    return dumps(Obj(Global(dcp, "Metadata"), {"state_dict_metadata": {}, "planner_data": None, "storage_data": {},
                                               "storage_meta": storage_meta, "version": "1.0.0"}))


@pytest.mark.parametrize("payload,refused", [
    (Call(Global("posix", "system"), ("echo pwned",)), "posix.system"),
    (Call(Global("os", "system"), ("echo pwned",)), "os.system"),
    (Call(Global(MCORE_TORCH, "MCoreLoadPlanner"), ()), f"{MCORE_TORCH}.MCoreLoadPlanner"),
    (Call(Global("megatron.core.dist_checkpointing.mapping", "ShardedObject"), ()), "ShardedObject"),
    (Call(Global("pathlib", "Path"), ("/etc",)), "pathlib.Path"),
    (Call(Global("pathlib", "WindowsPath"), ("C:\\\\",)), "pathlib.WindowsPath"),
    (Call(Global("pathlib", "PosixPath"), (Call(Global("os", "getcwd"), ()),)), "os.getcwd"),
    (Call(Global("argparse", "Namespace"), ()), "argparse.Namespace"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_everything_else_is_still_refused(payload, refused, tmp_path):
    """Oracle: hand-built pickles naming classes no megatron-core version writes into .metadata."""
    path = tmp_path / ".metadata"
    path.write_bytes(_metadata_with(payload))
    with pytest.raises(ConversionError, match=f"unreadable checkpoint metadata: refusing to load .*{refused}"):
        read_dcp_metadata(path)


def test_the_admitted_names_are_inert_stand_ins(tmp_path):
    """Admitted names run no code of theirs: megatron's classes become plain records of their
    arguments, PosixPath a string of its (string) parts; anything else as a part is refused.
    Oracle: hand-built pickles."""
    import io

    from ckptconv.formats.torch_dist import _MetadataUnpickler

    def load(value):
        return _MetadataUnpickler(io.BytesIO(dumps(value))).load()

    plan = load(Call(Global(MCORE_TORCH, "MCoreSavePlan"), ("rm -rf /",)))
    assert type(plan).__module__ == "ckptconv.formats.torch_dist.dcp" and plan.args == ("rm -rf /",)
    assert load(Call(Global("pathlib", "PosixPath"), ("ckpt", "iter_0000010"))) == "ckpt/iter_0000010"
    bad = tmp_path / ".metadata"
    bad.write_bytes(_metadata_with(Call(Global("pathlib", "PosixPath"), (3,))))
    with pytest.raises(ConversionError, match="unreadable checkpoint metadata"):
        read_dcp_metadata(bad)
