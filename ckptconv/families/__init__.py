"""The family registry: every family ckptconv converts, listed explicitly.

Adding a family: its package ``ckptconv/families/<name>/`` (see :mod:`ckptconv.families.base`), its
table ``mappings/<name>.toml``, and one line in :data:`FAMILIES` (``docs/adding-a-family.md``).
"""

from __future__ import annotations

from ckptconv.core.spec import ModelSpec
from ckptconv.errors import ConversionError
from ckptconv.families.base import Family
from ckptconv.families.ernie4_5_vl_moe import FAMILY as ERNIE4_5_VL_MOE
from ckptconv.families.qwen2_5_vl import FAMILY as QWEN2_5_VL
from ckptconv.families.step3p7 import FAMILY as STEP3P7

FAMILIES: tuple[Family, ...] = (QWEN2_5_VL, ERNIE4_5_VL_MOE, STEP3P7)

_BY_NAME = {family.name: family for family in FAMILIES}
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def get_family(name: str) -> Family:
    if name not in _BY_NAME:
        raise ConversionError(f"unknown family {name!r}; known: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for_config(config: dict, where: str = "config.json") -> Family:
    model_type = config.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise ConversionError(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return _BY_MODEL_TYPE[model_type]


def normalize_config(config: dict, where: str = "config.json", model_dir=None) -> ModelSpec:
    """``config.json`` -> the spec. ``model_dir``: the directory the config came from, when its other
    files (tokenizer, processor) may complete what the config leaves out (see
    :meth:`Family.complete_config`)."""
    family = family_for_config(config, where)
    if model_dir is not None:
        config = family.complete_config(config, model_dir)
    return family.normalize(config)
