"""Status parsing against recorded squeue/sacct output: accounting lag, requeues, arrays, GPU-hours."""

import os
import signal
import subprocess
import time

import pytest

from llava_hpc.orchestrate import summarize
from llava_hpc.rundir import RunDir, Submission
from llava_hpc.scheduler import (QueryStats, Scheduler, _clock_to_seconds, _expand_array_ids, _gpus_in_tres,
                                 _interruptible_controller)


def fake_slurm(monkeypatch, scheduler, sacct: str, squeue: str | None):
    def run(command, stats):
        stats.commands.append(command)
        if command[0] == "sacct":
            return subprocess.CompletedProcess(command, 0, sacct, "")
        if squeue is None:  # every id left the queue
            return subprocess.CompletedProcess(command, 1, "", "slurm_load_jobs error: Invalid job id specified")
        return subprocess.CompletedProcess(command, 0, squeue, "")

    monkeypatch.setattr(scheduler, "_run", run)


def submission(ids, tmp_path):
    return Submission("features", "slurm", ids, len(ids), time.time(), str(tmp_path / "logs"))


def test_accounting_lag_falls_back_to_squeue(monkeypatch, tmp_path):
    scheduler = Scheduler(RunDir(tmp_path), "slurm")
    fake_slurm(monkeypatch, scheduler, sacct="", squeue="41_0|RUNNING|0:07|None\n41_1|PENDING|0:00|Resources\n")
    stats = QueryStats()
    states = scheduler.query([submission(["41_0", "41_1"], tmp_path)], stats)
    assert states["41_0"].state == "RUNNING" and states["41_0"].elapsed_s == 7
    assert states["41_1"].state == "PENDING" and states["41_1"].reason == "Resources"
    assert (stats.squeue_calls, stats.sacct_calls) == (1, 1)


def test_finished_jobs_come_from_sacct_when_squeue_forgot_them(monkeypatch, tmp_path):
    scheduler = Scheduler(RunDir(tmp_path), "slurm")
    sacct = "41_0|COMPLETED|30|billing=2,cpu=2,gres/gpu=2,mem=1G,node=1|0:0|None\n" \
            "41_1|FAILED|12|billing=2,cpu=2,gres/gpu=2,mem=1G,node=1|1:0|NonZeroExitCode\n"
    fake_slurm(monkeypatch, scheduler, sacct=sacct, squeue=None)
    sub = submission(["41_0", "41_1"], tmp_path)
    states = scheduler.query([sub])
    assert states["41_0"].state == "COMPLETED" and states["41_0"].gpu_seconds == 60
    assert states["41_1"].state == "FAILED" and states["41_1"].log_err.endswith("41_1_0_log.err")
    row = summarize("features", sub, states, done=False)
    assert row.state == "failed" and row.tasks_done == 1 and row.gpu_hours == pytest.approx(84 / 3600)
    assert row.reason.startswith("41_1: FAILED exit 1:0") and row.log.endswith("41_1_0_log.err")


def test_requeued_attempts_are_counted_and_shown(monkeypatch, tmp_path):
    scheduler = Scheduler(RunDir(tmp_path), "slurm")
    sacct = "50|PREEMPTED|20|gres/gpu=1|0:15|None\n50|REQUEUED|5|gres/gpu=1|0:0|None\n50|PENDING|0||0:0|BeginTime\n"
    fake_slurm(monkeypatch, scheduler, sacct=sacct, squeue="50|PENDING|0:00|BeginTime\n")
    sub = submission(["50"], tmp_path)
    states = scheduler.query([sub])
    assert states["50"].requeues == 2 and states["50"].gpu_seconds == 25
    assert summarize("features", sub, states, done=False).state == "requeued"


def test_pending_array_ranges_are_expanded(monkeypatch, tmp_path):
    scheduler = Scheduler(RunDir(tmp_path), "slurm")
    fake_slurm(monkeypatch, scheduler, sacct="7_[1-3,5%2]|PENDING|0||0:0|JobArrayTaskLimit\n7_0|RUNNING|3||0:0|None\n",
               squeue=None)
    ids = [f"7_{i}" for i in range(6)]
    states = scheduler.query([submission(ids, tmp_path)])
    assert [states[i].state for i in ids] == ["RUNNING", "PENDING", "PENDING", "PENDING", "UNKNOWN", "PENDING"]


def test_completed_without_marker_is_a_failure_that_says_why(tmp_path):
    from llava_hpc.scheduler import TaskState

    sub = submission(["9"], tmp_path)
    row = summarize("features", sub, {"9": TaskState("9", "COMPLETED")}, done=False)
    assert row.state == "failed" and "_SUCCESS marker is missing" in row.reason
    assert summarize("features", sub, {"9": TaskState("9", "COMPLETED")}, done=True).state == "done"


@pytest.mark.parametrize("text, seconds", [("0:07", 7), ("1:02:03", 3723), ("2-01:00:00", 176400), ("45", 45)])
def test_squeue_clock(text, seconds):
    assert _clock_to_seconds(text) == seconds


def test_gpu_tres_and_array_ids():
    assert _gpus_in_tres("cpu=8,gres/gpu:a100=4,mem=60G") == 4
    assert _gpus_in_tres("cpu=8,mem=60G") == 0
    assert _expand_array_ids("12_[0-2]") == ["12_0", "12_1", "12_2"]
    assert _expand_array_ids("12_4") == ["12_4"]


def test_unknown_executor_is_refused(tmp_path):
    from llava_hpc.scheduler import SchedulerError

    with pytest.raises(SchedulerError, match="unknown executor 'pbs'"):
        Scheduler(RunDir(tmp_path), "pbs")


def test_a_failed_task_still_completing_stays_failed(monkeypatch, tmp_path):
    """Right after a task dies squeue may still list it COMPLETING: accounting's FAILED is what matters (a resubmit
    in that second would otherwise take the dead job for a live one)."""
    scheduler = Scheduler(RunDir(tmp_path), "slurm")
    fake_slurm(monkeypatch, scheduler, sacct="41_0|FAILED|8|cpu=1|0:9|None\n41_1|RUNNING|8|cpu=1|0:0|None\n",
               squeue="41_0|COMPLETING|0:08|None\n41_1|RUNNING|0:08|None\n")
    states = scheduler.query([submission(["41_0", "41_1"], tmp_path)])
    assert states["41_0"].state == "FAILED" and states["41_1"].state == "RUNNING"


def test_jobs_that_can_never_run_are_replaced_not_waited_for(monkeypatch, tmp_path):
    """features: one task FAILED, one still RUNNING; stage1 PENDING afterok features; stage2 PENDING afterok stage1.
    Neither is live: stage1 and stage2 (only pending) are cancelled, the running features task is left alone."""
    from conftest import small_pipeline_dict, write_pipeline

    from llava_hpc.config import load_pipeline
    from llava_hpc.orchestrate import Orchestrator

    pipeline = load_pipeline(write_pipeline(tmp_path / "p.toml", small_pipeline_dict(tmp_path / "run", executor="slurm")))
    run = RunDir(pipeline.run_dir)
    logs = str(run.root / "logs")
    run.record_submission(Submission("features", "slurm", ["41_0", "41_1"], 2, time.time(), logs))
    run.record_submission(Submission("stage1", "slurm", ["42"], 1, time.time(), logs, depends_on=["41"]))
    run.record_submission(Submission("stage2", "slurm", ["43"], 1, time.time(), logs, depends_on=["41", "42"]))
    orchestrator = Orchestrator(pipeline, run)
    fake_slurm(monkeypatch, orchestrator.scheduler,
               sacct="41_0|FAILED|8|cpu=1|0:9|None\n41_1|RUNNING|8|cpu=1|0:0|None\n",
               squeue="41_1|RUNNING|0:08|None\n42|PENDING|0:00|Dependency\n43|PENDING|0:00|Dependency\n")
    cancelled = []
    monkeypatch.setattr(orchestrator.scheduler, "cancel", lambda subs: cancelled.extend(s.array_job_id for s in subs))
    assert orchestrator._active_submissions() == {}
    assert cancelled == ["42", "43"]

    # While features is healthy, everything queued is live and nothing is cancelled.
    cancelled.clear()
    fake_slurm(monkeypatch, orchestrator.scheduler, sacct="",
               squeue="41_0|RUNNING|0:08|None\n41_1|RUNNING|0:08|None\n42|PENDING|0:00|Dependency\n43|PENDING|0:00|Dependency\n")
    assert set(orchestrator._active_submissions()) == {"features", "stage1", "stage2"} and cancelled == []


def _fake_scontrol_killed_by_its_own_requeue(bin_dir, record):
    """An `scontrol` that, like a real requeue on a busy node, is SIGTERMed (with the rest of the job) before
    it exits."""
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/bash\necho "$@" > {record}\nkill -TERM $$\nsleep 0.2\necho requeued\n')
    script.chmod(0o755)


def test_requeue_survives_the_sigterm_it_triggers(monkeypatch, tmp_path):
    from submitit.slurm.slurm import SlurmJobEnvironment

    from llava_hpc.scheduler import _requeue_surviving_its_own_kill

    record = tmp_path / "scontrol.args"
    _fake_scontrol_killed_by_its_own_requeue(tmp_path, record)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    env = SlurmJobEnvironment()

    assert SlurmJobEnvironment._requeue is not _requeue_surviving_its_own_kill  # nothing hardened this process
    # submitit's own requeue reports this requeue as failed: the job would write an error result
    with pytest.raises(subprocess.CalledProcessError, match="died with <Signals.SIGTERM"):
        SlurmJobEnvironment._requeue(env, countdown=3)

    def handler(signum, frame):  # stands in for submitit's "bypass" handler
        pass

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        _requeue_surviving_its_own_kill(env, countdown=3)
        assert signal.getsignal(signal.SIGTERM) is handler  # the job's own handler is back afterwards
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert record.read_text().split() == ["requeue", "4242"]


def test_stage_jobs_requeue_with_the_hardened_requeue(monkeypatch, tmp_path):
    from submitit.slurm.slurm import SlurmJobEnvironment

    import llava_hpc.scheduler as scheduler

    submitit_requeue = SlurmJobEnvironment._requeue  # monkeypatch restores it after the test
    monkeypatch.setattr(scheduler, "run_task", lambda run_dir, task: {"ran": task})
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "debug")  # a stage run inside the caller leaves submitit alone
    assert scheduler._RequeueableStageCall()(str(tmp_path), "t0") == {"ran": "t0"}
    assert SlurmJobEnvironment._requeue is submitit_requeue
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # as submitit's sbatch script sets it
    try:
        for call in (scheduler._RequeueableStageCall(), scheduler._run_in_job):
            monkeypatch.setattr(SlurmJobEnvironment, "_requeue", submitit_requeue)
            assert call(str(tmp_path), "t0") == {"ran": "t0"}
            assert SlurmJobEnvironment._requeue is scheduler._requeue_surviving_its_own_kill
            # Done: a USR2 now (the time-limit warning of a job that finished near its limit) changes nothing.
            assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
            signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_the_reason_of_a_multi_rank_failure_is_its_exception_not_srun_epilogue(tmp_path):
    """torch prefixes every traceback line of a distributed process with "[rankN]:"; srun's own lines come after."""
    from llava_hpc.scheduler import TaskState

    log = tmp_path / "9_0_log.err"
    log.write_text("[rank0]: Traceback (most recent call last):\n"
                   "[rank0]:   File \"loop.py\", line 1, in train\n"
                   "[rank0]: llava_hpc.data.features_io.CorruptShardError: part-00001.parquet: checksum mismatch\n"
                   "srun: error: node1: task 0: Exited with exit code 1\n"
                   "srun: error: node2: task 1: Exited with exit code 1\n")
    state = TaskState("9", "FAILED", exit_code="1:0", log_err=str(log))
    row = summarize("stage2", submission(["9"], tmp_path), {"9": state}, done=False)
    assert row.reason.endswith("CorruptShardError: part-00001.parquet: checksum mismatch"), row.reason


def test_local_tasks_have_elapsed_time_and_gpu_hours_once_finished(tmp_path):
    """No accounting on the local executor: a finished task ran from its submission until its result file."""
    import pickle

    import submitit

    run = RunDir(tmp_path)
    logs = run.log_dir("stage1")
    logs.mkdir(parents=True)
    submitted = time.time() - 100
    sub = Submission("stage1", "local", ["4242"], 1, submitted, str(logs), gpus_per_task=2)
    paths = submitit.core.utils.JobPaths(logs, job_id="4242", task_id=0)
    with open(paths.result_pickle, "wb") as f:
        pickle.dump(("success", None), f)
    os.utime(paths.result_pickle, (submitted + 75, submitted + 75))
    state = Scheduler(run, "local").query([sub])["4242"]
    assert state.state == "COMPLETED" and state.elapsed_s == 75 and state.gpu_seconds == 150
    row = summarize("stage1", sub, {"4242": state}, done=True)
    assert row.state == "done" and row.elapsed_s == 75 and abs(row.gpu_hours - 150 / 3600) < 1e-9


def test_submitit_still_has_the_private_names_the_scheduler_relies_on():
    """submitit has no public hook for how a job requeues itself nor for rendering an sbatch script without
    submitting, so `harden_requeue` replaces `SlurmJobEnvironment._requeue` and `sbatch_script` calls the executor's
    own text builder. If submitit renames them or stops calling `_requeue` from its signal handler, fail here, not in
    a preempted job."""
    import inspect

    from submitit.core.job_environment import SignalHandler
    from submitit.slurm.slurm import SlurmExecutor, SlurmJobEnvironment

    assert list(inspect.signature(SlurmJobEnvironment._requeue).parameters) == ["self", "countdown"]
    assert "self.env._requeue(countdown)" in inspect.getsource(SignalHandler.checkpoint_and_try_requeue)
    assert list(inspect.signature(SlurmExecutor._make_submission_file_text).parameters) == ["self", "command", "uid"]
    assert isinstance(inspect.getattr_static(SlurmExecutor, "_submitit_command_str"), property)


def test_a_local_controller_started_with_sigint_ignored_still_answers_cancel():
    """`nohup llava-hpc submit ... &` starts with SIGINT ignored; exec would hand that on to the local controller,
    which `cancel` stops with SIGINT. While it starts, SIGINT has Python's handler (exec resets it to the default)."""
    import sys

    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"]
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "True"
        with _interruptible_controller(local=True):
            assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "False"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the caller's choice is back
        with _interruptible_controller(local=False):  # Slurm jobs get their signals from Slurm
            assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "True"
    finally:
        signal.signal(signal.SIGINT, saved)
