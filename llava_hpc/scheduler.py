"""The only module that knows submitit (and Slurm's command-line tools).

Submits one job, or one job array, per stage; chains stages with `afterok`; makes checkpointable stages
requeue on preemption and timeout; asks Slurm about any number of jobs with one squeue and one sacct call.
Executors: `slurm` (a real cluster), `local` (subprocesses on this machine, no queue) and `debug` (in the
calling process, for tests and debuggers).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

from llava_hpc import checkpoint_signal
from llava_hpc.config import Resources
from llava_hpc.rundir import RunDir, Submission
from llava_hpc.secrets import is_secret
from llava_hpc.stages import Task
from llava_hpc.stages.runner import run_task

EXECUTORS = ("slurm", "local", "debug")

# Slurm states, grouped the way a user reads them.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "STOPPED"}
# PREEMPTED as the *last* attempt means it was not requeued (a requeued one shows up queued again).
FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SchedulerError(RuntimeError):
    pass


def _requeue_surviving_its_own_kill(env, countdown: int) -> None:
    """submitit's `scontrol requeue`, run with SIGTERM ignored.

    A requeue makes slurmd SIGTERM every process of the job, and `scontrol` is one of them: when that signal
    lands before scontrol has exited (a loaded node), submitit sees "scontrol died with SIGTERM" and writes an
    error result for a job that Slurm has in fact requeued, so whoever reads that result sees a failure. An
    ignored disposition survives exec, so scontrol finishes and reports the requeue's real outcome; SIGKILL
    after KillWait still ends it. Called from the signal handler, i.e. on the main thread, as signal.signal needs.
    """
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        subprocess.check_call(["scontrol", "requeue", env.job_id], timeout=60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    logging.getLogger("submitit").info(f"Requeued job {env.job_id} ({countdown} remaining timeouts; scontrol ran with "
                                       "SIGTERM ignored)")


def harden_requeue() -> None:
    """Make this job process requeue itself with `_requeue_surviving_its_own_kill` (call it inside the job).

    Only in a Slurm job: the debug executor runs stages inside the caller, where nothing is requeued and the
    caller's submitit should stay as it is."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":  # submitit's sbatch script exports it
        return
    # Private in submitit (as is the dry run's submission text, in sbatch_script): it has no hook for how a job
    # requeues itself. Its signal handler calls `env._requeue(countdown)`; test_scheduler.py pins that, so a submitit
    # that changes it fails a unit test instead of a preempted job.
    from submitit.slurm.slurm import SlurmJobEnvironment

    SlurmJobEnvironment._requeue = _requeue_surviving_its_own_kill


def _run_in_job(run_dir: str, task: Task) -> dict:
    """A stage task as a job runs it. In a Slurm job: requeue robustly, and let training checkpoint before
    submitit's USR2 handler requeues (checkpoint_signal); once the task has ended, a late USR2 (a job that finishes
    inside the last signal_delay_s of its time limit) is ignored: it must neither requeue finished work nor kill
    the exiting process (Python puts the default action, termination, back for its handled signals at exit, and
    the job would end FAILED after it succeeded)."""
    in_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    if in_slurm:
        harden_requeue()
        checkpoint_signal.defer(signal.SIGUSR2)
    try:
        return run_task(run_dir, task)
    finally:
        if in_slurm:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class _RequeueableStageCall(Checkpointable):
    """A stage task that submitit requeues on preemption/timeout. Its state is on disk (checkpoints, finished
    shards), so resubmitting the same call with the same arguments resumes the work."""

    def __call__(self, run_dir: str, task: Task) -> dict:
        return _run_in_job(run_dir, task)


class _SlurmExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor, constructible where Slurm is not installed, so that a dry run renders the exact
    sbatch script on a laptop. A real submission checks for sbatch first (`Scheduler.submit`)."""

    @classmethod
    def affinity(cls) -> int:
        return 2


# Compute nodes usually have no internet: models come from the shared HF cache, never from the hub.
OFFLINE_SETUP = "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1"


@contextmanager
def _without_secrets():
    """sbatch exports the submitting environment to the job (and Slurm keeps it): hide secrets while it runs."""
    hidden = {name: os.environ.pop(name) for name in list(os.environ) if is_secret(name)}
    try:
        yield
    finally:
        os.environ.update(hidden)


def job_python(python: str) -> str:
    """The command a Slurm task starts Python with: USR2 ignored from its first instant.

    Slurm sends USR2 (the time-limit warning, or preemption) whenever it decides, also in the seconds before
    submitit has installed its handler (Python starting, the task unpickling), and USR2's default action ends the
    process: the job would end FAILED instead of requeuing. An ignored disposition survives exec, submitit's handler
    replaces it once installed, and a signal that came too early is only dropped: a preempted job is still requeued
    by Slurm when its GraceTime ends."""
    return f"bash -c 'trap \"\" USR2; exec \"$0\" \"$@\"' {shlex.quote(python)}"


@contextmanager
def _stderr_to(path: Path | None):
    """While submitit starts local jobs: their controller process inherits a stderr that is this file, not the
    terminal. It writes there only about itself, a KeyboardInterrupt traceback included when Ctrl-C stops it (the
    tasks' own logs are files already). No-op for None."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.dup2(target, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


@contextmanager
def _interruptible_controller(local: bool):
    """While submitit starts a local job: `cancel` stops its controller with SIGINT, and a process started with
    SIGINT ignored (`nohup llava-hpc submit ... &`, any `cmd &` in a script) would pass that on through exec, so the
    controller would ignore the cancel and run on. Python's own handler is installed for the moment of the start
    (exec resets a handler, never an ignore). The main thread only, where signal.signal works."""
    if not local or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


@dataclass
class TaskState:
    job_id: str
    state: str = "UNKNOWN"  # a Slurm state name, or UNKNOWN while accounting lags
    elapsed_s: int = 0
    gpu_seconds: float = 0.0
    requeues: int = 0
    exit_code: str = ""
    reason: str = ""
    log_err: str = ""

    @property
    def finished(self) -> bool:
        return self.state == "COMPLETED" or self.state in FAILED_STATES or self.state.startswith("CANCELLED")


@dataclass
class QueryStats:
    """How many Slurm commands a status query ran: the benchmark and a test hold it to one of each."""

    squeue_calls: int = 0
    sacct_calls: int = 0
    seconds: float = 0.0
    commands: list[list[str]] = field(default_factory=list)


def _gpus_in_tres(tres: str) -> int:
    match = re.search(r"gres/gpu(?::[^=,]+)?=(\d+)", tres or "")
    return int(match.group(1)) if match else 0


def _clock_to_seconds(text: str) -> int:
    """squeue's %M: [D-][HH:]MM:SS."""
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
    parts = [int(p) for p in text.split(":") if p.isdigit()]
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + part
    return days * 86400 + seconds


def _expand_array_ids(job_id: str) -> list[str]:
    """sacct shows pending array tasks as '123_[2-5,7%4]': expand to 123_2 ... 123_7."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not match:
        return [job_id]
    base, ranges = match.groups()
    ids = []
    for part in ranges.split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-")
            ids.extend(f"{base}_{i}" for i in range(int(lo), int(hi) + 1))
        elif part:
            ids.append(f"{base}_{part}")
    return ids


class Scheduler:
    def __init__(self, run: RunDir, executor: str = "slurm", python: str | None = None):
        if executor not in EXECUTORS:
            raise SchedulerError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
        self.run = run
        self.executor_kind = executor
        self.python = python or sys.executable
        self._live_jobs: dict[str, list[submitit.Job]] = {}

    # ------------------------------------------------------------------------------------------ submit
    def _executor(self, stage: str, resources: Resources, dependency: str | None, checkpointable: bool,
                  create_folder: bool = True) -> submitit.Executor:
        folder = self.run.log_dir(stage)
        if create_folder:
            folder.mkdir(parents=True, exist_ok=True)
        if self.executor_kind != "slurm":
            executor = submitit.AutoExecutor(folder=folder, cluster=self.executor_kind,
                                             local_python=shlex.quote(self.python))
            params = dict(name=f"llava-{stage}", timeout_min=resources.time, cpus_per_task=resources.cpus,
                          gpus_per_node=resources.gpus, nodes=resources.nodes, tasks_per_node=resources.tasks_per_node)
            if resources.mem_gb is not None:
                params["mem_gb"] = resources.mem_gb
            executor.update_parameters(**params)
            return executor
        executor = _SlurmExecutor(folder=folder, max_num_timeout=resources.max_requeues, python=job_python(self.python))
        additional = dict(resources.additional)
        if checkpointable:
            # Sites often set JobRequeue=0: a job that must come back after preemption, a time limit or a node
            # failure says so itself (without it `scontrol requeue` is refused and preemption cancels the job).
            additional["requeue"] = True
        params = dict(
            job_name=f"llava-{stage}",
            time=resources.time,
            nodes=resources.nodes,
            ntasks_per_node=resources.tasks_per_node,
            cpus_per_task=resources.cpus,
            # No GPU line at all for CPU work: sites reject --gpus-per-node=0 in their GPU partitions and any GPU
            # request in their CPU ones.
            gpus_per_node=resources.gpus or None,
            mem=_mem(resources.mem_gb) if resources.mem_gb is not None else None,
            partition=resources.partition,
            account=resources.account,
            qos=resources.qos,
            constraint=resources.constraint,
            exclusive=resources.exclusive or None,
            dependency=dependency,
            # submitit writes --wckey=submitit unless told otherwise: only the user's own wckey, if any.
            wckey=resources.wckey,
            setup=[OFFLINE_SETUP, *resources.setup],
            # Slurm 22.05-23.02 steps do not inherit the batch job's --cpus-per-task: without it each task is
            # pinned to one core where the site binds tasks to cores.
            srun_args=[f"--cpus-per-task={resources.cpus}"],
            array_parallelism=resources.array_parallelism,
            signal_delay_s=resources.signal_delay_s,
            additional_parameters=additional or None,
        )
        # None removes submitit's default for that line (its wckey); everything else that is None is not set.
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None or k == "wckey"})
        return executor

    @staticmethod
    def dependency_for(after: list[Submission]) -> str | None:
        ids = sorted({s.array_job_id for s in after if s.executor == "slurm"})
        return "afterok:" + ":".join(ids) if ids else None

    def sbatch_script(self, stage: str, tasks: list[Task], resources: Resources, after: list[Submission],
                      checkpointable: bool) -> str:
        """The sbatch script `submit` would write, for --dry-run: exactly submitit's, rendered here, so it works
        where Slurm is not installed. Submits nothing."""
        if self.executor_kind != "slurm":
            return f"# {self.executor_kind} executor: {len(tasks)} task(s) run as processes on this machine, no sbatch script\n"
        executor = self._executor(stage, resources, self.dependency_for(after), checkpointable, create_folder=False)
        if len(tasks) > 1:
            executor.parameters["map_count"] = len(tasks)  # what submitit's map_array sets on its copy
        # Both are submitit's own: the text it writes into the submission file, and the command that file runs.
        return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")

    def submit(self, stage: str, tasks: list[Task], resources: Resources, after: list[Submission],
               checkpointable: bool) -> Submission:
        if not tasks:
            raise SchedulerError(f"stage {stage}: nothing to submit")
        if self.executor_kind == "slurm":
            _require_slurm()
        executor = self._executor(stage, resources, self.dependency_for(after), checkpointable)
        # Not checkpointable: submitit still requeues the job on preemption, not on timeout.
        call = _RequeueableStageCall() if checkpointable else _run_in_job
        run_dir = str(self.run.root)
        local = self.executor_kind == "local"
        controller_log = self.run.log_dir(stage) / "local-controller.err" if local else None
        with _without_secrets(), _stderr_to(controller_log), _interruptible_controller(local):
            if len(tasks) == 1:
                jobs = [executor.submit(call, run_dir, tasks[0])]
            else:
                jobs = executor.map_array(call, [run_dir] * len(tasks), tasks)
        self._live_jobs[stage] = jobs
        submission = Submission(
            stage=stage,
            executor=self.executor_kind,
            job_ids=[str(job.job_id) for job in jobs],
            array_size=len(tasks),
            submitted_at=time.time(),
            log_folder=str(self.run.log_dir(stage)),
            tasks=[t.label for t in tasks],
            gpus_per_task=resources.gpus * resources.nodes,
            depends_on=[s.array_job_id for s in after if s.executor == "slurm"],
        )
        self.run.record_submission(submission)
        return submission

    def wait(self, submission: Submission, on_poll=None, poll_s: float = 2.0) -> list[str]:
        """Block until every task of a submission from this process ends; return the errors (empty: success).
        `on_poll()` is called every `poll_s` while tasks still run (progress for the person waiting)."""
        jobs = self._live_jobs.get(submission.stage)
        if jobs is None:
            raise SchedulerError(f"stage {submission.stage} was not submitted by this process; use `status`")
        # Debug jobs run inside result(): there is nothing to poll.
        if on_poll is not None and self.executor_kind != "debug":
            while not all(job.done() for job in jobs):
                on_poll()
                time.sleep(poll_s)
        errors = []
        for job in jobs:
            try:
                job.result()
            except Exception as exc:  # submitit re-raises the task's exception with its traceback
                errors.append(f"job {job.job_id}: {exc}".strip())
        return errors

    # ------------------------------------------------------------------------------------------ logs
    def log_paths(self, submission: Submission, position: int = 0) -> tuple[Path, Path]:
        paths = _job_paths(submission.log_folder, submission.job_ids[position])
        return paths.stdout, paths.stderr

    # ------------------------------------------------------------------------------------------ status
    def query(self, submissions: list[Submission], stats: QueryStats | None = None) -> dict[str, TaskState]:
        """States of every task of the given submissions, by job id ("123" or "123_4")."""
        stats = stats if stats is not None else QueryStats()
        started = time.time()
        states: dict[str, TaskState] = {}
        slurm = [s for s in submissions if s.executor == "slurm"]
        if slurm:
            states.update(self._query_slurm(slurm, stats))
        for submission in submissions:
            if submission.executor != "slurm":
                for position, job_id in enumerate(submission.job_ids):
                    states[job_id] = self._local_state(submission, position)
        stats.seconds += time.time() - started
        return states

    def _run(self, command: list[str], stats: QueryStats) -> subprocess.CompletedProcess:
        stats.commands.append(command)
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise SchedulerError(f"{command[0]} not found: is this a Slurm login node? (or use --executor local)") from None

    def _query_slurm(self, submissions: list[Submission], stats: QueryStats) -> dict[str, TaskState]:
        ids = sorted({s.array_job_id for s in submissions})
        wanted = {job_id for s in submissions for job_id in s.job_ids}
        states = {job_id: TaskState(job_id) for job_id in wanted}

        # sacct first (history, GPU use, requeues); squeue second (fresher for what is still queued).
        stats.sacct_calls += 1
        fields = "JobID,State,ElapsedRaw,AllocTRES,ExitCode,Reason"
        acct = self._run(["sacct", "-n", "-P", "-D", "-X", "-j", ",".join(ids), "-o", fields], stats)
        if acct.returncode == 0:
            for line in acct.stdout.splitlines():
                parts = line.split("|")
                if len(parts) < 6:
                    continue
                raw_id, state, elapsed, tres, exit_code, reason = parts[:6]
                for job_id in _expand_array_ids(raw_id):
                    if job_id not in states:
                        continue
                    entry = states[job_id]
                    state_name = state.split()[0]
                    seconds = int(elapsed or 0)
                    entry.gpu_seconds += _gpus_in_tres(tres) * seconds
                    # -D lists every attempt, oldest first: each earlier line is a requeue, the last is current.
                    if entry.state != "UNKNOWN":
                        entry.requeues += 1
                    entry.state, entry.elapsed_s, entry.exit_code = state_name, seconds, exit_code
                    entry.reason = "" if reason in ("None", "") else reason
        # (sacct failing, e.g. accounting down, leaves UNKNOWN: squeue and the run directory still tell a lot.)

        stats.squeue_calls += 1
        queue = self._run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%M|%r"], stats)
        if queue.returncode == 0:  # non-zero when every id has left the queue ("Invalid job id")
            for line in queue.stdout.splitlines():
                parts = line.split("|")
                if len(parts) < 4 or parts[0] not in states:
                    continue
                entry = states[parts[0]]
                if parts[1] == "COMPLETING" and entry.finished:
                    continue  # accounting already has how it ended (FAILED, say): keep that, it is what matters
                entry.state = parts[1]
                entry.elapsed_s = max(entry.elapsed_s, _clock_to_seconds(parts[2]))
                entry.reason = "" if parts[3] in ("None", "") else parts[3]

        for submission in submissions:
            for position, job_id in enumerate(submission.job_ids):
                entry = states[job_id]
                if entry.state in FAILED_STATES or entry.state.startswith("CANCELLED"):
                    entry.log_err = str(self.log_paths(submission, position)[1])
        return states

    def _local_state(self, submission: Submission, position: int) -> TaskState:
        """Local and debug jobs have no accounting: read submitit's result file, else ask whether the pid lives."""
        job_id = submission.job_ids[position]
        entry = TaskState(job_id)
        paths = _job_paths(submission.log_folder, job_id)
        if not Path(submission.log_folder).resolve().is_relative_to(self.run.root.resolve()):
            # jobs.jsonl is only a text file: a log folder it names outside the run directory (a moved run, an
            # edited file) is never unpickled
            entry.state = "UNKNOWN"
            return entry
        if paths.result_pickle.exists():
            try:
                with open(paths.result_pickle, "rb") as f:  # written by our own job, inside the run directory
                    outcome, _ = pickle.load(f)
            except Exception:
                outcome = "error"
            entry.state = "COMPLETED" if outcome == "success" else "FAILED"
        elif submission.executor == "local" and job_id.isdigit() and _pid_alive(int(job_id)):
            entry.state = "RUNNING"
        else:
            entry.state = "UNKNOWN"
        # No accounting: a task runs from its submission (no queue here) until its result file is written.
        if entry.state == "RUNNING":
            entry.elapsed_s = int(time.time() - submission.submitted_at)
        elif entry.state in ("COMPLETED", "FAILED"):
            entry.elapsed_s = max(0, int(paths.result_pickle.stat().st_mtime - submission.submitted_at))
        entry.gpu_seconds = submission.gpus_per_task * entry.elapsed_s
        if entry.state == "FAILED":
            entry.log_err = str(paths.stderr)
        return entry

    # ------------------------------------------------------------------------------------------ cancel
    def cancel(self, submissions: list[Submission]) -> list[str]:
        cancelled = []
        slurm_ids = sorted({s.array_job_id for s in submissions if s.executor == "slurm"})
        if slurm_ids:
            result = subprocess.run(["scancel", *slurm_ids], capture_output=True, text=True, timeout=60)
            if result.returncode != 0 and "Invalid job id" not in result.stderr:
                raise SchedulerError(f"scancel failed: {result.stderr.strip()}")
            cancelled.extend(slurm_ids)
        for submission in submissions:
            if submission.executor == "local":
                for job_id in submission.job_ids:
                    if job_id.isdigit() and _pid_alive(int(job_id)):
                        # SIGINT, as submitit's own LocalJob.cancel: its tasks ignore SIGTERM (a Slurm pre-kill
                        # warning), and its controller answers SIGINT by killing its tasks.
                        os.kill(int(job_id), signal.SIGINT)
                        cancelled.append(job_id)
        return cancelled


def _job_paths(folder: str, job_id: str):
    """Where submitit keeps a job's logs and result, through its public Job (the job itself is not contacted)."""
    return submitit.Job(folder, job_id).paths


def _require_slurm() -> None:
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise SchedulerError(f"{' and '.join(missing)} not found: submitting needs a Slurm login node (here, "
                             "`--dry-run` prints the sbatch scripts, and `--executor local` runs the stages on this machine)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
