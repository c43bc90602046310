"""Tests of the local Slurm cluster itself (slurm/local/start.sh): several nodes in network namespaces of their own,
GPUs as GRES, the GPU and CPU partitions' policy, enforced accounts, JobRequeue=0, offline compute nodes; and
submitit against it.

Skipped when no Slurm answers (``sinfo`` missing or failing); with ``LLAVA_HPC_REQUIRE_SLURM=1`` (CI)
they fail instead. Every wait is bounded by a deadline; leftover jobs are cancelled on teardown.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import cloudpickle
import pytest
import submitit
from conftest import SLURM_ACCOUNT, cluster_address
from submitit.helpers import Checkpointable

# The job processes cannot import this test module (pytest puts tests/ on sys.path only in this
# process): ship its functions and classes to the jobs by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slurm

LOCAL_PARTITIONS = {"standard", "spgpu", "urgent"}
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
    return job.results()[0]  # rank 0's (a multi-task job has one result per task)


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

    def make(partition: str = "standard", requeue: bool = False, python: str | None = None,
             **params) -> submitit.AutoExecutor:
        ex = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm", slurm_python=python)
        ex.update_parameters(name=name, timeout_min=30, slurm_partition=partition, cpus_per_task=1,
                             slurm_account=SLURM_ACCOUNT)
        if requeue:  # JobRequeue=0 on this cluster, as on many: a job that must come back asks for it
            params["slurm_additional_parameters"] = {"requeue": True, **params.get("slurm_additional_parameters", {})}
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
    victim = executor("spgpu", requeue=True, gpus_per_node=1).submit(_Resumable(str(log)))
    wait_until(lambda: log.exists() and log.read_text().count("start") >= 1, 60, "the victim job to start")

    # Every GPU of every node: wherever the victim runs, it is preempted.
    urgent = executor("urgent", nodes=2, gpus_per_node=2).submit(_cuda_visible_devices)
    assert result_of(urgent, timeout=60) == "0,1"

    assert result_of(victim, timeout=90) == "resumed"
    starts = log.read_text().splitlines()
    assert len(starts) == 2 and "preempted=True" in starts[1], starts
    assert "scontrol ran with SIGTERM ignored" in victim.stdout()  # the hardened requeue did it
    assert submitit_state(victim, {"COMPLETED"}) == "COMPLETED"


# --------------------------------------------------------------------------- the cluster as a university's
def srun(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["srun", "--time=2", *args], capture_output=True, text=True, timeout=timeout)


def test_nodes_are_hosts_of_their_own():
    out = srun("-A", SLURM_ACCOUNT, "-N2", "--ntasks-per-node=1", "bash", "-c",
               "echo $(hostname) $(hostname -I) $SLURM_PROCID")
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split() for line in out.stdout.splitlines())
    assert [row[0] for row in rows] == ["node1", "node2"]
    addresses = {row[1] for row in rows}
    assert len(addresses) == 2 and cluster_address() not in addresses
    assert all(a.rsplit(".", 1)[0] == cluster_address().rsplit(".", 1)[0] for a in addresses)  # the bridge's /24


def test_gpus_are_gres_on_every_node_and_enforced():
    out = srun("-A", SLURM_ACCOUNT, "-p", "spgpu", "-N2", "--gpus-per-node=1", "bash", "-c",
               "echo $(hostname)=$CUDA_VISIBLE_DEVICES")
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == ["node1=0", "node2=0"]
    too_many = srun("-A", SLURM_ACCOUNT, "-p", "spgpu", "--gpus-per-node=3", "true")
    assert too_many.returncode != 0 and "Requested node configuration is not available" in too_many.stderr


def test_every_job_must_name_a_valid_account():
    missing = srun("true")
    assert missing.returncode != 0 and "requires an account" in missing.stderr
    wrong = srun("-A", "no-such-lab", "true")
    assert wrong.returncode != 0 and "Invalid account" in wrong.stderr
    assert srun("-A", SLURM_ACCOUNT, "true").returncode == 0
    batch = subprocess.run(["sbatch", "--wrap", "true", "-o", "/dev/null"], capture_output=True, text=True)
    assert batch.returncode != 0 and "requires an account" in batch.stderr


def test_gpu_partition_takes_gpu_jobs_and_cpu_partition_cpu_jobs():
    no_gpu = srun("-A", SLURM_ACCOUNT, "-p", "spgpu", "true")
    assert no_gpu.returncode != 0 and "spgpu is a GPU partition" in no_gpu.stderr
    zero_gpus = srun("-A", SLURM_ACCOUNT, "-p", "spgpu", "--gpus-per-node=0", "true")
    assert zero_gpus.returncode != 0 and "spgpu is a GPU partition" in zero_gpus.stderr
    gpu_on_cpu = srun("-A", SLURM_ACCOUNT, "-p", "standard", "--gpus-per-node=1", "true")
    assert gpu_on_cpu.returncode != 0 and "standard has no GPUs" in gpu_on_cpu.stderr


def test_nothing_is_requeued_unless_the_job_asks():
    jobs = {}
    for flag in ("--no-requeue", "--requeue"):
        out = subprocess.run(["sbatch", "--parsable", "-A", SLURM_ACCOUNT, flag, "-o", "/dev/null", "--wrap",
                              "sleep 60"], capture_output=True, text=True, check=True)
        jobs[flag] = out.stdout.strip()
    try:
        for job in jobs.values():
            wait_state(job, {"RUNNING"}, 30)
        refused = subprocess.run(["scontrol", "requeue", jobs["--no-requeue"]], capture_output=True, text=True)
        assert refused.returncode != 0 and "disabled" in refused.stderr
        assert subprocess.run(["scontrol", "requeue", jobs["--requeue"]], capture_output=True).returncode == 0
        assert "JobRequeue=0" in _run("scontrol", "show", "config").replace(" ", "")
    finally:
        _run("scancel", *jobs.values())


def _listener() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server, server.getsockname()[1]


def test_compute_nodes_reach_only_the_cluster(tmp_path):
    """From a node: the controller answers, the other node is routable, this machine's loopback services and
    anything beyond the bridge are not (no packet leaves: there is no route). The login side reaches loopback."""
    server, port = _listener()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the login side reaches its loopback service
        probe = tmp_path / "probe.py"
        probe.write_text(
            "import socket, sys\n"
            "for host, port in [(sys.argv[1], 6817), ('127.0.0.1', int(sys.argv[2])), ('1.1.1.1', 443)]:\n"
            "    s = socket.socket(); s.settimeout(3)\n"
            "    try:\n"
            "        s.connect((host, port)); print(host, 'ok')\n"
            "    except OSError as e:\n"
            "        print(host, e.errno)\n")
        out = srun("-A", SLURM_ACCOUNT, "-N2", sys.executable, str(probe), cluster_address(), str(port))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines.count(f"{cluster_address()} ok") == 2
        assert lines.count(f"127.0.0.1 {errno.ECONNREFUSED}") == 2  # the node's own loopback, not this machine's
        assert lines.count(f"1.1.1.1 {errno.ENETUNREACH}") == 2
    finally:
        server.close()


def test_usr2_before_submitit_handles_it_does_not_kill_the_job(executor, tmp_path: Path) -> None:
    """Slurm may send USR2 (time limit near, preemption) in the seconds before submitit installs its handler. A
    slow-starting Python widens that window to 10 s; a USR2 inside it must not kill the task (its default action)."""
    from llava_hpc.scheduler import job_python

    started = tmp_path / "python-started"
    slow_python = tmp_path / "slow-python"
    slow_python.write_text(f"#!/bin/bash\ntouch {started}\nsleep 10\nexec {sys.executable} \"$@\"\n")
    slow_python.chmod(0o755)
    job = executor(python=job_python(str(slow_python))).submit(_add, 20, 22)
    wait_until(started.exists, 60, "the task's python to start")
    assert subprocess.run(["scancel", "--signal=USR2", job.job_id], timeout=15).returncode == 0
    assert result_of(job, timeout=60) == 42
    assert submitit_state(job, {"COMPLETED", "FAILED"}) == "COMPLETED"
