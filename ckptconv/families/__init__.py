"""Family registry: HF ``model_type`` -> config normalizer.

Adding a family means adding a normalizer module here and a table in ``mappings/``.
"""

from __future__ import annotations

from typing import Callable

from ckptconv.errors import ConversionError
from ckptconv.spec import ModelSpec

Normalizer = Callable[[dict], ModelSpec]


def _qwen2_5_vl(config: dict) -> ModelSpec:
    from ckptconv.families.qwen2_5_vl import normalize

    return normalize(config)


def _ernie4_5_vl_moe(config: dict) -> ModelSpec:
    from ckptconv.families.ernie4_5_vl_moe import normalize

    return normalize(config)


def _step3p7(config: dict) -> ModelSpec:
    from ckptconv.families.step3p7 import normalize

    return normalize(config)


# model_type (as written in config.json) -> normalizer. Released ERNIE "Thinking" checkpoints use
# the remote-code type name `ernie4_5_moe_vl`; the weights are the same family.
NORMALIZERS: dict[str, Normalizer] = {
    "qwen2_5_vl": _qwen2_5_vl,
    "ernie4_5_vl_moe": _ernie4_5_vl_moe,
    "ernie4_5_moe_vl": _ernie4_5_vl_moe,
    "step3p7": _step3p7,
}


def supported_model_types() -> list[str]:
    return sorted(NORMALIZERS)


def normalize_config(config: dict, where: str = "config.json") -> ModelSpec:
    model_type = config.get("model_type")
    if model_type not in NORMALIZERS:
        raise ConversionError(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return NORMALIZERS[model_type](config)


def require(cfg: dict, key: str, where: str):
    """Read a required config field, or fail naming it."""
    if key not in cfg or cfg[key] is None:
        raise ConversionError(f"{where}: required field {key!r} is missing")
    return cfg[key]
