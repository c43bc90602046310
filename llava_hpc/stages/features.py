"""Features stage: run the frozen CLIP tower once over every training image; write fp16 Parquet shards.

Both training stages read these shards instead of decoding images and running CLIP at every step.

Sharding is by position among the dataset's image records (shard i holds image records
[i*shard_size, (i+1)*shard_size)), so a shard's content never depends on which images turn out bad.
A job array deals the missing shards out to its tasks; a rerun computes only the shards that are not there.
Records whose image is missing, corrupt or outside the image root are skipped and listed (id, image,
reason) in the shard's sidecar and, once all shards exist, in `bad_records.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from llava_hpc import faults
from llava_hpc.data.features_io import shard_name, shard_paths, write_shard
from llava_hpc.model.vision import build_vision_tower
from llava_hpc.rundir import append_jsonl, atomic_write_json, atomic_write_jsonl
from llava_hpc.stages import StageContext, Task
from llava_hpc.stages.common import (
    BadRecord,
    DatasetFileError,
    ImageLoader,
    ImageRecord,
    compute_device,
    image_record,
    load_records,
    model_preflight,
    vision_spec,
)

log = logging.getLogger("llava_hpc.features")



def output_dir(ctx: StageContext, dataset: str) -> Path:
    return ctx.run.stage_dir("features") / dataset


def is_done(ctx: StageContext) -> bool:
    return all(ctx.run.is_done(output_dir(ctx, name)) for name in ctx.pipeline.feature_datasets())


def reset(ctx: StageContext) -> None:
    """--force: recompute the shards, not just re-mark them done."""
    for dataset in ctx.pipeline.feature_datasets():
        for path in output_dir(ctx, dataset).glob("part-*"):
            path.unlink()


def preflight(ctx: StageContext) -> list[str]:
    return model_preflight(ctx.pipeline)


def _image_records(ctx: StageContext, dataset: str) -> tuple[list[ImageRecord | BadRecord], int]:
    """All records that carry an image, in file order (malformed ones as BadRecord), and the text-only count."""
    records = load_records(dataset, ctx.pipeline.datasets[dataset], ctx.pipeline)
    items: list[ImageRecord | BadRecord] = []
    text_only = 0
    for position, record in enumerate(records):
        try:
            item = image_record(record, position)
        except BadRecord as bad:
            items.append(bad)
            continue
        if item is None:
            text_only += 1
        else:
            items.append(item)
    return items, text_only


def _shard_count(n_items: int, shard_size: int) -> int:
    return max(1, math.ceil(n_items / shard_size))


def _missing_shards(directory: Path, count: int) -> list[int]:
    return [i for i in range(count) if not (directory / f"{shard_name(i)}.parquet").exists()]


def plan(ctx: StageContext) -> list[Task]:
    settings = ctx.pipeline.stages.features
    tasks: list[Task] = []
    for dataset in ctx.pipeline.feature_datasets():
        directory = output_dir(ctx, dataset)
        if ctx.run.is_done(directory):
            continue
        try:
            items, _ = _image_records(ctx, dataset)
        except DatasetFileError as exc:
            if not ctx.dry_run:
                raise
            # A dry run where the data is not (a laptop): as many tasks as the data would have at least.
            ctx.warnings.append(f"features: {exc}; planned {settings.array_tasks} task(s), shards unknown")
            items = [None] * settings.array_tasks * settings.shard_size
        missing = _missing_shards(directory, _shard_count(len(items), settings.shard_size))
        n_tasks = max(1, min(settings.array_tasks, len(missing)))
        for k in range(n_tasks):
            shards = missing[k::n_tasks]
            tasks.append(
                Task(
                    stage="features",
                    index=len(tasks),
                    label=f"{dataset} {k + 1}/{n_tasks} ({len(shards)} shards)",
                    payload={"dataset": dataset, "shards": shards},
                )
            )
    return tasks


def _load_batch(loader: ImageLoader, items: list[ImageRecord | BadRecord], workers: int):
    def load(item):
        if isinstance(item, BadRecord):
            return item
        try:
            return loader.load(item.image)
        except BadRecord as bad:
            return bad

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(load, items))


def _encode_shard(tower, loader, items, batch_size: int, workers: int):
    ids: list[str] = []
    images: list[str] = []
    blocks: list[np.ndarray] = []
    bad: list[dict] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        loaded = _load_batch(loader, batch, workers)
        good = []
        for item, image in zip(batch, loaded):
            if isinstance(image, BadRecord):
                record = {"reason": str(image)}
                if isinstance(item, ImageRecord):
                    record.update(id=item.id, image=item.image)
                bad.append(record)
            else:
                good.append((item, image))
        if not good:
            continue
        pixels = tower.preprocess([image for _, image in good])
        features = tower(pixels).to(torch.float16).cpu().numpy()
        blocks.append(features)
        ids.extend(item.id for item, _ in good)
        images.extend(item.image for item, _ in good)
    if blocks:
        features = np.concatenate(blocks)
    else:
        features = np.zeros((0, tower.num_patches, tower.hidden_size), dtype=np.float16)
    return ids, images, features, bad


def run(ctx: StageContext, task: Task) -> dict:
    settings = ctx.pipeline.stages.features
    dataset = task.payload["dataset"]
    directory = output_dir(ctx, dataset)
    directory.mkdir(parents=True, exist_ok=True)
    items, text_only = _image_records(ctx, dataset)
    atomic_write_json(directory / "plan.json", {"shards": _shard_count(len(items), settings.shard_size), "image_records": len(items)})
    loader = ImageLoader(ctx.pipeline.datasets[dataset], ctx.pipeline)
    device, dtype = compute_device()
    tower = build_vision_tower(vision_spec(ctx.pipeline), device=device, dtype=dtype)
    workers = int(os.environ.get("SLURM_CPUS_PER_TASK", "2"))

    written = 0
    for shard in task.payload["shards"]:
        target = directory / f"{shard_name(shard)}.parquet"
        if target.exists():  # another task or an earlier attempt finished it
            continue
        for stale in directory.glob(f".{shard_name(shard)}.*.tmp"):  # left by a killed writer
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        started = time.time()
        chunk = items[shard * settings.shard_size : (shard + 1) * settings.shard_size]
        ids, images, features, bad = _encode_shard(tower, loader, chunk, settings.batch_size, workers)
        meta = write_shard(directory, shard, ids, images, features, bad, compression=settings.compression)
        seconds = time.time() - started
        append_jsonl(
            directory / "metrics.jsonl",
            {"shard": shard, "rows": len(ids), "bad": len(bad), "seconds": round(seconds, 3),
             "images_per_s": round(len(chunk) / max(seconds, 1e-9), 1), "bytes": meta["bytes"], "time": time.time()},
        )
        log.info("%s %s: %d rows, %d bad, %.1f img/s", dataset, target.name, len(ids), len(bad), len(chunk) / max(seconds, 1e-9))
        written += 1
        faults.pause("after_shard")

    finalized = finalize(ctx, dataset, n_items=len(items), text_only=text_only)
    return {"dataset": dataset, "shards_written": written, "dataset_done": finalized}


def finalize(ctx: StageContext, dataset: str, n_items: int, text_only: int) -> bool:
    """Once every shard exists: merge bad records, write the summary and `_SUCCESS`. Idempotent, so whichever
    array task finishes last does it (two doing it at once write the same bytes)."""
    settings = ctx.pipeline.stages.features
    directory = output_dir(ctx, dataset)
    count = _shard_count(n_items, settings.shard_size)
    if _missing_shards(directory, count):
        return False
    rows = bad = size = 0
    bad_records: list[dict] = []
    shape = None
    for i in range(count):
        meta = json.loads((directory / f"{shard_name(i)}.json").read_text())
        rows += meta["rows"]
        bad += meta["bad"]
        size += meta["bytes"]
        bad_records.extend(meta["bad_records"])
        shape = shape or meta["shape"]
    atomic_write_jsonl(directory / "bad_records.jsonl", bad_records)
    summary = {
        "dataset": dataset,
        "shards": count,
        "rows": rows,
        "bad_records": bad,
        "text_only_records": text_only,
        "bytes": size,
        "bytes_per_image": round(size / rows, 1) if rows else None,
        "features_shape": shape,
        "compression": settings.compression,
    }
    atomic_write_json(directory / "summary.json", summary)
    ctx.run.mark_done(directory, summary)
    return True


def progress(ctx: StageContext) -> str | None:
    notes = []
    for dataset in ctx.pipeline.feature_datasets():
        directory = output_dir(ctx, dataset)
        summary_path = directory / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            note = f"{dataset}: {summary['shards']}/{summary['shards']} shards"
            if summary["bad_records"]:
                note += f", {summary['bad_records']} bad records"
            notes.append(note)
        elif (directory / "plan.json").exists():
            total = json.loads((directory / "plan.json").read_text())["shards"]
            notes.append(f"{dataset}: {len(shard_paths(directory))}/{total} shards")
    return "; ".join(notes) or None
