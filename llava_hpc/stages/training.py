"""What stage 1 and stage 2 share: building the model and the dataset from the run directory, running the
training loop, and writing the stage's summary, plot and `_SUCCESS`. Each stage module says only what
differs: which parameters train, where it starts from, what it writes at the end."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from typing import Callable

import torch

from llava_hpc.config import TrainStage
from llava_hpc.data.datasets import Collator, FeatureConversationDataset
from llava_hpc.data.features_io import FeatureStore
from llava_hpc.data.templates import ConversationTemplate
from llava_hpc.model.builders import build_llava
from llava_hpc.rundir import atomic_write_json
from llava_hpc.stages import StageContext, Task
from llava_hpc.stages.common import llava_spec, load_records, model_preflight
from llava_hpc.train import distributed
from llava_hpc.train.loop import TrainResult, TrainSettings, plot_loss, train

log = logging.getLogger("llava_hpc.train")


def settings_of(stage: TrainStage) -> TrainSettings:
    return TrainSettings(
        batch_size=stage.batch_size, grad_accum=stage.grad_accum, lr=stage.lr, warmup_ratio=stage.warmup_ratio,
        weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm, epochs=stage.epochs,
        max_steps=stage.max_steps, seed=stage.seed, precision=stage.precision,
        gradient_checkpointing=stage.gradient_checkpointing, save_every_steps=stage.save_every_steps,
        keep_checkpoints=stage.keep_checkpoints, zero_stage=stage.zero_stage,
        offload_optimizer=stage.offload_optimizer, offload_params=stage.offload_params,
        shuffle_window_shards=stage.shuffle_window_shards,
    )


def plan(ctx: StageContext, stage: str) -> list[Task]:
    if ctx.run.is_done(ctx.run.stage_dir(stage)):
        return []
    config: TrainStage = getattr(ctx.pipeline.stages, stage)
    resources = ctx.pipeline.resources(stage)
    ranks = resources.nodes * resources.tasks_per_node
    return [Task(stage=stage, index=0, label=f"{config.dataset}, {ranks} rank(s), ZeRO-{config.zero_stage}")]


def is_done(ctx: StageContext, stage: str) -> bool:
    return ctx.run.is_done(ctx.run.stage_dir(stage))


def reset(ctx: StageContext, stage: str) -> None:
    """--force: train from scratch, so the old checkpoints and metrics go."""
    out_dir = ctx.run.stage_dir(stage)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)


def preflight(ctx: StageContext, stage: str) -> list[str]:
    return model_preflight(ctx.pipeline)


def progress(ctx: StageContext, stage: str) -> str | None:
    metrics = ctx.run.stage_dir(stage) / "metrics.jsonl"
    if not metrics.exists():
        return None
    lines = metrics.read_text().splitlines()
    if not lines:
        return None
    last = json.loads(lines[-1])
    return f"step {last['step']}, loss {last['loss']:.3f}"


def run_training(
    ctx: StageContext,
    stage: str,
    template_name: str,
    prepare: Callable,  # (model) -> None: freeze / load what this stage starts from
    finish: Callable,  # (ctx, result, model, tokenizer, env) -> dict: write the stage's artifact (collective)
) -> dict:
    config: TrainStage = getattr(ctx.pipeline.stages, stage)
    settings = settings_of(config)
    out_dir = ctx.run.stage_dir(stage)
    env = distributed.environment()
    device = distributed.setup(env)
    if device.type == "cpu":
        # Bitwise-reproducible resume on CPU; on GPUs determinism costs too much speed to be the default.
        torch.use_deterministic_algorithms(True)
    # The process group is left up when the task ends: the process ends with it, and DeepSpeed keeps a handle
    # to it that a second engine in the same process (the debug executor runs stages in-process) reuses.
    torch.manual_seed(settings.seed)
    spec = llava_spec(ctx.pipeline)
    model, tokenizer = build_llava(spec, device=device, with_vision_tower=False)
    prepare(model)

    dataset_config = ctx.pipeline.datasets[config.dataset]
    records = load_records(config.dataset, dataset_config, ctx.pipeline)
    if config.max_samples is not None:
        records = records[: config.max_samples]
    # Checksums are checked as each shard is first loaded: a shard corrupted on the shared filesystem must not train
    # silently. Two windows of shards are cached: a global batch that straddles two windows reads from both.
    store = FeatureStore(ctx.run.stage_dir("features") / config.dataset, verify=True,
                         cache_shards=2 * config.shuffle_window_shards)
    template = ConversationTemplate(template_name, tokenizer)
    source = str(dataset_config.path) if dataset_config.path else f"synthetic {dataset_config.split}"
    dataset = FeatureConversationDataset(records, store, template, spec.max_length, config.overlong, source)
    if len(dataset) == 0:
        raise ValueError(f"{stage}: dataset {config.dataset!r} has no usable samples")
    collate = Collator(tokenizer.pad_token_id, padding_side="right")

    result: TrainResult = train(model, dataset, collate, settings, out_dir, env, device, stage)
    summary = finish(ctx, result, model, tokenizer, env)
    if env.is_main:
        plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png", f"{ctx.pipeline.name} {stage}")
        summary.update(
            stage=stage, steps=result.steps, resumed_from_step=result.resumed_from, final_loss=result.final_loss,
            seconds=round(result.seconds, 1), world_size=env.world_size, template=template_name,
            samples=len(dataset), data=asdict(dataset.stats) | {"skipped_ids": dataset.stats.skipped_ids[:20]},
            # How the features were read by this rank: about one decode per shard per epoch when shard-local.
            feature_shards={"shards": len(store.paths), "window": config.shuffle_window_shards,
                            "decodes": store.shard_loads},
        )
        atomic_write_json(out_dir / "summary.json", summary)
        ctx.run.mark_done(out_dir, {"steps": result.steps})
    distributed.barrier()
    return summary
