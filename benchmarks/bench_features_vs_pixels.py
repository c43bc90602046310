"""Training input throughput: precomputed Parquet features vs raw images through the vision tower.

Same model, same batches, same collator; the only difference is where the image tokens come from:
  features: FeatureStore lookup (fp16 Parquet, zstd) -> collate -> projector + LLM forward
  pixels:   image file decode + CLIP preprocessing -> collate -> vision tower + projector + LLM forward
Two sizes: the tiny demo tower (64x64 features from 64 px PNGs) and the real CLIP-L/14 224 shape
(256x1024 features, random weights, from 640x480 JPEGs like COCO's), with a small LLM so it runs on CPU.
Forward passes run under no_grad (the tower is frozen, so its cost is the same in training). The stored
feature values are random: values do not change the timing, and fp16 CLIP activations compress about as
poorly. After a warm-up batch each path makes several timed passes (alternating; the pixel path as many as
its setting allows, the cheap features path at least 5) and the best pass counts, which keeps noise from
other processes on a shared machine out of the ratio.
Prints a table; no timing asserts.

    python benchmarks/bench_features_vs_pixels.py [--threads 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from llava_hpc.data.datasets import Collator, FeatureConversationDataset, ImageConversationDataset, file_image_loader
from llava_hpc.data.features_io import FeatureStore, write_shard
from llava_hpc.data.templates import ConversationTemplate
from llava_hpc.model.builders import LlavaSpec, LLMSpec, TinyLLMSpec, build_llava
from llava_hpc.model.vision import TinyVisionSpec, VisionTowerSpec
from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld


@dataclass(frozen=True)
class Setting:
    name: str
    vision: TinyVisionSpec
    llm_hidden: int
    image_size: tuple[int, int]  # (width, height) of the files on disk
    image_format: str
    batch_size: int
    batches: int
    pixel_repeats: int


SETTINGS = (
    Setting("tiny (demo)", TinyVisionSpec(), 128, (64, 64), "PNG", batch_size=16, batches=8, pixel_repeats=5),
    Setting(
        "CLIP-L/14 224",
        TinyVisionSpec(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, layers=24, heads=16),
        256,
        (640, 480),
        "JPEG",
        batch_size=4,
        batches=2,
        pixel_repeats=1,
    ),
)


def run(setting: Setting, workdir: Path) -> dict:
    samples = setting.batch_size * (setting.batches + 1)  # one warm-up batch
    world = SyntheticWorld(SyntheticSpec(n_pretrain=samples, n_instruct=samples, n_bench=1))
    records = world.records("instruct")
    spec = LlavaSpec(
        vision=VisionTowerSpec(tiny=setting.vision),
        llm=LLMSpec(tiny=TinyLLMSpec(hidden_size=setting.llm_hidden), vocabulary=world.vocabulary()),
    )
    model, tokenizer = build_llava(spec)
    model.eval()
    template = ConversationTemplate("chat_template", tokenizer)

    image_root = workdir / "images"
    suffix = ".jpg" if setting.image_format == "JPEG" else ".png"
    for record in records:
        record["image"] = record["image"].replace(".png", suffix)
        path = image_root / record["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        image = world.load_image(record["image"].replace(suffix, ".png")).resize(setting.image_size, Image.BILINEAR)
        image.save(path, format=setting.image_format, quality=90)
    load_image = file_image_loader(image_root)

    # What the features stage writes: fp16 rows in a zstd Parquet shard (untimed, done once per dataset).
    feature_dir = workdir / "features"
    features = torch.randn(len(records), model.num_patches, model.vision_tower.hidden_size).half().numpy()
    write_shard(feature_dir, 0, images=[r["image"] for r in records], features=features)
    store = FeatureStore(feature_dir)

    max_length = 4096
    datasets = {
        "features": FeatureConversationDataset.from_records(records, store, template, max_length),
        "pixels": ImageConversationDataset(
            records, template, model.vision_tower.preprocess, load_image, model.num_patches, max_length
        ),
    }
    collate = Collator(tokenizer.pad_token_id)
    order = list(range(len(records)))
    warm_up, *timed = [order[i : i + setting.batch_size] for i in range(0, len(order), setting.batch_size)]

    def step(dataset, indices) -> None:
        batch = collate([dataset[i] for i in indices])
        with torch.no_grad():
            model(**batch.model_inputs())

    best = {}
    for dataset in datasets.values():
        step(dataset, warm_up)  # allocators and kernels
    repeats = {"features": max(5, setting.pixel_repeats), "pixels": setting.pixel_repeats}
    for round_number in range(repeats["features"]):
        for kind, dataset in datasets.items():
            if round_number >= repeats[kind]:
                continue
            start = time.perf_counter()
            for indices in timed:
                step(dataset, indices)
            best[kind] = min(best.get(kind, float("inf")), time.perf_counter() - start)
    throughput = {kind: setting.batch_size * setting.batches / seconds for kind, seconds in best.items()}
    image_bytes = sum((image_root / r["image"]).stat().st_size for r in records) / len(records)
    feature_bytes = sum(p.stat().st_size for p in feature_dir.glob("*.parquet")) / len(records)
    return {
        "setting": setting.name,
        "features_shape": [model.num_patches, model.vision_tower.hidden_size],
        "batch_size": setting.batch_size,
        "features_samples_per_s": throughput["features"],
        "pixels_samples_per_s": throughput["pixels"],
        "ratio": throughput["features"] / throughput["pixels"],
        "image_kib_per_sample": image_bytes / 1024,
        "parquet_kib_per_sample": feature_bytes / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for setting in SETTINGS:
        with tempfile.TemporaryDirectory() as workdir:
            rows.append(run(setting, Path(workdir)))
    header = (
        f"{'setting':<16} {'features':>10} {'batch':>5} {'features/s':>11} {'pixels/s':>9} {'ratio':>7} "
        f"{'image KiB':>10} {'parquet KiB':>12}"
    )
    print(f"threads: {torch.get_num_threads()}, device: cpu")
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = "x".join(map(str, row["features_shape"]))
        print(
            f"{row['setting']:<16} {shape:>10} {row['batch_size']:>5} {row['features_samples_per_s']:>11.1f} "
            f"{row['pixels_samples_per_s']:>9.1f} {row['ratio']:>6.1f}x {row['image_kib_per_sample']:>10.1f} "
            f"{row['parquet_kib_per_sample']:>12.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
