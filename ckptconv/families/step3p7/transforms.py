"""Step3.7's own transforms (named by ``mappings/step3p7.toml``; returned by ``Family.transforms()``)."""

from __future__ import annotations

from ckptconv.core.transforms import RowBlocks, Transform, TransformContext, attention_geometry, expect_shape, register
from ckptconv.formats.array import split

TRANSFORMS: dict[str, Transform] = {}


def _bits(t):
    """The tensor's elements as unsigned integers of the same width (bitwise comparison: NaN and
    -0.0 compare by their bits). Arrays (numpy-backed) and torch tensors alike."""
    if hasattr(t, "raw"):  # ckptconv.formats.array.Array
        return t.raw.view(f"u{t.dtype.itemsize}")
    import torch

    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@register("fuse_qkv_gate", (4, 1), into=TRANSFORMS)
def _fuse_qkv_gate():
    """q, k, v and the per-head gate g_proj -> one linear_qkv laid out as Megatron-Bridge's
    ``merge_qkvg_weights`` lays it out for megatron-core's ``attention_output_gate``
    (Megatron-Bridge param_mapping.py, ``merge_qkvg_weights`` / ``split_qkvg_weights``).

    Per query group g: ``[q_g (heads/groups * d), gate_g (heads/groups * d), k_g (d), v_g (d)]``,
    where gate_g repeats each head's ``g_proj`` row d (head_dim) times. megatron-core's
    ``attention_output_gate`` multiplies the attention output by ``sigmoid(gate)`` element-wise; d
    equal rows per head make that exactly Step3.7's one sigmoid per head, so a stock megatron-core
    SelfAttention computes the model. Every group block has the same size, so Megatron's column
    split over TP (groups % tp == 0) hands each rank whole groups with their gates. Head geometry is
    per layer (``spec.layer_attention``; MTP layers by ``{hf_layer}``).

    The inverse takes each head's first gate row and checks the other d - 1 are bit-identical: a
    checkpoint trained with an element-wise gate has stopped being a per-head model, and HF's
    ``g_proj`` cannot hold it.
    """

    def forward_rows(ts, ctx: TransformContext):
        q, k, v, g = ts
        heads, groups, d = attention_geometry(ctx)
        tail = tuple(q.shape[1:])
        expect_shape(q, (heads * d, *tail), "q_proj", ctx)
        expect_shape(k, (groups * d, *tail), "k_proj", ctx)
        expect_shape(v, (groups * d, *tail), "v_proj", ctx)
        expect_shape(g, (heads, *tail), "g_proj", ctx)
        per_group = heads // groups
        blocks = []
        for i in range(groups):  # row slices: the writer streams them without a concatenated copy
            blocks.append(q[i * per_group * d:(i + 1) * per_group * d])
            for head in range(i * per_group, (i + 1) * per_group):
                blocks += [g[head:head + 1]] * d  # the same view d times: no copy until written
            blocks += [k[i * d:(i + 1) * d], v[i * d:(i + 1) * d]]
        return [RowBlocks(blocks)]

    def forward(ts, ctx: TransformContext):
        return [rows.materialize() for rows in forward_rows(ts, ctx)]

    def inverse(ts, ctx: TransformContext):
        (qkvg,) = ts
        heads, groups, d = attention_geometry(ctx)
        per_group = heads // groups
        tail = tuple(qkvg.shape[1:])
        block = 2 * per_group * d + 2 * d
        expect_shape(qkvg, (groups * block, *tail), "linear_qkv (with the expanded per-head gate)", ctx)
        grouped = qkvg.reshape(groups, block, *tail)
        q, gate, k, v = split(grouped, [per_group * d, per_group * d, d, d], dim=1)
        gate = gate.reshape(groups * per_group, d, *tail)
        bits = _bits(gate)
        if not (bits == bits[:, :1]).all():
            raise ctx.fail(
                "the gate rows of a head differ (linear_qkv holds head_dim copies of each head's g_proj row): "
                "the checkpoint was trained with an element-wise attention_output_gate, which Step3.7's "
                "per-head g_proj cannot represent"
            )
        return [
            q.reshape(heads * d, *tail).contiguous(),
            k.reshape(groups * d, *tail).contiguous(),
            v.reshape(groups * d, *tail).contiguous(),
            gate[:, 0].contiguous(),
        ]

    return forward, inverse, forward_rows
