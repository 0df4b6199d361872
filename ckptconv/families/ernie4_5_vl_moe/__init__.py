"""ERNIE-4.5-VL-MoE: the family's parts (see :mod:`ckptconv.families.base`) wired into its ``FAMILY``."""

from __future__ import annotations

from ckptconv.families.base import Family


class Ernie45VLMoe(Family):
    name = "ernie4_5_vl_moe"
    title = "ERNIE-4.5-VL-MoE"
    model_types = ("ernie4_5_vl_moe", "ernie4_5_moe_vl")

    def normalize(self, config):
        from ckptconv.families.ernie4_5_vl_moe.config import normalize

        return normalize(config)
    def build_model(self, spec, *, padded_vocab_size, dtype):
        from ckptconv.families.ernie4_5_vl_moe.model import build_model

        return build_model(spec, padded_vocab_size=padded_vocab_size, dtype=dtype)

    def hf_config(self, spec):
        from ckptconv.families.ernie4_5_vl_moe.model import hf_config

        return hf_config(spec)

    def verify_inputs(self, spec, hf_dir, *, prompt, image, text_only):
        from ckptconv.families.ernie4_5_vl_moe.inputs import verify_inputs

        return verify_inputs(spec, hf_dir, prompt=prompt, image=image, text_only=text_only)

    def make_tiny(self, out_dir, *, seed=0, **options):
        from ckptconv.families.ernie4_5_vl_moe.fixtures import make_tiny_ernie4_5_vl_moe

        return make_tiny_ernie4_5_vl_moe(out_dir, seed=seed, **options)

    def real_width_config(self, variant, num_layers, vision_layers, num_experts):
        from ckptconv.families.ernie4_5_vl_moe.fixtures import real_width_config

        return real_width_config(variant, num_layers, vision_layers, num_experts)

FAMILY = Ernie45VLMoe()
