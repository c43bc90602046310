"""`llava-hpc`: the command line. Thin on purpose: parse, load the pipeline, call the orchestrator, print."""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from llava_hpc import PIPELINE_ENV
from llava_hpc.rundir import AlreadyLockedError, RunDir, RunDirError, make_private
from llava_hpc.stages import ORDER, UnknownStageError

# Each command imports what it needs when it runs: `--help` loads no pydantic model, `status` no torch, transformers,
# openai or pyarrow (benchmarks/bench_cli.py measures it).
if TYPE_CHECKING:
    from llava_hpc.config import Pipeline

app = typer.Typer(
    name="llava-hpc",
    help=(
        "Train and evaluate LLaVA-style vision-language models on a Slurm cluster.\n\n"
        "A pipeline file (TOML) says what to train and where; every stage runs as a Slurm job (or job array)\n"
        "and hands its outputs to the next through a run directory. Start with the demo, which needs no\n"
        "cluster and no GPU:\n\n"
        "    llava-hpc run -p pipelines/demo.toml\n\n"
        "On a cluster: `llava-hpc submit all`, then `llava-hpc status`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

PipelineOpt = Annotated[
    Optional[Path],
    typer.Option("--pipeline", "-p", help=f"pipeline file (default: ${PIPELINE_ENV}, else ./pipeline.toml)"),
]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="run directory (default: the pipeline's run_dir)")]
ExecutorOpt = Annotated[Optional[str], typer.Option("--executor", help="slurm | local | debug (default: the pipeline's)")]

_SLURM = "Slurm resources (override the pipeline file for this command)"
# The Slurm options a command may take, by the key config.with_resource_overrides knows them by.
SLURM_OPTIONS = {
    "partition": Annotated[Optional[str], typer.Option("--partition", help="Slurm partition for the submitted "
                                                       "stage(s)", rich_help_panel=_SLURM)],
    "account": Annotated[Optional[str], typer.Option("--account", help="Slurm account to charge",
                                                     rich_help_panel=_SLURM)],
    "qos": Annotated[Optional[str], typer.Option("--qos", help="Slurm QOS", rich_help_panel=_SLURM)],
    "time": Annotated[Optional[str], typer.Option("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS",
                                                  rich_help_panel=_SLURM)],
    "gpus": Annotated[Optional[int], typer.Option("--gpus", help="GPUs per node", rich_help_panel=_SLURM)],
    "nodes": Annotated[Optional[int], typer.Option("--nodes", help="nodes per job (multi-node training: one task "
                                                   "per GPU)", rich_help_panel=_SLURM)],
}


def slurm_options(*keys: str):
    """Give a command the named Slurm options (SLURM_OPTIONS), declared once here, and hand their values to it as
    one `overrides` dict. Typer reads a command's parameters from its signature, so the wrapper's signature is the
    command's own (less `overrides`) plus one keyword parameter per option."""
    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "overrides"]
        added = [inspect.Parameter(f"slurm_{key}", inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation=SLURM_OPTIONS[key]) for key in keys]

        @functools.wraps(command)
        def with_overrides(*args, **kwargs):
            overrides = {key: kwargs.pop(f"slurm_{key}", None) for key in keys}
            return command(*args, overrides=overrides, **kwargs)

        with_overrides.__signature__ = inspect.Signature([*own, *added])
        with_overrides.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        return with_overrides
    return decorate


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _load(pipeline_opt: Path | None, run_dir_opt: Path | None,
          warnings: list[str] | None = None) -> tuple[Pipeline, RunDir]:
    """The pipeline and run directory a command works on. With only --run-dir, the run's own resolved copy
    of the pipeline is used, so `status`/`logs`/`cancel` work from anywhere. With `warnings` (a dry run), missing
    files and unset variables are collected there instead of failing."""
    from llava_hpc.config import PipelineError, find_pipeline, load_pipeline

    check = warnings is None
    try:
        if pipeline_opt is None and run_dir_opt is not None and not os.environ.get(PIPELINE_ENV) \
                and not Path("pipeline.toml").exists() and (run_dir_opt / "pipeline.toml").exists():
            pipeline = load_pipeline(run_dir_opt / "pipeline.toml", check_files=check, warnings=warnings)
        else:
            pipeline = load_pipeline(find_pipeline(pipeline_opt), check_files=check, warnings=warnings)
    except PipelineError as exc:
        _fail(str(exc))
    if run_dir_opt is not None:
        pipeline = pipeline.model_copy(update={"run_dir": run_dir_opt.expanduser().resolve()})
    return pipeline, RunDir(pipeline.run_dir)


def _orchestrator(pipeline: Pipeline, run: RunDir, executor: str | None):
    from llava_hpc.orchestrate import Orchestrator
    from llava_hpc.scheduler import SchedulerError

    try:
        return Orchestrator(pipeline, run, executor)
    except SchedulerError as exc:
        _fail(str(exc))


def _apply_overrides(pipeline: Pipeline, stages: list[str], **overrides) -> Pipeline:
    from llava_hpc.config import PipelineError, with_resource_overrides

    try:
        return with_resource_overrides(pipeline, stages, **overrides)
    except PipelineError as exc:
        _fail(str(exc))


def _stages_for(stage: str) -> list[str]:
    from llava_hpc.orchestrate import resolve_stages

    try:
        return resolve_stages(stage)
    except UnknownStageError as exc:
        _fail(str(exc))


def _print_outcome(outcome) -> None:
    colour = {"submitted": "green", "failed": "red", "dry-run": "cyan", "login-side": "magenta",
              "not-applicable": "dim"}.get(outcome.action, "yellow")
    console.print(f"[bold]{outcome.stage:9}[/] [{colour}]{outcome.action}[/] {outcome.message}", highlight=False)
    if outcome.script:
        console.print(outcome.script, markup=False, highlight=False)


class _Progress:
    """What a person waiting sees between the "submitted" lines: on a terminal one live line (spinner, stage, elapsed,
    its progress); elsewhere (a Slurm .out file, CI, nohup) a plain line per running stage every
    $LLAVA_HPC_PROGRESS_S seconds (default 30): step/total, rate, ETA and loss for training."""

    def __init__(self, progress_of):
        self.progress_of = progress_of  # stage -> its progress text (the orchestrator's)
        self.every_s = float(os.environ.get("LLAVA_HPC_PROGRESS_S", "30"))
        self.started: dict[str, float] = {}
        self.printed: dict[str, float] = {}
        self.live = None

    def waiting_on(self, stage: str) -> None:
        """Called every few seconds while the stage runs here (local executor)."""
        now = time.time()
        started = self.started.setdefault(stage, now)
        self.show(stage, self.progress_of(stage), now - started)

    def show(self, stage: str, text: str | None, elapsed_s: float) -> None:
        line = f"{stage:9} running {_elapsed(max(1, elapsed_s))}" + (f"  {text}" if text else "")
        if console.is_terminal:
            if self.live is None:
                self.live = console.status("")
                self.live.start()
            self.live.update(line)
            return
        now = time.time()
        if now - self.printed.get(stage, now - elapsed_s) >= self.every_s:
            console.print(f"{time.strftime('%H:%M:%S')} {line}", highlight=False, markup=False, soft_wrap=True)
            self.printed[stage] = now

    def rows(self, rows) -> None:
        """A poll of `status` (Slurm): a line for each running stage."""
        for row in rows:
            if row.state.startswith("running"):
                self.show(row.stage, row.progress, row.elapsed_s)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


# The signal that stopped a submitting command, when it was not Ctrl-C (see _stop_like_ctrl_c).
_stopped_by: int | None = None


def _stop_like_ctrl_c() -> None:
    """SIGTERM (`kill`, a CI or `timeout` limit) and SIGHUP (the terminal closed) stop a submitting command as
    Ctrl-C does. Otherwise they end it on the spot and the stages it started on this machine live on (their tasks
    ignore SIGTERM, Slurm's pre-kill warning), training beside the rerun in the same run directory. A signal the
    caller chose to ignore (`nohup`) stays ignored. The main thread only, where signal.signal works."""

    def stop(signum, frame):
        global _stopped_by
        _stopped_by = signum
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, stop)


def _interrupted(orchestrator) -> None:
    """Ctrl-C (or SIGTERM/SIGHUP): stages that run on this machine stop with this command (their finished work is
    kept: shards, checkpoints, answer chunks, `_SUCCESS` markers); Slurm jobs are the queue's and go on. The exit
    code is the shell's for the signal: 128 + its number."""
    code = 128 + (_stopped_by or signal.SIGINT)
    what = f"{signal.Signals(_stopped_by).name} received" if _stopped_by else "interrupted"
    if orchestrator.executor == "local":
        from llava_hpc.orchestrate import NothingToDo

        try:
            stopped = orchestrator.cancel(None)
        except NothingToDo:
            stopped = []
        stages = f"stopped the running stage (pid {', '.join(stopped)})" if stopped else "nothing was running"
        _fail(f"{what}: {stages}; finished stages and saved work are kept. Run the same command again to go on "
              "from there.", code=code)
    _fail(f"{what}: the Slurm jobs already submitted go on (`llava-hpc status`; `llava-hpc cancel` stops them)",
          code=code)


def _submit(stage, pipeline_opt, run_dir, executor, force, dry_run, wait, overrides, plan_options=None):
    make_private()
    _stop_like_ctrl_c()
    warnings: list[str] | None = [] if dry_run else None
    pipeline, run = _load(pipeline_opt, run_dir, warnings)
    stages = _stages_for(stage)
    pipeline = _apply_overrides(pipeline, stages, **overrides)
    orchestrator = _orchestrator(pipeline, run, executor)
    from llava_hpc.config import PipelineError
    from llava_hpc.orchestrate import PreflightError
    from llava_hpc.scheduler import SchedulerError

    progress = _Progress(orchestrator.progress)
    try:
        outcomes = orchestrator.submit(stage, force=force, dry_run=dry_run, wait=wait, on_outcome=_print_outcome,
                                       plan_options=plan_options, on_wait=progress.waiting_on)
    except AlreadyLockedError as exc:
        _fail(f"another llava-hpc command is submitting into this run directory: {exc}")
    except PreflightError as exc:
        _fail("nothing was submitted; fix these first:\n" + "\n".join(f"  - {p}" for p in exc.problems))
    except SchedulerError as exc:
        _fail(str(exc))
    except RunDirError as exc:
        _fail(str(exc))
    except (UnknownStageError, PipelineError, ValueError, OSError) as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        progress.stop()
        _interrupted(orchestrator)
    finally:
        progress.stop()
    if dry_run:
        for warning in dict.fromkeys([*(warnings or []), *orchestrator.ctx.warnings]):
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if any(o.action == "failed" for o in outcomes):
        raise typer.Exit(1)
    return pipeline, run, orchestrator, outcomes


@app.command()
@slurm_options("partition", "account", "qos", "time", "gpus", "nodes")
def submit(
    stage: Annotated[str, typer.Argument(help=f"a stage ({', '.join(ORDER)}) or 'all'")],
    pipeline: PipelineOpt = None,
    run_dir: RunDirOpt = None,
    executor: ExecutorOpt = None,
    force: Annotated[bool, typer.Option("--force", help="redo stages that are done or already queued")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the sbatch script(s); submit nothing; needs no Slurm")] = False,
    overrides: dict | None = None,
):
    """Submit a stage (or 'all', chained with afterok) as Slurm job(s). Done stages are skipped.

    On the local executor stages run on this machine, one after the other, and this command waits."""
    _submit(stage, pipeline, run_dir, executor, force, dry_run, None, overrides)


@app.command()
@slurm_options("partition", "account", "qos", "time", "gpus", "nodes")
def run(
    pipeline: PipelineOpt = None,
    run_dir: RunDirOpt = None,
    executor: ExecutorOpt = None,
    force: Annotated[bool, typer.Option("--force", help="redo stages that are done")] = False,
    poll: Annotated[float, typer.Option(help="seconds between status checks")] = 3.0,
    overrides: dict | None = None,
):
    """Submit every stage and wait for the end, showing progress. The demo's main job:

        llava-hpc run -p pipelines/demo.toml"""
    started = time.time()
    pipeline_obj, run_obj, orchestrator, outcomes = _submit("all", pipeline, run_dir, executor, force, False, None,
                                                            overrides)
    # What is left to the login side (a judge compute nodes cannot reach) is not waited for here.
    stages = [o.stage for o in outcomes if o.action not in ("login-side", "not-applicable")]
    if orchestrator.executor == "slurm":
        try:
            if console.is_terminal:
                with Live(console=console, refresh_per_second=1) as live:
                    rows = orchestrator.wait_until_finished(
                        stages, poll_s=poll, on_poll=lambda r: live.update(_status_table(r, run_obj)))
            else:  # a log: progress lines, then the final table
                rows = orchestrator.wait_until_finished(stages, poll_s=poll,
                                                        on_poll=_Progress(orchestrator.progress).rows)
                console.print(_status_table(rows, run_obj))
        except KeyboardInterrupt:
            _interrupted(orchestrator)
    else:
        rows = [r for r in orchestrator.status() if r.stage in stages]
        console.print(_status_table(rows, run_obj))
    failed = [r for r in rows if r.state not in ("done", "login-side", "n/a")]
    console.print(f"finished in {time.time() - started:.0f} s; run directory: {run_obj.root}")
    if failed:
        _fail(", ".join(f"{r.stage} {r.state}" for r in failed), code=1)


def _elapsed(seconds: int) -> str:
    if not seconds:
        return "-"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


STATE_STYLE = {"done": "green", "running": "cyan", "pending": "yellow", "requeued": "magenta", "failed": "bold red",
               "cancelled": "red", "not submitted": "dim", "submitted": "yellow", "login-side": "magenta", "n/a": "dim"}


def _status_table(rows, run: RunDir) -> Table:
    table = Table(title=f"llava-hpc  {run.root}", title_justify="left")
    for column in ("stage", "state", "job", "tasks", "elapsed", "GPU-h", "progress / reason"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = STATE_STYLE.get(row.state) or STATE_STYLE.get(row.state.split()[0], "white")
        job = row.job_ids[0].split("_")[0] if row.job_ids else "-"
        tasks = f"{row.tasks_done}/{row.tasks_total}" if row.tasks_total else "-"
        note = " ".join(x for x in (row.progress or "", row.reason) if x)
        if row.log:
            note += f"\nlog: {row.log}"
        table.add_row(row.stage, f"[{style}]{row.state}[/]", job, tasks, _elapsed(row.elapsed_s),
                      f"{row.gpu_hours:.2f}" if row.gpu_hours else "-", note)
    return table


@app.command()
def status(
    pipeline: PipelineOpt = None,
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
):
    """One table: each stage's state, job id, array progress, elapsed time, GPU-hours, and why it failed.

    Asks Slurm with one squeue and one sacct call, however many jobs there are."""
    if run_dir is not None and not run_dir.expanduser().is_dir():
        _fail(f"{run_dir}: no such run directory (a typo? `llava-hpc status -p PIPELINE` finds the pipeline's own)")
    pipeline_obj, run = _load(pipeline, run_dir)
    orchestrator = _orchestrator(pipeline_obj, run, None)
    from llava_hpc.scheduler import SchedulerError

    try:
        rows = orchestrator.status()
    except SchedulerError as exc:
        _fail(str(exc))
    if as_json:
        from dataclasses import asdict

        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        console.print(_status_table(rows, run))
        if not run.root.exists():
            console.print(f"nothing submitted yet: {run.root} does not exist. Start with `llava-hpc submit all` "
                          "(or `llava-hpc run` on the local executor).", highlight=False)


@app.command()
def logs(
    stage: Annotated[str, typer.Argument(help="stage whose log to show")],
    pipeline: PipelineOpt = None,
    run_dir: RunDirOpt = None,
    task: Annotated[Optional[int], typer.Option("--task", help="array task (default: the first failed, else 0)")] = None,
    stdout: Annotated[bool, typer.Option("--stdout", help="show stdout instead of stderr")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing as the log grows, until the job ends")] = False,
):
    """Print a stage's job log (stderr by default, where Python logs and tracebacks go)."""
    pipeline_obj, run = _load(pipeline, run_dir)
    if stage not in ORDER:
        _fail(f"unknown stage {stage!r}; stages: {', '.join(ORDER)}")
    submission = run.latest_submission(stage)
    if submission is None:
        _fail(f"stage {stage} was never submitted in {run.root}")
    orchestrator = _orchestrator(pipeline_obj, run, submission.executor)
    states = orchestrator.scheduler.query([submission])
    if task is None:
        failed = [i for i, j in enumerate(submission.job_ids) if states[j].state not in ("COMPLETED", "RUNNING", "PENDING", "UNKNOWN")]
        task = failed[0] if failed else 0
    if not 0 <= task < len(submission.job_ids):
        _fail(f"stage {stage} has tasks 0..{len(submission.job_ids) - 1}")
    out, err = orchestrator.scheduler.log_paths(submission, task)
    path = out if stdout else err
    console.print(f"[dim]{path}[/]", highlight=False)
    position = 0
    while True:
        if path.exists():
            with open(path, errors="replace") as f:
                f.seek(position)
                chunk = f.read()
                position = f.tell()
            sys.stdout.write(chunk)
            sys.stdout.flush()
        if not follow:
            if not path.exists():
                _fail(f"no log yet at {path} (job {submission.job_ids[task]} has not started?)", code=1)
            return
        state = orchestrator.scheduler.query([submission])[submission.job_ids[task]]
        if state.finished:
            return
        time.sleep(1.0)


@app.command()
def cancel(
    stage: Annotated[Optional[str], typer.Argument(help="stage to cancel (default: every stage)")] = None,
    pipeline: PipelineOpt = None,
    run_dir: RunDirOpt = None,
):
    """Cancel the queued or running job(s) of a stage, or of every stage."""
    from llava_hpc.orchestrate import NothingToDo
    from llava_hpc.scheduler import SchedulerError

    if stage is not None and stage not in ORDER:
        _fail(f"unknown stage {stage!r}; stages: {', '.join(ORDER)}")
    pipeline_obj, run = _load(pipeline, run_dir)
    orchestrator = _orchestrator(pipeline_obj, run, None)
    try:
        cancelled = orchestrator.cancel(stage)
    except (NothingToDo, SchedulerError) as exc:
        _fail(str(exc), code=1)
    console.print(f"cancelled: {', '.join(cancelled) or 'nothing was running'}")


@app.command()
def validate(
    pipeline: PipelineOpt = None,
    check_files: Annotated[bool, typer.Option(help="check that dataset and bench files exist")] = True,
):
    """Check a pipeline file and print it resolved (absolute paths, defaults filled in)."""
    from llava_hpc.config import PipelineError, find_pipeline, load_pipeline

    try:
        resolved = load_pipeline(find_pipeline(pipeline), check_files=check_files)
    except PipelineError as exc:
        _fail(str(exc))
    console.print(resolved.to_toml(), markup=False, highlight=False)


@app.command()
@slurm_options("account", "qos")
def doctor(
    pipeline: PipelineOpt = None,
    run_dir: RunDirOpt = None,
    online: Annotated[bool, typer.Option("--online", help="send the judge one request of max_tokens=1")] = False,
    probe: Annotated[bool, typer.Option("--probe", help="submit a 1-minute job: bf16, run-dir writes and an "
                                                        "all-reduce on the training stage's nodes")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    overrides: dict | None = None,
):
    """Check, before the first submit, what jobs would trip over: Slurm, account/QOS, partitions and GPUs, the run
    directory (shared, writable, room for the features), models offline, data files, the judge's key. Exit 1 on any
    error. See docs/doctor.md."""
    from rich.markup import escape

    from llava_hpc import doctor as checks

    warnings: list[str] = []
    pipeline_obj, _ = _load(pipeline, run_dir, warnings)
    # The account and QOS a submit would be given on its command line (sites often leave them out of the file).
    pipeline_obj = _apply_overrides(pipeline_obj, list(ORDER), **overrides)
    results = checks.run_checks(pipeline_obj, online=online, probe=probe, pipeline_warnings=warnings,
                                say=lambda text: err_console.print(f"[dim]{escape(text)}[/]", highlight=False))
    if as_json:
        print(json.dumps(checks.as_dicts(results), indent=1))
    else:
        table = Table(title=f"llava-hpc doctor  {pipeline_obj.name}", title_justify="left")
        for column in ("check", "status", "detail", "fix"):
            table.add_column(column, overflow="fold")
        style = {"ok": "green", "warning": "yellow", "error": "bold red", "skipped": "dim"}
        for r in results:
            table.add_row(escape(r.name), f"[{style[r.status]}]{r.status}[/]", escape(r.detail), escape(r.fix))
        console.print(table)
    if checks.has_errors(results):
        raise typer.Exit(1)


@app.command()
@slurm_options("partition", "account", "qos", "time")
def judge(
    bench: Annotated[Optional[str], typer.Option("--bench", help="bench to judge (default: every judged bench)")] = None,
    pipeline: PipelineOpt = None,
    run_dir: RunDirOpt = None,
    local: Annotated[bool, typer.Option("--local", help="judge here, in this process, instead of a Slurm job")] = False,
    collect: Annotated[bool, typer.Option("--collect", help="Batch API: fetch finished batches (submitting follow-up "
                                                           "batches where a bench needs them); never waits")] = False,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="Batch API on the login side: stay until "
                                                 "the batches finish (default: submit and return)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count requests, tokens and cost; send nothing")] = False,
    executor: ExecutorOpt = None,
    force: Annotated[bool, typer.Option("--force", help="judge again (cached replies are still reused)")] = False,
    overrides: dict | None = None,
):
    """Judge a bench's answers with GPT-4 or any OpenAI-compatible endpoint (the reference LLaVA-Bench protocol).

    Where compute nodes reach the endpoint (a cluster address, or a partition the profile marks as having internet)
    and the transport is sync, this submits the judge job. Otherwise it judges here, on the login side: sync requests
    go out at once; the Batch API submits the batches and returns (`--collect` later fetches the reviews). Once a
    bench is judged here its report is written too. The key is read from the environment variable named by
    judge.api_key_env (a job reads judge.api_key_file); it is never written into the run directory or given to sbatch.
    Replies are cached by content: rerunning never pays twice for the same judgement."""
    pipeline_obj, run = _load(pipeline, run_dir)
    if bench is not None and bench not in pipeline_obj.benches:
        _fail(f"no bench {bench!r} in the pipeline; benches: {', '.join(pipeline_obj.benches) or 'none'}")
    from llava_hpc.eval.bench_judging import AnswersFileError, judge_dir
    from llava_hpc.eval.benches import judged_benches
    from llava_hpc.eval.endpoint import judge_placement

    names = [bench] if bench else None
    if bench is not None and bench not in judged_benches(pipeline_obj):
        _fail(f"bench {bench!r} ({pipeline_obj.benches[bench].kind}) needs no judge: it is scored by exact match")
    if dry_run:
        from llava_hpc.eval.judge_estimate import dry_run_estimate

        _print_estimate(dry_run_estimate(pipeline_obj, run, names))
        return
    where = executor or pipeline_obj.executor
    placement = judge_placement(pipeline_obj)
    if not (local or collect) and (where != "slurm" or placement.as_job):
        _submit("judge", pipeline, run_dir, executor, force, False, None, overrides,
                plan_options={"judge": {"benches": names}} if names else None)
        return
    if where == "slurm" and not (local or collect):
        console.print(f"[dim]judging on this machine: {placement.reason.split(':')[0]}[/]", highlight=False)
    batch = pipeline_obj.judge.transport == "batch"
    wait = (not batch or where != "slurm") if wait is None else wait
    make_private()
    from llava_hpc.eval.judge_transport import JudgeTransportError, MissingApiKeyError
    from llava_hpc.eval.judging import JudgeIncompleteError, judge_bench

    pending = False
    for name in names or judged_benches(pipeline_obj):
        if run.is_done(judge_dir(run, name)) and not force:
            console.print(f"{name}: already judged (--force to judge again)", highlight=False)
            continue
        if collect and batch and not (judge_dir(run, name) / "batches.json").exists():
            _fail(f"{name}: nothing to collect: no batch was submitted for it; run `llava-hpc judge --bench {name}`")
        try:
            summary = judge_bench(pipeline_obj, run, name, local=True, wait=wait and not collect)
        except (MissingApiKeyError, JudgeTransportError, JudgeIncompleteError, AnswersFileError,
                FileNotFoundError, ValueError) as exc:
            _fail(f"{name}: {exc}", code=1)
        if "pending" in summary:
            pending = True
            console.print(f"{name}: {summary['pending']}; collect with `llava-hpc judge --collect"
                          f"{' --bench ' + name if bench else ''}`", highlight=False)
            continue
        console.print(f"{name}: {json.dumps(summary.get('scores', {}).get('all', summary), default=str)}", highlight=False)
        _report_here(pipeline_obj, run, name)
    if pending:
        raise typer.Exit(0)


def _report_here(pipeline: Pipeline, run: RunDir, bench: str) -> None:
    """A bench judged on the login side gets its report here too: a few seconds of CPU, no job needed."""
    from llava_hpc.orchestrate import Orchestrator

    outcomes = Orchestrator(pipeline, run, "debug").submit("report", plan_options={"report": {"benches": [bench]}})
    if any(o.action == "failed" for o in outcomes):
        _fail(f"{bench}: judged, but its report failed: {outcomes[-1].message}", code=1)
    console.print(f"{bench}: report in {run.stage_dir('report') / bench}", highlight=False)


def _print_estimate(estimate: dict) -> None:
    table = Table(title="judge dry run: nothing sent", title_justify="left")
    for column in ("bench", "phase", "model", "requests", "cached", "to send", "prompt tok", "completion tok",
                   "sync $", "batch $"):
        table.add_column(column, justify="right" if column not in ("bench", "phase", "model") else "left")
    money = lambda value: "?" if value is None else f"{value:.3f}"  # noqa: E731 - unknown price: say so
    for name, bench in estimate.items():
        for phase in bench["phases"]:
            table.add_row(name, phase["phase"], phase["model"], str(phase["requests"]), str(phase["cached"]),
                          str(phase["to_send"]), f"{phase['prompt_tokens']:,}", f"{phase['completion_tokens']:,}",
                          money(phase["cost_sync_usd"]), money(phase["cost_batch_usd"]))
    console.print(table)
    for name, bench in estimate.items():
        for note in bench["notes"]:
            console.print(f"[dim]{name}: {note}[/]", highlight=False)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option("--out", help="directory to write (replaced if it exists)")],
    pipeline: PipelineOpt = None,
    run_dir: RunDirOpt = None,
    stage: Annotated[Optional[str], typer.Option(help="stage1 or stage2 (default: the latest done)")] = None,
):
    """Write a trained model in transformers' Llava format: loads with LlavaForConditionalGeneration and
    AutoProcessor, no llava-hpc needed. After stage 1 alone: the base LLM with the trained projector."""
    from llava_hpc.model.export import export_llava
    from llava_hpc.stages import StageContext
    from llava_hpc.stages.common import load_trained_model

    pipeline_obj, run = _load(pipeline, run_dir)
    ctx = StageContext(pipeline_obj, run)
    if stage is None:
        stage = "stage2" if run.is_done(run.stage_dir("stage2")) else "stage1"
    if stage not in ("stage1", "stage2"):
        _fail(f"--stage must be stage1 or stage2, got {stage!r}")
    try:
        model, template, model_id = load_trained_model(ctx, stage)
    except (FileNotFoundError, OSError) as exc:
        _fail(str(exc))
    export_llava(model, template.tokenizer, model.vision_tower.image_processor, out, template.name)
    console.print(f"exported {model_id} to {out}")


@app.command()
def chat(
    question: Annotated[str, typer.Argument(help="the question about the image")],
    model: Annotated[Path, typer.Option("--model", help="an exported model directory (e.g. RUN/stage2/model)")],
    image: Annotated[Path, typer.Option("--image", help="the image file")],
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 512,
):
    """Ask a trained model one question about one image (greedy by default)."""
    if not image.is_file():  # before the model loads: a typo should not cost a minute
        _fail(f"image {image} does not exist")
    if not model.is_dir():
        _fail(f"model {model} does not exist (an exported model directory, e.g. RUN/stage2/model)")
    from llava_hpc.model.export import chat as chat_with

    try:
        answer = chat_with(model, image, question, temperature=temperature, max_new_tokens=max_new_tokens)
    except (FileNotFoundError, OSError, ValueError) as exc:
        _fail(str(exc))
    print(answer)


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="show the Python traceback of an unexpected error")] = False,
):
    """Options for every command (before the command's name: `llava-hpc --debug status`)."""


def main() -> None:
    """The entry point: an error a user can cause is one message (the commands say which file, record and field);
    an unexpected one is one line too, with its traceback only under --debug."""
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence; --debug shows everything
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
        err_console.print("  (unexpected: `llava-hpc --debug ...` shows the traceback; please report it)",
                          highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
