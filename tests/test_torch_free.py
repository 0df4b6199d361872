"""Conversion moves bytes, so it runs without torch: the formats torch would write, written by us.

These specify that our hand-written pickles are what torch writes (byte for byte for chunk
archives; field for field for DCP's ``.metadata``: test_dcp_metadata.py), that Arrays carry every checkpoint dtype
bit-exactly, and that a conversion process never imports torch unless a dtype cast needs it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from ckptconv.formats.array import DTYPES, Array, cat
from ckptconv.formats.pickles import tensor_data_pkl
from ckptconv.formats.torch_save import _TRAILER_RECORDS, object_bytes, read_tensor, write_tensor


class _Records:
    """Captures the records ``torch.serialization._save`` writes."""

    def __init__(self):
        self.records = {}

    def write_record(self, name, data, nbytes):
        self.records[name] = bytes(data) if isinstance(data, (bytes, bytearray)) else data

    def write_record_metadata(self, name, nbytes):
        self.records[name] = None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.torch_name)
@pytest.mark.parametrize("shape", [(), (7,), (3, 4), (2, 3, 4, 5), (300, 70000)])
def test_chunk_data_pkl_is_byte_identical_to_torch_save(dtype, shape):
    records = _Records()
    tensor = torch.empty(shape, dtype=getattr(torch, dtype.torch_name))
    torch.serialization._save(tensor, records, pickle, 2, _disable_byteorder_record=False)
    assert tensor_data_pkl(dtype, shape) == records.records["data.pkl"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.torch_name)
def test_every_dtype_round_trips_bit_exactly_through_arrays_and_archives(dtype):
    source = (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) * 1.37 - 9).to(getattr(torch, dtype.torch_name))
    array = Array.from_torch(source)
    assert array.dtype == dtype and array.shape == (2, 3, 4)
    buffer = io.BytesIO()
    write_tensor(buffer, array)
    via_torch = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    via_us = read_tensor(bytearray(buffer.getvalue())).to_torch()
    for loaded in (via_torch, via_us):
        assert loaded.dtype == source.dtype
        assert torch.equal(loaded.view(torch.uint8), source.view(torch.uint8))


def test_objects_are_archived_as_torch_save_does():
    for obj in ([None], {}):
        assert torch.load(io.BytesIO(object_bytes(obj)), weights_only=True) == obj
    assert dict(_TRAILER_RECORDS)["version"] == b"3\n"


def test_meta_arrays_have_shapes_and_no_memory():
    huge = Array.empty_meta((1 << 20, 1 << 16), DTYPES[3])  # 128 GiB if it were real
    rows = cat([huge[:10], huge[:5]], dim=0).reshape(3, 5, 1 << 16)
    assert rows.shape == (3, 5, 1 << 16) and rows.meta and set(rows.raw.strides) == {0}  # one element behind it
    assert huge.t().contiguous().shape == (1 << 16, 1 << 20)


def _modules_after(argv: list[str]) -> set[str]:
    code = (
        "import sys, json\n"
        "from ckptconv.cli import main\n"
        f"sys.argv = ['ckptconv', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stderr.strip().splitlines()[-1]))


def test_converting_either_way_never_imports_torch(tiny_qwen, tmp_path):
    """torch alone takes longer to import than a 3 GB model takes to convert (docs/benchmarks.md)."""
    assert _modules_after(["hf-to-mcore", str(tiny_qwen), str(tmp_path / "mcore"), "--tp", "2", "--json"]) == set()
    assert _modules_after(["mcore-to-hf", str(tmp_path / "mcore"), str(tmp_path / "hf"), "--json"]) == set()


def test_a_dtype_cast_is_the_one_place_torch_is_needed(tiny_qwen, tmp_path):
    assert "torch" in _modules_after(["hf-to-mcore", str(tiny_qwen), str(tmp_path / "bf16"), "--dtype", "bf16", "--json"])


def test_only_unchanged_views_of_a_mapped_file_count_as_file_ranges(tmp_path):
    """What lets the writers copy bytes file to file: a view of the mapping knows where it lies in
    the file; a copy, a cast or a transposed view does not claim to be there."""
    from ckptconv.pipeline.source import open_hf_checkpoint
    from safetensors.torch import save_file

    weight = torch.arange(12 * 8, dtype=torch.float32).reshape(12, 8)
    save_file({"a": torch.zeros(3), "w": weight}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    source = open_hf_checkpoint(str(tmp_path))
    info = source.tensors["w"]
    w = source.read("w")
    fd, offset = w.file_range()
    assert offset == info.offset and os.pread(fd, 32, offset) == weight[0].numpy().tobytes()
    assert w[4:6].file_range()[1] == info.offset + 4 * 8 * 4  # rows 4-5 of a row-major [12, 8] fp32
    assert w[:, :4].file_range() is None  # not contiguous
    assert w.t().contiguous().file_range() is None  # computed: lives elsewhere
    assert w.to(torch.bfloat16).file_range() is None
    source.close()
    assert os.pread(fd, 32, offset) == weight[0].numpy().tobytes()  # the array keeps its own descriptor


def test_chunks_of_4_gib_and_more_are_written_in_zip64_and_load_in_torch_and_in_ours(tmp_path, monkeypatch):
    """A chunk of 4 GiB or more (a 256k x 8192 bf16 embedding) needs zip64 sizes and offsets;
    simulated by lowering the threshold so every field past 64 is written the zip64 way."""
    import ckptconv.formats.torch_save as tsf
    from torch.distributed.checkpoint import FileSystemReader

    from ckptconv.formats.torch_dist import DistCheckpointReader, DistCheckpointWriter, write_metadata

    monkeypatch.setattr(tsf, "_ZIP64_AT", 64)
    weight = torch.randn(8, 16).to(torch.bfloat16)  # 256 bytes: past the lowered threshold
    buffer = io.BytesIO()
    write_tensor(buffer, Array.from_torch(weight))
    assert torch.equal(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), weight)
    assert torch.equal(read_tensor(bytearray(buffer.getvalue())).to_torch(), weight)
    writer = DistCheckpointWriter(tmp_path, lanes=1)
    writer.write_chunk("w", (8, 16), (0, 0), Array.from_torch(weight))
    write_metadata(tmp_path, [writer.close()])
    assert torch.equal(DistCheckpointReader(tmp_path).read("w").to_torch(), weight)
    target = {"w": torch.empty(8, 16, dtype=torch.bfloat16)}
    torch.distributed.checkpoint.load(target, storage_reader=FileSystemReader(str(tmp_path)), no_dist=True)
    assert torch.equal(target["w"], weight)


def test_without_kernel_copies_both_directions_still_round_trip(tiny_qwen, tmp_path, monkeypatch):
    """Where copy_file_range cannot copy between two files (EXDEV across filesystems on older
    kernels, ENOSYS, EINVAL), the writers copy through memory instead, with the same result."""
    import errno

    from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore
    from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

    calls = {"n": 0}

    def refuse(*args, **kwargs):
        calls["n"] += 1
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    convert_hf_to_mcore(str(tiny_qwen), tmp_path / "mcore")
    convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "hf")
    assert calls["n"] > 0
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tiny_qwen / "model.safetensors").read_bytes()
