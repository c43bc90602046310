"""The command line, in-process (typer's runner) with the debug and local executors and dry runs."""

import json
import os
import re

import pytest

from conftest import invoke, small_pipeline_dict, write_pipeline


def test_help_explains_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("submit", "run", "status", "logs", "cancel", "validate"):
        assert command in result.output
    assert "pipelines/demo.toml" in result.output


def test_unknown_stage(small_pipeline):
    result = invoke("submit", "stage9", "-p", str(small_pipeline))
    assert result.exit_code == 2 and "unknown stage 'stage9'" in result.output


def test_bad_pipeline_names_file_and_key(tmp_path):
    data = small_pipeline_dict(tmp_path / "run")
    data["stages"]["features"]["shards"] = 3
    path = write_pipeline(tmp_path / "bad.toml", data)
    result = invoke("submit", "features", "-p", str(path))
    assert result.exit_code == 2
    assert "bad.toml" in result.output and "stages.features.shards: unknown key" in result.output


def test_pipeline_from_environment_variable(small_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("validate", env={"LLAVA_HPC_PIPELINE": str(small_pipeline)})
    assert result.exit_code == 0 and 'name = "test"' in result.output


def test_dry_run_prints_sbatch_scripts_and_submits_nothing(tmp_path):
    data = small_pipeline_dict(tmp_path / "run", executor="slurm")
    data["slurm"]["setup"] = ["module load cuda/12.1.1"]
    path = write_pipeline(tmp_path / "p.toml", data)
    result = invoke("submit", "all", "-p", str(path), "--dry-run", "--partition", "spgpu", "--account", "lab1",
                    "--time", "2:00:00", "--gpus", "1")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "#SBATCH --partition=spgpu" in out
    assert "#SBATCH --account=lab1" in out
    assert "#SBATCH --time=120" in out
    assert "#SBATCH --gpus-per-node=1" in out
    assert "#SBATCH --array=0-3%4" in out  # 64 pretrain + 48 instruct samples, 2 tasks each
    assert "module load cuda/12.1.1" in out
    assert "--signal=USR2@120" in out
    assert not (tmp_path / "run").exists()


def test_slurm_options_are_declared_once_and_reach_the_command():
    import typer
    from typer.testing import CliRunner

    from llava_hpc.cli import slurm_options

    seen = {}
    app = typer.Typer()

    @app.command()
    @slurm_options("partition", "time")
    def probe(name: str = "x", overrides: dict | None = None):
        seen.update(name=name, overrides=overrides)

    result = CliRunner().invoke(app, ["--name", "y", "--partition", "spgpu", "--time", "30"])
    assert result.exit_code == 0, result.output
    assert seen == {"name": "y", "overrides": {"partition": "spgpu", "time": "30"}}
    # Each command takes exactly the options that make sense for it.
    takes = {"submit": {"--partition", "--account", "--qos", "--time", "--gpus", "--nodes"},
             "run": {"--partition", "--account", "--qos", "--time", "--gpus", "--nodes"},
             "judge": {"--partition", "--account", "--qos", "--time"}, "doctor": {"--account", "--qos"}}
    for command, options in takes.items():
        help_text = invoke(command, "--help", env={"COLUMNS": "200"}).output
        present = {o for o in ("--partition", "--account", "--qos", "--time", "--gpus", "--nodes")
                   if re.search(rf"{o}\b", help_text)}
        assert present == options, command


def test_run_on_debug_executor_and_status(small_pipeline):
    result = invoke("run", "-p", str(small_pipeline), "--executor", "debug")
    assert result.exit_code == 0, result.output
    assert "done" in result.output
    status = invoke("status", "-p", str(small_pipeline), "--json")
    rows = {row["stage"]: row for row in json.loads(status.output)}
    assert rows["features"]["state"] == "done"
    # Nothing is judged in this pipeline: the run says so, and status never calls it done.
    assert re.search(r"judge\s+not-applicable no judged bench in this pipeline", result.output), result.output
    assert rows["judge"]["state"] == "n/a" and rows["judge"]["reason"].startswith("no judged bench")
    assert rows["features"]["progress"] == "pretrain: 4/4 shards; instruct: 3/3 shards"
    # the run keeps a resolved, secret-free copy of the pipeline and a record of the submission
    run_dir = small_pipeline.parent / "run"
    assert (run_dir / "pipeline.toml").exists()
    assert json.loads((run_dir / "jobs.jsonl").read_text().splitlines()[0])["stage"] == "features"
    # status works from the run directory alone
    os.rename(small_pipeline, small_pipeline.with_suffix(".moved"))
    status = invoke("status", "--run-dir", str(run_dir), "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)[0]["state"] == "done"


def test_status_before_anything_was_submitted(small_pipeline):
    result = invoke("status", "-p", str(small_pipeline), "--json")
    assert json.loads(result.output)[0]["state"] == "not submitted"
    table = invoke("status", "-p", str(small_pipeline))  # the table a person reads, every state styled
    assert table.exit_code == 0, table.output
    assert "not submitted" in table.output and "features" in table.output


@pytest.mark.parametrize("state", ["not submitted", "submitted", "pending", "running", "running (requeued)",
                                   "requeued", "done", "failed", "cancelled"])
def test_status_table_renders_every_state(state, tmp_path):
    from rich.console import Console

    from llava_hpc.cli import _status_table
    from llava_hpc.orchestrate import StageStatus
    from llava_hpc.rundir import RunDir

    console = Console(record=True, width=200)
    console.print(_status_table([StageStatus("features", state, ["7_0"], 1, 2, 65, 0.5, "x: 1/2 shards", "why",
                                             "/logs/x.err")], RunDir(tmp_path)))
    assert state in console.export_text()


def test_cancel_with_nothing_submitted(small_pipeline):
    result = invoke("cancel", "-p", str(small_pipeline))
    assert result.exit_code == 1 and "nothing was submitted" in result.output


def test_local_executor_runs_in_subprocesses_and_reports_a_failure_with_its_log(tmp_path):
    data_file = tmp_path / "data.json"
    data_file.write_text("[]")
    data = small_pipeline_dict(
        tmp_path / "run",
        executor="local",
        datasets={"mine": {"kind": "llava-json", "path": str(data_file), "images": str(tmp_path)}},
        stages={"features": {"datasets": ["mine"]}, "stage1": {"dataset": "mine"}, "stage2": {"dataset": "mine"}},
    )
    path = write_pipeline(tmp_path / "p.toml", data)
    # plan() reads the file at submit time; make the job itself fail by breaking the file under a
    # submitted job is racy, so instead the vision tower is a model directory without weights: the submit-time
    # check (a config.json is there) passes, the job fails loading it.
    broken = tmp_path / "no-such-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    data["model"]["vision_tower"] = str(broken)
    write_pipeline(path, data)
    result = invoke("submit", "features", "-p", str(path))
    assert result.exit_code == 1
    assert "failed" in result.output
    status = json.loads(invoke("status", "-p", str(path), "--json").output)[0]
    assert status["state"] == "failed"
    assert "no-such-model" in status["reason"]
    assert status["log"].endswith("_log.err")
    log = invoke("logs", "features", "-p", str(path))
    assert "ModelNotAvailableError" in log.output


def test_submit_refuses_models_that_would_not_load_offline_and_submits_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    data = small_pipeline_dict(tmp_path / "run", executor="local",
                               model={"vision_tower": "openai/clip-vit-large-patch14", "llm": str(tmp_path / "nope")})
    path = write_pipeline(tmp_path / "p.toml", data)
    result = invoke("submit", "all", "-p", str(path))
    assert result.exit_code == 2, result.output
    assert "nothing was submitted" in result.output
    assert "hf download openai/clip-vit-large-patch14" in result.output  # the exact command that fixes it
    assert f"model directory {tmp_path / 'nope'} has no config.json" in result.output
    assert not (tmp_path / "run" / "jobs.jsonl").exists()
    # A dry run shows the same problems as warnings and still prints the plan.
    dry = invoke("submit", "all", "-p", str(path), "--dry-run")
    assert dry.exit_code == 0 and "warning:" in dry.output and "hf download openai/clip-vit-large-patch14" in dry.output


def test_cancel_stops_a_local_job(tmp_path):
    import subprocess
    import sys
    import time

    data = small_pipeline_dict(tmp_path / "run", executor="local",
                               stages={"features": {"datasets": ["pretrain"], "shard_size": 8, "array_tasks": 1}})
    path = write_pipeline(tmp_path / "p.toml", data)
    env = {**os.environ, "LLAVA_HPC_FAULT_SLEEP_AFTER_SHARD": "30"}
    submit = subprocess.Popen([sys.executable, "-m", "llava_hpc.cli", "submit", "features", "-p", str(path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = tmp_path / "run" / "features" / "pretrain" / "part-00000.parquet"
    deadline = time.time() + 90
    jobs = tmp_path / "run" / "jobs.jsonl"
    # Both: a loaded machine can run the job's first shard before `submit` has recorded the job it started.
    while not (shard.exists() and jobs.exists() and "job_ids" in jobs.read_text()):
        assert time.time() < deadline, "the local job never wrote its first shard, or submit never recorded it"
        time.sleep(0.5)
    result = invoke("cancel", "features", "-p", str(path))
    assert result.exit_code == 0 and "cancelled" in result.output
    pid = json.loads((tmp_path / "run" / "jobs.jsonl").read_text().splitlines()[-1])["job_ids"][0]
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-f", f"submitit.*{tmp_path}"], capture_output=True).stdout.strip():
        assert time.time() < deadline, f"local job {pid} still has processes after cancel"
        time.sleep(0.5)
    submit.wait(30)
    assert not (tmp_path / "run" / "features" / "pretrain" / "_SUCCESS").exists()


@pytest.mark.parametrize("args", [["--help"], ["status", "-p", "PIPELINE"], ["status", "-p", "PIPELINE", "--json"]])
def test_help_and_status_load_no_heavy_library(small_pipeline, args):
    """`--help` and `status` are what a person runs most: they import none of the ML stack (measured in
    benchmarks/bench_cli.py)."""
    import subprocess
    import sys

    args = [str(small_pipeline) if a == "PIPELINE" else a for a in args]
    heavy = ("torch", "transformers", "deepspeed", "openai", "matplotlib", "pyarrow", "datasets")
    probe = ("import atexit, sys\n"
             f"atexit.register(lambda: print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules)))\n"
             f"sys.argv = ['llava-hpc', *{args!r}]\n"
             "from llava_hpc.cli import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "HEAVY=", done.stdout[-500:]
