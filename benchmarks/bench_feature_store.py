"""Reading precomputed features for training: memory and speed of one epoch, bounded store vs everything in RAM.

The baseline is what a user (and llava-hpc before it) would write: decode every shard up front and index the rows,
then read samples in a global random order. llava-hpc's FeatureStore keeps `2 x window` decoded shards, training
reads in shard-local windows (SampleStream with groups), and the shards of the next global batch are prefetched
(decoded in the store's background thread while this batch is read). Each mode runs in its own process so its peak
resident memory (ru_maxrss) is its own.

    .venv/bin/python benchmarks/bench_feature_store.py                  # CLIP ViT-L/14-336 width: 576 x 1024 fp16
    .venv/bin/python benchmarks/bench_feature_store.py --quick          # small shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_dataset(directory: Path, shards: int, rows: int, patches: int, hidden: int) -> None:
    from llava_hpc.data.features_io import write_shard

    rng = np.random.default_rng(0)
    for shard in range(shards):
        images = [f"{shard}-{row}.png" for row in range(rows)]
        features = rng.standard_normal((rows, patches, hidden), dtype=np.float32).astype(np.float16)
        write_shard(directory, shard, images=images, features=features)


def read_epoch(directory: Path, mode: str, window: int, batch: int) -> dict:
    """One epoch in training's order; returns what one process measured of itself."""
    from llava_hpc.data.features_io import FeatureStore, read_shard, shard_paths
    from llava_hpc.data.sampling import SampleStream

    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    checksum = 0  # order-free: the bits of one value per sample, summed as integers
    if mode == "all in RAM":
        arrays, index = [], {}
        for number, path in enumerate(shard_paths(directory)):
            shard = read_shard(path)
            arrays.append(shard.features)
            index.update({image: (number, row) for row, image in enumerate(shard.images)})
        ids = list(index)
        stream = SampleStream(len(ids), batch, seed=0)
        loads = len(arrays)
        for step in range(len(ids) // batch):
            for i in stream.global_batch_indices(step):
                number, row = index[ids[i]]
                checksum += int(arrays[number][row][0, 0].view(np.uint16))
    else:
        store = FeatureStore(directory, verify=True, cache_shards=2 * window)
        ids = store.images
        groups = [store.shard_of(i) for i in ids]
        stream = SampleStream(len(ids), batch, seed=0, groups=groups, window=window)
        steps = len(ids) // batch
        for step in range(steps):
            if step + 1 < steps:  # what training's loader does: the next batch's shards decode while this one is read
                store.prefetch(groups[i] for i in stream.global_batch_indices(step + 1))
            for i in stream.global_batch_indices(step):
                checksum += int(store.get(ids[i])[0, 0].view(np.uint16))
        loads = store.shard_loads
        store.close()
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "samples": len(ids) // batch * batch, "seconds": seconds, "shard_decodes": loads,
            "peak_rss_mib": peak_kib / 1024, "rss_growth_mib": (peak_kib - baseline_kib) / 1024, "checksum": checksum}


def run_mode(directory: Path, mode: str, window: int, batch: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--dir", str(directory), "--window", str(window),
         "--batch", str(batch)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 x 64 features, 8 shards: a smoke run")
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--rows", type=int, default=32, help="samples per shard")
    parser.add_argument("--window", type=int, default=2, help="shuffle_window_shards")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(read_epoch(args.dir, args.child, args.window, args.batch)))
        return

    patches, hidden = (64, 64) if args.quick else (576, 1024)
    shards = args.shards or (8 if args.quick else 32)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        directory = Path(tmp)
        write_dataset(directory, shards, args.rows, patches, hidden)
        on_disk = sum(p.stat().st_size for p in directory.glob("*.parquet")) / 2**20
        rows = [run_mode(directory, mode, args.window, args.batch) for mode in ("all in RAM", "bounded store")]
    full, bounded = rows
    assert full["checksum"] == bounded["checksum"], "the two modes read different features"
    print(f"{shards} shards x {args.rows} samples of {patches}x{hidden} fp16 ({on_disk:.0f} MiB of Parquet), "
          f"window {args.window} shards, global batch {args.batch}, one epoch")
    print(f"{'mode':<14} {'samples/s':>10} {'decodes':>8} {'peak RSS MiB':>13} {'RSS growth MiB':>15}")
    for row in rows:
        print(f"{row['mode']:<14} {row['samples'] / row['seconds']:>10.0f} {row['shard_decodes']:>8} "
              f"{row['peak_rss_mib']:>13.0f} {row['rss_growth_mib']:>15.0f}")
    memory_ratio = full["rss_growth_mib"] / max(bounded["rss_growth_mib"], 1.0)
    speed_ratio = (bounded["samples"] / bounded["seconds"]) / (full["samples"] / full["seconds"])
    print(f"memory growth: all-in-RAM / bounded = {memory_ratio:.1f}x; speed: bounded / all-in-RAM = {speed_ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "memory_ratio": memory_ratio, "speed_ratio": speed_ratio,
                                        "on_disk_mib": on_disk}, indent=1))


if __name__ == "__main__":
    main()
