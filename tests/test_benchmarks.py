"""The training benchmarks run and print sane tables: benchmarks/gpu/bench_gpu.py at tiny size on the CPU (how
CI checks the script that is meant for a lent GPU), and benchmarks/bench_train.py in its quick mode. No timing
asserts: only that every row is there, finished, and holds positive numbers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH_GPU = REPO / "benchmarks" / "gpu" / "bench_gpu.py"
BENCH_TRAIN = REPO / "benchmarks" / "bench_train.py"

GPU_ROWS = [
    "stage1 features", "stage1 pixels", "stage2 features", "stage2 pixels", "stage2 features (torch engine)",
    "generate b1", "generate b32", "decode (1 core)",
    "stage1 features/pixels", "stage2 features/pixels",
]


def load_bench_gpu():
    if "bench_gpu" in sys.modules:
        return sys.modules["bench_gpu"]
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH_GPU)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_tiny_prints_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(BENCH_GPU), "--tiny", "--peak-tflops", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,  # not the repo root: the script finds it
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == GPU_ROWS
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["status"])
        assert row["name"] in done.stdout
        for key in ("steps_per_s", "samples_per_s", "peak_mem_gib"):
            assert row[key] is not None and row[key] > 0 and row[key] == row[key], (name, key, row[key])
    for name in GPU_ROWS[:5]:  # training: tokens, model FLOPs and MFU against the given peak
        row = rows[name]
        assert row["steps"] >= 3 and row["tokens_per_s"] > 0 and row["flops_per_step"] > 0
        assert 0 < row["mfu"] < 1 and row["tflops"] == pytest.approx(row["mfu"] * 1.0)
        assert row["samples_per_s"] == pytest.approx(row["steps_per_s"] * row["batch"])
    # The reference's path does the project's work plus the CLIP forward.
    assert rows["stage1 pixels"]["flops_per_step"] > rows["stage1 features"]["flops_per_step"]
    for name in ("generate b1", "generate b32"):
        assert rows[name]["tokens_per_s"] > 0
    assert rows["generate b32"]["batch"] == 32
    assert "workers" in rows["decode (1 core)"]["notes"]
    # The headline numbers as JSON lines: samples/s and MFU per training row; the rows run the DeepSpeed engine.
    metrics = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"metric"')]
    assert [(m["metric"], m["detail"]["row"]) for m in metrics] == [
        (metric, name) for name in GPU_ROWS[:5] for metric in ("train_samples_per_s", "mfu")]
    assert all(m["value"] > 0 for m in metrics)
    assert metrics[0]["value"] == pytest.approx(rows["stage1 features"]["samples_per_s"])
    assert all("DeepSpeed" in rows[name]["notes"] for name in GPU_ROWS[:4])
    assert "TorchEngine" in rows["stage2 features (torch engine)"]["notes"]
    meta = json.loads(out.read_text())["meta"]
    assert meta["engine"] == "DeepSpeedEngine" and meta["zero_stage"] == 2 and meta["training_precision"] == "fp32"
    markdown = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in markdown for name in GPU_ROWS)


def test_bench_gpu_flop_formula_matches_the_real_shapes():
    """N is the Llama-3.2-1B count (1.236 B with the tied head once); stage 2 - stage 1 is exactly the weight
    gradients (2NT) at equal batch and length; the model built from the real config has exactly N weights."""
    bench = load_bench_gpu()
    shapes = bench.REAL
    n = bench.llm_matmul_weights(shapes)
    assert n == 1_235_746_816
    assert bench.linear_weights(bench.build_llm(shapes, torch.device("meta"))) == n
    batch, seq = 8, 1024
    stage1 = bench.train_flops(shapes, "stage1", "features", batch, seq)
    stage2 = bench.train_flops(shapes, "stage2", "features", batch, seq)
    assert stage2 - stage1 == 2 * n * batch * seq
    assert stage1 == pytest.approx(4 * n * batch * seq, rel=0.05)  # attention and projector are a few percent
    pixels = bench.train_flops(shapes, "stage1", "pixels", batch, seq)
    assert bench.num_patches(shapes) == 256  # CLIP-L/14 at 224 px, the seed recipe's features (256 x 1024)
    assert pixels - stage1 == pytest.approx(batch * 2 * 303e6 * 257, rel=0.15)  # CLIP-L forward per image


def test_bench_gpu_reports_oom_and_errors_per_row_and_goes_on():
    bench = load_bench_gpu()
    ctx = bench.Context(bench.TINY, torch.device("cpu"), row_budget_s=0.1, peak_tflops=None)

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def broken():
        raise ValueError("shapes do not fit")

    assert bench.run_row("stage2 features", out_of_memory, ctx).status == "OOM"
    row = bench.run_row("stage2 pixels", broken, ctx)
    assert row.status.startswith("error: ValueError: shapes do not fit") and row.name == "stage2 pixels"


def test_bench_gpu_deadline_skips_rows(tmp_path):
    bench = load_bench_gpu()
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--deadline-s", "0", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # --tiny sets one thread for the process
    rows = json.loads(out.read_text())["rows"]
    assert [row["status"] for row in rows] == ["skipped (deadline)"] * 8


@pytest.mark.slow
def test_bench_train_quick_has_ratio_rows(tmp_path):
    out = tmp_path / "train.json"
    done = subprocess.run(
        [sys.executable, str(BENCH_TRAIN), "--quick", "--device", "cpu", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["stage"], row["path"]) for row in rows] == [
        ("stage1", "features"), ("stage1", "pixels"), ("stage1", "ratio"),
        ("stage2", "features"), ("stage2", "pixels"), ("stage2", "ratio"),
    ]
    for row in rows:
        for key in ("steps_per_s", "samples_per_s", "peak_mem_mib"):
            assert row[key] > 0, (row["stage"], row["path"], key)
        if row["path"] != "ratio":
            assert row["size"] == "tiny" and row["batch_size"] == 64
            assert row["peak_mem_mib"] > row["rss_after_imports_mib"] > 0
    # Stage 1 trains the projector only; stage 2 the LLM as well.
    by = {(row["stage"], row["path"]): row for row in rows}
    assert by["stage1", "features"]["trainable_params"] < by["stage2", "features"]["trainable_params"]
    assert by["stage1", "features"]["trainable_params"] == by["stage1", "pixels"]["trainable_params"]
    assert done.stdout.count("ratio f/p") == 2


def test_bench_feature_store_quick_reads_the_same_features_both_ways(tmp_path):
    out = tmp_path / "store.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_feature_store.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["all in RAM", "bounded store"] and "memory growth" in done.stdout
    assert rows["all in RAM"]["checksum"] == rows["bounded store"]["checksum"]  # the same bits were read
    for row in rows.values():
        assert row["samples"] == 256 and row["seconds"] > 0 and row["peak_rss_mib"] > 0
    # Window 2, cache 4: read shard-locally, each of the 8 shards is decoded once in the epoch.
    assert rows["bounded store"]["shard_decodes"] == 8


BENCH_SCALE = REPO / "benchmarks" / "bench_scale.py"


@pytest.mark.slow
def test_bench_scale_quick_prints_one_json_object_per_metric():
    """Every metric of the scale benchmark (the step-overhead part is left to docs/performance.md: ~1 min), as
    {"metric", "value", "unit", "detail"} lines. Not timings: the facts behind them (dedup, no duplicate decode)."""
    done = subprocess.run([sys.executable, str(BENCH_SCALE), "--quick", "--only", "storage", "dedup", "encode",
                           "padding", "rss"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert all(set(line) == {"metric", "value", "unit", "detail"} for line in lines)
    metrics = {}
    for line in lines:
        metrics.setdefault(line["metric"], []).append(line)
    assert set(metrics) == {"feature_bytes_per_sample", "feature_read_mib_per_s", "feature_dedup_ratio",
                            "encode_records_per_s", "cache_reopen_s", "cache_speedup", "padding_fraction",
                            "host_rss_per_rank_gib", "rss_ratio_4_vs_1"}
    sizes = {line["detail"]["pixels"]: line for line in metrics["feature_bytes_per_sample"]}
    assert sizes[224]["detail"]["raw_bytes"] == 256 * 1024 * 2 and sizes[336]["detail"]["raw_bytes"] == 576 * 1024 * 2
    dedup = metrics["feature_dedup_ratio"][0]
    assert dedup["detail"]["rows_stored"] == dedup["detail"]["unique_images"] < dedup["detail"]["records"]
    assert dedup["value"] == pytest.approx(dedup["detail"]["records"] / dedup["detail"]["rows_stored"], abs=1e-3)
    assert metrics["cache_reopen_s"][0]["detail"]["rows"] == 50_000
    padding = metrics["padding_fraction"][0]["detail"]
    assert 0 <= padding["length_grouped"] < padding["random"] < 1
    # Ranks read disjoint shards: the total number of decodes does not grow with the number of ranks.
    decodes = metrics["rss_ratio_4_vs_1"][0]["detail"]["decodes_total"]
    assert decodes["1"] == decodes["2"] == decodes["4"]
    assert [line["detail"]["ranks"] for line in metrics["host_rss_per_rank_gib"]] == [1, 2, 4]


@pytest.mark.slow
def test_bench_bad_input_scale_names_exactly_the_bad_records_and_redoes_nothing():
    """The bad-input-at-scale run, small (3,000 records, 2 steps): it exits non-zero unless the 7 injected records are
    exactly the ones named, every other record trains, and the rerun rewrites no file."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_bad_input_scale.py"), "--records", "3000",
                           "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["metric"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert rows["bad_records_named_exactly"]["value"] == 1
    assert rows["bad_records_named_exactly"]["detail"]["by_kind"] == {"bad_record": 3, "image": 3, "overlong": 1}
    assert rows["samples_trained_on"]["value"] == 3000 - 7
    assert rows["rerun_seconds"]["detail"]["files_rewritten"] == 0


def test_bench_cli_quick_measures_help_and_status_against_a_bare_start():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cli.py"), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["metric"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == {"python_start_s", "help_s", "status_s"}
    for name in ("help_s", "status_s"):
        assert rows[name]["value"] > rows["python_start_s"]["value"] > 0
        assert rows[name]["detail"]["heavy_imports"] == []


@pytest.mark.slow
def test_bench_alignment_trains_both_variants_and_reports_against_chance():
    """Two steps per variant (docs/performance.md has the --quick figures): the table is complete and sane."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_alignment.py"), "--steps", "2",
                           "--eval-every", "2", "--n-eval", "2"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["metric"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == {"stage1_caption_loss_ratio_no_bos_vs_bos", "stage1_held_out_colour",
                         "stage1_held_out_position", "stage1_seconds_per_step"}
    assert rows["stage1_held_out_colour"]["detail"]["chance"] == pytest.approx(1 / 6, abs=1e-3)
    assert 0 <= rows["stage1_held_out_position"]["value"] <= 1
    assert rows["stage1_caption_loss_ratio_no_bos_vs_bos"]["detail"]["ours"] > 0


def test_benchmark_stdout_carries_only_json_rows_whatever_else_prints(tmp_path):
    """A library's logger bound to stdout before the claim (DeepSpeed's is), a bare write to descriptor 1 and a child
    process that inherits it all land on stderr; the rows alone stay on stdout."""
    script = tmp_path / "noisy_bench.py"
    script.write_text(
        "import logging, os, subprocess, sys\n"
        f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
        "library = logging.getLogger('library'); library.addHandler(logging.StreamHandler(sys.stdout))\n"
        "import jsonrows\n"
        "jsonrows.claim_stdout()\n"
        "library.warning('Setting accelerator to CPU.')\n"
        "print('progress 1/2')\n"
        "os.write(1, b'from C\\n')\n"
        "subprocess.run([sys.executable, '-c', 'print(\"from a child\")'], check=True)\n"
        "jsonrows.emit('answers_per_s', 12.5, 'answers/s', batch=8)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"metric": "answers_per_s", "value": 12.5, "unit": "answers/s", "detail": {"batch": 8}}]
    for noise in ("Setting accelerator to CPU.", "progress 1/2", "from C", "from a child"):
        assert noise in done.stderr
