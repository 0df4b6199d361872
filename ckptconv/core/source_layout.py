"""How one source lays its tensors out, read against the table's ``[[hf_prefix]]`` and ``[[source_flag]]``.

Vendors store the same model under different names: ERNIE-4.5-VL's remote-code releases keep the
vision tower at the top level (``vision_model.*``) where transformers writes ``model.vision_model.*``;
some conversions of tied checkpoints also store ``lm_head.weight``. The table says which spellings
and optional tensors exist; this module reads which ones a source uses (a :class:`SourceLayout`),
binds the table to it for the import, and records it in ``ckptconv.json`` so the export writes the
names and layout the source had.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

from ckptconv.core.mapping import MappingTable
from ckptconv.core.spec import ModelSpec
from ckptconv.errors import ConversionError


@dataclass(frozen=True)
class SourceLayout:
    prefixes: dict[str, str] = field(default_factory=dict)
    """Row spelling -> the source's spelling, only where they differ."""
    flags: dict[str, bool] = field(default_factory=dict)
    """Every source flag of the table, true or false for this source."""

    def as_json(self) -> dict:
        return {"hf_prefixes": dict(sorted(self.prefixes.items())), "flags": dict(sorted(self.flags.items()))}

    @classmethod
    def from_json(cls, data: dict | None, table: MappingTable) -> "SourceLayout":
        """The layout a manifest recorded, checked against the table it must bind."""
        data = data or {}
        prefixes = dict(data.get("hf_prefixes") or {})
        known = {spellings[0]: set(spellings[1:]) for spellings in table.hf_prefixes}
        for ours, theirs in prefixes.items():
            if theirs not in known.get(ours, ()):
                raise ConversionError(f"ckptconv.json: hf prefix {ours!r} -> {theirs!r} is not one the {table.family} table knows")
        flags = {f.name: False for f in table.source_flags}
        for name, value in (data.get("flags") or {}).items():
            if name not in flags:
                raise ConversionError(f"ckptconv.json: source flag {name!r} is not one the {table.family} table knows")
            flags[name] = bool(value)
        return cls(prefixes, flags)


def _holds(spec: ModelSpec, expression: str | None) -> bool:
    if not expression:
        return True
    from ckptconv.core.plan import _flag

    return _flag(spec, expression)


def detect_source_layout(table: MappingTable, spec: ModelSpec, hf_names: Iterable[str]) -> SourceLayout:
    """Which spelling of each prefix the source uses, and which source flags hold. A source that
    mixes two spellings of one prefix is refused (its tensors would be read twice or not at all)."""
    names = set(hf_names)
    prefixes: dict[str, str] = {}
    for spellings in table.hf_prefixes:
        used = [p for p in spellings if any(n.startswith(p) for n in names)]
        if len(used) > 1:
            raise ConversionError(
                f"the checkpoint stores tensors under both {' and '.join(repr(p) for p in used)}; "
                "one model uses one spelling"
            )
        if used and used[0] != spellings[0]:
            prefixes[spellings[0]] = used[0]
    flags = {}
    for flag in table.source_flags:
        present = _rename(flag.present, prefixes) in names
        flags[flag.name] = present and _holds(spec, flag.when)
    return SourceLayout(prefixes, flags)


def _rename(name: str, prefixes: dict[str, str]) -> str:
    for ours, theirs in prefixes.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def bind(table: MappingTable, layout: SourceLayout) -> MappingTable:
    """The table as this source spells it: rows' HF names renamed, source flags set."""
    if not layout.prefixes and not any(layout.flags.values()):
        return replace(table, flag_values={**table.flag_values, **layout.flags})
    rules = tuple(replace(rule, hf=tuple(_rename(n, layout.prefixes) for n in rule.hf)) for rule in table.rules)
    return replace(table, rules=rules, flag_values={**table.flag_values, **layout.flags})
