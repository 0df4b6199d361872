"""ERNIE-4.5-VL-MoE's forward pass as stages (layerwise verify): each a module of
``Ernie4_5_VLMoeForConditionalGeneration`` and of
:class:`~ckptconv.families.ernie4_5_vl_moe.model.ErnieVLMegatron`.

Vision tower and resampler are transformers' modules on both sides. MoE layers carry two router
probes, one per expert pool: HF ``mlp.text_moe.gate`` / ``mlp.vision_moe.gate`` against megatron's
``mlp.text_moe_layer.router`` / ``mlp.vision_moe_layer.router``, each seeing only its pool's tokens.
"""

from __future__ import annotations

from ckptconv.verify.stages import SAME, RouterProbe, Stage, output_stage

POOL_ROUTERS = (
    RouterProbe("text", "mlp.text_moe.gate", "mlp.text_moe_layer.router"),
    RouterProbe("vision", "mlp.vision_moe.gate", "mlp.vision_moe_layer.router"),
)


def layerwise_stages(spec) -> list[Stage]:
    tower = "vision_tower"
    stages = [Stage("vision.patch_embed", f"model.{tower}.patch_embed", f"{tower}.patch_embed", layout=SAME)]
    stages += [
        Stage(f"vision.block.{j}", f"model.{tower}.blocks.{j}", f"{tower}.blocks.{j}", layout=SAME)
        for j in range(int(spec.vision["depth"]))
    ]
    stages.append(Stage("vision.norm", f"model.{tower}.ln", f"{tower}.ln", layout=SAME))
    stages.append(Stage("vision.resampler", "model.resampler_model", "resampler_model", layout=SAME))
    stages.append(Stage("embedding", "model.language_model.embed_tokens", "language_model.embedding"))
    stages += [
        Stage(
            f"decoder.layer.{i}", f"model.language_model.layers.{i}", f"language_model.decoder.layers.{i}",
            routers=POOL_ROUTERS if kind == "moe" else (),
        )
        for i, kind in enumerate(spec.layer_mlp_kinds)
    ]
    stages.append(Stage("final_norm", "model.language_model.norm", "language_model.decoder.final_layernorm"))
    stages.append(output_stage(spec))
    return stages
