"""The stages of the pipeline, the order they run in, and what a stage declares.

Each stage is a module `llava_hpc.stages.<name>` whose `STAGE` is a `Stage`: the functions the orchestrator and
the job call, and its place in the chain. Adding a stage is its module and its name in `ORDER` (and, when it has
settings of its own, its table in `config.py`; any other stage gets a `[stages.<name>]` table with only `slurm`).
The orchestrator, `status` and `doctor` ask the declaration, never the name. Worked example: docs/architecture.md.
Stage modules are imported when first asked for (`get_stage(name)`) and import torch and the like only inside the
functions that need them: `llava-hpc --help` and `status` stay light.
Stages never import one another: they meet in the run directory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from llava_hpc.rundir import RunDir

if TYPE_CHECKING:
    from llava_hpc.config import Pipeline

# The stages in the order they run; each is the module llava_hpc/stages/<name>.py.
ORDER = ("features", "stage1", "stage2", "generate", "judge", "report")


class UnknownStageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Task:
    """One unit of a stage's work: one job, or one task of a job array. Small and picklable on purpose:
    it is what submitit writes to disk, so it holds names and numbers, never data or secrets."""

    stage: str
    index: int
    label: str
    payload: dict = field(default_factory=dict)


@dataclass
class StageContext:
    pipeline: Pipeline
    run: RunDir
    executor: str = "debug"  # where the stages are being submitted (a job rebuilding its context runs in place)
    dry_run: bool = False  # planning for --dry-run: unreadable inputs become warnings, not errors
    warnings: list[str] = field(default_factory=list)


def _nothing_to_say(ctx: StageContext) -> None:
    return None


def _no_problems(ctx: StageContext) -> list[str]:
    return []


@dataclass(frozen=True)
class Stage:
    """A stage's declaration. `plan`, `is_done` and `inputs_ready` take the stage's plan options as keywords (the
    CLI's `judge --bench X` gives `benches=[X]`); a stage without options takes none."""

    name: str
    after: tuple[str, ...]  # the stages it reads from (in every pipeline, unless `needs` says otherwise)
    plan: Callable[..., list[Task]]  # (ctx) -> the tasks still to run: one job, or an array when several
    run: Callable[[StageContext, Task], dict]  # do one task: read inputs from, write outputs to the run directory
    is_done: Callable[..., bool]  # (ctx) -> whether its `_SUCCESS` marker(s) exist
    # Requeued by submitit on preemption and timeout, resuming from its own files (every stage so far can).
    checkpointable: bool = True
    # A short note for `status` ("37/40 shards"), or None.
    progress: Callable[[StageContext], str | None] = _nothing_to_say
    # What `--force` removes besides the `_SUCCESS` markers (feature shards, checkpoints), so it really runs again.
    reset: Callable[[StageContext], None] = _nothing_to_say
    # Problems that would make its job fail at once (a model not in the local cache, a missing key file), checked
    # before anything is submitted.
    preflight: Callable[[StageContext], list[str]] = _no_problems
    # Slurm only: why it is not submitted as a job and what to run on the login side instead (the judge, where
    # compute nodes cannot reach its endpoint), or None.
    login_side: Callable[[StageContext], str | None] = _nothing_to_say
    # Why this pipeline gives it nothing to do at all (no bench), or None.
    not_applicable: Callable[[StageContext], str | None] = _nothing_to_say
    # The stages it reads from when that depends on the pipeline (generate: stage1's model or stage2's); None: after.
    needs: Callable[[StageContext], Sequence[str]] | None = None
    # (ctx, parent, **options) -> whether what it reads from `parent` is there, when that is less than all of the
    # parent (judge --bench X needs only X's answers); None: the parent's is_done.
    inputs_ready: Callable[..., bool] | None = None

    def reads_from(self, ctx: StageContext) -> tuple[str, ...]:
        return tuple(self.needs(ctx)) if self.needs is not None else self.after

    def ready_to_read(self, ctx: StageContext, parent: str, **options) -> bool:
        if self.inputs_ready is not None:
            return self.inputs_ready(ctx, parent, **options)
        return get_stage(parent).is_done(ctx)

    def settings(self, pipeline: Pipeline):
        """Its `[stages.<name>]` table (None for a training stage the pipeline leaves out)."""
        return getattr(pipeline.stages, self.name)


def get_stage(name: str) -> Stage:
    if name not in ORDER:
        raise UnknownStageError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
    return importlib.import_module(f"llava_hpc.stages.{name}").STAGE


def deal_out(items: list, max_tasks: int) -> list[list]:
    """`items` dealt round-robin to at most `max_tasks` array tasks; one (empty) share when there are no items."""
    count = max(1, min(max_tasks, len(items)))
    return [items[k::count] for k in range(count)]


def needs(name: str, ctx: StageContext) -> tuple[str, ...]:
    """The stages `name` reads from in this pipeline."""
    return get_stage(name).reads_from(ctx)


def upstream(name: str, wanted: list[str], ctx: StageContext) -> list[str]:
    """The stages in `wanted` that `name` depends on, directly or through stages not in `wanted`."""
    found: list[str] = []
    for parent in needs(name, ctx):
        if parent in wanted:
            found.append(parent)
        else:
            found.extend(upstream(parent, wanted, ctx))
    return list(dict.fromkeys(found))
