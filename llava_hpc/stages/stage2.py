"""Stage 2: fine-tune projector + LLM with DeepSpeed ZeRO (or plain torch in one process) on precomputed
features, starting from the stage-1 projector, with the conversation template. Writes the whole model in
transformers' Llava format to `RUN/stage2/model/` (gathered from all ranks under ZeRO-3: never empty tensors)."""

from __future__ import annotations

from llava_hpc.stages import StageContext, Task
from llava_hpc.stages.common import llava_spec, stage1_projector_path, stage2_model_dir
from llava_hpc.stages.training import run_training, training_stage


def run(ctx: StageContext, task: Task) -> dict:
    from llava_hpc.model.llava import load_projector

    projector_path = stage1_projector_path(ctx.run)
    if not ctx.run.is_done(ctx.run.stage_dir("stage1")):
        raise FileNotFoundError(f"{projector_path}: stage1 is not done in {ctx.run.root}; submit stage1 first")

    def prepare(model) -> None:
        model.freeze_language_model(False)
        weight = model.multi_modal_projector.linear_1.weight
        projector = load_projector(projector_path)
        wanted = ctx.pipeline.model.standardize_features
        if projector.standardize_features != wanted:
            raise ValueError(f"{projector_path}: trained with model.standardize_features = "
                             f"{str(projector.standardize_features).lower()}, but the pipeline says "
                             f"{str(wanted).lower()}; set it back, or redo stage1 (--force)")
        model.multi_modal_projector = projector.to(device=weight.device, dtype=weight.dtype)

    return run_training(ctx, "stage2", ctx.pipeline.model.template, prepare, _finish)


def _finish(ctx, result, model, tokenizer, env) -> dict:
    import torch

    from llava_hpc.model.builders import build_llava
    from llava_hpc.model.export import export_llava

    state = result.engine.full_state_dict()  # collective under ZeRO-3: every rank calls it
    if not env.is_main:
        return {}
    # Rebuild on the CPU with the vision tower (training needed none), load the trained weights, export.
    spec = llava_spec(ctx.pipeline)
    full, tokenizer = build_llava(spec, device="cpu", with_vision_tower=True)
    state = {name: tensor.to(torch.float32) for name, tensor in state.items()}
    incompatible = full.load_state_dict(state, strict=False)
    missing = [k for k in incompatible.missing_keys if not k.startswith("vision_tower.")]
    if missing or incompatible.unexpected_keys:
        raise RuntimeError(f"stage2 export: trained state does not fit the model (missing {missing[:3]}, "
                           f"unexpected {incompatible.unexpected_keys[:3]})")
    empty = [name for name, tensor in state.items() if tensor.numel() == 0]
    if empty:
        raise RuntimeError(f"stage2 export: empty tensors gathered for {empty[:3]} (ZeRO-3 partitions not gathered)")
    target = stage2_model_dir(ctx.run)
    export_llava(full, tokenizer, full.vision_tower.image_processor, target, ctx.pipeline.model.template)
    return {"model": str(target), "parameters": sum(t.numel() for t in state.values())}


STAGE = training_stage("stage2", after=("features", "stage1"), run=run)
