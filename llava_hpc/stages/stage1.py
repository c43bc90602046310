"""Stage 1: train the projector on precomputed features, the LLM frozen (by default the `plain` template: image,
then caption; `[stages.stage1] template` can put the caption in a chat turn instead). Writes
`RUN/stage1/projector.safetensors`."""

from __future__ import annotations

from llava_hpc.stages import StageContext, Task
from llava_hpc.stages.common import log, stage1_projector_path
from llava_hpc.stages.training import run_training, training_stage


def _prepare(ctx: StageContext):
    def prepare(model) -> None:
        model.freeze_language_model(True)
        projector = model.multi_modal_projector
        if projector.standardize_features:
            _measure_feature_statistics(ctx, projector)

    return prepare


def _measure_feature_statistics(ctx: StageContext, projector) -> None:
    """Every rank measures the same sample (deterministic), so no broadcast; a resume measures it again, equally."""
    import torch

    from llava_hpc.data.features_io import feature_statistics

    directory = ctx.run.stage_dir("features") / ctx.pipeline.stages.stage1.dataset
    mean, std, images = feature_statistics(directory)
    weight = projector.linear_1.weight
    projector.set_feature_statistics(torch.from_numpy(mean).to(weight.device), torch.from_numpy(std).to(weight.device))
    log.info(
        "stage1: standardising features with mean/std of %d images in %s (std per dimension %.3g-%.3g)",
        images, directory, float(std.min()), float(std.max()))


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
    return run_training(ctx, "stage1", ctx.pipeline.stages.stage1.template, _prepare(ctx), _finish)


STAGE = training_stage("stage1", after=("features",), run=run)
