"""Step3.7: the family's package (see :mod:`ckptconv.families.base`), named for the registry."""

from __future__ import annotations

from ckptconv.families.base import Family


class Step3p7(Family):
    name = "step3p7"
    title = "Step3.7"
    model_types = ("step3p7",)
    has_transforms = True  # fuse_qkv_gate

    def zero_centered_norm(self, hf_name):
        # Step3.7 trunk RMSNorms compute x * (1 + w); the vision tower's LayerNorms are standard.
        return "norm" in hf_name and "vision" not in hf_name


FAMILY = Step3p7()
