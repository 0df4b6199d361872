"""Qwen2.5-VL: the family's parts (see :mod:`ckptconv.families.base`) wired into its ``FAMILY``."""

from __future__ import annotations

from ckptconv.families.base import Family


class Qwen25VL(Family):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)

    def normalize(self, config):
        from ckptconv.families.qwen2_5_vl.config import normalize

        return normalize(config)
    def build_model(self, spec, *, padded_vocab_size, dtype):
        from ckptconv.families.qwen2_5_vl.model import build_model

        return build_model(spec, padded_vocab_size=padded_vocab_size, dtype=dtype)

    def hf_config(self, spec):
        from ckptconv.families.qwen2_5_vl.model import hf_config

        return hf_config(spec)

    def verify_inputs(self, spec, hf_dir, *, prompt, image, text_only):
        from ckptconv.families.qwen2_5_vl.inputs import verify_inputs

        return verify_inputs(spec, hf_dir, prompt=prompt, image=image, text_only=text_only)

    def make_tiny(self, out_dir, *, seed=0, **options):
        from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

        return make_tiny_qwen2_5_vl(out_dir, seed=seed, **options)

    def real_width_config(self, variant, num_layers, vision_layers, num_experts):
        from ckptconv.families.qwen2_5_vl.fixtures import real_width_config

        return real_width_config(variant, num_layers, vision_layers, num_experts)

FAMILY = Qwen25VL()
