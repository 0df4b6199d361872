"""ERNIE-4.5-VL-MoE: the family's package (see :mod:`ckptconv.families.base`), named for the registry."""

from __future__ import annotations

from ckptconv.families.base import Family


class Ernie45VLMoe(Family):
    name = "ernie4_5_vl_moe"
    title = "ERNIE-4.5-VL-MoE"
    # Released ERNIE "Thinking" checkpoints use the remote-code type name; the weights are the same family.
    model_types = ("ernie4_5_vl_moe", "ernie4_5_moe_vl")

    def complete_config(self, config, model_dir):
        # Flat (released) configs name only im_patch_id; the other special ids are in the tokenizer files.
        return self.part("tokens").complete_token_ids(config, model_dir)


FAMILY = Ernie45VLMoe()
