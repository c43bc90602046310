"""Judge stage: every bench the judge scores (llava_hpc.eval.benches.BENCH_KINDS: LLaVA-Bench COCO / In-the-Wild,
folder benches) scored by an LLM judge through any OpenAI-compatible API, the LLaVA-Bench way
(llava_hpc.eval.llava_bench). One task per bench; the judging and what it writes under RUN/judge/<bench>/ are
llava_hpc.eval.judging's.
"""

from __future__ import annotations

import json
from pathlib import Path

from llava_hpc.eval.bench_judging import judge_dir
from llava_hpc.eval.benches import judged_benches
from llava_hpc.eval.endpoint import job_key_problem, judge_placement
from llava_hpc.eval.judging import judge_bench
from llava_hpc.stages import Stage, StageContext, Task


def output_dir(ctx: StageContext, bench: str) -> Path:
    return judge_dir(ctx.run, bench)


def _benches(ctx: StageContext, benches: list[str] | None = None) -> list[str]:
    """The judged benches, or those of them in `benches` (the CLI's --bench)."""
    return [name for name in judged_benches(ctx.pipeline) if benches is None or name in benches]


def is_done(ctx: StageContext, benches: list[str] | None = None) -> bool:
    return all(ctx.run.is_done(output_dir(ctx, name)) for name in _benches(ctx, benches))


def not_applicable(ctx: StageContext) -> str | None:
    """Why this pipeline has nothing for the judge at all (shown instead of a 'done' that never happened)."""
    if _benches(ctx):
        return None
    kinds = sorted({ctx.pipeline.benches[name].kind for name in ctx.pipeline.generate_benches()})
    scored = f" (its benches, {', '.join(kinds)}, are scored without a judge)" if kinds else ""
    return f"no judged bench in this pipeline{scored}"


def plan(ctx: StageContext, benches: list[str] | None = None) -> list[Task]:
    """One task per judged bench not done yet; `benches` limits it (the CLI's --bench)."""
    names = _benches(ctx, benches)
    transport = ctx.pipeline.judge.transport
    return [
        Task(stage="judge", index=index, label=f"{name} ({ctx.pipeline.judge.model}, {transport})",
             payload={"bench": name})
        for index, name in enumerate(name for name in names if not ctx.run.is_done(output_dir(ctx, name)))
    ]


def inputs_ready(ctx: StageContext, parent: str, benches: list[str] | None = None) -> bool:
    """The answers of the benches it will judge, and only those: `judge --bench X` does not wait for the generation
    of other benches (exact-match ones are never judged)."""
    return all(ctx.run.is_done(ctx.run.stage_dir(parent) / name) for name in _benches(ctx, benches))


def run(ctx: StageContext, task: Task) -> dict:
    return judge_bench(ctx.pipeline, ctx.run, task.payload["bench"], local=False)


def login_side(ctx: StageContext) -> str | None:
    """On Slurm: why the judge is not a job (and what to run instead), or None where a job can do it."""
    if not _benches(ctx):
        return None
    placement = judge_placement(ctx.pipeline)
    return None if placement.as_job else placement.reason


def preflight(ctx: StageContext) -> list[str]:
    """What would make a judge job fail at once, found at submit time instead."""
    if not _benches(ctx) or not judge_placement(ctx.pipeline).as_job:
        return []
    problem = job_key_problem(ctx.pipeline)
    return [problem] if problem else []


def batches_pending(ctx: StageContext, bench: str) -> list[dict]:
    """The bench's Batch API batches not collected yet (recorded by the transport in batches.json)."""
    path = output_dir(ctx, bench) / "batches.json"
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["batches"] if not r["collected"]]


def progress(ctx: StageContext) -> str | None:
    notes = []
    for name in _benches(ctx):
        directory = output_dir(ctx, name)
        summary_path = directory / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            score = summary["scores"]["all"]["relative_score"]
            notes.append(f"{name}: {score} % relative ({summary['n']} judged)")
        elif pending := batches_pending(ctx, name):
            done = sum(r.get("completed", 0) for r in pending)
            total = sum(len(r["keys"]) for r in pending)
            notes.append(f"{name}: {len(pending)} batch(es) at the API ({done}/{total} done at the last look); "
                         "collect with `llava-hpc judge --collect`")
        elif (directory / "cache").is_dir():
            notes.append(f"{name}: {sum(1 for _ in (directory / 'cache').glob('*.json'))} replies cached")
    return "; ".join(notes) or None


STAGE = Stage(name="judge", after=("generate",), plan=plan, run=run, is_done=is_done, progress=progress,
              preflight=preflight, login_side=login_side, not_applicable=not_applicable, inputs_ready=inputs_ready)
