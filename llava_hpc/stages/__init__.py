"""The stages of the pipeline and the order they run in.

Each stage is a module with:
    plan(ctx) -> list[Task]     the tasks still to run (one job, or an array when there are several)
    run(ctx, task) -> dict      do one task; read inputs from and write outputs to the run directory
    is_done(ctx, **plan_options) -> bool
                                whether its `_SUCCESS` marker(s) exist (for what the plan options select)
    progress(ctx) -> str | None optional: a short progress note for `status` (e.g. "37/40 shards")
    reset(ctx)                  optional: what `--force` removes besides the `_SUCCESS` markers
    needs(ctx) -> [stage]       optional: the stages it reads from when that depends on the pipeline
                                (generate reads stage1's model or stage2's); default: StageInfo.after
    inputs_ready(ctx, parent, **plan_options) -> bool
                                optional: whether what it will read from `parent` is there, when that is less
                                than all of `parent` (judge --bench X needs only X's answers); default:
                                the parent's is_done
    preflight(ctx) -> [str]     optional: problems that would make its job fail at once (a model not in the local
                                cache, a missing key file), checked before anything is submitted
    login_side(ctx) -> str|None optional, Slurm only: why the stage is not submitted as a job and what to run on
                                the login side instead (the judge, where compute nodes cannot reach its endpoint)
Stages never import one another: they meet in the run directory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from llava_hpc.rundir import RunDir

if TYPE_CHECKING:
    from llava_hpc.config import Pipeline


@dataclass(frozen=True)
class StageInfo:
    name: str
    after: tuple[str, ...]
    description: str
    module: str | None  # None: not built in this version
    checkpointable: bool = True


STAGES: dict[str, StageInfo] = {
    info.name: info
    for info in (
        StageInfo("features", (), "frozen CLIP features -> Parquet shards", "llava_hpc.stages.features"),
        StageInfo("stage1", ("features",), "train the projector (LLM frozen)", "llava_hpc.stages.stage1"),
        StageInfo("stage2", ("features", "stage1"), "fine-tune projector + LLM with DeepSpeed ZeRO",
                  "llava_hpc.stages.stage2"),
        StageInfo("generate", ("stage2",), "batched answers for every bench", "llava_hpc.stages.generate"),
        StageInfo("judge", ("generate",), "GPT-4 (or any OpenAI-compatible) judge", "llava_hpc.stages.judge"),
        StageInfo("report", ("generate", "judge"), "scores, tables and plots per bench", "llava_hpc.stages.report"),
    )
}
ORDER = list(STAGES)


class StageNotBuiltError(RuntimeError):
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


def built_stages() -> list[str]:
    return [name for name in ORDER if STAGES[name].module is not None]


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise StageNotBuiltError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
    info = STAGES[name]
    if info.module is None:
        raise StageNotBuiltError(
            f"stage {name!r} ({info.description}) is not built in this version of llava-hpc; "
            f"built stages: {', '.join(built_stages())}"
        )
    return importlib.import_module(info.module)


def needs(name: str, ctx: StageContext) -> tuple[str, ...]:
    """The stages `name` reads from in this pipeline."""
    module = stage_module(name) if STAGES[name].module is not None else None
    return tuple(module.needs(ctx)) if hasattr(module, "needs") else STAGES[name].after


def upstream(name: str, wanted: list[str], ctx: StageContext) -> list[str]:
    """The stages in `wanted` that `name` depends on, directly or through stages not in `wanted`."""
    found: list[str] = []
    for parent in needs(name, ctx):
        if parent in wanted:
            found.append(parent)
        else:
            found.extend(upstream(parent, wanted, ctx))
    return list(dict.fromkeys(found))
