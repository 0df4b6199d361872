"""Plan = mapping table x model spec x parallel layout.

Expanding the table's placeholders gives one :class:`PlanItem` per group of tensors converted
together (a fused QKV, one layer's expert stack, ...). The plan is the same in both directions:
import reads ``hf_names`` and writes ``targets``; export reads ``targets`` and writes ``hf_names``.
It also yields the exact key sets both sides must have, which is the coverage proof.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field

from ckptconv.errors import ConversionError
from ckptconv.core.layout import ParallelLayout
from ckptconv.core.mapping import MappingTable, Rule
from ckptconv.core.spec import ModelSpec

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# Placeholders that become a prepended axis of the Megatron tensor instead of part of its key.
_AXIS_PLACEHOLDERS = ("layer", "expert")


@dataclass(frozen=True)
class McoreTarget:
    """One Megatron tensor of a plan item, located inside its (possibly stacked) global tensor."""

    key: str
    """The sharded key in the checkpoint, e.g. ``language_model.decoder.layers.mlp.linear_fc2.weight``."""
    name: str
    """The per-layer name, e.g. ``language_model.decoder.layers.3.mlp.linear_fc2.weight``; for humans."""
    axis_index: tuple[int, ...] = ()
    """Position on the prepended axes (layer when stacked, then expert)."""
    axis_sizes: tuple[int, ...] = ()

    @property
    def extra_state_key(self) -> str:
        return self.key.rsplit(".", 1)[0] + "._extra_state"

    @property
    def extra_state_fqn(self) -> str:
        """The storage name megatron-core gives a ShardedObject (``ShardedObject.unique_key``)."""
        offsets = self.axis_index or (0,)
        shape = self.axis_sizes or (1,)
        return f"{self.extra_state_key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"


@dataclass(frozen=True)
class PlanItem:
    rule: Rule
    indices: dict
    hf_names: tuple[str, ...]
    targets: tuple[McoreTarget, ...]

    @property
    def label(self) -> str:
        return f"{', '.join(self.hf_names)} -> {', '.join(t.name for t in self.targets)}"


@dataclass
class Plan:
    spec: ModelSpec
    layout: ParallelLayout
    table: MappingTable
    padded_vocab_size: int
    items: list[PlanItem] = field(default_factory=list)

    def hf_names(self) -> list[str]:
        return [name for item in self.items for name in item.hf_names]

    def extra_state_fqns(self) -> list[str]:
        return sorted({t.extra_state_fqn for item in self.items if item.rule.extra_state for t in item.targets})


def _flag(spec: ModelSpec, expression: str, table: MappingTable | None = None) -> bool:
    negate = expression.startswith("not ")
    name = expression[4:].strip() if negate else expression.strip()
    if hasattr(spec, name):
        value = getattr(spec, name)
    elif name in spec.flags:
        value = spec.flags[name]
    elif table is not None and name in table.flag_values:  # read off the source (core.source_layout)
        value = table.flag_values[name]
    else:
        raise ConversionError(f"mapping condition {expression!r}: {name!r} is not a spec field or flag")
    return bool(value) != negate


def _range(spec: ModelSpec, name: str, rule: Rule) -> list[int]:
    if name == "layer":
        return [i for i, kind in enumerate(spec.layer_mlp_kinds) if rule.layers is None or kind == rule.layers]
    if name in ("expert",):
        if not spec.num_experts:
            raise ConversionError(f"mapping row {rule.hf[0]!r} uses {{expert}} but the model has no experts")
        return list(range(spec.num_experts[rule.pool]))
    if name not in spec.ranges:
        raise ConversionError(f"mapping placeholder {{{name}}} has no range for family {spec.family}")
    return list(range(spec.ranges[name]))


def _fill(pattern: str, values: dict) -> str:
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), pattern)


def _target(pattern: str, values: dict, spec: ModelSpec, rule: Rule) -> McoreTarget:
    """Turn an mcore name pattern into the sharded key megatron-core uses.

    ``{layer}``: stacked models drop the ``{layer}.`` segment and prepend a layer axis (as
    TransformerBlock.sharded_state_dict does for homogeneous layers); others keep ``layers.N.``.
    ``{expert}``: always an expert axis (SequentialMLP / GroupedMLP ``experts.experts.<name>``).
    """
    axis_index: list[int] = []
    axis_sizes: list[int] = []
    key = pattern
    for placeholder in _PLACEHOLDER.findall(pattern):
        if placeholder == "layer" and spec.stacked_layers:
            key = key.replace("{layer}.", "", 1)
            axis_index.append(values["layer"])
            axis_sizes.append(spec.num_layers)
        elif placeholder == "expert":
            key = key.replace("{expert}.", "", 1)
            axis_index.append(values["expert"])
            axis_sizes.append(spec.num_experts[rule.pool])
    return McoreTarget(
        key=_fill(key, values),
        name=_fill(pattern, values),
        axis_index=tuple(axis_index),
        axis_sizes=tuple(axis_sizes),
    )


def _derive(values: dict, spec: ModelSpec, rule: Rule) -> dict:
    """Add the placeholders computed from others: ``{hf_expert}`` (the expert's index over all
    pools) and the spec's offset placeholders (``{hf_layer}`` = ``{mtp}`` + 45)."""
    if "expert" in values:
        values["hf_expert"] = values["expert"] + sum(spec.num_experts[: rule.pool])
    for name, (source, offset) in spec.offsets.items():
        if source in values:
            values[name] = values[source] + offset
    return values


def _source_placeholder(name: str, spec: ModelSpec) -> str:
    """The range a placeholder iterates: derived ones follow their source."""
    if name == "hf_expert":
        return "expert"
    return spec.offsets[name][0] if name in spec.offsets else name


def _expand_side(patterns: tuple[str, ...], inner: list[str], values: dict, spec: ModelSpec, rule: Rule) -> list[dict]:
    """Values for each concrete name on one side: outer values x the side's inner placeholders."""
    if not inner:
        return [dict(values) for _ in patterns]
    combos = itertools.product(*(_range(spec, p, rule) for p in inner))
    out = []
    for combo in combos:
        out.append(_derive({**values, **dict(zip(inner, combo))}, spec, rule))
    return out


def build_plan(spec: ModelSpec, table: MappingTable, layout: ParallelLayout) -> Plan:
    layout.validate(spec)
    plan = Plan(spec=spec, layout=layout, table=table, padded_vocab_size=layout.padded_vocab_size(spec.vocab_size))
    for rule in table.rules:
        if rule.when and not _flag(spec, rule.when, table):
            continue
        hf_ph, mcore_ph = rule.placeholders()
        hf_ph = {_source_placeholder(p, spec) for p in hf_ph}
        mcore_ph = {_source_placeholder(p, spec) for p in mcore_ph}
        outer = sorted(hf_ph & mcore_ph)
        hf_inner = sorted(hf_ph - mcore_ph)
        mcore_inner = sorted(mcore_ph - hf_ph)
        if hf_inner and mcore_inner:
            raise ConversionError(f"mapping row {rule.hf}: placeholders {hf_inner} and {mcore_inner} only on one side each")
        for combo in itertools.product(*(_range(spec, p, rule) for p in outer)):
            values = _derive(dict(zip(outer, combo)), spec, rule)
            hf_values = _expand_side(rule.hf, hf_inner, values, spec, rule)
            mcore_values = _expand_side(rule.mcore, mcore_inner, values, spec, rule)
            hf_names = tuple(_fill(p, v) for v in hf_values for p in rule.hf) if hf_inner else tuple(
                _fill(p, v) for p, v in zip(rule.hf, hf_values))
            targets = tuple(_target(p, v, spec, rule) for v in mcore_values for p in rule.mcore) if mcore_inner else tuple(
                _target(p, v, spec, rule) for p, v in zip(rule.mcore, mcore_values))
            plan.items.append(PlanItem(rule=rule, indices=values, hf_names=hf_names, targets=targets))
    _check_unique(plan)
    return plan


def _check_unique(plan: Plan) -> None:
    """Each HF tensor is read by one item and each Megatron chunk written by one item."""
    seen_hf: dict[str, str] = {}
    seen_mcore: dict[tuple, str] = {}
    for item in plan.items:
        for name in item.hf_names:
            if name in seen_hf:
                raise ConversionError(f"mapping table {plan.table.path.name}: HF tensor {name} is mapped twice")
            seen_hf[name] = item.label
        for target in item.targets:
            slot = (target.key, target.axis_index)
            if slot in seen_mcore:
                raise ConversionError(f"mapping table {plan.table.path.name}: Megatron tensor {target.name} is produced twice")
            seen_mcore[slot] = item.label


LANGUAGE_MODEL_PREFIX = "language_model."


def language_model_only(plan: Plan) -> tuple[Plan, list[PlanItem]]:
    """The plan for the bare language model (``--language-model-only``): the items whose every
    target lies under ``language_model.``, with that prefix removed -- the keys of a plain
    megatron-core GPTModel, what Megatron-LM's ``pretrain_gpt`` builds. Returns the new plan and the
    items left out (the vision tower and projector, taken from the HF source on export)."""
    kept, dropped = [], []
    for item in plan.items:
        inside = [t.key.startswith(LANGUAGE_MODEL_PREFIX) for t in item.targets]
        if all(inside):
            targets = tuple(
                dataclasses.replace(t, key=t.key[len(LANGUAGE_MODEL_PREFIX):], name=t.name[len(LANGUAGE_MODEL_PREFIX):])
                for t in item.targets
            )
            kept.append(dataclasses.replace(item, targets=targets))
        elif any(inside):
            raise ConversionError(f"{item.label}: one table row writes inside and outside the language model")
        else:
            dropped.append(item)
    if not kept:
        raise ConversionError(f"the {plan.spec.family} table has no language_model.* rows")
    return dataclasses.replace(plan, items=kept), dropped
