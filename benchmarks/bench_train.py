"""Stage-1 and stage-2 training steps: the project's path (precomputed Parquet features) vs the reference's path
(image files decoded and run through the frozen CLIP tower every step). Same model, same batches, one table.

    features: FeatureStore row (fp16 Parquet) -> Collator -> projector + LLM forward/backward -> AdamW step
    pixels:   image file decode + CLIP preprocessing -> Collator -> frozen CLIP + projector + LLM fwd/bwd -> AdamW

Stage 1 trains the projector (LLM frozen, `plain` template, pretrain captions); stage 2 trains projector + LLM
(`chat_template`, instruct conversations), as the demo's stages do. The step is the project's own: the real
dataset and collator classes, `TorchEngine` from llava_hpc/train/loop.py (autocast, clip, AdamW, schedule),
the same per-step work `train()` does (collate in the training process, no loader workers) minus logging and
checkpoints.

Sizes:
  tiny  the demo's models (64 px CLIP tower with 64 patches x 64, 2-layer 128-wide LLM) on the demo's 64 px
        synthetic PNGs, the demo's batch of 64
  mid   a CLIP-B/16-shaped tower (224 px, 196 patches x 768, 12 layers, 86 M params, random weights) and a
        ~20 M-param LLM, on 640x480 JPEGs (COCO's size, with noise so they compress like photos)
Feature values in the Parquet shards are random fp16: values do not change the cost, and it keeps the parent
process free of torch. Every (size, stage, path) runs in its own subprocess, so peak memory (ru_maxrss on CPU,
torch.cuda.max_memory_allocated on GPU) is that path's alone, over the whole child: model, data, optimizer
state, activations. "above imports" subtracts the child's RSS after importing torch and transformers (~350 MiB,
the same for both paths). At tiny size the features path peaks ~70 MiB higher: the first Parquet read maps
pyarrow's Parquet library and starts its thread pools, a fixed cost larger than the tiny tower; at mid size the
tower's 86 M fp32 weights and activations dominate the other way.
Each child runs warm-up steps (untimed), then several rounds over the same batches, and each batch counts with
its fastest round: on a shared machine that is the one least disturbed by other jobs. One torch thread per
child by default (see --threads). No timing asserts.

    .venv/bin/python benchmarks/bench_train.py                # tiny + mid, ~1.5 min on 2 cores
    .venv/bin/python benchmarks/bench_train.py --quick        # tiny only, fewer steps (~30 s; the test's way)
    .venv/bin/python benchmarks/bench_train.py --json out.json --threads 2   # on an idle machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from llava_hpc.data.features_io import write_shard  # noqa: E402  (numpy + pyarrow only: the parent stays light)
from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld  # noqa: E402

STAGES = {
    # stage: (synthetic split, template, LLM frozen?, lr) -- as the demo's stage 1 and stage 2
    "stage1": ("pretrain", "plain", True, 3e-3),
    "stage2": ("instruct", "chat_template", False, 3e-3),
}
PATHS = ("features", "pixels")


@dataclass(frozen=True)
class Size:
    name: str
    # vision tower (the project's "tiny" CLIP builder, random weights): image_size, patch, hidden, mlp, layers, heads
    vision: dict
    llm: dict  # TinyLLMSpec fields: hidden_size, intermediate_size, layers, heads
    image_files: tuple[int, int]  # (width, height) of the files on disk
    image_format: str
    batch_size: int
    max_length: int
    warmup_steps: int
    steps_per_round: int
    rounds: int
    photo_noise: bool = False  # add noise so JPEGs are as large (and as slow to decode) as photos


SIZES = {
    "tiny": Size(
        "tiny",
        vision={},  # TinyVisionSpec defaults = the demo's tower
        llm={"hidden_size": 128, "intermediate_size": 256, "layers": 2, "heads": 4},  # pipelines/demo.toml
        image_files=(64, 64),
        image_format="PNG",
        batch_size=64,
        max_length=256,
        warmup_steps=2,
        steps_per_round=3,
        rounds=3,
    ),
    "mid": Size(
        "mid",
        vision={"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
                "layers": 12, "heads": 12},
        llm={"hidden_size": 512, "intermediate_size": 1536, "layers": 6, "heads": 8},
        image_files=(640, 480),
        image_format="JPEG",
        batch_size=4,
        max_length=512,
        warmup_steps=1,
        steps_per_round=1,
        rounds=3,
        photo_noise=True,
    ),
}
QUICK = {"warmup_steps": 1, "steps_per_round": 2, "rounds": 2}


def _world(samples: int) -> SyntheticWorld:
    # The demo's world (its vocabulary is the tiny tokenizer's); only the sample counts differ.
    return SyntheticWorld(SyntheticSpec(n_pretrain=samples, n_instruct=samples, n_bench=1,
                                        instruct_categories=("colour", "position")))


# ---------------------------------------------------------------------------------------------- parent: data
def prepare_data(size: Size, workdir: Path, samples: int) -> None:
    """Image files, records and feature shards for both splits (untimed: the features stage runs once per
    dataset). Layout: workdir/{split}.json, workdir/images/{split}/NNNNNN.{png,jpg}, workdir/features/{split}/."""
    world = _world(samples)
    num_patches = (size.vision.get("image_size", 64) // size.vision.get("patch_size", 8)) ** 2
    hidden = size.vision.get("hidden_size", 64)
    suffix = ".png" if size.image_format == "PNG" else ".jpg"
    rng = np.random.default_rng(0)
    for split in ("pretrain", "instruct"):
        records = world.records(split)
        for record in records:
            image = world.load_image(record["image"])
            if image.size != size.image_files:
                image = image.resize(size.image_files, Image.BILINEAR)
            if size.photo_noise:
                pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 12, (*image.size[::-1], 3)).astype(np.int16)
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            record["image"] = record["image"].replace(".png", suffix)
            path = workdir / "images" / record["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format=size.image_format, quality=90)
        (workdir / f"{split}.json").write_text(json.dumps(records))
        features = rng.standard_normal((len(records), num_patches, hidden), dtype=np.float32).astype(np.float16)
        write_shard(workdir / "features" / split, 0, images=[r["image"] for r in records], features=features)


def run_child(job: dict, timeout: float) -> dict:
    """One (size, stage, path) in a fresh interpreter: its peak memory is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        name = f"{job['size_fields']['name']}/{job['stage']}/{job['path']}"
        raise RuntimeError(f"child {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- child: one path
def _rss_mib() -> float:
    """Current resident set size (the high-water mark is ru_maxrss; this is the level right now)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_path(job: dict) -> dict:
    """Build the model and dataset of one path, run warm-up steps, then `rounds` x `steps_per_round` timed steps
    over the same batches; report each batch's fastest round and this process's peak memory."""
    import resource

    import torch

    from llava_hpc.data.datasets import (Collator, FeatureConversationDataset, ImageConversationDataset,
                                         file_image_loader)
    from llava_hpc.data.features_io import FeatureStore
    from llava_hpc.data.templates import ConversationTemplate
    from llava_hpc.model.builders import LlavaSpec, LLMSpec, TinyLLMSpec, build_llava
    from llava_hpc.model.vision import TinyVisionSpec, VisionTowerSpec
    from llava_hpc.train.loop import TorchEngine, TrainSettings, resolve_precision

    import transformers  # noqa: F401  (what build_llava imports lazily: in the baseline, the same for both paths)
    from transformers import CLIPVisionModel, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    rss_after_imports = _rss_mib()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    size = Size(**{**job["size_fields"], "image_files": tuple(job["size_fields"]["image_files"])})
    split, template_name, llm_frozen, lr = STAGES[job["stage"]]
    workdir = Path(job["workdir"])
    device = torch.device(job["device"])
    torch.manual_seed(0)

    spec = LlavaSpec(
        vision=VisionTowerSpec(tiny=TinyVisionSpec(**size.vision)),
        llm=LLMSpec(tiny=TinyLLMSpec(**size.llm), vocabulary=tuple(_world(1).vocabulary())),
        max_length=size.max_length,
    )
    # The project's training jobs build no tower at all; the reference's path needs it every step.
    model, tokenizer = build_llava(spec, device=device, with_vision_tower=job["path"] == "pixels")
    model.freeze_language_model(llm_frozen)
    template = ConversationTemplate(template_name, tokenizer)
    records = json.loads((workdir / f"{split}.json").read_text())
    if job["path"] == "features":
        dataset = FeatureConversationDataset.from_records(records, FeatureStore(workdir / "features" / split), template,
                                             size.max_length)
    else:
        dataset = ImageConversationDataset(records, template, model.vision_tower.preprocess,
                                           file_image_loader(workdir / "images"), model.num_patches, size.max_length)
    collate = Collator.for_training(model, tokenizer.pad_token_id)

    settings = TrainSettings(batch_size=size.batch_size, grad_accum=1, lr=lr, warmup_ratio=0.0, weight_decay=0.0,
                             max_grad_norm=1.0, epochs=1.0, max_steps=None, seed=0, precision="auto",
                             gradient_checkpointing=False, save_every_steps=10**9, keep_checkpoints=1, zero_stage=0)
    total = size.warmup_steps + size.rounds * size.steps_per_round
    model.train()
    engine = TorchEngine(model, settings, total, 0, resolve_precision("auto", device), device)
    trainable = sum(p.numel() for p in engine.params)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch_number: int) -> int:
        """One optimizer step, as train() does it: read + collate the samples, forward, backward, clip, AdamW."""
        start = batch_number * size.batch_size
        indices = [(start + j) % len(dataset) for j in range(size.batch_size)]
        batch = collate([dataset[i] for i in indices]).to(device)
        loss = engine.loss(batch.model_inputs())
        engine.backward(loss)
        engine.step()
        loss.item()  # the loop logs the loss every step, which waits for the step to finish
        return int(batch.attention_mask.sum()) + len(indices) * (model.num_patches - 1)  # tokens after expansion

    for number in range(size.warmup_steps):  # allocator, kernels, AdamW state: not the steady state
        step(number)
    # Every round runs the same batches (those after the warm-up ones), so rounds and paths see the same samples.
    # Each batch counts with its fastest round: on a shared machine that is the least disturbed one.
    seconds = [[0.0] * size.steps_per_round for _ in range(size.rounds)]
    tokens = [0] * size.steps_per_round
    for round_number in range(size.rounds):
        for k in range(size.steps_per_round):
            sync()
            started = time.perf_counter()
            tokens[k] = step(size.warmup_steps + k)
            sync()
            seconds[round_number][k] = time.perf_counter() - started
    best = sum(min(column) for column in zip(*seconds))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "size": size.name, "stage": job["stage"], "path": job["path"], "device": device.type,
        "threads": torch.get_num_threads(), "batch_size": size.batch_size, "trainable_params": trainable,
        "steps_per_s": size.steps_per_round / best,
        "samples_per_s": size.steps_per_round * size.batch_size / best,
        "tokens_per_s": sum(tokens) / best,
        "rounds": size.rounds,
        "step_seconds": seconds,
        "peak_mem_mib": peak,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)",
        # What the imports alone cost (CPU): the part of the peak that is not this path's model and data.
        "rss_after_imports_mib": rss_after_imports,
    }


# ---------------------------------------------------------------------------------------------- table
def ratio_row(features: dict, pixels: dict) -> dict:
    """features / pixels: > 1 for speed means the project's path is faster; < 1 for memory means it needs less."""
    return {
        "size": features["size"], "stage": features["stage"], "path": "ratio",
        "batch_size": features["batch_size"],
        "steps_per_s": features["steps_per_s"] / pixels["steps_per_s"],
        "samples_per_s": features["samples_per_s"] / pixels["samples_per_s"],
        "peak_mem_mib": features["peak_mem_mib"] / pixels["peak_mem_mib"],
        "above_imports": _above_imports(features) / max(_above_imports(pixels), 1e-9)
        if features["device"] == "cpu" else None,
    }


def _above_imports(row: dict) -> float:
    return row["peak_mem_mib"] - row["rss_after_imports_mib"]


def format_table(rows: list[dict]) -> str:
    memory = "peak RSS MiB" if rows and rows[0].get("device", "cpu") == "cpu" else "peak alloc MiB"
    header = (f"{'size':<5} {'stage':<7} {'path':<9} {'batch':>5} {'steps/s':>8} {'samples/s':>10} "
              f"{memory:>14} {'above imports':>14}")
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["path"] == "ratio":
            above = f"{row['above_imports']:>13.2f}x" if row["above_imports"] is not None else f"{'-':>14}"
            lines.append(f"{row['size']:<5} {row['stage']:<7} {'ratio f/p':<9} {'':>5} {row['steps_per_s']:>7.2f}x "
                         f"{row['samples_per_s']:>9.2f}x {row['peak_mem_mib']:>13.2f}x {above}")
        else:
            above = f"{_above_imports(row):>14.0f}" if row["device"] == "cpu" else f"{'-':>14}"
            lines.append(f"{row['size']:<5} {row['stage']:<7} {row['path']:<9} {row['batch_size']:>5} "
                         f"{row['steps_per_s']:>8.2f} {row['samples_per_s']:>10.1f} {row['peak_mem_mib']:>14.0f} "
                         f"{above}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None,
                        help="default: tiny mid (tiny only with --quick)")
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=sorted(STAGES))
    parser.add_argument("--quick", action="store_true", help="tiny size, fewer steps: a smoke run (~30 s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per child (default 1: on a shared box a 2-thread child stalls whenever "
                             "either thread is preempted, which swamps the ratio; use 2+ on an idle machine)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_path(json.loads(args.child))))
        return

    started = time.perf_counter()
    device = args.device
    if device is None:
        import torch  # only to ask for a GPU; the children do the work

        device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = args.sizes or (["tiny"] if args.quick else ["tiny", "mid"])
    rows = []
    for name in sizes:
        size = SIZES[name]
        if args.quick:
            size = Size(**{**asdict(size), **QUICK})
        samples = size.batch_size * (size.warmup_steps + size.steps_per_round)
        with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
            prepare_data(size, Path(workdir), samples)
            for stage in args.stages:
                results = {}
                for path in PATHS:
                    job = {"size_fields": asdict(size), "stage": stage, "path": path, "workdir": workdir,
                           "threads": args.threads, "device": device}
                    results[path] = run_child(job, timeout=600)
                    rows.append(results[path])
                rows.append(ratio_row(results["features"], results["pixels"]))
    first = next(row for row in rows if row["path"] != "ratio")
    print(f"device: {first['device']}, torch threads per child: {first['threads']}; each batch's best of "
          f"{first['rounds']} rounds after warm-up; ratio = features / pixels; {time.perf_counter() - started:.0f} s")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
