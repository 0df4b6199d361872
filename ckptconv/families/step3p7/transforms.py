"""Step3.7's own transforms (named by ``mappings/step3p7.toml``; returned by ``Family.transforms()``)."""

from __future__ import annotations

from ckptconv.core.transforms import RowBlocks, Transform, TransformContext, attention_geometry, expect_shape, register
from ckptconv.formats.array import split

TRANSFORMS: dict[str, Transform] = {}


@register("fuse_qkv_gate", (4, 1), into=TRANSFORMS)
def _fuse_qkv_gate():
    """q, k, v and the per-head gate g_proj -> one linear_qkv, rows grouped per query group g as
    ``[q_g (heads/groups * d), gate_g (heads/groups), k_g (d), v_g (d)]``.

    This is megatron-core's ``attention_output_gate`` order (query, gate, key, value per group)
    with a per-head gate of one row per head. Every group block has the same size, so Megatron's
    column split over TP (which requires groups % tp == 0) hands each rank whole groups with their
    gates. Head geometry is per layer (``spec.layer_attention``).
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
            blocks += [
                q[i * per_group * d:(i + 1) * per_group * d],
                g[i * per_group:(i + 1) * per_group],
                k[i * d:(i + 1) * d],
                v[i * d:(i + 1) * d],
            ]
        return [RowBlocks(blocks)]

    def forward(ts, ctx: TransformContext):
        return [rows.materialize() for rows in forward_rows(ts, ctx)]

    def inverse(ts, ctx: TransformContext):
        (qkvg,) = ts
        heads, groups, d = attention_geometry(ctx)
        per_group = heads // groups
        tail = tuple(qkvg.shape[1:])
        expect_shape(qkvg, (groups * (per_group * (d + 1) + 2 * d), *tail), "linear_qkv (with gate)", ctx)
        grouped = qkvg.reshape(groups, per_group * (d + 1) + 2 * d, *tail)
        q, g, k, v = split(grouped, [per_group * d, per_group, d, d], dim=1)
        return [
            q.reshape(heads * d, *tail).contiguous(),
            k.reshape(groups * d, *tail).contiguous(),
            v.reshape(groups * d, *tail).contiguous(),
            g.reshape(heads, *tail).contiguous(),
        ]

    return forward, inverse, forward_rows
