"""Stage 1: train the projector on precomputed features, the LLM frozen (the `plain` template: image, then
caption). Writes `RUN/stage1/projector.safetensors`."""

from __future__ import annotations

from llava_hpc.stages import StageContext, Task
from llava_hpc.stages.common import stage1_projector_path
from llava_hpc.stages.training import run_training, training_stage


def _prepare(model) -> None:
    model.freeze_language_model(True)


def _finish(ctx, result, model, tokenizer, env) -> dict:
    from llava_hpc.model.llava import save_projector

    # Under ZeRO-2 (or one process) every rank holds the whole projector; rank 0 writes it.
    projector = result.engine.model.multi_modal_projector
    if env.is_main:
        save_projector(projector, stage1_projector_path(ctx.run))  # atomic: temporary file, then rename
    trainable = sum(p.numel() for p in projector.parameters())
    return {"trainable_parameters": trainable, "projector": str(stage1_projector_path(ctx.run))}


def run(ctx: StageContext, task: Task) -> dict:
    if ctx.pipeline.stages.stage1.zero_stage == 3:
        raise ValueError("stage1 trains only the projector: use zero_stage 0 or 2 (ZeRO-3 would partition a few MB)")
    return run_training(ctx, "stage1", "plain", _prepare, _finish)


STAGE = training_stage("stage1", after=("features",), run=run)
