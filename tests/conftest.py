from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

REPO = Path(__file__).resolve().parents[1]
# The real LLaVA-Bench tables (../shared/data beside the checkout, as on the development and CI machines).
LLAVA_EVAL = Path(os.environ.get("LLAVA_HPC_EVAL_DATA", REPO.parent / "shared" / "data" / "llava-eval"))
if not LLAVA_EVAL.exists() and Path("/work/shared/data/llava-eval").exists():
    LLAVA_EVAL = Path("/work/shared/data/llava-eval")
# scripts/test.sh sets this: tests that need the tables then fail instead of skipping when they are missing.
REQUIRE_EVAL_DATA = os.environ.get("LLAVA_HPC_REQUIRE_EVAL_DATA") == "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The local cluster (slurm/local/start.sh) enforces accounts: every job names this one.
SLURM_ACCOUNT = "llava-lab"
SLURM_CONF = Path("/etc/slurm/slurm.conf")


def cluster_address() -> str:
    """The controller's address on the cluster bridge: the one login-side address compute nodes reach (a stand-in
    for a service inside the cluster, e.g. an OpenAI-compatible judge endpoint on another node)."""
    import re

    match = re.search(r"^SlurmctldHost=[^(\s]+\(([\d.]+)\)", SLURM_CONF.read_text(), re.M)
    if not match:
        raise RuntimeError(f"{SLURM_CONF}: no SlurmctldHost address (is the local cluster running?)")
    return match.group(1)


def wait_for(predicate, timeout: float = 300, poll: float = 0.5, what: str = "condition"):
    """predicate()'s first truthy value, polled every `poll` s; AssertionError naming `what` after `timeout` s."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def slurm_available() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked `slurm` need the local cluster. Without it they skip on a laptop, but fail where
    LLAVA_HPC_REQUIRE_SLURM=1 (CI, scripts/test.sh): a green CI run means they really ran."""
    if any(item.get_closest_marker("slurm") for item in items) and not slurm_available():
        if os.environ.get("LLAVA_HPC_REQUIRE_SLURM") == "1":
            for item in items:
                if item.get_closest_marker("slurm"):
                    item.add_marker(pytest.mark.usefixtures("_slurm_required"))
        else:
            skip = pytest.mark.skip(reason="local Slurm is not running (bash slurm/local/start.sh)")
            for item in items:
                if item.get_closest_marker("slurm"):
                    item.add_marker(skip)


@pytest.fixture
def _slurm_required():
    pytest.fail("LLAVA_HPC_REQUIRE_SLURM=1 but the local Slurm cluster does not answer (bash slurm/local/start.sh)")


def small_pipeline_dict(run_dir: Path, **sections) -> dict:
    """A demo-like pipeline small enough for a unit test: 64 + 48 synthetic samples, shards of 16."""
    data = {
        "name": "test",
        "run_dir": str(run_dir),
        "executor": "debug",
        "slurm": {"partition": "standard", "account": SLURM_ACCOUNT, "cpus": 1, "mem_gb": 1, "time": 10},
        "model": {"vision_tower": "tiny", "llm": "tiny", "max_length": 128},
        "synthetic": {"n_pretrain": 64, "n_instruct": 48, "n_bench": 20},
        "datasets": {
            "pretrain": {"kind": "synthetic", "split": "pretrain"},
            "instruct": {"kind": "synthetic", "split": "instruct"},
        },
        "stages": {
            "features": {"batch_size": 16, "shard_size": 16, "array_tasks": 2},
            # plain torch in one process: fast; DeepSpeed is exercised through Slurm in test_slurm_training
            "stage1": {"dataset": "pretrain", "zero_stage": 0},
            "stage2": {"dataset": "instruct", "zero_stage": 0},
        },
        "benches": {"synthetic": {"kind": "synthetic"}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def write_pipeline(path: Path, data: dict) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture
def small_pipeline(tmp_path) -> Path:
    return write_pipeline(tmp_path / "pipeline.toml", small_pipeline_dict(tmp_path / "run"))
