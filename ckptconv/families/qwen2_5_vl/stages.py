"""Qwen2.5-VL's forward pass as stages (layerwise verify): each a module of
``Qwen2_5_VLForConditionalGeneration`` and of :class:`~ckptconv.families.qwen2_5_vl.model.QwenVLMegatron`.

The vision tower is transformers' own module on both sides (replicated, HF names), so its stages
compare the same code on weights read from two files: a vision weight converted wrong shows up at
its block. The merged vision features then enter the language model in place of the image tokens.
"""

from __future__ import annotations

from ckptconv.verify.stages import SAME, Stage, output_stage


def layerwise_stages(spec) -> list[Stage]:
    stages = [Stage("vision.patch_embed", "model.visual.patch_embed", "visual.patch_embed", layout=SAME)]
    stages += [
        Stage(f"vision.block.{j}", f"model.visual.blocks.{j}", f"visual.blocks.{j}", layout=SAME)
        for j in range(int(spec.vision["depth"]))
    ]
    stages.append(Stage("vision.merger", "model.visual.merger", "visual.merger", layout=SAME))
    stages.append(Stage("embedding", "model.language_model.embed_tokens", "language_model.embedding"))
    stages += [
        Stage(f"decoder.layer.{i}", f"model.language_model.layers.{i}", f"language_model.decoder.layers.{i}")
        for i in range(spec.num_layers)
    ]
    stages.append(Stage("final_norm", "model.language_model.norm", "language_model.decoder.final_layernorm"))
    stages.append(output_stage(spec))
    return stages
