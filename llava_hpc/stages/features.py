"""Features stage: run the frozen CLIP tower once over every unique training image; write fp16 Parquet shards.

Both training stages read these shards instead of decoding images and running CLIP at every step.

Features are stored once per unique image, keyed by the image path exactly as the records name it: in
llava_instruct_150k ~158K records share ~81K COCO images, so per-record storage paid twice for half of them.
Unique images are ordered by a seeded hash (`FeaturesStage.seed`), not file order, so a shard is a random
sample of the dataset and training's shard-local windows approximate a global shuffle. Shard i holds
positions [i*shard_size, (i+1)*shard_size) of that order, so a shard's content never depends on which images
turn out bad. The order is recorded in `plan.json` (seed, counts, a digest of the order) and `images.parquet`
(image, shard, position, the ids of the records that use it).

A job array deals the missing shards out to its tasks; a rerun computes only the shards that are not there.
Images that are missing, corrupt or outside the image root are skipped and listed with every record id that
uses them in the shard's sidecar; once all shards exist, `bad_records.jsonl` names each record that cannot be
trained on (one row per record: its id, image and reason; malformed records by position and field).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llava_hpc import faults
from llava_hpc.data.shard_layout import file_sha256, shard_name, shard_paths
from llava_hpc.data.llava_json import DatasetFileError
from llava_hpc.rundir import append_jsonl, atomic_path, atomic_write_json, atomic_write_jsonl
from llava_hpc.stages import Stage, StageContext, Task, deal_out
from llava_hpc.data.images import BadRecord
from llava_hpc.stages.common import (
    ImageLoader,
    compute_device,
    image_record,
    load_positioned_records,
    model_preflight,
    vision_spec,
)

if TYPE_CHECKING:  # numpy, PIL, pyarrow and torch are imported where shards are made: status stays light
    from PIL import Image

    from llava_hpc.synthetic import SyntheticWorld

log = logging.getLogger("llava_hpc.features")


def output_dir(ctx: StageContext, dataset: str) -> Path:
    return ctx.run.stage_dir("features") / dataset


def not_applicable(ctx: StageContext) -> str | None:
    return None if ctx.pipeline.feature_datasets() else "no dataset in this pipeline"


def is_done(ctx: StageContext) -> bool:
    return all(ctx.run.is_done(output_dir(ctx, name)) for name in ctx.pipeline.feature_datasets())


def reset(ctx: StageContext) -> None:
    """--force: recompute the shards, not just re-mark them done."""
    for dataset in ctx.pipeline.feature_datasets():
        for path in output_dir(ctx, dataset).glob("part-*"):
            path.unlink()


def preflight(ctx: StageContext) -> list[str]:
    return model_preflight(ctx.pipeline)


@dataclass
class DatasetPlan:
    """What the records say, before any image is opened: the unique images in shard order and who uses them."""

    seed: int
    shard_size: int
    order: list[str]  # unique image paths, as the records name them, in shard order
    references: dict[str, list[str]]  # image -> ids of the records that use it, in file order
    malformed: list[dict]  # records image_record rejected: position, id where it has one, reason
    records: int
    image_records: int
    text_only: int

    @property
    def shards(self) -> int:
        return _shard_count(len(self.order), self.shard_size)

    def shard_images(self, shard: int) -> list[str]:
        return self.order[shard * self.shard_size : (shard + 1) * self.shard_size]

    def description(self) -> dict:
        """plan.json: what a rerun must reproduce exactly before it may add shards beside the existing ones."""
        return {
            "layout": "unique-images",
            "seed": self.seed,
            "shard_size": self.shard_size,
            "shards": self.shards,
            "records": self.records,
            "image_records": self.image_records,
            "unique_images": len(self.order),
            "malformed_records": len(self.malformed),
            "text_only_records": self.text_only,
            "order_sha256": hashlib.sha256("\n".join(self.order).encode()).hexdigest(),
        }


def shard_order_key(seed: int, image: str) -> str:
    """Where an image goes in the shard order. A hash rather than a seeded RNG permutation: the order is a
    function of (seed, path) alone, stable across numpy versions, and a rerun months later must reproduce the
    existing shards' membership exactly to add the missing ones."""
    return hashlib.sha256(f"{seed}\0{image}".encode()).hexdigest()


def dataset_plan(ctx: StageContext, dataset: str) -> DatasetPlan:
    settings = ctx.pipeline.stages.features
    # Positions are places in the file (not in a max_samples subset): what a user opens the file at.
    records, positions = load_positioned_records(dataset, ctx.pipeline.datasets[dataset], _world(ctx))
    references: dict[str, list[str]] = {}
    malformed: list[dict] = []
    text_only = image_records = 0
    for position, record in zip(positions.tolist(), records):
        try:
            item = image_record(record, position)
        except BadRecord as bad:
            row = {"position": position, "reason": str(bad)}
            if isinstance(record, dict) and isinstance(record.get("id"), (str, int)) and not isinstance(record["id"], bool):
                row["id"] = str(record["id"])
            malformed.append(row)
            continue
        if item is None:
            text_only += 1
        else:
            image_records += 1
            references.setdefault(item.image, []).append(item.id)
    order = sorted(references, key=lambda image: (shard_order_key(settings.seed, image), image))
    return DatasetPlan(settings.seed, settings.shard_size, order, references, malformed, len(records),
                       image_records, text_only)


def _world(ctx: StageContext) -> SyntheticWorld:
    from llava_hpc.synthetic import SyntheticWorld

    return SyntheticWorld.from_config(ctx.pipeline.synthetic)


def _shard_count(n_items: int, shard_size: int) -> int:
    return max(1, math.ceil(n_items / shard_size))


def _missing_shards(directory: Path, count: int) -> list[int]:
    return [i for i in range(count) if not (directory / f"{shard_name(i)}.parquet").exists()]


def _check_plan_unchanged(directory: Path, planned: DatasetPlan) -> None:
    """Shards already written belong to the order they were planned in: adding shards of another order would
    drop some images and hold others twice."""
    plan_file = directory / "plan.json"
    if not plan_file.exists() or not shard_paths(directory):
        return
    try:
        recorded = json.loads(plan_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{plan_file}: unreadable ({exc}); resubmit the features stage with --force") from None
    expected = planned.description()
    changed = [key for key in ("layout", "seed", "shard_size", "order_sha256") if recorded.get(key) != expected[key]]
    if changed:
        raise ValueError(
            f"{plan_file}: the existing shards were planned with a different {', '.join(changed)} (the dataset's "
            f"images, the features seed or shard_size changed, or the shards predate per-image features); "
            "resubmit the features stage with --force to recompute them all"
        )


def _write_plan(directory: Path, planned: DatasetPlan) -> None:
    """plan.json and images.parquet, atomically; every array task writes the same bytes, so skip when present."""
    description = planned.description()
    plan_file = directory / "plan.json"
    images_file = directory / "images.parquet"
    with contextlib.suppress(OSError, ValueError):
        if images_file.exists() and json.loads(plan_file.read_text()) == description:
            return
    import pyarrow as pa
    import pyarrow.parquet as pq

    positions = range(len(planned.order))
    table = pa.table({
        "image": pa.array(planned.order, pa.string()),
        "shard": pa.array([p // planned.shard_size for p in positions], pa.int32()),
        "position": pa.array(list(positions), pa.int64()),
        "record_ids": pa.array([planned.references[image] for image in planned.order], pa.list_(pa.string())),
    })
    with atomic_path(images_file) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    atomic_write_json(plan_file, description)  # last: a plan.json always has its images.parquet


def plan(ctx: StageContext) -> list[Task]:
    settings = ctx.pipeline.stages.features
    tasks: list[Task] = []
    for dataset in ctx.pipeline.feature_datasets():
        directory = output_dir(ctx, dataset)
        if ctx.run.is_done(directory):
            continue
        try:
            planned = dataset_plan(ctx, dataset)
        except DatasetFileError as exc:
            if not ctx.dry_run:
                raise
            # A dry run where the data is not (a laptop): as many tasks as the data would have at least.
            ctx.warnings.append(f"features: {exc}; planned {settings.array_tasks} task(s), shards unknown")
            count = settings.array_tasks
        else:
            try:
                _check_plan_unchanged(directory, planned)
            except ValueError as exc:
                if not ctx.dry_run:  # a dry run with --force would clear the old shards: say it, do not refuse
                    raise
                ctx.warnings.append(f"features: {exc}")
            count = planned.shards
        shares = deal_out(_missing_shards(directory, count), settings.array_tasks)
        tasks.extend(
            Task(stage="features", index=len(tasks) + k, label=f"{dataset} {k + 1}/{len(shares)} ({len(shards)} shards)",
                 payload={"dataset": dataset, "shards": shards})
            for k, shards in enumerate(shares)
        )
    return tasks


def content_hash(loader: ImageLoader, image_name: str, image: Image.Image) -> str:
    """What the image was when its features were computed. Files: sha256 of the file's bytes (what `sha256sum`
    prints). Synthetic renders have no file: sha256 of the decoded RGB pixels (with mode and size), which changes
    exactly when the world renders that image differently and, unlike PNG bytes, not with the encoder's version.
    The prefix says which, so the two are never compared."""
    if loader.world is not None:
        digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
        digest.update(image.tobytes())
        return f"rgb-sha256:{digest.hexdigest()}"
    return f"sha256:{file_sha256((loader.root / image_name).resolve())}"


def _load_batch(loader: ImageLoader, images: list[str], workers: int):
    """(decoded image, content hash) per name, or the BadRecord saying why it cannot be used."""

    def load(name: str):
        try:
            image = loader.load(name)
            return image, content_hash(loader, name, image)
        except BadRecord as bad:
            return bad
        except OSError as exc:  # vanished between decoding and hashing
            return BadRecord(f"image {name!r} unreadable: {exc}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(load, images))


def _encode_shard(tower, loader, planned: DatasetPlan, images: list[str], batch_size: int, workers: int):
    import numpy as np
    import torch

    names: list[str] = []
    hashes: list[str] = []
    blocks: list[np.ndarray] = []
    bad: list[dict] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        loaded = _load_batch(loader, batch, workers)
        good = []
        for name, result in zip(batch, loaded):
            if isinstance(result, BadRecord):
                bad.append({"image": name, "reason": str(result), "record_ids": planned.references[name]})
            else:
                good.append((name, *result))
        if not good:
            continue
        pixels = tower.preprocess([image for _, image, _ in good])
        blocks.append(tower(pixels).to(torch.float16).cpu().numpy())
        names.extend(name for name, _, _ in good)
        hashes.extend(digest for _, _, digest in good)
    if blocks:
        features = np.concatenate(blocks)
    else:
        features = np.zeros((0, tower.num_patches, tower.hidden_size), dtype=np.float16)
    return names, hashes, features, bad


def run(ctx: StageContext, task: Task) -> dict:
    from llava_hpc.data.features_io import write_shard  # pyarrow and torch: only where the work runs
    from llava_hpc.model.vision import build_vision_tower

    settings = ctx.pipeline.stages.features
    dataset = task.payload["dataset"]
    directory = output_dir(ctx, dataset)
    directory.mkdir(parents=True, exist_ok=True)
    planned = dataset_plan(ctx, dataset)
    _check_plan_unchanged(directory, planned)
    _write_plan(directory, planned)
    loader = ImageLoader(ctx.pipeline.datasets[dataset], _world(ctx))
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
        chunk = planned.shard_images(shard)
        names, hashes, features, bad = _encode_shard(tower, loader, planned, chunk, settings.batch_size, workers)
        meta = write_shard(directory, shard, images=names, content_hashes=hashes, features=features, bad_images=bad,
                           compression=settings.compression)
        seconds = time.time() - started
        append_jsonl(
            directory / "metrics.jsonl",
            {"shard": shard, "rows": len(names), "bad": len(bad), "seconds": round(seconds, 3),
             "images_per_s": round(len(chunk) / max(seconds, 1e-9), 1), "bytes": meta["bytes"], "time": time.time()},
        )
        log.info("%s %s: %d images, %d bad, %.1f img/s", dataset, target.name, len(names), len(bad), len(chunk) / max(seconds, 1e-9))
        written += 1
        faults.pause("after_shard")

    finalized = finalize(ctx, dataset, planned)
    return {"dataset": dataset, "shards_written": written, "dataset_done": finalized}


def finalize(ctx: StageContext, dataset: str, planned: DatasetPlan) -> bool:
    """Once every shard exists: merge bad records, write the summary and `_SUCCESS`. Idempotent, so whichever
    array task finishes last does it (two doing it at once write the same bytes)."""
    directory = output_dir(ctx, dataset)
    count = planned.shards
    if _missing_shards(directory, count):
        return False
    rows = size = 0
    bad_images: list[dict] = []
    shape = None
    for i in range(count):
        meta = json.loads((directory / f"{shard_name(i)}.json").read_text())
        rows += meta["rows"]
        size += meta["bytes"]
        bad_images.extend(meta["bad_images"])
        shape = shape or meta["shape"]
    # One row per record that cannot be trained on: malformed ones first (file order), then by image.
    bad_records = list(planned.malformed)
    for bad in bad_images:
        bad_records.extend({"id": record_id, "image": bad["image"], "reason": bad["reason"]} for record_id in bad["record_ids"])
    atomic_write_jsonl(directory / "bad_records.jsonl", bad_records)
    unique = len(planned.order)
    summary = {
        "dataset": dataset,
        "seed": planned.seed,
        "shards": count,
        "records": planned.records,
        "image_records": planned.image_records,
        "unique_images": unique,
        "dedup_ratio": round(planned.image_records / unique, 4) if unique else None,
        "rows": rows,
        "bad_images": len(bad_images),
        "bad_records": len(bad_records),
        "malformed_records": len(planned.malformed),
        "text_only_records": planned.text_only,
        "bytes": size,
        "bytes_per_image": round(size / rows, 1) if rows else None,
        "features_shape": shape,
        "compression": ctx.pipeline.stages.features.compression,
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


STAGE = Stage(name="features", after=(), plan=plan, run=run, is_done=is_done, progress=progress, reset=reset,
              preflight=preflight, not_applicable=not_applicable)
