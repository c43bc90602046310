"""Tests of the local single-node Slurm cluster itself (slurm/local/start.sh), driven through submitit.

Skipped when no Slurm answers (``sinfo`` missing or failing); with ``LLAVA_HPC_REQUIRE_SLURM=1`` (CI)
they fail instead. Every wait is bounded by a deadline; leftover jobs are cancelled on teardown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import cloudpickle
import pytest
import submitit
from submitit.helpers import Checkpointable

# The job processes cannot import this test module (pytest puts tests/ on sys.path only in this
# process): ship its functions and classes to the jobs by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slurm

LOCAL_PARTITIONS = {"debug", "spgpu", "urgent"}
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED",
}  # fmt: skip


# --------------------------------------------------------------------------- availability
def _slurm_unavailable_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo does not answer ({exc})"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip() or proc.returncode}"
    partitions = {line.strip().rstrip("*") for line in proc.stdout.splitlines() if line.strip()}
    if not LOCAL_PARTITIONS <= partitions:
        return f"partitions {sorted(LOCAL_PARTITIONS - partitions)} missing: not the local test cluster"
    return None


def require_local_slurm() -> None:
    """Skip (or, with LLAVA_HPC_REQUIRE_SLURM=1, fail) unless the local Slurm cluster answers."""
    reason = _slurm_unavailable_reason()
    if reason is None:
        return
    message = f"local Slurm cluster not available: {reason} (start it with: bash slurm/local/start.sh)"
    if os.environ.get("LLAVA_HPC_REQUIRE_SLURM") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module", autouse=True)
def _local_slurm() -> None:
    require_local_slurm()


# --------------------------------------------------------------------------- helpers
def _run(*cmd: str) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def slurm_state(job_id: str) -> str:
    """State from squeue (live jobs), else from sacct (accounting); UNKNOWN if neither knows it yet."""
    out = _run("squeue", "-h", "-j", job_id, "-o", "%T")
    if out:
        return out.splitlines()[0].strip()
    out = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State")
    if out:
        return out.splitlines()[-1].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    return "UNKNOWN"


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)
        time.sleep(interval)


def wait_state(job_id: str, states: Iterable[str], timeout: float = 30) -> str:
    wanted = set(states)
    return wait_until(lambda: (s := slurm_state(job_id)) in wanted and s, timeout, f"job {job_id} in {wanted}")


def _describe(job: submitit.Job) -> str:
    err = job.stderr() or ""
    return f"job {job.job_id} state={slurm_state(job.job_id)}; stderr tail:\n{err[-2000:]}"


def result_of(job: submitit.Job, timeout: float = 60):
    """job.result(), bounded: waits for the result file or a final Slurm state first."""

    def finished() -> bool:
        return job.paths.result_pickle.exists() or slurm_state(job.job_id) in FINAL_STATES

    deadline = time.monotonic() + timeout
    while not finished():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s: {_describe(job)}", pytrace=False)
        time.sleep(0.5)
    if not job.paths.result_pickle.exists():
        time.sleep(1)  # the result file may land just after the state flips
    if not job.paths.result_pickle.exists():
        pytest.fail(f"job ended without a result: {_describe(job)}", pytrace=False)
    return job.result()


def submitit_state(job: submitit.Job, states: Iterable[str], timeout: float = 20) -> str:
    """Poll submitit's own view (sacct via its watcher) until it reports one of `states`."""
    wanted = set(states)

    def check():
        state = job.watcher.get_state(job.job_id, mode="force").split()[0]
        return state in wanted and state

    return wait_until(check, timeout, f"submitit to see job {job.job_id} in {wanted}", interval=1)


@pytest.fixture
def executor(tmp_path: Path):
    """Factory of slurm AutoExecutors; every job they submit is cancelled on teardown."""
    name = f"llava-hpc-test-{uuid.uuid4().hex[:8]}"

    def make(partition: str = "debug", **params) -> submitit.AutoExecutor:
        ex = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
        ex.update_parameters(name=name, timeout_min=30, slurm_partition=partition, cpus_per_task=1)
        if params:
            ex.update_parameters(**params)
        return ex

    yield make
    _run("scancel", "--name", name)


# --------------------------------------------------------------------------- job bodies
def _add(a: int, b: int) -> int:
    return a + b


def _square(x: int) -> int:
    return x * x


def _sleep_then_touch(seconds: float, marker: str) -> str:
    time.sleep(seconds)
    Path(marker).write_text("done")
    return "done"


def _marker_exists(marker: str) -> bool:
    return Path(marker).exists()


def _fail() -> None:
    raise RuntimeError("failing on purpose")


def _cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


class _Resumable(Checkpointable):
    """Runs until preempted (at most `seconds`); once requeued by submitit, returns at once."""

    def __init__(self, log: str, seconds: float = 120) -> None:
        self.log = log
        self.seconds = seconds
        self.preempted = False

    def __call__(self) -> str:
        # As every llava-hpc stage job does: submitit's bare requeue can be killed by the SIGTERM it triggers.
        from llava_hpc.scheduler import harden_requeue

        harden_requeue()
        with open(self.log, "a") as f:
            f.write(f"start {os.environ.get('SLURM_RESTART_COUNT', '0')} preempted={self.preempted}\n")
        if self.preempted:
            return "resumed"
        time.sleep(self.seconds)
        return "never preempted"

    def checkpoint(self, *args, **kwargs):
        self.preempted = True
        return super().checkpoint(*args, **kwargs)


# --------------------------------------------------------------------------- tests
def test_plain_job_completes(executor) -> None:
    job = executor().submit(_add, 2, 3)
    assert result_of(job) == 5
    assert submitit_state(job, {"COMPLETED"}) == "COMPLETED"


def test_map_array(executor) -> None:
    jobs = executor().map_array(_square, [1, 2, 3, 4])
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one Slurm array
    assert [result_of(j) for j in jobs] == [1, 4, 9, 16]


def test_afterok_dependency_waits(executor, tmp_path: Path) -> None:
    marker = tmp_path / "first.done"
    first = executor().submit(_sleep_then_touch, 4, str(marker))
    ex = executor(slurm_additional_parameters={"dependency": f"afterok:{first.job_id}"})
    second = ex.submit(_marker_exists, str(marker))
    wait_until(
        lambda: _run("squeue", "-h", "-j", second.job_id, "-o", "%T %r") == "PENDING Dependency",
        10,
        f"job {second.job_id} to be held by its dependency",
    )
    assert result_of(second) is True  # it started only after the first job had finished
    assert result_of(first) == "done"


def test_failed_dependency_cancels_dependent(executor) -> None:
    first = executor().submit(_fail)
    second = executor(slurm_additional_parameters={"dependency": f"afterok:{first.job_id}"}).submit(_add, 1, 1)
    with pytest.raises(Exception, match="failing on purpose"):
        result_of(first)
    assert wait_state(second.job_id, {"CANCELLED"}, 30) == "CANCELLED"
    assert submitit_state(second, {"CANCELLED"}) == "CANCELLED"
    assert second.done(force_check=True)
    assert not second.paths.result_pickle.exists()


def test_spgpu_job_sees_fake_gpu(executor) -> None:
    job = executor("spgpu", gpus_per_node=1).submit(_cuda_visible_devices)
    devices = result_of(job)
    assert devices in {"0", "1"}, devices


@pytest.mark.slow
def test_checkpointable_job_preempted_by_urgent_is_requeued(executor, tmp_path: Path) -> None:
    log = tmp_path / "resumable.log"
    victim = executor("spgpu", gpus_per_node=1).submit(_Resumable(str(log)))
    wait_until(lambda: log.exists() and log.read_text().count("start") >= 1, 60, "the victim job to start")

    urgent = executor("urgent", gpus_per_node=2).submit(_cuda_visible_devices)
    assert result_of(urgent, timeout=60) == "0,1"  # it got both GPUs, so the victim was preempted

    assert result_of(victim, timeout=90) == "resumed"
    starts = log.read_text().splitlines()
    assert len(starts) == 2 and "preempted=True" in starts[1], starts
    assert "scontrol ran with SIGTERM ignored" in victim.stdout()  # the hardened requeue did it
    assert submitit_state(victim, {"COMPLETED"}) == "COMPLETED"
