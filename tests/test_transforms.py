"""Each transform in the vocabulary, and its exact inverse."""

import pytest
import torch

from ckptconv.errors import ConversionError
from ckptconv.core.spec import AttentionGeometry, ModelSpec
from ckptconv.core.transforms import TransformContext, get


def spec(heads=4, groups=2, head_dim=3, vocab=10, **fields) -> ModelSpec:
    return ModelSpec(
        family="test", hf_config={}, vocab_size=vocab, hidden_size=heads * head_dim, num_layers=2,
        num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim, ffn_hidden_size=8,
        norm_eps=1e-6, rope_theta=1e4, qkv_bias=True, tie_word_embeddings=False,
        layer_mlp_kinds=("dense", "dense"), **fields,
    )


def ctx(s=None, **kw) -> TransformContext:
    return TransformContext(spec=s or spec(), where="test", **kw)


def labelled_rows(prefix: str, heads: int, head_dim: int, width: int = 2) -> torch.Tensor:
    """Row r of head h holds the value 1000*prefix + 10*h + r, so the layout can be read off."""
    base = {"q": 1, "k": 2, "v": 3}[prefix] * 1000
    return torch.tensor([[base + 10 * h + r] * width for h in range(heads) for r in range(head_dim)], dtype=torch.float32)


def test_fuse_qkv_interleaves_query_groups_as_megatron_does():
    # 4 query heads in 2 groups, head_dim 3: Megatron rows are [q0 q1 k0 v0 | q2 q3 k1 v1].
    q, k, v = labelled_rows("q", 4, 3), labelled_rows("k", 2, 3), labelled_rows("v", 2, 3)
    (fused,) = get("fuse_qkv").forward([q, k, v], ctx())
    heads_in_order = [int(row // 10) for row in fused[::3, 0].tolist()]
    assert heads_in_order == [100, 101, 200, 300, 102, 103, 201, 301]
    assert all(torch.equal(a, b) for a, b in zip(get("fuse_qkv").inverse([fused], ctx()), [q, k, v]))


@pytest.mark.parametrize("heads,groups", [(4, 1), (4, 2), (4, 4), (6, 3), (8, 2)])
def test_fuse_qkv_round_trips_weights_and_biases(heads, groups):
    s = spec(heads=heads, groups=groups, head_dim=4)
    for tail in [(5,), ()]:
        q, k, v = torch.randn(heads * 4, *tail), torch.randn(groups * 4, *tail), torch.randn(groups * 4, *tail)
        (fused,) = get("fuse_qkv").forward([q, k, v], ctx(s))
        assert fused.shape == ((heads + 2 * groups) * 4, *tail)
        back = get("fuse_qkv").inverse([fused], ctx(s))
        assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


def test_fuse_qkv_uses_per_layer_head_overrides():
    s = spec(heads=4, groups=2, head_dim=3, layer_attention={1: AttentionGeometry(6, 2, 3)})
    q, k, v = torch.randn(18, 2), torch.randn(6, 2), torch.randn(6, 2)
    (fused,) = get("fuse_qkv").forward([q, k, v], ctx(s, indices={"layer": 1}))
    assert fused.shape == (30, 2)
    with pytest.raises(ConversionError, match="expected"):
        get("fuse_qkv").forward([q, k, v], ctx(s, indices={"layer": 0}))


def test_fuse_qkv_rejects_shapes_that_disagree_with_the_config():
    with pytest.raises(ConversionError, match=r"q has shape \[11, 2\], expected \[12, 2\]"):
        get("fuse_qkv").forward([torch.zeros(11, 2), torch.zeros(6, 2), torch.zeros(6, 2)], ctx())


def test_fuse_gate_up_is_cat_gate_then_up():
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    (fc1,) = get("fuse_gate_up").forward([gate, up], ctx())
    assert torch.equal(fc1[:4], gate) and torch.equal(fc1[4:], up)
    assert all(torch.equal(a, b) for a, b in zip(get("fuse_gate_up").inverse([fc1], ctx()), [gate, up]))


def test_pad_vocab_appends_zero_rows_and_export_drops_them():
    emb = torch.randn(10, 4)
    (padded,) = get("pad_vocab").forward([emb], ctx(padded_vocab_size=16))
    assert padded.shape == (16, 4) and torch.equal(padded[:10], emb) and not padded[10:].any()
    assert torch.equal(get("pad_vocab").inverse([padded], ctx(padded_vocab_size=16))[0], emb)


def test_transpose_split_rows_and_expert_splits_round_trip():
    router = torch.randn(6, 4)
    assert torch.equal(get("transpose").inverse(get("transpose").forward([router], ctx()), ctx())[0], router)
    bias = torch.randn(2, 4)
    rows = get("split_rows").forward([bias], ctx())
    assert len(rows) == 2 and torch.equal(rows[1], bias[1])
    assert torch.equal(get("split_rows").inverse(rows, ctx())[0], bias)
    stacked = torch.randn(3, 5, 2)
    assert torch.equal(get("split_experts").inverse(get("split_experts").forward([stacked], ctx()), ctx())[0], stacked)
    gate, up = torch.randn(3, 5, 2), torch.randn(3, 5, 2)
    per_expert = get("fuse_gate_up_split_experts").forward([gate, up], ctx())
    assert len(per_expert) == 3 and torch.equal(per_expert[2][:5], gate[2]) and torch.equal(per_expert[2][5:], up[2])
    back = get("fuse_gate_up_split_experts").inverse(per_expert, ctx())
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


_TIED = torch.randn(10, 3)

def test_a_second_copy_of_a_tied_embedding_must_equal_it_bit_for_bit():
    """Oracle: hand value. One bit of difference in lm_head is refused, not dropped."""
    from ckptconv.errors import ConversionError

    emb = torch.randn(10, 3, dtype=torch.bfloat16)
    head = emb.clone()
    head.view(torch.int16)[3, 1] ^= 1
    with pytest.raises(ConversionError, match="differs from the embedding although tie_word_embeddings"):
        get("pad_vocab_tied").forward([emb, head], ctx(padded_vocab_size=16))


EXAMPLE_INPUTS = {
    "copy": [torch.randn(5, 3)],
    "copy_all": [torch.randn(5), torch.randn(2, 2)],
    "fuse_qkv": [torch.randn(12, 7), torch.randn(6, 7), torch.randn(6, 7)],
    "fuse_gate_up": [torch.randn(4, 3), torch.randn(4, 3)],
    "transpose": [torch.randn(4, 3)],
    "pad_vocab": [torch.randn(10, 3)],
    "pad_vocab_tied": [_TIED, _TIED.clone()],  # a tied embedding stored twice
    "split_rows": [torch.randn(2, 5)],
    "split_experts": [torch.randn(3, 2, 2)],
    "fuse_gate_up_split_experts": [torch.randn(3, 2, 4), torch.randn(3, 2, 4)],
}


def test_every_core_transform_has_an_exactness_example():
    from ckptconv.core.transforms import TRANSFORMS

    core = {name for name, t in TRANSFORMS.items() if t.forward.__module__ == "ckptconv.core.transforms"}
    assert set(EXAMPLE_INPUTS) == core


@pytest.mark.parametrize("name", sorted(EXAMPLE_INPUTS))
def test_every_transform_inverts_exactly_in_bf16(name):
    """inverse(forward(x)) == x bit for bit, for inputs the transform accepts."""
    s = spec(heads=4, groups=2, head_dim=3)
    xs = [x.to(torch.bfloat16) for x in EXAMPLE_INPUTS[name]]
    c = ctx(s, padded_vocab_size=16)
    back = get(name).inverse(get(name).forward(xs, c), c)
    assert len(back) == len(xs) and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(back, xs))


def test_streaming_forms_equal_the_eager_forward():
    """Transforms with a row-block (streaming) forward give the same tensor as their forward."""
    from ckptconv.core.transforms import TRANSFORMS

    streaming = {name: t for name, t in TRANSFORMS.items()
                 if t.forward_rows is not None and t.forward.__module__ == "ckptconv.core.transforms"}
    assert {"pad_vocab", "fuse_qkv", "fuse_gate_up", "fuse_gate_up_split_experts"} <= set(streaming)
    c = ctx(padded_vocab_size=16)
    for name, transform in streaming.items():
        xs = EXAMPLE_INPUTS[name]
        eager = transform.forward(xs, c)
        rows = transform.forward_rows(xs, c)
        assert len(rows) == len(eager)
        assert all(torch.equal(r.materialize() if hasattr(r, "materialize") else r, e) for r, e in zip(rows, eager))


def test_streaming_inverses_equal_the_eager_inverse():
    """Export writes stacked experts as row blocks; they must be the stacked tensors exactly."""
    from ckptconv.core.transforms import TRANSFORMS

    streaming = {name: t for name, t in TRANSFORMS.items()
                 if t.inverse_rows is not None and t.forward.__module__ == "ckptconv.core.transforms"}
    assert {"split_rows", "split_experts", "fuse_gate_up_split_experts"} <= set(streaming)
    c = ctx(padded_vocab_size=16)
    for name, transform in streaming.items():
        megatron_side = transform.forward(EXAMPLE_INPUTS[name], c)
        rows = transform.inverse_rows(megatron_side, c)
        eager = transform.inverse(megatron_side, c)
        assert [tuple(r.shape) for r in rows] == [tuple(e.shape) for e in eager]
        assert all(torch.equal(r.materialize(), e) for r, e in zip(rows, eager))
