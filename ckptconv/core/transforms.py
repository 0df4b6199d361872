"""The vocabulary of tensor transforms a mapping table may name.

A transform maps the list of HF tensors one table row consumes to the list of Megatron tensors it
produces (``forward``), and back (``inverse``); ``inverse(forward(x)) == x`` bit for bit, which is
what makes export "the same table read backwards". Transforms never guess a layout from a shape:
everything they need (head counts, vocab padding, expert counts) comes from the
:class:`TransformContext`, and they check the shapes they are given against it.

Transforms only move elements (slice, interleave, concatenate, transpose), never compute, and use
only what :class:`~ckptconv.formats.array.Array` and ``torch.Tensor`` share: the converter runs them on
Arrays (no torch import), tests and verify on torch tensors.

The core vocabulary is :data:`TRANSFORMS`. A family that needs more declares its own dict with
:func:`register` (``into=``) in ``ckptconv/families/<name>/transforms.py`` and returns it from
``Family.transforms()``; the family's mapping table resolves names against both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ckptconv.formats.array import cat, chunk, split, stack
from ckptconv.formats.rowblocks import RowBlocks
from ckptconv.errors import ConversionError
from ckptconv.core.spec import ModelSpec

Tensors = list  # of Array or torch.Tensor


@dataclass(frozen=True)
class TransformContext:
    spec: ModelSpec
    indices: dict[str, int] = field(default_factory=dict)
    """Placeholder values of this row, e.g. ``{"layer": 3}``."""
    padded_vocab_size: int = 0
    where: str = ""
    """The HF key(s) this row reads; used in error messages."""
    params: dict = field(default_factory=dict)
    """Per-row parameters from the table (``params = {...}``)."""

    def fail(self, message: str) -> ConversionError:
        return ConversionError(f"{self.where}: {message}")


@dataclass(frozen=True)
class Transform:
    name: str
    forward: Callable[[Tensors, TransformContext], Tensors]
    inverse: Callable[[Tensors, TransformContext], Tensors]
    arity: tuple[int | None, int | None]
    """(number of HF tensors, number of Megatron tensors); None = as many as the row lists."""
    forward_rows: Callable[[Tensors, TransformContext], list["RowBlocks"]] | None = None
    """Optional streaming form of ``forward``: the same result as row blocks, not copied into
    one tensor; the writer writes the blocks back to back (see :class:`RowBlocks`)."""
    inverse_rows: Callable[[Tensors, TransformContext], list["RowBlocks"]] | None = None
    """Optional streaming form of ``inverse`` (export), likewise."""


TRANSFORMS: dict[str, Transform] = {}


def register(name: str, arity: tuple[int | None, int | None], into: dict[str, Transform] | None = None):
    """Decorator for a ``(forward, inverse[, forward_rows[, inverse_rows]])`` factory:
    ``@register("x", (1, 1))`` adds to the core vocabulary, ``into=`` to a family's own dict."""
    table = TRANSFORMS if into is None else into

    def wrap(factory: Callable[[], tuple]):
        if name in table:
            raise ValueError(f"transform {name!r} is registered twice")
        forward, inverse, *streaming = factory()
        table[name] = Transform(name, forward, inverse, arity, *streaming)
        return factory

    return wrap


def get(name: str) -> Transform:
    """A transform of the core vocabulary (a family's own are found through its mapping table)."""
    if name not in TRANSFORMS:
        raise ConversionError(f"unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS))}")
    return TRANSFORMS[name]


def expect_shape(t, shape: tuple[int, ...], what: str, ctx: TransformContext) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ctx.fail(f"{what} has shape {list(t.shape)}, expected {list(shape)} from the config")


# ----------------------------------------------------------------------------------------------
@register("copy", (1, 1))
def _copy():
    return (lambda ts, ctx: [ts[0]]), (lambda ts, ctx: [ts[0]])


# ----------------------------------------------------------------------------------------------
def attention_geometry(ctx: TransformContext) -> tuple[int, int, int]:
    """(query heads, query groups, head dim) of this row's layer (layers may differ: Step3.7)."""
    layer = ctx.indices.get("layer", ctx.indices.get("hf_layer"))  # hf_layer: MTP layers past the decoder
    geometry = ctx.spec.attention(layer)
    return geometry.num_attention_heads, geometry.num_query_groups, geometry.head_dim


@register("fuse_qkv", (3, 1))
def _fuse_qkv():
    """q, k, v -> Megatron's linear_qkv: rows interleaved per query group, ``[q_g, k_g, v_g]`` for
    each group g, where q_g holds ``heads/groups`` heads. Works for weights ``[rows, in]`` and
    biases ``[rows]`` alike (the trailing dims ride along)."""

    def forward_rows(ts, ctx):
        q, k, v = ts
        heads, groups, d = attention_geometry(ctx)
        tail = tuple(q.shape[1:])
        expect_shape(q, (heads * d, *tail), "q", ctx)
        expect_shape(k, (groups * d, *tail), "k", ctx)
        expect_shape(v, (groups * d, *tail), "v", ctx)
        q_rows = heads // groups * d
        blocks = []
        for g in range(groups):
            blocks += [q[g * q_rows:(g + 1) * q_rows], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        return [RowBlocks(blocks)]

    def forward(ts, ctx):
        return [rows.materialize() for rows in forward_rows(ts, ctx)]

    def inverse(ts, ctx):
        (qkv,) = ts
        heads, groups, d = attention_geometry(ctx)
        tail = tuple(qkv.shape[1:])
        expect_shape(qkv, ((heads + 2 * groups) * d, *tail), "linear_qkv", ctx)
        per_group = heads // groups
        grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
        q, k, v = split(grouped, [per_group * d, d, d], dim=1)
        return [
            q.reshape(heads * d, *tail).contiguous(),
            k.reshape(groups * d, *tail).contiguous(),
            v.reshape(groups * d, *tail).contiguous(),
        ]

    return forward, inverse, forward_rows


# ----------------------------------------------------------------------------------------------
@register("fuse_gate_up", (2, 1))
def _fuse_gate_up():
    """gate, up -> linear_fc1 = cat(gate, up) along the output dim (Megatron's SwiGLU layout).
    Also works on expert stacks ``[E, F, H]`` when ``params.dim = 1``."""

    def checked(ts, ctx):
        gate, up = ts
        if tuple(gate.shape) != tuple(up.shape):
            raise ctx.fail(f"gate {list(gate.shape)} and up {list(up.shape)} differ in shape")
        return gate, up

    def forward(ts, ctx):
        return [cat(list(checked(ts, ctx)), dim=ctx.params.get("dim", 0))]

    def forward_rows(ts, ctx):
        if ctx.params.get("dim", 0) != 0:  # stacked experts fuse along dim 1: not a row concatenation
            return forward(ts, ctx)
        return [RowBlocks(list(checked(ts, ctx)))]

    def inverse(ts, ctx):
        (fc1,) = ts
        dim = ctx.params.get("dim", 0)
        if fc1.shape[dim] % 2:
            raise ctx.fail(f"linear_fc1 has odd size {fc1.shape[dim]} on dim {dim}")
        gate, up = chunk(fc1, 2, dim=dim)
        return [gate.contiguous(), up.contiguous()]

    return forward, inverse, forward_rows


# ----------------------------------------------------------------------------------------------
@register("transpose", (1, 1))
def _transpose():
    """A 2D tensor stored the other way round (ERNIE's router gates are ``[hidden, experts]`` on
    disk, Megatron's router weight is ``[experts, hidden]``)."""

    def forward(ts, ctx):
        (t,) = ts
        if t.ndim != 2:
            raise ctx.fail(f"transpose expects a 2D tensor, got shape {list(t.shape)}")
        return [t.t().contiguous()]

    return forward, forward


# ----------------------------------------------------------------------------------------------
@register("pad_vocab", (1, 1))
def _pad_vocab():
    """Megatron pads the vocabulary so it splits evenly over TP (see ``layout.padded_vocab_size``).
    Pad rows are zeros; export drops them."""

    def forward_rows(ts, ctx):
        (t,) = ts
        vocab = ctx.spec.vocab_size
        expect_shape(t, (vocab, *t.shape[1:]), "embedding / output layer", ctx)
        pad = ctx.padded_vocab_size - vocab
        if pad < 0:
            raise ctx.fail(f"padded vocab {ctx.padded_vocab_size} is smaller than vocab {vocab}")
        return [RowBlocks([t, t.new_zeros((pad, *t.shape[1:]))])]

    def forward(ts, ctx):
        return [rows.materialize() for rows in forward_rows(ts, ctx)]

    def inverse(ts, ctx):
        (t,) = ts
        expect_shape(t, (ctx.padded_vocab_size, *t.shape[1:]), "padded embedding / output layer", ctx)
        return [t[: ctx.spec.vocab_size].contiguous()]

    return forward, inverse, forward_rows


# ----------------------------------------------------------------------------------------------
@register("pad_vocab_tied", (2, 1))
def _pad_vocab_tied():
    """A tied model's embedding stored twice (``embed_tokens`` and ``lm_head``, as some conversions of
    tied checkpoints write it): Megatron keeps one matrix, so the second copy must be the first bit for
    bit, else the checkpoint is refused; then ``pad_vocab``. Inverse: the embedding, and ``lm_head``
    as its copy (the layout the source had)."""
    pad = TRANSFORMS["pad_vocab"]

    def same(ts, ctx):
        import numpy as np

        from ckptconv.formats.array import as_array

        embedding, head = (as_array(t) for t in ts)
        if embedding.meta or head.meta:  # planning on meta tensors: shapes only
            if embedding.shape != head.shape:
                raise ctx.fail(f"lm_head shape {list(head.shape)} differs from the embedding's {list(embedding.shape)}")
            return
        if embedding.dtype != head.dtype or embedding.shape != head.shape or not np.array_equal(embedding.raw, head.raw):
            raise ctx.fail(
                "the output layer differs from the embedding although tie_word_embeddings is true; a tied model "
                "has one matrix, and keeping either would silently drop the other"
            )

    def forward_rows(ts, ctx):
        same(ts, ctx)
        return pad.forward_rows(ts[:1], ctx)

    def forward(ts, ctx):
        same(ts, ctx)
        return pad.forward(ts[:1], ctx)

    def inverse(ts, ctx):
        (embedding,) = pad.inverse(ts, ctx)
        return [embedding, embedding]

    return forward, inverse, forward_rows


# ----------------------------------------------------------------------------------------------
@register("split_experts", (1, None))
@register("split_rows", (1, None))
def _unstack():
    """One HF tensor whose rows become separate Megatron tensors; inverse: stack them.

    ``split_rows``: ERNIE's ``moe_statics.e_score_correction_bias`` ``[2, E]`` (row 0 steers the
    text pool, row 1 the vision pool). ``split_experts``: a stacked expert tensor ``[E, ...]``
    (Step3.7) -> one tensor per expert, as Megatron's expert axis holds them."""

    def forward(ts, ctx):
        (t,) = ts
        return [row.contiguous() for row in t.unbind(0)]

    def inverse_rows(ts, ctx):
        return [RowBlocks([t.reshape(1, *t.shape) for t in ts], (len(ts), *ts[0].shape))]

    def inverse(ts, ctx):
        return [stack(list(ts))]

    return forward, inverse, None, inverse_rows


@register("fuse_gate_up_split_experts", (2, None))
def _fuse_gate_up_split_experts():
    """Stacked gate ``[E, F, H]`` and up ``[E, F, H]`` -> per expert linear_fc1 ``[2F, H]``."""

    def forward_rows(ts, ctx):
        gate, up = ts
        if tuple(gate.shape) != tuple(up.shape) or gate.ndim != 3:
            raise ctx.fail(f"expected stacked gate/up [E, F, H] of equal shape, got {list(gate.shape)} and {list(up.shape)}")
        return [RowBlocks([g, u]) for g, u in zip(gate.unbind(0), up.unbind(0))]

    def forward(ts, ctx):
        return [rows.materialize() for rows in forward_rows(ts, ctx)]

    def inverse_rows(ts, ctx):
        pairs = [chunk(fc1, 2, dim=0) for fc1 in ts]
        stacked = (len(pairs), *pairs[0][0].shape)
        return [RowBlocks([g for g, _ in pairs], stacked), RowBlocks([u for _, u in pairs], stacked)]

    def inverse(ts, ctx):
        return [rows.materialize() for rows in inverse_rows(ts, ctx)]

    return forward, inverse, forward_rows, inverse_rows


# ----------------------------------------------------------------------------------------------
@register("copy_all", (None, None))
def _copy_all():
    """Several tensors copied one-to-one (the i-th HF name to the i-th Megatron name); keeps
    tables of replicated modules short. Each pair is still its own tensor in the checkpoint."""

    def same(ts, ctx):
        return list(ts)

    return same, same
