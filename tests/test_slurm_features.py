"""The features stage on the real local Slurm: arrays, status, afterok, cancel, failure, kill -9 and resume."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SLURM_ACCOUNT, small_pipeline_dict, wait_for, write_pipeline

from llava_hpc.config import load_pipeline
from llava_hpc.data.features_io import read_shard, shard_paths, verify_shard
from llava_hpc.orchestrate import Orchestrator
from llava_hpc.rundir import RunDir, read_jsonl
from llava_hpc.scheduler import QueryStats
from llava_hpc.stages import StageContext
from llava_hpc.stages import features as features_stage

pytestmark = pytest.mark.slurm
CLI = str(Path(sys.executable).parent / "llava-hpc")


def slurm_pipeline(tmp_path: Path, name="pipeline.toml", **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = small_pipeline_dict(
        tmp_path / "run",
        executor="slurm",
        python=sys.executable,
        slurm={"partition": "standard", "account": SLURM_ACCOUNT, "cpus": 1, "mem_gb": 1, "time": 10},
        stages={
            "features": {"batch_size": 8, "shard_size": 8, "array_tasks": 4},
            "stage1": {"dataset": "pretrain"},
            "stage2": {"dataset": "instruct"},
        },
    )
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return write_pipeline(tmp_path / name, data)


def submit_after(orchestrator: Orchestrator, after):
    """Submit an orchestrator's features stage afterok `after`: the scheduler call `submit all` chains stages with."""
    orchestrator.run.create()
    orchestrator.run.pipeline_file.write_text(orchestrator.pipeline.to_toml())
    pipeline = orchestrator.pipeline
    tasks = features_stage.plan(StageContext(pipeline, orchestrator.run))
    return orchestrator.scheduler.submit("features", tasks, pipeline.resources("features"), after, checkpointable=True)


def cli(*args, cwd, env=None, check=True):
    result = subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"llava-hpc {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def status_rows(cwd, *args):
    return {row["stage"]: row for row in json.loads(cli("status", "--json", *args, cwd=cwd).stdout)}



def sacct_field(job_id: str, field: str) -> set[str]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", field], capture_output=True, text=True).stdout
    return {line for line in out.split() if line}


def test_submit_features_array_in_spgpu_and_status_until_done(tmp_path):
    slurm_pipeline(tmp_path)
    # Exactly as a user types it: ./pipeline.toml found by default.
    out = cli("submit", "features", "--partition", "spgpu", "--gpus", "1", cwd=tmp_path).stdout
    assert "submitted array of 8" in out
    rows = status_rows(tmp_path)
    assert rows["features"]["state"] in ("pending", "running", "done")
    assert rows["features"]["tasks_total"] == 8
    seen = set()

    def finished():
        row = status_rows(tmp_path)["features"]
        seen.add(row["state"])
        return row if row["state"] in ("done", "failed", "cancelled") else None

    final = wait_for(finished, what="features done")
    assert final["state"] == "done", final
    assert final["tasks_done"] == 8
    assert seen & {"pending", "running"}, seen
    assert "pretrain: 8/8 shards" in final["progress"] and "instruct: 6/6 shards" in final["progress"]
    job = final["job_ids"][0].split("_")[0]
    assert sacct_field(job, "Partition") == {"spgpu"}
    stats = QueryStats()
    pipeline = load_pipeline(tmp_path / "pipeline.toml")
    Orchestrator(pipeline, RunDir(pipeline.run_dir)).status(stats)
    assert (stats.squeue_calls, stats.sacct_calls) == (1, 1), stats.commands  # 8 tasks, one call each
    table = cli("status", cwd=tmp_path).stdout  # the plain table, as written in the docs
    assert "features" in table and "done" in table and "8/8" in table
    again = cli("submit", "features", cwd=tmp_path).stdout
    assert "skipped-done" in again


def test_dependent_stage_waits_afterok_and_a_failed_dependency_cancels_it(tmp_path):
    first = load_pipeline(slurm_pipeline(tmp_path / "a"))
    second = load_pipeline(slurm_pipeline(tmp_path / "b"))
    os.environ["LLAVA_HPC_FAULT_SLEEP_AFTER_SHARD"] = "2"  # exported to the jobs: makes A last long enough to watch B wait
    try:
        a = Orchestrator(first, RunDir(first.run_dir))
        b = Orchestrator(second, RunDir(second.run_dir))
        sub_a = a.submit("features")[0].submission
    finally:
        del os.environ["LLAVA_HPC_FAULT_SLEEP_AFTER_SHARD"]
    sub_b = submit_after(b, [sub_a])
    assert sub_b.depends_on == [sub_a.array_job_id]
    waiting = wait_for(lambda: (r := b.status()[0]).state == "pending" and "Dependency" in r.reason and r,
                       timeout=60, what="B pending on its dependency")
    assert waiting.tasks_done == 0
    assert a.wait_until_finished(["features"], timeout_s=240)[0].state == "done"
    assert b.wait_until_finished(["features"], timeout_s=240)[0].state == "done"

    # Now a dependency that fails: A's dataset file turns unreadable after submission.
    broken_dir = tmp_path / "c"
    broken_dir.mkdir()
    data_file = broken_dir / "data.json"
    data_file.write_text(json.dumps([{"id": "x", "image": "x.png", "conversations": []}]))
    broken = load_pipeline(slurm_pipeline(
        broken_dir, datasets={"mine": {"kind": "llava-json", "path": str(data_file), "images": str(broken_dir)}},
        stages={"features": {"datasets": ["mine"], "shard_size": 8, "array_tasks": 4}, "stage1": {"dataset": "mine"},
                "stage2": {"dataset": "mine"}},
        slurm={"partition": "standard", "account": SLURM_ACCOUNT, "cpus": 1, "mem_gb": 1, "time": 10,
               "additional": {"begin": "now+3"}},
    ))
    c = Orchestrator(broken, RunDir(broken.run_dir))
    sub_c = c.submit("features")[0].submission
    data_file.write_text("[{ not json")
    dependent = load_pipeline(slurm_pipeline(tmp_path / "d"))
    d = Orchestrator(dependent, RunDir(dependent.run_dir))
    submit_after(d, [sub_c])
    failed = c.wait_until_finished(["features"], timeout_s=180)[0]
    assert failed.state == "failed"
    assert "not valid JSON" in failed.reason and "data.json" in failed.reason
    assert failed.log.endswith("_log.err") and Path(failed.log).exists()
    assert d.wait_until_finished(["features"], timeout_s=120)[0].state == "cancelled"


def test_cancel_and_failed_job_shown_with_its_log(tmp_path):
    slurm_pipeline(tmp_path)
    cli("submit", "features", cwd=tmp_path, env={"LLAVA_HPC_FAULT_SLEEP_AFTER_SHARD": "60"})
    wait_for(lambda: status_rows(tmp_path)["features"]["state"] == "running", timeout=120, what="running")
    out = cli("cancel", "features", cwd=tmp_path).stdout
    assert "cancelled" in out
    row = wait_for(lambda: (r := status_rows(tmp_path)["features"])["state"] == "cancelled" and r, timeout=60,
                   what="cancelled state")
    assert "CANCELLED" in row["reason"]
    logs = cli("logs", "features", "--stdout", cwd=tmp_path, check=False)
    assert "_log.out" in logs.stdout


def test_kill_9_while_writing_then_resubmit_completes_only_missing_shards(tmp_path):
    path = slurm_pipeline(tmp_path, stages={"features": {"batch_size": 8, "shard_size": 8, "array_tasks": 2, "datasets": ["pretrain"]}})
    pipeline = load_pipeline(path)
    out = pipeline.run_dir / "features" / "pretrain"
    cli("submit", "features", cwd=tmp_path, env={"LLAVA_HPC_FAULT_SLEEP_AFTER_SHARD": "3"})
    wait_for(lambda: len(shard_paths(out)) >= 2, timeout=180, what="two shards")
    job = json.loads((pipeline.run_dir / "jobs.jsonl").read_text().splitlines()[-1])["job_ids"][0].split("_")[0]
    subprocess.run(["scancel", "--signal=KILL", "--full", job], check=True)
    wait_for(lambda: status_rows(tmp_path)["features"]["state"] in ("failed", "cancelled"), timeout=60, what="killed")
    survivors = shard_paths(out)
    assert 2 <= len(survivors) < 8
    for shard in survivors:  # every visible shard is whole: checksum and a full read
        verify_shard(shard)
        assert len(read_shard(shard)[0]) == 8
    before = {p.name: p.stat().st_mtime_ns for p in survivors}

    cli("submit", "features", cwd=tmp_path)
    final = wait_for(lambda: (r := status_rows(tmp_path)["features"])["state"] in ("done", "failed") and r, what="resumed")
    assert final["state"] == "done", final
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(out) if p.name in before} == before
    written = [row["shard"] for row in read_jsonl(out / "metrics.jsonl")]
    assert sorted(written) == list(range(8)), "each shard computed exactly once across kill and resume"
    assert not list(out.glob(".*.tmp"))
