"""Step3.7's forward pass as stages (layerwise verify): each a module of
``Step3p7ForConditionalGeneration`` and of :class:`~ckptconv.families.step3p7.model.Step37Megatron`.

The vision tower is one stage: the Megatron side keeps its tensors under their on-disk names and
runs transformers' module on all of them at once (``functional_call``), so its blocks have no
modules of their own to hook. The projector follows; MoE layers carry a router probe (HF
``mlp.gate`` against megatron's ``mlp.router``).
"""

from __future__ import annotations

from ckptconv.verify.stages import SAME, RouterProbe, Stage, output_stage

ROUTER = (RouterProbe("experts", "mlp.gate", "mlp.router"),)


def layerwise_stages(spec) -> list[Stage]:
    stages = [
        Stage("vision", "model.vision_model", "vision_model", layout=SAME),
        Stage("vision.projector", "model.multi_modal_projector", "image_insert_embedding.align_projector", layout=SAME),
        Stage("embedding", "model.language_model.embed_tokens", "language_model.embedding"),
    ]
    stages += [
        Stage(
            f"decoder.layer.{i}", f"model.language_model.layers.{i}", f"language_model.decoder.layers.{i}",
            routers=ROUTER if kind == "moe" else (),
        )
        for i, kind in enumerate(spec.layer_mlp_kinds)
    ]
    stages.append(Stage("final_norm", "model.language_model.norm", "language_model.decoder.final_layernorm"))
    stages.append(output_stage(spec))
    if spec.mtp_num_layers:
        # transformers drops the MTP layers on load, and next-token logits never run them: their
        # keys are checked against the checkpoint, their values have no reference to meet.
        stages.append(Stage("mtp", None, "language_model.mtp"))
    return stages
