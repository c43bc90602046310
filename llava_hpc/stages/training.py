"""What stage 1 and stage 2 share: building the model and the dataset from the run directory, running the
training loop, and writing the stage's summary, plot and `_SUCCESS`; `training_stage` declares either. Each stage
module says only what differs: which parameters train, where it starts from, what it writes at the end."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING, Callable

from llava_hpc.config import TrainStage
from llava_hpc.rundir import atomic_write_json, atomic_write_jsonl, read_jsonl
from llava_hpc.stages import Stage, StageContext, Task
from llava_hpc.stages.common import llava_spec, load_positioned_records, model_preflight, subset_positions
from llava_hpc.train.tracking import EVENTS_DIR

# Planning, status and progress need none of the training machinery (torch, Arrow): `llava-hpc status` stays fast.
if TYPE_CHECKING:
    from llava_hpc.data.datasets import FeatureConversationDataset
    from llava_hpc.data.encoded import EncodedCache, EncodeSettings
    from llava_hpc.data.templates import ConversationTemplate
    from llava_hpc.train import distributed

log = logging.getLogger("llava_hpc.train")


def training_stage(name: str, after: tuple[str, ...], run: Callable[[StageContext, Task], dict]) -> Stage:
    """The declaration of a training stage: everything but `run` is the same for stage 1 and stage 2."""
    return Stage(name=name, after=after, run=run, plan=partial(plan, stage=name), is_done=partial(is_done, stage=name),
                 progress=partial(progress, stage=name), reset=partial(reset, stage=name),
                 preflight=partial(preflight, stage=name))


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
    """--force: train from scratch, so the old checkpoints, metrics and TensorBoard events go."""
    out_dir = ctx.run.stage_dir(stage)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(out_dir / EVENTS_DIR, ignore_errors=True)


def preflight(ctx: StageContext, stage: str) -> list[str]:
    return model_preflight(ctx.pipeline)


def progress(ctx: StageContext, stage: str) -> str | None:
    """"step 120/1500, 3.2 steps/s, ETA 0:07:11, loss 1.234" from the stage's metrics.jsonl (the rate over the
    last rows of the current attempt: rows say which checkpoint their attempt resumed from)."""
    metrics = ctx.run.stage_dir(stage) / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()[-20:] if line.strip()]
    if not rows:
        return None
    last = rows[-1]
    total = last.get("total_steps")
    text = f"step {last['step']}" + (f"/{total}" if total else "")
    attempt = [row for row in rows if row.get("resumed_from") == last.get("resumed_from")]
    if len(attempt) >= 2 and attempt[-1]["time"] > attempt[0]["time"]:
        rate = (attempt[-1]["step"] - attempt[0]["step"]) / (attempt[-1]["time"] - attempt[0]["time"])
        text += f", {rate:.2f} steps/s" if rate < 10 else f", {rate:.0f} steps/s"
        if total and rate > 0 and total > last["step"]:
            text += f", ETA {_clock((total - last['step']) / rate)}"
    return text + f", loss {last['loss']:.3f}"


def _clock(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def encoded_cache(ctx: StageContext, stage: str, template: ConversationTemplate,
                  settings: EncodeSettings) -> EncodedCache:
    """The stage's encoded-records cache, keyed by everything its samples depend on (see data.encoded)."""
    from llava_hpc.data.encoded import EncodedCache, cache_spec, file_fingerprint

    config: TrainStage = getattr(ctx.pipeline.stages, stage)
    dataset = ctx.pipeline.datasets[config.dataset]
    if dataset.kind == "synthetic":
        source = {"synthetic": ctx.pipeline.synthetic.model_dump(mode="json"), "split": dataset.split}
    else:
        source = file_fingerprint(dataset.path)
    subset = {"seed": dataset.subset_seed, "dataset_max_samples": dataset.max_samples,
              "stage_max_samples": config.max_samples}
    # Per stage: a new key (an edited file, another max_length) replaces that stage's old cache, never another's.
    return EncodedCache(ctx.run.root / "cache" / "encoded" / stage, config.dataset,
                        cache_spec(source, template, settings, subset))


def build_cache(ctx: StageContext, stage: str, cache: EncodedCache, template: ConversationTemplate,
                settings: EncodeSettings, env: distributed.DistributedEnv) -> None:
    """Collective: unless the cache is complete, every rank encodes its share (with a pool of its CPUs), then rank 0
    publishes it. A failure on any rank fails every rank with its message, never a hang at a barrier."""
    from llava_hpc.synthetic import SyntheticWorld
    from llava_hpc.train import distributed

    # One decision for all ranks: a cache published by another job between two ranks' checks must not split them.
    _, missing = distributed.all_reduce_mean_and_any(0.0, not cache.is_complete())
    if not missing:
        return
    config: TrainStage = getattr(ctx.pipeline.stages, stage)
    dataset = ctx.pipeline.datasets[config.dataset]
    source = str(dataset.path) if dataset.path else f"synthetic {dataset.split}"
    failure, subset = None, None
    try:
        world = SyntheticWorld.from_config(ctx.pipeline.synthetic)
        records, positions = load_positioned_records(config.dataset, dataset, world)
        if config.max_samples is not None:  # the stage's own subset, drawn from the dataset's
            chosen = subset_positions(len(records), config.max_samples, dataset.subset_seed)
            records, positions = [records[i] for i in chosen], positions[chosen]
        subset = {**cache.spec["subset"], "records_chosen": len(positions), "positions": positions.tolist()}
        workers = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
        cache.encode_part(records, positions, template, settings, env.rank, env.world_size, source, workers,
                          progress=env.is_main)
    except Exception as exc:  # noqa: BLE001 - reported to every rank below, then raised
        failure = f"{type(exc).__name__}: {exc}"
        if env.world_size == 1:
            raise
    _raise_failures(stage, distributed.gather_failures(failure))
    failure = None
    if env.is_main:
        try:
            report = cache.finalize(env.world_size, subset)
            log.info("%s: encoded %s into %s", stage, report["counts"], cache.directory)
        except Exception as exc:  # noqa: BLE001
            failure = f"{type(exc).__name__}: {exc}"
            if env.world_size == 1:
                raise
    _raise_failures(stage, distributed.gather_failures(failure))


def skipped_records(cache: EncodedCache, dataset: FeatureConversationDataset, features_dir) -> list[dict]:
    """Every record of the stage's data that does not train, in file order, each naming the file, its position and
    id, the field and why: malformed and over-long ones (from encoding) and those whose image has no features (the
    reason the features stage gave: a missing or corrupt file)."""
    skipped = list(cache.skipped())
    if dataset.missing_features:
        source = cache.spec["source"].get("path")
        why = {}
        bad_file = features_dir / "bad_records.jsonl"
        if bad_file.exists():
            why = {row["image"]: row["reason"] for row in read_jsonl(bad_file) if row.get("image")}
        skipped += [{"file": source, "position": m["position"], "id": m["id"], "kind": "image", "field": "image",
                     "reason": why.get(m["image"], f"no features for image {m['image']!r}")}
                    for m in dataset.missing_features]
    return sorted(skipped, key=lambda row: row["position"])


def _count_kinds(skipped: list[dict]) -> dict:
    return dict(Counter(row["kind"] for row in skipped))


def _skipped_line(skipped: list[dict], path) -> str:
    if not skipped:
        return "no record skipped"
    kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in _count_kinds(skipped).items())
    return f"{len(skipped)} skipped ({kinds}), each named in {path}"


def _raise_failures(stage: str, failures: list[tuple[int, str]]) -> None:
    if failures:
        raise RuntimeError(f"{stage}: encoding the training records failed: " +
                           "; ".join(f"rank {rank}: {message}" for rank, message in failures))


def run_training(
    ctx: StageContext,
    stage: str,
    template_name: str,
    prepare: Callable,  # (model) -> None: freeze / load what this stage starts from
    finish: Callable,  # (ctx, result, model, tokenizer, env) -> dict: write the stage's artifact (collective)
) -> dict:
    import torch

    from llava_hpc.data.datasets import Collator, FeatureConversationDataset
    from llava_hpc.data.encoded import EncodeSettings
    from llava_hpc.data.features_io import FeatureStore
    from llava_hpc.data.templates import ConversationTemplate
    from llava_hpc.model.builders import build_llava
    from llava_hpc.train import distributed
    from llava_hpc.train.loop import TrainResult, TrainSettings, plot_loss, train

    config: TrainStage = getattr(ctx.pipeline.stages, stage)
    # The loop's settings are the stage table's fields of the same names (the table adds data and Slurm choices).
    settings = TrainSettings(**config.model_dump(include={f.name for f in dataclasses.fields(TrainSettings)}))
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

    # Checksums are checked as each shard is first loaded: a shard corrupted on the shared filesystem must not train
    # silently. Two windows of shards are cached: a global batch that straddles two windows reads from both.
    store = FeatureStore(ctx.run.stage_dir("features") / config.dataset, verify=True,
                         cache_shards=2 * config.shuffle_window_shards)
    template = ConversationTemplate(template_name, tokenizer)
    encode_settings = EncodeSettings(store.num_patches, spec.max_length, config.overlong)
    cache = encoded_cache(ctx, stage, template, encode_settings)
    build_cache(ctx, stage, cache, template, encode_settings, env)
    cache_report = cache.report()
    dataset = FeatureConversationDataset(cache.open(), store, cache_report["counts"])
    if len(dataset) == 0:
        raise ValueError(f"{stage}: dataset {config.dataset!r} has no usable samples")
    collate = Collator.for_training(model, tokenizer.pad_token_id)

    skipped = skipped_records(cache, dataset, ctx.run.stage_dir("features") / config.dataset)
    if env.is_main:
        atomic_write_jsonl(out_dir / "skipped.jsonl", skipped)
        log.info("%s: training on %d of %d records; %s", stage, len(dataset), cache_report["counts"]["records"],
                 _skipped_line(skipped, out_dir / "skipped.jsonl"))

    result: TrainResult = train(model, dataset, collate, settings, out_dir, env, device, stage)
    summary = finish(ctx, result, model, tokenizer, env)
    if env.is_main:
        # Stage 2's plot continues stage 1's curve: one picture of the whole training.
        curves = [(name, ctx.run.stage_dir(name) / "metrics.jsonl") for name in ("stage1", "stage2")]
        curves = curves[: [name for name, _ in curves].index(stage) + 1]
        plot_loss(curves, out_dir / "loss.png", f"{ctx.pipeline.name} {stage}")
        summary.update(
            stage=stage, steps=result.steps, resumed_from_step=result.resumed_from, final_loss=result.final_loss,
            seconds=round(result.seconds, 1), world_size=env.world_size, template=template_name,
            samples=len(dataset), data=dataset.stats,
            skipped={"records": len(skipped), "by_kind": _count_kinds(skipped), "file": str(out_dir / "skipped.jsonl"),
                     "first": skipped[:20]},
            encoded_cache={"key": cache.key, "path": str(cache.directory), "counts": cache_report["counts"]},
            # How the features were read by this rank: about one decode per shard per epoch when shard-local.
            feature_shards={"shards": len(store.paths), "window": config.shuffle_window_shards,
                            "decodes": store.shard_loads},
        )
        atomic_write_json(out_dir / "summary.json", summary)
        ctx.run.mark_done(out_dir, {"steps": result.steps})
    distributed.barrier()
    return summary
