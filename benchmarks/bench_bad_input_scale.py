"""Bad input at real scale: a LLaVA-Pretrain-sized JSON (558K records; --quick 50K) with a few bad records among
them, through the real features and stage-1 jobs (local executor: each stage a process of its own), then again.

What is injected, at spread-out positions: 3 malformed records (no `<image>` in the turns, `conversations` not a
list, a non-string `image`), 2 records whose image is missing on disk, 1 whose image file is corrupt, 1 over-long
sample. The run must finish, train on every other record, and name exactly those 7 (file, position, id, field,
reason) in stage1/skipped.jsonl; the rerun must redo nothing (no file of the run directory rewritten).

The records' captions are the synthetic world's, over its 2,000 images (records per image ~279: this measures
record handling at scale, not image throughput, which bench_scale.py and bench_features.py cover). Stage 1 runs
`max_steps` steps only: the point is that every record is read, encoded and accounted for.

    .venv/bin/python benchmarks/bench_bad_input_scale.py --quick    # 50K records, ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_bad_input_scale.py            # 558K records
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

import tomli_w

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jsonrows  # noqa: E402  (benchmarks/jsonrows.py: stdout holds the JSON rows only)

jsonrows.claim_stdout()  # before the heavy imports, which may print
emit = jsonrows.emit

from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld  # noqa: E402

CLI = str(Path(sys.executable).parent / "llava-hpc")
IMAGES = 2000


def make_data(root: Path, n: int) -> tuple[Path, dict[int, tuple[str, str]]]:
    """The JSON file and the injected bad records: {position: (id, field)}."""
    world = SyntheticWorld(SyntheticSpec(n_pretrain=IMAGES, n_instruct=8, n_bench=4))
    world.write_images(root, "pretrain")
    base = world.records("pretrain")
    (root / "pretrain" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    records = [{**base[i % IMAGES], "id": f"{i:07d}"} for i in range(n)]
    caption = base[0]["conversations"][1]["value"]
    bad = {
        "no-image-token": ({"conversations": [{"from": "human", "value": "What is it?"},
                                              {"from": "gpt", "value": caption}]}, "conversations"),
        "turns-not-a-list": ({"conversations": "a caption"}, "conversations"),
        "image-not-a-string": ({"image": 7}, "image"),
        "missing-image-1": ({"image": "pretrain/missing-1.png"}, "image"),
        "missing-image-2": ({"image": "pretrain/missing-2.png"}, "image"),
        "corrupt-image": ({"image": "pretrain/corrupt.png"}, "image"),
        "over-long": ({"conversations": [base[0]["conversations"][0],
                                         {"from": "gpt", "value": " ".join([caption] * 200)}]}, "conversations"),
    }
    expected = {}
    for k, (name, (change, field)) in enumerate(bad.items()):
        position = (k + 1) * n // (len(bad) + 1)
        records[position] = {**records[position], **change, "id": name}
        expected[position] = (name, field)
    path = root / "blip_laion_cc_sbu_558k.json"
    path.write_text(json.dumps(records))
    return path, expected


def write_pipeline(workdir: Path, data: Path, steps: int) -> Path:
    pipeline = {
        "name": "bad-input-at-scale", "run_dir": str(workdir / "run"), "executor": "local",
        "slurm": {"partition": "standard", "cpus": 2, "mem_gb": 4, "time": 60},
        "model": {"vision_tower": "tiny", "llm": "tiny", "max_length": 128},
        "synthetic": {"n_pretrain": IMAGES, "n_instruct": 8, "n_bench": 4},
        "datasets": {"pretrain": {"kind": "llava-json", "path": str(data), "images": str(data.parent)},
                     "instruct": {"kind": "synthetic", "split": "instruct"}},
        "stages": {"features": {"batch_size": 128, "shard_size": 500, "array_tasks": 1},
                   "stage1": {"dataset": "pretrain", "zero_stage": 0, "batch_size": 64, "max_steps": steps,
                              "overlong": "skip", "save_every_steps": 1000},
                   "stage2": {"dataset": "instruct", "zero_stage": 0}},
        "benches": {"synthetic": {"kind": "synthetic"}},
    }
    path = workdir / "pipeline.toml"
    path.write_text(tomli_w.dumps(pipeline))
    return path


def submit(pipeline: Path, stage: str) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([CLI, "submit", stage, "-p", str(pipeline)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"llava-hpc submit {stage} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - started, proc.stdout


def snapshot(run_dir: Path) -> dict[str, int]:
    """Every file of the run directory with its modification time, but the bookkeeping every submit writes (the
    logs, jobs.jsonl, the lock, the pipeline copy as last submitted)."""
    bookkeeping = {"jobs.jsonl", ".lock", "pipeline.toml"}
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.parts[len(run_dir.parts)] != "logs" and str(p.relative_to(run_dir)) not in bookkeeping}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50K records instead of 558K")
    parser.add_argument("--records", type=int, help="any other number of records")
    parser.add_argument("--steps", type=int, default=20, help="stage-1 optimizer steps")
    args = parser.parse_args()
    n = args.records or (50_000 if args.quick else 558_000)
    with tempfile.TemporaryDirectory(prefix="llava-bad-input-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        data, expected = make_data(workdir / "data", n)
        make_s = time.perf_counter() - started
        pipeline = write_pipeline(workdir, data, args.steps)
        features_s, _ = submit(pipeline, "features")
        stage1_s, _ = submit(pipeline, "stage1")
        run_dir = workdir / "run"
        before = snapshot(run_dir)
        rerun_s = sum(submit(pipeline, stage)[0] for stage in ("features", "stage1"))
        rewritten = sorted(name for name, mtime in snapshot(run_dir).items() if before.get(name) != mtime)

        skipped = [json.loads(line) for line in (run_dir / "stage1" / "skipped.jsonl").read_text().splitlines()]
        named = {row["position"]: (row["id"], row["field"]) for row in skipped}
        summary = json.loads((run_dir / "stage1" / "summary.json").read_text())
        features = json.loads((run_dir / "features" / "pretrain" / "summary.json").read_text())
        exact = named == expected and all(row["file"] == str(data) and row["reason"] for row in skipped)
        emit("bad_records_named_exactly", int(exact), "bool", records=n, expected=len(expected), named=len(skipped),
             by_kind=summary["skipped"]["by_kind"], trained_on=summary["samples"],
             file_mib=round(data.stat().st_size / 2**20, 1),
             examples=[f"{r['file']}: record #{r['position']} ({r['id']}), field {r['field']}: {r['reason']}"
                       for r in skipped[:3]])
        emit("samples_trained_on", summary["samples"], "records", expected=n - len(expected))
        emit("run_seconds", round(features_s + stage1_s, 1), "s", features_s=round(features_s, 1),
             stage1_s=round(stage1_s, 1), encode_s=summary["encoded_cache"]["counts"]["encode_seconds_max_rank"],
             make_data_s=round(make_s, 1), steps=args.steps, unique_images=features["unique_images"],
             bad_images=features["bad_images"])
        emit("rerun_seconds", round(rerun_s, 1), "s", files_rewritten=len(rewritten), rewritten_first=rewritten[:5],
             note="features + stage1 submitted again: both done, nothing recomputed")
        if not exact or summary["samples"] != n - len(expected) or rewritten:
            raise SystemExit("bad input at scale: FAILED (see the lines above)")


if __name__ == "__main__":
    main()
