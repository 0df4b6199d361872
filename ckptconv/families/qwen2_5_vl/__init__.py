"""Qwen2.5-VL: the family's package (see :mod:`ckptconv.families.base`), named for the registry."""

from __future__ import annotations

from ckptconv.families.base import Family


class Qwen25VL(Family):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)


FAMILY = Qwen25VL()
