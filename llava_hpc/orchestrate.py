"""Turning `submit STAGE|all`, `run`, `status` and `cancel` into scheduler calls, under the run-directory lock.

On Slurm the whole chain is queued at once, each stage `afterok` the stages it reads from. The local and
debug executors have no queue and no dependencies, so here the project itself runs stages in order, each
waiting for the one before.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from llava_hpc.config import Pipeline
from llava_hpc.rundir import RunDir, Submission, atomic_write_text
from llava_hpc.scheduler import ACTIVE_STATES, FAILED_STATES, QueryStats, Scheduler, SchedulerError, TaskState
from llava_hpc.stages import ORDER, StageContext, get_stage, upstream


class NothingToDo(Exception):
    pass


class PreflightError(RuntimeError):
    """What would make a job fail at once, found before anything was submitted; one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def resolve_stages(requested: str) -> list[str]:
    """'all' -> every stage in order; a stage name -> itself (UnknownStageError, naming the stages, for others)."""
    if requested == "all":
        return list(ORDER)
    get_stage(requested)
    return [requested]


@dataclass
class StageOutcome:
    stage: str
    action: str  # submitted | skipped-done | skipped-active | not-applicable | login-side | dry-run | failed
    message: str
    submission: Submission | None = None
    script: str | None = None


@dataclass
class StageStatus:
    stage: str
    state: str  # not submitted | submitted | pending | running | requeued | done | failed | cancelled | login-side | n/a
    job_ids: list[str] = field(default_factory=list)
    tasks_done: int = 0
    tasks_total: int = 0
    elapsed_s: int = 0
    gpu_hours: float = 0.0
    progress: str | None = None
    reason: str = ""
    log: str = ""


def summarize(stage: str, submission: Submission | None, states: dict[str, TaskState], done: bool) -> StageStatus:
    if submission is None:
        return StageStatus(stage, "done" if done else "not submitted")
    tasks = [states.get(job_id, TaskState(job_id)) for job_id in submission.job_ids]
    names = [t.state for t in tasks]
    status = StageStatus(
        stage,
        "submitted",
        job_ids=submission.job_ids,
        tasks_done=sum(n == "COMPLETED" for n in names),
        tasks_total=len(tasks),
        elapsed_s=max((t.elapsed_s for t in tasks), default=0),
        gpu_hours=sum(t.gpu_seconds for t in tasks) / 3600,
    )
    failed = [t for t in tasks if t.state in FAILED_STATES]
    cancelled = [t for t in tasks if t.state.startswith("CANCELLED")]
    requeued = any(t.requeues for t in tasks)
    if any(n == "RUNNING" for n in names):
        status.state = "running"
    elif any(n in ACTIVE_STATES for n in names):
        status.state = "requeued" if requeued else "pending"
        waiting = {t.reason for t in tasks if t.reason}
        status.reason = ", ".join(sorted(waiting))
    elif failed:
        status.state = "failed"
    elif cancelled:
        status.state = "cancelled"
    elif done:
        status.state = "done"
    elif names and all(n == "COMPLETED" for n in names):
        # Every task ended well but the stage wrote no _SUCCESS: it is not done, and says why.
        status.state = "failed"
        status.reason = "jobs completed but the stage's _SUCCESS marker is missing"
    if requeued and status.state == "running":
        status.state = "running (requeued)"
    for task in failed + cancelled:
        if not status.reason:
            status.reason = f"{task.job_id}: {task.state}" + (f" exit {task.exit_code}" if task.exit_code not in ("", "0:0") else "")
            status.reason += _last_error_line(task.log_err)
        if not status.log and task.log_err:
            status.log = task.log_err
    return status


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(:|$)")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # torch prefixes a distributed process's traceback lines with it


def _last_error_line(path: str) -> str:
    """The exception that killed a task, from the end of its stderr (srun's own epilogue comes after it)."""
    try:
        with open(path, errors="replace") as f:
            lines = [_RANK_PREFIX.sub("", line.strip()) for line in f.readlines()[-200:] if line.strip()]
    except OSError:
        return ""
    for pattern in (_EXCEPTION_LINE, re.compile(r"error", re.I)):
        for line in reversed(lines):
            if pattern.search(line):
                return f" - {line[:300]}"
    return f" - {lines[-1][:300]}" if lines else ""


class Orchestrator:
    def __init__(self, pipeline: Pipeline, run: RunDir, executor: str | None = None):
        self.pipeline = pipeline
        self.run = run
        self.executor = executor or pipeline.executor
        self.scheduler = Scheduler(run, self.executor, python=pipeline.python)
        self.ctx = StageContext(pipeline, run, executor=self.executor)

    # ------------------------------------------------------------------------------------------ status
    def status(self, stats: QueryStats | None = None) -> list[StageStatus]:
        latest = {stage: self.run.latest_submission(stage) for stage in ORDER}
        submissions = [s for s in latest.values() if s is not None]
        states = self.scheduler.query(submissions, stats) if submissions else {}
        rows = []
        for stage in ORDER:
            reason = get_stage(stage).not_applicable(self.ctx)
            if reason and latest[stage] is None:
                rows.append(StageStatus(stage, "n/a", reason=reason))
                continue
            row = summarize(stage, latest[stage], states, get_stage(stage).is_done(self.ctx))
            row.progress = self.progress(stage)
            self._mark_login_side(row, latest[stage], states)
            rows.append(row)
        return rows

    def _mark_login_side(self, row: StageStatus, submission: Submission | None, states: dict) -> None:
        """A stage (or the rest of one) left to the login side shows as such, not as failed or never submitted."""
        if self.executor != "slurm" or row.state not in ("not submitted", "failed"):
            return
        if submission is not None and any(states.get(j, TaskState(j)).state != "COMPLETED" for j in submission.job_ids):
            return  # a job of it really failed
        reason = get_stage(row.stage).login_side(self.ctx)
        if reason:
            row.state, row.reason = "login-side", reason

    def progress(self, stage: str) -> str | None:
        """What a stage's files say about how far it got (step/total, rate, ETA, loss for training)."""
        return get_stage(stage).progress(self.ctx)

    # ------------------------------------------------------------------------------------------ submit
    def submit(self, requested: str, force: bool = False, dry_run: bool = False, wait: bool | None = None,
               on_outcome=None, plan_options: dict | None = None, on_wait=None) -> list[StageOutcome]:
        """Submit the requested stage(s). `wait` defaults to True where there is no queue (local, debug); while it
        waits for a stage, `on_wait(stage)` is called every few seconds. `plan_options`: stage -> keyword arguments
        for its plan() (e.g. {"judge": {"benches": [...]}})."""
        stages = resolve_stages(requested)
        wait = self.executor != "slurm" if wait is None else wait
        self._plan_options = plan_options or {}
        self._on_wait = on_wait
        self.ctx.dry_run = dry_run
        if dry_run:
            self.ctx.warnings.extend(self._preflight(stages, force))
            return self._submit_locked(stages, force, dry_run, wait, on_outcome)
        with self.run.lock(f"llava-hpc submit {requested}"):
            problems = self._preflight(stages, force)
            if problems:
                raise PreflightError(problems)
            return self._submit_locked(stages, force, dry_run, wait, on_outcome)

    def _preflight(self, stages: list[str], force: bool) -> list[str]:
        """Every problem the stages about to be submitted can see from here (models missing from the local cache, a
        judge job without a key), so that a submit fails now, in one message, not at hour 3 in a job."""
        problems: list[str] = []
        for stage in stages:
            declared = get_stage(stage)
            if force or not declared.is_done(self.ctx):
                problems.extend(f"{stage}: {problem}" for problem in declared.preflight(self.ctx))
        return list(dict.fromkeys(problems))

    def _submit_locked(self, stages, force, dry_run, wait, on_outcome) -> list[StageOutcome]:
        if not dry_run:
            self.run.create()
            atomic_write_text(self.run.pipeline_file, self.pipeline.to_toml())
        outcomes: list[StageOutcome] = []
        active: dict[str, Submission] = self._active_submissions(dry_run)
        for stage in stages:
            outcome = self._submit_stage(stage, stages, force, dry_run, active)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
            if outcome.action == "dry-run":
                # What later stages of the dry run would wait on: a placeholder for the job id sbatch would give.
                active[stage] = Submission(stage, "slurm", [f"<{stage}-job-id>"], 1, time.time(), "")
            if outcome.submission is not None:
                active[stage] = outcome.submission
                if wait:
                    poll = (lambda stage=stage: self._on_wait(stage)) if self._on_wait else None
                    errors = self.scheduler.wait(outcome.submission, on_poll=poll)
                    if errors or not get_stage(stage).is_done(self.ctx, **self._plan_options.get(stage, {})):
                        failed = StageOutcome(stage, "failed", "; ".join(errors) or "ended without writing _SUCCESS",
                                              outcome.submission)
                        outcomes.append(failed)
                        if on_outcome:
                            on_outcome(failed)
                        break
        return outcomes

    def _active_submissions(self, dry_run: bool = False) -> dict[str, Submission]:
        """Latest submissions whose jobs are still queued or running and can still succeed: resubmitting them would
        double the work. One that can no longer succeed (a task of it failed, or of a job it waits on `afterok`) is
        not active: its stage is resubmitted for what is left, and its jobs still waiting on that dependency are
        cancelled here (many clusters leave them pending forever, reason DependencyNeverSatisfied)."""
        submissions = self.run.submissions()
        latest = {s.stage: s for s in submissions}  # jobs.jsonl is in submission order: the last one wins
        live = [s for s in latest.values() if s.executor == "slurm"]
        self._replaced: dict[str, str] = {}
        if not live:
            return {}
        by_job = {s.array_job_id: s for s in submissions if s.executor == "slurm"}
        dependencies = {by_job[j].array_job_id: by_job[j] for s in live for j in s.depends_on if j in by_job}
        queried = {s.array_job_id: s for s in [*live, *dependencies.values()]}
        try:
            states = self.scheduler.query(list(queried.values()))
        except SchedulerError as exc:
            if not dry_run:
                raise
            self.ctx.warnings.append(f"earlier submissions of this run directory not checked: {exc}")
            return {}
        tasks_of = {job: [states.get(j, TaskState(j)) for j in s.job_ids] for job, s in queried.items()}

        def doomed(job: str, seen: frozenset = frozenset()) -> bool:
            tasks = tasks_of.get(job)
            if tasks is None or job in seen:
                return False  # a dependency older than anything queried here ended long ago
            if any(t.state in FAILED_STATES or t.state.startswith("CANCELLED") for t in tasks):
                return True
            if any(t.reason.startswith("DependencyNeverSatisfied") for t in tasks):
                return True
            if all(t.state == "COMPLETED" for t in tasks):
                return False
            return any(doomed(dep, seen | {job}) for dep in queried[job].depends_on)

        active = {}
        for s in live:
            tasks = tasks_of[s.array_job_id]
            if not any(t.state in ACTIVE_STATES for t in tasks):
                continue
            if not doomed(s.array_job_id):
                active[s.stage] = s
            elif not dry_run and all(t.state == "PENDING" or t.finished for t in tasks):
                self.scheduler.cancel([s])
                self._replaced[s.stage] = s.array_job_id
        return active

    def _submit_stage(self, stage, stages, force, dry_run, active) -> StageOutcome:
        declared = get_stage(stage)
        if declared.settings(self.pipeline) is None:
            return StageOutcome(stage, "failed", f"the pipeline has no [stages.{stage}] table")
        if (reason := declared.not_applicable(self.ctx)) is not None:
            return StageOutcome(stage, "not-applicable", reason)
        if declared.is_done(self.ctx) and not force:
            return StageOutcome(stage, "skipped-done", "already done (_SUCCESS exists); --force to redo")
        if stage in active and not force:
            ids = ",".join(active[stage].job_ids[:3]) + ("..." if len(active[stage].job_ids) > 3 else "")
            return StageOutcome(stage, "skipped-active", f"already queued or running (job {ids}); --force to resubmit")
        if self.executor == "slurm" and (reason := declared.login_side(self.ctx)):
            return StageOutcome(stage, "login-side", reason)
        options = self._plan_options.get(stage, {})
        waiting_on = [parent for parent in declared.reads_from(self.ctx)
                      if not declared.ready_to_read(self.ctx, parent, **options)
                      and parent not in active and parent not in stages]
        if waiting_on and not dry_run:
            return StageOutcome(stage, "failed", f"needs {', '.join(waiting_on)}, which is neither done nor queued: "
                                                 f"submit {waiting_on[0]} first (or `submit all`)")
        if force and not dry_run:
            self._clear_done(stage)
        tasks = declared.plan(self.ctx, **options)
        if not tasks:
            return StageOutcome(stage, "skipped-done", "nothing left to compute")
        after = [active[parent] for parent in upstream(stage, list(active) + stages, self.ctx) if parent in active]
        resources = self.pipeline.resources(stage)
        if dry_run:
            script = self.scheduler.sbatch_script(stage, tasks, resources, after, declared.checkpointable)
            kind = f"an array of {len(tasks)}" if len(tasks) > 1 else "1 job"
            ranks = resources.nodes * resources.tasks_per_node
            shape = f" of {resources.nodes} node(s) x {resources.tasks_per_node} task(s)" if ranks > 1 else ""
            deps = f", afterok {', '.join(s.stage for s in after)}" if after else ""
            return StageOutcome(stage, "dry-run", f"would submit {kind}{shape}{deps}", script=script)
        submission = self.scheduler.submit(stage, tasks, resources, after, declared.checkpointable)
        kind = f"array of {len(tasks)}" if len(tasks) > 1 else "job"
        deps = f", afterok {','.join(submission.depends_on)}" if submission.depends_on else ""
        if stage in self._replaced:
            deps += f" (cancelled job {self._replaced[stage]}: it waited on a job that failed)"
        return StageOutcome(stage, "submitted", f"{kind} {submission.array_job_id}{deps}", submission)

    def _clear_done(self, stage: str) -> None:
        """--force: remove the stage's completion markers (and whatever its `reset` says) so it runs again."""
        stage_dir = self.run.stage_dir(stage)
        if stage_dir.exists():
            for marker in stage_dir.rglob("_SUCCESS"):
                marker.unlink()
        get_stage(stage).reset(self.ctx)

    # ------------------------------------------------------------------------------------------ wait / cancel
    def wait_until_finished(self, stages: list[str], poll_s: float = 3.0, timeout_s: float | None = None,
                            on_poll=None) -> list[StageStatus]:
        started = time.time()
        while True:
            rows = {row.stage: row for row in self.status()}
            if on_poll:
                on_poll(list(rows.values()))
            wanted = [rows[s] for s in stages if s in rows]
            if any(r.state in ("failed", "cancelled") for r in wanted) or \
                    all(r.state in ("done", "login-side") for r in wanted):
                return wanted
            if timeout_s is not None and time.time() - started > timeout_s:
                raise TimeoutError(f"stages {stages} not finished after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def cancel(self, stage: str | None) -> list[str]:
        stages = [stage] if stage else ORDER
        submissions = [s for s in (self.run.latest_submission(name) for name in stages) if s is not None]
        if not submissions:
            raise NothingToDo("nothing was submitted" + (f" for {stage}" if stage else ""))
        return self.scheduler.cancel(submissions)
