"""Step3.7: the family's parts (see :mod:`ckptconv.families.base`) wired into its ``FAMILY``."""

from __future__ import annotations

from ckptconv.families.base import Family


class Step3p7(Family):
    name = "step3p7"
    title = "Step3.7"
    model_types = ("step3p7",)

    def normalize(self, config):
        from ckptconv.families.step3p7.config import normalize

        return normalize(config)

    def transforms(self):
        from ckptconv.families.step3p7.transforms import TRANSFORMS

        return TRANSFORMS

    def build_model(self, spec, *, padded_vocab_size, dtype):
        from ckptconv.families.step3p7.model import build_model

        return build_model(spec, padded_vocab_size=padded_vocab_size, dtype=dtype)

    def hf_config(self, spec):
        from ckptconv.families.step3p7.model import hf_config

        return hf_config(spec)

    def verify_inputs(self, spec, hf_dir, *, prompt, image, text_only):
        from ckptconv.families.step3p7.inputs import verify_inputs

        return verify_inputs(spec, hf_dir, prompt=prompt, image=image, text_only=text_only)

    def make_tiny(self, out_dir, *, seed=0, **options):
        from ckptconv.families.step3p7.fixtures import make_tiny_step3p7

        return make_tiny_step3p7(out_dir, seed=seed, **options)

    def real_width_config(self, variant, num_layers, vision_layers, num_experts):
        from ckptconv.families.step3p7.fixtures import real_width_config

        return real_width_config(variant, num_layers, vision_layers, num_experts)

    def zero_centered_norm(self, hf_name):
        # Step3.7 trunk RMSNorms compute x * (1 + w); the vision tower's LayerNorms are standard.
        return "norm" in hf_name and "vision" not in hf_name

FAMILY = Step3p7()
