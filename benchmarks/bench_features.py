"""Features stage throughput and size: images/s through the frozen tower, bytes per image on disk (fp16, zstd
vs uncompressed), and shard read throughput, at the tiny width and at CLIP ViT-L/14 width (random weights:
throughput does not depend on the weights; compressibility does, so real-CLIP sizes are measured on a cluster).

    .venv/bin/python benchmarks/bench_features.py [--large-images 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_hpc.data.features_io import read_shard, write_shard
from llava_hpc.model.vision import TinyVisionSpec, VisionTower, VisionTowerSpec, build_vision_tower
from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld


def clip_l14_tower() -> VisionTower:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16)
    torch.manual_seed(0)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return VisionTower(CLIPVisionModel(config), processor)


def measure(name: str, tower: VisionTower, images: list[Image.Image], batch: int, tmp: Path) -> dict:
    started = time.time()
    blocks = []
    for i in range(0, len(images), batch):
        blocks.append(tower(tower.preprocess(images[i : i + batch])).to(torch.float16).numpy())
    seconds = time.time() - started
    features = np.concatenate(blocks)
    ids = [str(i) for i in range(len(images))]
    sizes = {}
    for compression in ("zstd", "none"):
        directory = tmp / f"{name.replace('/', '_')}-{compression}"
        directory.mkdir()
        sizes[compression] = write_shard(directory, 0, images=ids, features=features, compression=compression)["bytes"] / len(images)
    # Read throughput on a bigger shard (the same rows repeated) so the number is not just open() overhead.
    repeat = max(1, (64 << 20) // features.nbytes)
    big = np.concatenate([features] * repeat)
    directory = tmp / f"{name.replace('/', '_')}-read"
    directory.mkdir()
    write_shard(directory, 0, images=[str(i) for i in range(len(big))], features=big, compression="zstd")
    started = time.time()
    read_shard(directory / "part-00000.parquet")
    read_s = time.time() - started
    return {
        "width": name,
        "shape": f"{features.shape[1]}x{features.shape[2]}",
        "images_per_s": len(images) / seconds,
        "raw_fp16": features[0].nbytes,
        "zstd": sizes["zstd"],
        "none": sizes["none"],
        "read_mb_s": big.nbytes / 2**20 / read_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny-images", type=int, default=1024)
    parser.add_argument("--large-images", type=int, default=16)
    args = parser.parse_args()
    world = SyntheticWorld(SyntheticSpec(n_pretrain=args.tiny_images))
    tiny_images = [world.image("pretrain", i) for i in range(args.tiny_images)]
    # CLIP-L/14 sees real-sized photos: resize the synthetic scenes up so preprocessing costs what it would.
    large_images = [im.resize((480, 360)) for im in tiny_images[: args.large_images]]
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            measure("tiny", build_vision_tower(VisionTowerSpec(tiny=TinyVisionSpec())), tiny_images, 128, Path(tmp)),
            measure("CLIP-L/14", clip_l14_tower(), large_images, 8, Path(tmp)),
        ]
    print(f"{'width':<10} {'features':>9} {'images/s':>9} {'raw fp16 B':>11} {'zstd B/img':>11} {'none B/img':>11} "
          f"{'zstd/raw':>9} {'read MB/s':>10}")
    for r in rows:
        print(f"{r['width']:<10} {r['shape']:>9} {r['images_per_s']:>9.1f} {r['raw_fp16']:>11} {r['zstd']:>11.0f} "
              f"{r['none']:>11.0f} {r['zstd'] / r['raw_fp16']:>9.2f} {r['read_mb_s']:>10.0f}")


if __name__ == "__main__":
    main()
