"""Mapping tables: ``mappings/<family>.toml`` read into :class:`Rule` objects.

A table is data. Each ``[[tensor]]`` row says which HF tensors become which Megatron tensors and
how::

    [[tensor]]
    hf = ["model.layers.{layer}.self_attn.q_proj.weight", "...k_proj.weight", "...v_proj.weight"]
    mcore = "language_model.decoder.layers.{layer}.self_attention.linear_qkv.weight"
    transform = "fuse_qkv"     # a name from ckptconv.core.transforms (default "copy")
    shard = "column"           # how Megatron splits it over tensor parallel ranks (default "replicated")
    extra_state = true         # Megatron keeps an `_extra_state` object beside this linear
    when = "not tie_word_embeddings"   # row applies only when the flag holds
    layers = "moe"             # {layer} ranges only over layers of this MLP kind
    pool = 1                   # {expert} ranges over this expert pool; {hf_expert} = offset index
    shape = ["hidden_size"]    # expected HF shape (checked before converting), one list per hf name or one for all
    params = { dim = 1 }       # extra parameters for the transform
    keep_dtype = true          # never cast by --dtype (fp32 router weights and biases)

Placeholders: ``{layer}``, ``{expert}``, ``{hf_expert}``, any range the family's normalizer
declares in ``spec.ranges`` (e.g. ``{vblock}`` for vision blocks) and any offset placeholder it
declares in ``spec.offsets`` (``{hf_layer}`` = ``{mtp}`` + num_hidden_layers for Step3.7's MTP layers).

How a source lays its tensors out on disk, where vendors differ, is data too
(:mod:`ckptconv.core.source_layout` reads the source against it)::

    [[hf_prefix]]              # the same tensors under another prefix; the rows use the first spelling
    spellings = ["model.vision_model.", "vision_model."]

    [[source_flag]]            # a `when` flag that is true when the source stores this tensor
    name = "tied_lm_head_on_disk"
    present = "lm_head.weight"
    when = "tie_word_embeddings"   # ... and this spec flag holds

Key layouts. The rows' Megatron names are the default layout, ``bridge`` (Megatron-Bridge's names).
Another layout is a prefix re-mapping of those names, declared once per table, e.g. megatron-core's
own ``MimoModel``::

    [key_layouts.mimo]
    "visual.merger." = "modality_submodules.images.input_projections.0."
    "visual." = "modality_submodules.images.encoders.qwen_vit."

:meth:`MappingTable.with_key_layout` applies it (longest prefix first; names under no listed prefix,
such as ``language_model.*``, keep their name), so one table serves both directions in every layout.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from ckptconv.errors import ConversionError
from ckptconv.core.transforms import TRANSFORMS as CORE_TRANSFORMS, Transform

TABLES_PACKAGE = "ckptconv.mappings"
"""The tables are package data: ``mappings/`` at the top of the repository (where people read and
edit them) is installed as the package ``ckptconv.mappings`` (``setup.py``: ``package_dir``), in a
wheel and in an editable install alike, so they are found from any working directory."""
DEFAULT_KEY_LAYOUT = "bridge"
SHARD_KINDS = ("replicated", "column", "row", "glu", "vocab")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    mcore: tuple[str, ...]
    transform: str = "copy"
    shard: str = "replicated"
    extra_state: bool = False
    when: str | None = None
    layers: str | None = None
    pool: int = 0
    shape: tuple | None = None
    params: dict = field(default_factory=dict)
    expert_parallel: bool = False
    """True for expert weights: sharded over EP ranks (and expert-TP) instead of TP."""
    keep_dtype: bool = False
    """True for tensors that stay in their source dtype whatever ``--dtype`` says."""

    def placeholders(self) -> tuple[set[str], set[str]]:
        hf = {p for name in self.hf for p in _PLACEHOLDER.findall(name)}
        mcore = {p for name in self.mcore for p in _PLACEHOLDER.findall(name)}
        return hf, mcore


@dataclass(frozen=True)
class SourceFlag:
    """A ``when`` flag read off the source: true when it stores ``present`` (and ``when`` holds)."""

    name: str
    present: str
    when: str | None = None


@dataclass(frozen=True)
class MappingTable:
    family: str
    rules: tuple[Rule, ...]
    sha256: str
    path: Path
    transforms: dict[str, Transform] = field(default_factory=dict)
    """The vocabulary the rows name: the core transforms plus the family's own."""
    hf_prefixes: tuple[tuple[str, ...], ...] = ()
    """Alternative on-disk spellings of a name prefix; the rows use the first of each."""
    source_flags: tuple[SourceFlag, ...] = ()
    flag_values: dict[str, bool] = field(default_factory=dict)
    """Values of the source flags for the source this table is bound to (all false unbound)."""
    key_layouts: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    """Layout name -> (bridge prefix, layout prefix) pairs, longest bridge prefix first."""
    key_layout: str = DEFAULT_KEY_LAYOUT
    """The layout the rules' ``mcore`` names are in."""

    def transform_of(self, rule: Rule) -> Transform:
        return self.transforms[rule.transform]

    @property
    def key_layout_names(self) -> tuple[str, ...]:
        return (DEFAULT_KEY_LAYOUT, *self.key_layouts)

    def with_key_layout(self, name: str) -> "MappingTable":
        """This table with every Megatron name in layout ``name`` (``bridge`` = as written)."""
        if self.key_layout != DEFAULT_KEY_LAYOUT:
            raise ConversionError(f"{self.path.name}: already in key layout {self.key_layout!r}")
        if name == DEFAULT_KEY_LAYOUT:
            return self
        if name not in self.key_layouts:
            raise ConversionError(
                f"key layout {name!r} is not defined for {self.family}; choose one of {', '.join(self.key_layout_names)}"
            )
        prefixes = self.key_layouts[name]

        def rename(mcore: str) -> str:
            for old, new in prefixes:
                if mcore.startswith(old):
                    return new + mcore[len(old):]
            return mcore

        rules = tuple(replace(rule, mcore=tuple(rename(m) for m in rule.mcore)) for rule in self.rules)
        return replace(self, rules=rules, key_layout=name)

    def detect_key_layout(self, keys) -> str:
        """The layout a checkpoint's tensor keys are in: the one whose own prefixes they use."""
        keys = list(keys)
        found = [name for name, prefixes in self.key_layouts.items()
                 if any(k.startswith(new) for k in keys for _old, new in prefixes)]
        if len(found) > 1:
            raise ConversionError(f"checkpoint keys mix the {' and '.join(found)} key layouts")
        return found[0] if found else DEFAULT_KEY_LAYOUT


def _as_tuple(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _parse_rule(row: dict, where: str, vocabulary: dict[str, Transform]) -> Rule:
    known = {"hf", "mcore", "transform", "shard", "extra_state", "when", "layers", "pool", "shape", "params",
             "expert_parallel", "keep_dtype"}
    unknown = set(row) - known
    if unknown:
        raise ConversionError(f"{where}: unknown field(s) {sorted(unknown)}")
    if "hf" not in row or "mcore" not in row:
        raise ConversionError(f"{where}: every row needs `hf` and `mcore`")
    rule = Rule(
        hf=_as_tuple(row["hf"]),
        mcore=_as_tuple(row["mcore"]),
        transform=row.get("transform", "copy"),
        shard=row.get("shard", "replicated"),
        extra_state=bool(row.get("extra_state", False)),
        when=row.get("when"),
        layers=row.get("layers"),
        pool=int(row.get("pool", 0)),
        shape=tuple(row["shape"]) if "shape" in row else None,
        params=dict(row.get("params", {})),
        expert_parallel=bool(row.get("expert_parallel", False)),
        keep_dtype=bool(row.get("keep_dtype", False)),
    )
    if rule.shard not in SHARD_KINDS:
        raise ConversionError(f"{where}: shard {rule.shard!r} is not one of {SHARD_KINDS}")
    if rule.transform not in vocabulary:
        raise ConversionError(f"{where}: unknown transform {rule.transform!r}; known: {', '.join(sorted(vocabulary))}")
    transform = vocabulary[rule.transform]
    n_hf, n_mcore = transform.arity
    if n_hf is not None and len(rule.hf) != n_hf:
        raise ConversionError(f"{where}: transform {rule.transform} takes {n_hf} hf tensor(s), row lists {len(rule.hf)}")
    if n_mcore is not None and len(rule.mcore) != n_mcore:
        raise ConversionError(f"{where}: transform {rule.transform} makes {n_mcore} mcore tensor(s), row lists {len(rule.mcore)}")
    return rule


def transform_vocabulary(family: str) -> dict[str, Transform]:
    """The core transforms plus the family's own (a family may not redefine a core name)."""
    from ckptconv.families import get_family

    own = get_family(family).transforms()
    clash = set(own) & set(CORE_TRANSFORMS)
    if clash:
        raise ConversionError(f"family {family!r} redefines core transform(s) {sorted(clash)}")
    return {**CORE_TRANSFORMS, **own}


def installed_tables_dir() -> Path:
    """Where the installed package keeps the tables."""
    try:
        return Path(str(importlib.resources.files(TABLES_PACKAGE)))
    except ModuleNotFoundError:
        raise ConversionError(
            f"the mapping tables ({TABLES_PACKAGE}) are not installed; reinstall ckptconv (pip install .)"
        ) from None


def load_table(family: str, mappings_dir: Path | None = None) -> MappingTable:
    vocabulary = transform_vocabulary(family)
    path = Path(mappings_dir or installed_tables_dir()) / f"{family}.toml"
    if not path.is_file():
        raise ConversionError(f"no mapping table for family {family!r} at {path}")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConversionError(f"{path}: not valid TOML: {exc}") from None
    if data.get("family") != family:
        raise ConversionError(f"{path}: declares family {data.get('family')!r}, expected {family!r}")
    rows = data.get("tensor", [])
    rules = tuple(_parse_rule(row, f"{path.name} row {i + 1}", vocabulary) for i, row in enumerate(rows))
    used = {rule.transform: vocabulary[rule.transform] for rule in rules}
    prefixes = tuple(_parse_prefix(row, f"{path.name} hf_prefix {i + 1}") for i, row in enumerate(data.get("hf_prefix", [])))
    flags = tuple(_parse_source_flag(row, f"{path.name} source_flag {i + 1}") for i, row in enumerate(data.get("source_flag", [])))
    return MappingTable(family=family, rules=rules, sha256=hashlib.sha256(raw).hexdigest(), path=path, transforms=used,
                        hf_prefixes=prefixes, source_flags=flags, flag_values={f.name: False for f in flags},
                        key_layouts=_parse_key_layouts(data.get("key_layouts", {}), rules, path.name))


def _parse_prefix(row: dict, where: str) -> tuple[str, ...]:
    spellings = row.get("spellings")
    if set(row) != {"spellings"} or not isinstance(spellings, list) or len(spellings) < 2 or \
            not all(isinstance(p, str) and p.endswith(".") for p in spellings):
        raise ConversionError(f"{where}: needs exactly `spellings`, two or more prefixes ending in '.'")
    return tuple(spellings)


def _parse_source_flag(row: dict, where: str) -> SourceFlag:
    unknown = set(row) - {"name", "present", "when"}
    if unknown or not isinstance(row.get("name"), str) or not isinstance(row.get("present"), str):
        raise ConversionError(f"{where}: needs `name` and `present` (and optionally `when`)")
    return SourceFlag(name=row["name"], present=row["present"], when=row.get("when"))


def _parse_key_layouts(raw: dict, rules: tuple[Rule, ...], where: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """``[key_layouts.<name>]`` tables: each prefix must rename at least one row (a typo would
    otherwise leave tensors silently under their bridge names)."""
    names = [m for rule in rules for m in rule.mcore]
    layouts = {}
    for name, prefixes in raw.items():
        if name == DEFAULT_KEY_LAYOUT or not isinstance(prefixes, dict) or not prefixes:
            raise ConversionError(f"{where}: [key_layouts.{name}] must be a non-empty table of prefix = prefix")
        for old, new in prefixes.items():
            if not isinstance(new, str) or not old.endswith(".") or not new.endswith("."):
                raise ConversionError(f"{where}: [key_layouts.{name}] {old!r}: prefixes end with '.'")
            if not any(m.startswith(old) for m in names):
                raise ConversionError(f"{where}: [key_layouts.{name}] prefix {old!r} matches no row's mcore name")
        layouts[name] = tuple(sorted(prefixes.items(), key=lambda kv: -len(kv[0])))
    return layouts
