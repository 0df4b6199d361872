"""Each transform in the vocabulary -- the core's and every registered family's -- and its exact inverse.

Conversion runs the transforms on ``Array``s (numpy arrays of raw bits, no torch); verify and the
tests run them on torch tensors. Every test here runs on both backends (the ``backend`` fixture)
with the same expectations, and one test checks the two backends give the same bits.

Oracles: hand values (the layouts megatron-core documents, spelled out row by row) and
self-consistency (``inverse(forward(x)) == x`` bit for bit).
"""

import pytest
import torch

from ckptconv.core.spec import AttentionGeometry, ModelSpec
from ckptconv.core.transforms import TRANSFORMS as CORE_TRANSFORMS
from ckptconv.core.transforms import TransformContext
from ckptconv.errors import ConversionError
from ckptconv.families import FAMILIES
from ckptconv.formats.array import Array

ALL_TRANSFORMS = {**CORE_TRANSFORMS, **{name: t for family in FAMILIES for name, t in family.transforms().items()}}
"""The core vocabulary and every registered family's own transforms."""


class Backend:
    """Makes inputs of one backend from torch tensors, and reads any result back as torch."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, tensor: torch.Tensor):
        return Array.from_torch(tensor.contiguous()) if self.name == "array" else tensor

    @staticmethod
    def torch(result) -> torch.Tensor:
        if hasattr(result, "materialize"):  # RowBlocks
            result = result.materialize()
        return result.to_torch() if isinstance(result, Array) else result

    def is_native(self, result) -> bool:
        """The transform's results stay in the backend they were given (no silent torch round trip)."""
        if hasattr(result, "parts"):
            return all(self.is_native(p) for p in result.parts)
        return isinstance(result, Array) if self.name == "array" else isinstance(result, torch.Tensor)


@pytest.fixture(params=["array", "torch"])
def backend(request) -> Backend:
    return Backend(request.param)


def same(a, b) -> bool:
    """Bit for bit, dtype and shape included (either side an Array, RowBlocks or torch tensor)."""
    a, b = Backend.torch(a), Backend.torch(b)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def spec(heads=4, groups=2, head_dim=3, vocab=10, **fields) -> ModelSpec:
    return ModelSpec(
        family="test", hf_config={}, vocab_size=vocab, hidden_size=heads * head_dim, num_layers=2,
        num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim, ffn_hidden_size=8,
        norm_eps=1e-6, rope_theta=1e4, qkv_bias=True, tie_word_embeddings=False,
        layer_mlp_kinds=("dense", "dense"), **fields,
    )


def ctx(s=None, **kw) -> TransformContext:
    return TransformContext(spec=s or spec(), where="test", **kw)


def run(name: str, direction: str, xs, c=None):
    return getattr(ALL_TRANSFORMS[name], direction)(xs, c or ctx(padded_vocab_size=16))


def labelled_rows(prefix: str, heads: int, head_dim: int, width: int = 2) -> torch.Tensor:
    """Row r of head h holds the value 1000*prefix + 10*h + r, so the layout can be read off."""
    base = {"q": 1, "k": 2, "v": 3, "g": 4}[prefix] * 1000
    return torch.tensor([[base + 10 * h + r] * width for h in range(heads) for r in range(head_dim)], dtype=torch.float32)


# =========================================================================== hand values


def test_fuse_qkv_interleaves_query_groups_as_megatron_does(backend):
    # 4 query heads in 2 groups, head_dim 3: Megatron rows are [q0 q1 k0 v0 | q2 q3 k1 v1].
    q, k, v = labelled_rows("q", 4, 3), labelled_rows("k", 2, 3), labelled_rows("v", 2, 3)
    (fused,) = run("fuse_qkv", "forward", [backend(q), backend(k), backend(v)])
    assert backend.is_native(fused)
    heads_in_order = [int(row // 10) for row in Backend.torch(fused)[::3, 0].tolist()]
    assert heads_in_order == [100, 101, 200, 300, 102, 103, 201, 301]
    assert all(same(a, b) for a, b in zip(run("fuse_qkv", "inverse", [fused]), [q, k, v]))


def test_fuse_qkv_gate_puts_each_heads_gate_row_head_dim_times_after_its_group_queries(backend):
    """Step3.7 (Megatron-Bridge's merge_qkvg_weights): per group [q_g, gate_g (each head's g_proj row
    head_dim times), k_g, v_g]; 4 heads in 2 groups, head_dim 3."""
    q, k, v = labelled_rows("q", 4, 3), labelled_rows("k", 2, 3), labelled_rows("v", 2, 3)
    g = labelled_rows("g", 4, 1)  # one row per head: 4000, 4010, 4020, 4030
    (fused,) = run("fuse_qkv_gate", "forward", [backend(q), backend(k), backend(v), backend(g)])
    rows = [int(r) for r in Backend.torch(fused)[:, 0].tolist()]
    group0 = [1000, 1001, 1002, 1010, 1011, 1012, *[4000] * 3, *[4010] * 3, 2000, 2001, 2002, 3000, 3001, 3002]
    assert rows[:18] == group0 and rows[18:] == [r + 20 if r // 1000 in (1, 4) else r + 10 for r in group0]
    assert all(same(a, b) for a, b in zip(run("fuse_qkv_gate", "inverse", [fused]), [q, k, v, g]))


@pytest.mark.parametrize("heads,groups", [(4, 1), (4, 2), (4, 4), (6, 3), (8, 2)])
def test_fuse_qkv_round_trips_weights_and_biases(backend, heads, groups):
    s = spec(heads=heads, groups=groups, head_dim=4)
    for tail in [(5,), ()]:
        q, k, v = torch.randn(heads * 4, *tail), torch.randn(groups * 4, *tail), torch.randn(groups * 4, *tail)
        (fused,) = run("fuse_qkv", "forward", [backend(q), backend(k), backend(v)], ctx(s))
        assert tuple(fused.shape) == ((heads + 2 * groups) * 4, *tail)
        back = run("fuse_qkv", "inverse", [fused], ctx(s))
        assert all(same(a, b) for a, b in zip(back, [q, k, v]))


def test_fuse_qkv_uses_per_layer_head_overrides(backend):
    s = spec(heads=4, groups=2, head_dim=3, layer_attention={1: AttentionGeometry(6, 2, 3)})
    q, k, v = (backend(torch.randn(n, 2)) for n in (18, 6, 6))
    (fused,) = run("fuse_qkv", "forward", [q, k, v], ctx(s, indices={"layer": 1}))
    assert tuple(fused.shape) == (30, 2)
    with pytest.raises(ConversionError, match="expected"):
        run("fuse_qkv", "forward", [q, k, v], ctx(s, indices={"layer": 0}))


def test_fuse_qkv_rejects_shapes_that_disagree_with_the_config(backend):
    with pytest.raises(ConversionError, match=r"q has shape \[11, 2\], expected \[12, 2\]"):
        run("fuse_qkv", "forward", [backend(torch.zeros(11, 2)), backend(torch.zeros(6, 2)), backend(torch.zeros(6, 2))])


def test_fuse_gate_up_is_cat_gate_then_up(backend):
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    (fc1,) = run("fuse_gate_up", "forward", [backend(gate), backend(up)])
    assert same(Backend.torch(fc1)[:4], gate) and same(Backend.torch(fc1)[4:], up)
    assert all(same(a, b) for a, b in zip(run("fuse_gate_up", "inverse", [fc1]), [gate, up]))


def test_pad_vocab_appends_zero_rows_and_export_drops_them(backend):
    emb = torch.randn(10, 4)
    (padded,) = run("pad_vocab", "forward", [backend(emb)])
    torch_padded = Backend.torch(padded)
    assert torch_padded.shape == (16, 4) and same(torch_padded[:10], emb) and not torch_padded[10:].any()
    assert same(run("pad_vocab", "inverse", [padded])[0], emb)


def test_transpose_split_rows_and_expert_splits_round_trip(backend):
    router = torch.randn(6, 4)
    (transposed,) = run("transpose", "forward", [backend(router)])
    assert same(transposed, router.t().contiguous())
    assert same(run("transpose", "inverse", [transposed])[0], router)
    bias = torch.randn(2, 4)
    rows = run("split_rows", "forward", [backend(bias)])
    assert len(rows) == 2 and same(rows[1], bias[1])
    assert same(run("split_rows", "inverse", rows)[0], bias)
    stacked = torch.randn(3, 5, 2)
    assert same(run("split_experts", "inverse", run("split_experts", "forward", [backend(stacked)]))[0], stacked)
    gate, up = torch.randn(3, 5, 2), torch.randn(3, 5, 2)
    per_expert = run("fuse_gate_up_split_experts", "forward", [backend(gate), backend(up)])
    assert len(per_expert) == 3
    assert same(Backend.torch(per_expert[2])[:5], gate[2]) and same(Backend.torch(per_expert[2])[5:], up[2])
    back = run("fuse_gate_up_split_experts", "inverse", per_expert)
    assert same(back[0], gate) and same(back[1], up)


def test_a_second_copy_of_a_tied_embedding_must_equal_it_bit_for_bit(backend):
    """Oracle: hand value. One bit of difference in lm_head is refused, not dropped."""
    emb = torch.randn(10, 3, dtype=torch.bfloat16)
    head = emb.clone()
    head.view(torch.int16)[3, 1] ^= 1
    with pytest.raises(ConversionError, match="differs from the embedding although tie_word_embeddings"):
        run("pad_vocab_tied", "forward", [backend(emb), backend(head)])


# =========================================================================== every transform, both backends


_TIED = torch.randn(10, 3)

EXAMPLE_INPUTS = {
    "copy": [torch.randn(5, 3)],
    "copy_all": [torch.randn(5), torch.randn(2, 2)],
    "fuse_qkv": [torch.randn(12, 7), torch.randn(6, 7), torch.randn(6, 7)],
    "fuse_qkv_gate": [torch.randn(12, 7), torch.randn(6, 7), torch.randn(6, 7), torch.randn(4, 7)],
    "fuse_gate_up": [torch.randn(4, 3), torch.randn(4, 3)],
    "transpose": [torch.randn(4, 3)],
    "pad_vocab": [torch.randn(10, 3)],
    "pad_vocab_tied": [_TIED, _TIED.clone()],  # a tied embedding stored twice
    "split_rows": [torch.randn(2, 5)],
    "split_experts": [torch.randn(3, 2, 2)],
    "fuse_gate_up_split_experts": [torch.randn(3, 2, 4), torch.randn(3, 2, 4)],
}
"""Inputs each transform accepts (spec: 4 heads in 2 groups, head_dim 3; padded vocab 16)."""


def test_every_transform_has_an_example():
    """A transform added to the core or to a registered family is tested here, or this fails."""
    assert set(EXAMPLE_INPUTS) == set(ALL_TRANSFORMS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_INPUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_transform_inverts_exactly(backend, name, dtype):
    """Self-consistency: inverse(forward(x)) == x bit for bit, dtype kept, in the backend given."""
    xs = [x.to(dtype) for x in EXAMPLE_INPUTS[name]]
    made = run(name, "forward", [backend(x) for x in xs])
    assert all(backend.is_native(t) for t in made)
    back = run(name, "inverse", made)
    assert len(back) == len(xs) and all(backend.is_native(a) and same(a, b) for a, b in zip(back, xs))


@pytest.mark.parametrize("name", sorted(EXAMPLE_INPUTS))
def test_arrays_and_torch_tensors_give_the_same_bits(name):
    """The backend conversion runs (Arrays) and the one verify runs (torch) agree, both directions."""
    xs = [x.to(torch.bfloat16) for x in EXAMPLE_INPUTS[name]]
    on_arrays = run(name, "forward", [Array.from_torch(x) for x in xs])
    on_torch = run(name, "forward", xs)
    assert len(on_arrays) == len(on_torch) and all(same(a, t) for a, t in zip(on_arrays, on_torch))
    back_arrays, back_torch = run(name, "inverse", on_arrays), run(name, "inverse", on_torch)
    assert all(same(a, t) for a, t in zip(back_arrays, back_torch))


def test_streaming_forms_equal_the_eager_forward(backend):
    """Transforms with a row-block (streaming) forward give the same tensor as their forward."""
    streaming = {name: t for name, t in ALL_TRANSFORMS.items() if t.forward_rows is not None}
    assert {"pad_vocab", "fuse_qkv", "fuse_gate_up", "fuse_gate_up_split_experts", "fuse_qkv_gate"} <= set(streaming)
    c = ctx(padded_vocab_size=16)
    for name, transform in streaming.items():
        xs = [backend(x) for x in EXAMPLE_INPUTS[name]]
        eager, rows = transform.forward(xs, c), transform.forward_rows(xs, c)
        assert len(rows) == len(eager) and all(same(r, e) for r, e in zip(rows, eager)), name


def test_streaming_inverses_equal_the_eager_inverse(backend):
    """Export writes stacked experts as row blocks; they must be the stacked tensors exactly."""
    streaming = {name: t for name, t in ALL_TRANSFORMS.items() if t.inverse_rows is not None}
    assert {"split_rows", "split_experts", "fuse_gate_up_split_experts"} <= set(streaming)
    c = ctx(padded_vocab_size=16)
    for name, transform in streaming.items():
        megatron_side = transform.forward([backend(x) for x in EXAMPLE_INPUTS[name]], c)
        rows, eager = transform.inverse_rows(megatron_side, c), transform.inverse(megatron_side, c)
        assert [tuple(r.shape) for r in rows] == [tuple(e.shape) for e in eager]
        assert all(same(r, e) for r, e in zip(rows, eager)), name
