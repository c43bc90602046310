"""Data at real scale on bounded memory: one JSON object per line ({"metric", "value", "unit", "detail"}).

Metrics (ratios against the baseline a user would otherwise have, measured in this one run):
  feature_bytes_per_sample   fp16 CLIP-L features per image at 224 px (256 x 1024) and 336 px (576 x 1024):
                             raw and as the features stage writes them (zstd + byte-stream-split Parquet)
  feature_read_mib_per_s     FeatureStore decode rate on this machine (one thread), beside the rate one GPU
                             needs at the training rates of docs/performance.md
  feature_dedup_ratio        an instruct-150K-shaped set (158 records per 81 images) through the real features
                             stage: image records / rows stored
  encode_records_per_s       a LLaVA-Pretrain-shaped JSON encoded into the run directory's cache with SmolLM2's
                             real tokenizer (558K records; --quick 50K); cache_reopen_s, cache_speedup
  host_rss_per_rank_gib      1, 2 and 4 ranks reading one feature set for an epoch in training's order (a
                             process per rank); rss_ratio_4_vs_1
  padding_fraction           padded / total positions of micro-batches, random vs length-grouped, on the
                             instruct-shaped set's real token lengths
  step_overhead              llava-hpc's training step / the bare model's forward+backward+AdamW step - 1

    .venv/bin/python benchmarks/bench_scale.py --quick     # < 5 min on 2 cores
    .venv/bin/python benchmarks/bench_scale.py             # the 558K-record encode, bigger feature sets
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import jsonrows  # noqa: E402  (benchmarks/jsonrows.py: stdout holds the JSON rows only)

jsonrows.claim_stdout()  # before the heavy imports, which may print
emit = jsonrows.emit

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import llava_shaped  # noqa: E402

MIB = 2**20
# Training rates one GPU sustains on the seed recipe's shapes (docs/performance.md: estimated from the model
# FLOPs of a Llama-3.2-1B step at 40 % MFU of an H100's 989 TFLOP/s; benchmarks/gpu/bench_gpu.py measures them).
GPU_SAMPLES_PER_S = {"stage1": 250.0, "stage2": 90.0}


def _features(rows: int, patches: int, hidden: int, seed: int = 0) -> np.ndarray:
    # CLIP's penultimate-layer activations are roughly normal with a few large channels; random normal fp16 is
    # the same width and compresses no better (an upper bound on bytes).
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, patches, hidden), dtype=np.float32).astype(np.float16)


# ---------------------------------------------------------------------------------------------- storage
def storage(workdir: Path, quick: bool) -> None:
    from llava_hpc.data.features_io import FeatureStore, write_shard

    rows = 16 if quick else 64
    for pixels, patches in ((224, 256), (336, 576)):
        directory = workdir / f"bytes-{pixels}"
        meta = write_shard(directory, 0, images=[f"{i}.jpg" for i in range(rows)],
                           features=_features(rows, patches, 1024))
        raw = patches * 1024 * 2
        emit("feature_bytes_per_sample", round(meta["bytes"] / rows), "bytes", pixels=pixels, shape=[patches, 1024],
             raw_bytes=raw, on_disk_over_raw=round(meta["bytes"] / rows / raw, 3),
             pretrain_558k_gib=round(558_000 * meta["bytes"] / rows / 2**30, 1),
             instruct_81k_images_gib=round(81_000 * meta["bytes"] / rows / 2**30, 1))

    # Decode rate: shards of 224 px rows, read in full as training's store does.
    shards, rows = (3, 64) if quick else (6, 256)
    directory = workdir / "read"
    for shard in range(shards):
        write_shard(directory, shard, images=[f"{shard}-{i}.jpg" for i in range(rows)],
                    features=_features(rows, 256, 1024, seed=shard))
    os.sync()
    store = FeatureStore(directory, verify=True, cache_shards=1)
    started = time.perf_counter()
    for shard in range(shards):
        store.get(f"{shard}-0.jpg")
    seconds = time.perf_counter() - started
    store.close()
    rate = shards * rows * 256 * 1024 * 2 / MIB / seconds
    needed = {stage: round(rate_s * 256 * 1024 * 2 / MIB, 1) for stage, rate_s in GPU_SAMPLES_PER_S.items()}
    emit("feature_read_mib_per_s", round(rate, 1), "MiB/s", pixels=224, threads=1, checksum_verified=True,
         needed_per_gpu_mib_per_s=needed, gpu_samples_per_s=GPU_SAMPLES_PER_S,
         note="page cache warm (just written); a shared filesystem adds its own limit")


# ---------------------------------------------------------------------------------------------- dedup
def dedup(workdir: Path, quick: bool) -> None:
    """The real features stage (debug executor, tiny tower) over instruct-shaped records with image files."""
    from PIL import Image

    from llava_hpc.config import load_pipeline
    from llava_hpc.orchestrate import Orchestrator
    from llava_hpc.rundir import RunDir

    n = 400 if quick else 4000
    records = llava_shaped.instruct_records(n)
    images = workdir / "dedup-images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in sorted({r["image"] for r in records}):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / name, quality=90)
    data = llava_shaped.write_json(records, workdir / "instruct.json")
    toml = workdir / "dedup.toml"
    toml.write_text(f"""
name = "bench-dedup"
run_dir = "{workdir / 'dedup-run'}"
executor = "debug"
[model]
vision_tower = "tiny"
llm = "tiny"
[datasets.instruct]
kind = "llava-json"
path = "{data}"
images = "{images}"
[stages.features]
datasets = ["instruct"]
shard_size = 256
array_tasks = 1
[stages.stage1]
dataset = "instruct"
[stages.stage2]
dataset = "instruct"
""")
    pipeline = load_pipeline(toml)
    started = time.perf_counter()
    Orchestrator(pipeline, RunDir(pipeline.run_dir)).submit("features")
    seconds = time.perf_counter() - started
    summary = json.loads((pipeline.run_dir / "features" / "instruct" / "summary.json").read_text())
    emit("feature_dedup_ratio", summary["dedup_ratio"], "records/image", records=summary["records"],
         rows_stored=summary["rows"], unique_images=summary["unique_images"], seconds=round(seconds, 1),
         shape_of="llava_instruct_150k (158K records over 81K COCO images)")


# ---------------------------------------------------------------------------------------------- encode cache
def _template(name: str):
    from llava_hpc.data.templates import ConversationTemplate
    from llava_hpc.model.builders import LLMSpec, build_tokenizer

    return ConversationTemplate(name, build_tokenizer(LLMSpec(name="smollm2")))


def encode(workdir: Path, quick: bool) -> None:
    """Cold: what every rank of every start and requeue paid before (encode the whole JSON); warm: open the cache."""
    from llava_hpc.data.encoded import EncodedCache, EncodeSettings, cache_spec, file_fingerprint

    n = 50_000 if quick else 558_000
    path = llava_shaped.write_json(llava_shaped.pretrain_records(n), workdir / "pretrain.json")
    template = _template("plain")
    settings = EncodeSettings(256, 2048, "truncate")
    cache = EncodedCache(workdir / "cache", "pretrain", cache_spec(file_fingerprint(path), template, settings, {}))
    workers = len(os.sched_getaffinity(0))
    started = time.perf_counter()
    records = json.loads(path.read_text())
    cache.encode_part(records, np.arange(len(records)), template, settings, 0, 1, str(path), workers)
    cache.finalize(1, {})
    cold = time.perf_counter() - started
    started = time.perf_counter()
    samples = cache.open()
    rows = len(samples)
    samples.tokens(rows - 1)  # touch the mapped buffers
    reopen = time.perf_counter() - started
    detail = {"records": n, "tokenizer": "SmolLM2-135M-Instruct", "template": "plain", "workers": workers,
              "includes": "JSON parse + encode + write"}
    emit("encode_records_per_s", round(n / cold), "records/s", cold_s=round(cold, 1), **detail)
    emit("cache_reopen_s", round(reopen, 3), "s", goal="< 5 s", rows=rows)
    emit("cache_speedup", round(cold / reopen), "x", baseline="re-encoding the JSON at every start and requeue")


# ---------------------------------------------------------------------------------------------- padding
def padding(workdir: Path, quick: bool) -> None:
    """Instruct-shaped conversations encoded with SmolLM2's chat template (256 image tokens at 224 px)."""
    from llava_hpc.data.encoded import EncodeSettings, encode_in_memory
    from llava_hpc.data.sampling import compare_padding

    n = 4000 if quick else 20_000
    records = llava_shaped.instruct_records(n)
    table, _, _ = encode_in_memory(records, None, _template("chat_template"), EncodeSettings(256, 2048, "truncate"))
    lengths = table.column("length").to_numpy()
    batch = 16
    padded = compare_padding(lengths, batch)  # the training stream's own order, without and with lengths
    before, after = padded["random"], padded["length_grouped"]
    emit("padding_fraction", round(after, 4), "padded/total", random=round(before, 4), length_grouped=round(after, 4),
         ratio=round(before / max(after, 1e-9), 1), micro_batch=batch, samples=len(lengths),
         mean_length=round(float(lengths.mean()), 1), data="instruct-150K-shaped, LLaVA-Bench GPT-4 answer texts")


# ---------------------------------------------------------------------------------------------- RSS per rank
def _status_kib(field: str) -> int:
    """This process's own memory from /proc (ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def read_as_rank(directory: Path, rank: int, world: int, window: int, batch: int) -> dict:
    """One rank's epoch in training's order (the stream, the store, next-step prefetch); its own peak RSS."""
    from llava_hpc.data.features_io import FeatureStore
    from llava_hpc.data.sampling import SampleStream

    baseline = _status_kib("VmRSS")
    with FeatureStore(directory, verify=True, cache_shards=2 * window + 1) as store:
        images = store.images
        groups = [store.shard_of(image) for image in images]
        stream = SampleStream(len(images), batch, seed=0, groups=groups, window=window, rank=rank, world_size=world)
        steps = stream.chunk // batch
        started = time.perf_counter()
        for step in range(steps):
            if step + 1 < steps:
                store.prefetch(sorted({groups[i] for i in stream.step_indices(step + 1)}))
            for index in stream.step_indices(step):
                np.asarray(store.get(images[index]), dtype=np.float32).sum()  # the copy the collator makes
        seconds = time.perf_counter() - started
        decodes = store.shard_loads
    peak = _status_kib("VmHWM")
    return {"rank": rank, "world": world, "rss_gib": (peak - baseline) / 2**20, "decodes": decodes,
            "shards": len(store.paths), "seconds": seconds}


def rss(workdir: Path, quick: bool) -> None:
    from llava_hpc.data.features_io import write_shard

    shards, rows, window, batch = (16, 48, 2, 8) if quick else (32, 128, 2, 16)
    directory = workdir / "features"
    for shard in range(shards):
        write_shard(directory, shard, images=[f"{shard}/{i}.jpg" for i in range(rows)],
                    features=_features(rows, 256, 1024, seed=shard))
    shard_gib = rows * 256 * 1024 * 2 / 2**30
    per_world = {}
    for world in (1, 2, 4):
        children = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(
            {"directory": str(directory), "rank": rank, "world": world, "window": window, "batch": batch})],
            stdout=subprocess.PIPE, text=True) for rank in range(world)]
        results = [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
        if any(child.returncode for child in children):
            raise RuntimeError(f"a rank of world {world} failed")
        per_world[world] = results
        emit("host_rss_per_rank_gib", round(max(r["rss_gib"] for r in results), 3), "GiB", ranks=world,
             decodes_per_rank=[r["decodes"] for r in results], shards=shards, shard_gib=round(shard_gib, 3),
             window=window, cache_shards=2 * window + 1, shape=[256, 1024],
             measured="peak RSS of each rank's process above its imports (max over ranks)")
    ratio = max(r["rss_gib"] for r in per_world[4]) / max(r["rss_gib"] for r in per_world[1])
    emit("rss_ratio_4_vs_1", round(ratio, 3), "x", goal="<= 1.2",
         decodes_total={world: sum(r["decodes"] for r in rows_) for world, rows_ in per_world.items()})


# ---------------------------------------------------------------------------------------------- step overhead
def step_overhead(workdir: Path, quick: bool) -> None:
    """llava-hpc's `train()` (the stages' loop: its stream, store, collate, engine, metrics) against the bare model's
    forward + backward + clip + AdamW step on one collated batch of the same samples. The loop's per-step time is the
    difference of two runs of different lengths, so start-up and the final checkpoint cancel out."""
    import torch

    from llava_hpc.data.datasets import Collator, FeatureConversationDataset
    from llava_hpc.data.features_io import FeatureStore, write_shard
    from llava_hpc.data.templates import ConversationTemplate
    from llava_hpc.model.builders import LlavaSpec, LLMSpec, TinyLLMSpec, build_llava
    from llava_hpc.model.vision import TinyVisionSpec, VisionTowerSpec
    from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld
    from llava_hpc.train import distributed
    from llava_hpc.train.loop import TrainSettings, train

    torch.set_num_threads(1)  # one core per measurement: the other runs the prefetch thread
    world = SyntheticWorld(SyntheticSpec(n_pretrain=8, n_instruct=256, n_bench=1))
    records = world.records("instruct")
    # Mid width: CLIP-L features (256 x 1024) into a 6-layer 512-wide LLM.
    spec = LlavaSpec(vision=VisionTowerSpec(name="tiny", tiny=TinyVisionSpec(image_size=224, patch_size=14,
                                                                             hidden_size=1024, heads=8)),
                     llm=LLMSpec(name="tiny", tiny=TinyLLMSpec(hidden_size=512, intermediate_size=1536, layers=6, heads=8),
                                 vocabulary=tuple(world.vocabulary())),
                     max_length=512)
    store_dir = workdir / "features"
    images = sorted({r["image"] for r in records})
    for shard, start in enumerate(range(0, len(images), 64)):
        write_shard(store_dir, shard, images=images[start : start + 64],
                    features=_features(len(images[start : start + 64]), 256, 1024, seed=shard))
    batch_size = 4
    env = distributed.environment()
    device = torch.device("cpu")

    def fresh_model():
        torch.manual_seed(0)
        model, tokenizer = build_llava(spec, device=device, with_vision_tower=False)
        model.freeze_language_model(False)
        return model, tokenizer

    def loop_seconds(steps: int) -> float:
        model, tokenizer = fresh_model()
        store = FeatureStore(store_dir, verify=True, cache_shards=5)
        dataset = FeatureConversationDataset.from_records(records, store, ConversationTemplate("chat_template", tokenizer),
                                                          spec.max_length)
        settings = TrainSettings(batch_size=batch_size, grad_accum=1, lr=1e-4, warmup_ratio=0.0, weight_decay=0.0,
                                 max_grad_norm=1.0, epochs=100.0, max_steps=steps, seed=0, precision="fp32",
                                 gradient_checkpointing=False, save_every_steps=10**9, keep_checkpoints=1, zero_stage=0)
        out = workdir / f"loop-{steps}-{time.perf_counter_ns()}"  # a fresh run directory: no resume
        started = time.perf_counter()
        train(model, dataset, Collator.for_training(model, tokenizer.pad_token_id), settings, out, env, device, "bench")
        seconds = time.perf_counter() - started
        store.close()
        return seconds

    short, long = (2, 8) if quick else (5, 35)
    loop_step = min((loop_seconds(long) - loop_seconds(short)) / (long - short) for _ in range(1 if quick else 2))

    # The bare step: the same model and sample length, one batch collated once, nothing else.
    model, tokenizer = fresh_model()
    store = FeatureStore(store_dir)
    dataset = FeatureConversationDataset.from_records(records, store, ConversationTemplate("chat_template", tokenizer),
                                                      spec.max_length)
    batch = Collator(tokenizer.pad_token_id)([dataset[i] for i in range(batch_size)]).model_inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    model.train()

    def bare_step() -> None:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        bare_step()
    times = []
    for _ in range(long - short):
        started = time.perf_counter()
        bare_step()
        times.append(time.perf_counter() - started)
    bare = float(np.median(times))
    lengths = sorted(dataset.lengths)
    emit("step_overhead", round(loop_step / bare - 1, 4), "fraction", goal="<= 0.05", loop_step_s=round(loop_step, 4),
         bare_step_s=round(bare, 4), batch=batch_size, llm="6 x 512", features=[256, 1024],
         median_sample_length=int(lengths[len(lengths) // 2]), threads=1,
         note="loop step = (T(long run) - T(short run)) / extra steps, best of runs; bare = median step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sets (< 5 min on 2 cores)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one rank of the RSS measurement
    parser.add_argument("--only", nargs="*", help="run only these parts (storage dedup encode rss padding step)")
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        jsonrows.print_json(read_as_rank(Path(job["directory"]), job["rank"], job["world"], job["window"], job["batch"]))
        return
    parts = {"storage": storage, "dedup": dedup, "encode": encode, "padding": padding, "rss": rss, "step": step_overhead}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for name, part in parts.items():
            if args.only and name not in args.only:
                continue
            (Path(tmp) / name).mkdir()
            part(Path(tmp) / name, args.quick)


if __name__ == "__main__":
    main()
