"""The chunk format and the torch_dist files, checked against PyTorch's own readers."""

import io

import pytest
import torch

from ckptconv.formats.torch_dist import DistCheckpointReader, DistCheckpointWriter, write_metadata
from ckptconv.formats.torch_save import write_tensor


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(6, dtype=torch.float32).reshape(2, 3),
        torch.randn(5, 7).to(torch.bfloat16),
        torch.randn(3, 4, 5).to(torch.float16),
        torch.randn(4, 6)[:, 1:3],  # a non-contiguous view
        torch.randn(10)[3:7],  # a view at a storage offset: only its 4 elements are written
        torch.zeros(0, 3),
        torch.tensor(3.5),
    ],
    ids=["fp32", "bf16", "fp16-3d", "strided-view", "offset-view", "empty", "scalar"],
)
def test_write_tensor_is_loadable_by_torch_load_wherever_it_starts(tensor):
    buffer = io.BytesIO(b"some bytes before the archive")
    buffer.seek(0, io.SEEK_END)
    start = buffer.tell()
    write_tensor(buffer, tensor)
    archive = buffer.getvalue()[start:]
    loaded = torch.load(io.BytesIO(archive), weights_only=True)
    assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor)
    assert len(archive) < tensor.nbytes + 2048  # only the tensor's own bytes, not its base storage


def test_a_written_checkpoint_reads_back_through_torch_distributed_checkpoint(tmp_path):
    """torch's own DCP loader (no megatron) reads what DistCheckpointWriter wrote."""
    import torch.distributed.checkpoint as dcp

    weight = torch.randn(2, 6, 4)
    writer = DistCheckpointWriter(tmp_path)
    for layer in range(2):
        for rank, rows in enumerate((slice(0, 3), slice(3, 6))):  # two TP chunks per layer
            writer.write_chunk("w", (2, 6, 4), (layer, rows.start, 0), weight[layer : layer + 1, rows])
    writer.write_object("w_extra/shard_0_1", [None])
    write_metadata(tmp_path, [writer.close()])
    target = {"w": torch.empty(2, 6, 4)}
    dcp.load(target, checkpoint_id=str(tmp_path), no_dist=True)
    assert torch.equal(target["w"], weight)
    reader = DistCheckpointReader(tmp_path)
    assert torch.equal(reader.read("w", (1,)).to_torch(), weight[1]) and reader.read_object("w_extra/shard_0_1") == [None]


def test_chunks_that_do_not_tile_the_tensor_are_refused(tmp_path):
    from ckptconv.errors import ConversionError

    writer = DistCheckpointWriter(tmp_path)
    writer.write_chunk("w", (2, 4), (0, 0), torch.zeros(1, 4))  # layer 1 never written
    with pytest.raises(ConversionError, match="chunks cover 4 of 8 elements"):
        write_metadata(tmp_path, [writer.close()])


def test_row_blocks_are_written_as_one_tensor_without_being_concatenated():
    from ckptconv.core.transforms import RowBlocks

    top, bottom = torch.randn(5, 3), torch.zeros(2, 3)
    buffer = io.BytesIO()
    write_tensor(buffer, RowBlocks([top, bottom]), shape=(1, 7, 3))
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert loaded.shape == (1, 7, 3) and torch.equal(loaded[0], torch.cat([top, bottom]))
    rows = RowBlocks([top, bottom]).narrow_rows(4, 3)
    assert [tuple(p.shape) for p in rows.parts] == [(1, 3), (2, 3)]


def test_read_tensor_loads_in_place_archives_from_either_writer():
    """Chunks from ckptconv's writer and from torch.save itself (Megatron's writer, including a
    view into a larger storage) load through the in-place reader."""
    from ckptconv.formats.torch_save import read_tensor

    base = torch.randn(10, 4)
    for tensor, writer in [(base[2:5], torch.save), (base[2:5], write_tensor), (base.to(torch.bfloat16), write_tensor)]:
        buffer = io.BytesIO()
        writer(tensor, buffer) if writer is torch.save else writer(buffer, tensor)
        loaded = read_tensor(bytearray(buffer.getvalue()))
        assert loaded.dtype == tensor.dtype and torch.equal(loaded.to_torch(), tensor)
