"""The seed recipe's sbatch scripts as a university cluster's policy wants them, rendered by `submit all --dry-run` on
a machine with no Slurm at all (a laptop, a login node before `module load slurm`); what a real submit there says;
and the submit-time checks (a judge job's key) that would otherwise fail hours later in a job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, small_pipeline_dict, write_pipeline

CLI = str(Path(sys.executable).parent / "llava-hpc")
SEED = REPO / "pipelines" / "llava-llama3.2-1b.toml"


def cli_without_slurm(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """llava-hpc with a PATH that has no Slurm tools (and an empty HF cache): what a laptop has."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "LLAVA_"))}
    environ.update(PATH=str(bin_dir), COLUMNS="300", HF_HUB_CACHE=str(tmp_path / "hf"), **env)
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, env=environ)


def scripts_by_stage(output: str) -> dict[str, str]:
    """The dry run's output cut into each stage's sbatch script."""
    parts = re.split(r"^(\w+)\s+dry-run .*$", output, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.fixture(scope="module")
def seed_dry_run(tmp_path_factory) -> subprocess.CompletedProcess:
    tmp_path = tmp_path_factory.mktemp("laptop")
    data, runs = tmp_path / "data", tmp_path / "runs"  # the cluster's paths exist here, its data does not
    data.mkdir()
    runs.mkdir()
    return cli_without_slurm(tmp_path, "submit", "all", "-p", str(SEED), "--account", "lab1", "--dry-run",
                             LLAVA_DATA_DIR=str(data), LLAVA_DATA=str(data), LLAVA_RUNS=str(runs))


def test_dry_run_needs_no_slurm_and_shows_every_stage_and_the_chain(seed_dry_run):
    assert seed_dry_run.returncode == 0, seed_dry_run.stdout + seed_dry_run.stderr
    assert "Traceback" not in seed_dry_run.stderr and "Could not detect" not in seed_dry_run.stderr
    scripts = scripts_by_stage(seed_dry_run.stdout)
    assert sorted(scripts) == ["features", "generate", "stage1", "stage2"]
    assert re.search(r"^stage2\s+dry-run would submit 1 job, afterok features, stage1$", seed_dry_run.stdout, re.M)
    assert "--dependency='afterok:<features-job-id>:<stage1-job-id>'" in scripts["stage2"]
    # The judge uses the Batch API: the login side drives it once generate is done; no job holds an allocation.
    # The report of a judged bench follows its judging there (a few seconds of CPU).
    assert re.search(r"^judge\s+login-side .*llava-hpc judge --collect", seed_dry_run.stdout, re.M)
    assert re.search(r"^report\s+login-side llava-bench: written by `llava-hpc judge`", seed_dry_run.stdout, re.M)
    # Missing inputs are warnings: the datasets, the bench, the models not in the (empty) HF cache.
    warnings = seed_dry_run.stderr
    assert "blip_laion_cc_sbu_558k.json" in warnings and "llava_instruct_150k.json" in warnings
    assert "qa90_questions.jsonl" in warnings
    assert "hf download openai/clip-vit-large-patch14" in warnings
    assert "hf download meta-llama/Llama-3.2-1B-Instruct" in warnings


def test_gpu_stages_follow_the_site_policy(seed_dry_run):
    scripts = scripts_by_stage(seed_dry_run.stdout)
    for stage in ("features", "stage1", "stage2", "generate"):
        script = scripts[stage]
        assert "#SBATCH --partition=spgpu" in script and "#SBATCH --gpus-per-node=1" in script, stage
        assert "#SBATCH --account=lab1" in script, stage
        assert "#SBATCH --requeue" in script, stage  # sites set JobRequeue=0: checkpointable stages ask themselves
        assert "--wckey" not in script, stage
        assert "srun --unbuffered" in script and "--cpus-per-task=8" in script.split("srun", 1)[1], stage
        assert "export HF_HUB_OFFLINE=1" in script, stage  # compute nodes: no hub
        assert "module load python/3.11.5 cuda/12.1.1" in script, stage  # the Great Lakes profile's setup
    assert "#SBATCH --array=0-15%8" in scripts["features"]  # 8 array tasks per dataset, at most 8 at once (profile)


def test_cpu_stages_go_to_the_cpu_partition_without_any_gpu_line(tmp_path):
    """With a bench the chain reports itself (exact match), the report is a CPU job: the CPU partition, no GPU line."""
    data = {**small_pipeline_dict(tmp_path / "run", executor="slurm"), "profile": str(REPO / "slurm" / "profiles" /
                                                                                     "greatlakes.toml")}
    data.pop("slurm")
    path = write_pipeline(tmp_path / "p.toml", data)
    result = cli_without_slurm(tmp_path, "submit", "all", "-p", str(path), "--account", "lab1", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    report = scripts_by_stage(result.stdout)["report"]
    assert "#SBATCH --partition=standard" in report and "#SBATCH --account=lab1" in report
    assert "gpus" not in report and "gres" not in report
    assert "#SBATCH --gpus-per-node=1" in scripts_by_stage(result.stdout)["stage2"]


def test_real_submit_without_slurm_says_so_in_one_line(tmp_path):
    data = small_pipeline_dict(tmp_path / "run", executor="slurm")
    path = write_pipeline(tmp_path / "p.toml", data)
    result = cli_without_slurm(tmp_path, "submit", "all", "-p", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: sbatch and srun not found: submitting needs a Slurm login node")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "jobs.jsonl").exists()


def test_a_judge_job_without_its_key_is_refused_at_submit_time(tmp_path):
    """The OpenAI API from a partition the profile says reaches the internet: the job would need the key, and sbatch
    is never given it. The submit fails before anything is queued, naming the file the job would read."""
    key_file = tmp_path / "no-key-here"
    data = small_pipeline_dict(tmp_path / "run", executor="slurm",
                               cluster={"internet_partitions": ["standard"]},
                               benches={"landing": {"kind": "folder", "images": str(tmp_path), "question": "Safe?"}},
                               judge={"api_key_file": str(key_file)})
    path = write_pipeline(tmp_path / "p.toml", data)
    result = cli_without_slurm(tmp_path, "submit", "all", "-p", str(path), OPENAI_API_KEY="sk-in-the-shell")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "nothing was submitted" in result.stderr and "judge: the judge job needs $OPENAI_API_KEY" in result.stderr
    assert f"{key_file} does not exist" in result.stderr and "install -D -m 600" in result.stderr
    assert not (tmp_path / "run" / "jobs.jsonl").exists()
    # Judged from the login side instead, no job needs a key: the dry run shows the judge there.
    data["judge"]["where"] = "login"
    write_pipeline(path, data)
    dry = cli_without_slurm(tmp_path, "submit", "all", "-p", str(path), "--dry-run")
    assert dry.returncode == 0 and re.search(r"^judge\s+login-side", dry.stdout, re.M), dry.stdout + dry.stderr


def test_judge_placement_follows_what_compute_nodes_reach():
    from llava_hpc.config import parse_pipeline
    from llava_hpc.eval.endpoint import endpoint_scope, judge_placement

    assert endpoint_scope(None) == "internet"  # api.openai.com
    assert endpoint_scope("http://127.0.0.1:8000/v1") == "login"  # a node's loopback is the node itself
    assert endpoint_scope("http://10.1.2.3:8000/v1") == "cluster"  # vLLM on another node
    assert endpoint_scope("http://no-such-host.invalid/v1") == "internet"

    def placed(**judge) -> bool:
        data = small_pipeline_dict(Path("/tmp/run"), executor="slurm", judge=judge)
        return judge_placement(parse_pipeline(data, "p.toml", check_files=False)).as_job

    assert not placed()  # OpenAI, and no partition reaches the internet
    assert placed(base_url="http://10.1.2.3:8000/v1")
    assert not placed(base_url="http://10.1.2.3:8000/v1", transport="batch")  # batches: always the login side
    assert not placed(base_url="http://10.1.2.3:8000/v1", where="login")
    assert placed(where="job")


def test_nodes_on_the_command_line_spread_a_stage_over_nodes(tmp_path):
    data = small_pipeline_dict(tmp_path / "run", executor="slurm")
    path = write_pipeline(tmp_path / "p.toml", data)
    result = cli_without_slurm(tmp_path, "submit", "stage2", "-p", str(path), "--nodes", "2", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^stage2\s+dry-run would submit 1 job of 2 node\(s\) x 1 task\(s\)", result.stdout, re.M)
    assert "#SBATCH --nodes=2" in scripts_by_stage(result.stdout)["stage2"]
