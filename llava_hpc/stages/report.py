"""Report stage: one task per bench, `RUN/report/<bench>/summary.json`, `report.md` and a plot.

- Benches with exact answers (the synthetic bench): exact match overall and per category, n, chance, the
  answering model, and a bar per category against chance (`llava_hpc.eval.exact_report`).
- Judged benches (LLaVA-Bench, folder benches): from the judge's summary, per category and "all" the relative
  score as the reference defines it (ratio of means x 100) with both means, n and parse failures, the
  per-question distribution, the baseline's scores where the bench has one, judge and answer models, spend,
  and a box plot of per-question relative scores (`llava_hpc.eval.judged_report`).
Which a bench gets is its kind's (`llava_hpc.eval.benches.BENCH_KINDS`), decided without reading its files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from llava_hpc import faults
from llava_hpc.eval import exact_report, judged_report
from llava_hpc.eval.benches import bench_kind, load_bench
from llava_hpc.eval.endpoint import judge_placement
from llava_hpc.rundir import atomic_write_json, read_jsonl
from llava_hpc.stages import Stage, StageContext, Task

log = logging.getLogger("llava_hpc.report")


def output_dir(ctx: StageContext, bench: str) -> Path:
    return ctx.run.stage_dir("report") / bench


def _judged(ctx: StageContext, name: str) -> bool:
    return bench_kind(ctx.pipeline, name).judged


def is_done(ctx: StageContext, benches: list[str] | None = None) -> bool:
    return all(ctx.run.is_done(output_dir(ctx, name)) for name in ctx.pipeline.generate_benches()
               if benches is None or name in benches)


def not_applicable(ctx: StageContext) -> str | None:
    return None if ctx.pipeline.generate_benches() else "no bench in this pipeline"


def _after_login_judging(ctx: StageContext) -> str | None:
    later = [name for name in ctx.pipeline.generate_benches()
             if _judged_on_login_side(ctx, name) and not ctx.run.is_done(output_dir(ctx, name))]
    return f"{', '.join(later)}: written by `llava-hpc judge` on the login side once judged" if later else None


def login_side(ctx: StageContext) -> str | None:
    """When what is left to report is only benches judged on the login side: no job for it, and why."""
    return None if plan(ctx) else _after_login_judging(ctx)


def _judged_on_login_side(ctx: StageContext, name: str) -> bool:
    """A judged bench whose judging is not a job of this chain (on Slurm: the Batch API, an endpoint compute nodes
    cannot reach): its report is written by the login side's `llava-hpc judge` once the reviews are in."""
    return (ctx.executor == "slurm" and _judged(ctx, name)
            and not ctx.run.is_done(ctx.run.stage_dir("judge") / name) and not judge_placement(ctx.pipeline).as_job)


def plan(ctx: StageContext, benches: list[str] | None = None) -> list[Task]:
    names = [name for name in ctx.pipeline.generate_benches() if benches is None or name in benches]
    return [
        Task(stage="report", index=index, label=f"{name} ({bench_kind(ctx.pipeline, name).label})",
             payload={"bench": name})
        for index, name in enumerate(
            name for name in names
            if not ctx.run.is_done(output_dir(ctx, name)) and not _judged_on_login_side(ctx, name))
    ]


def inputs_ready(ctx: StageContext, parent: str, benches: list[str] | None = None) -> bool:
    """The answers and reviews of the benches it will report now (those judged later on the login side are not
    waited for)."""
    names = [task.payload["bench"] for task in plan(ctx, benches)]
    if parent == "judge":
        names = [name for name in names if _judged(ctx, name)]
    return all(ctx.run.is_done(ctx.run.stage_dir(parent) / name) for name in names)


def run(ctx: StageContext, task: Task) -> dict:
    name = task.payload["bench"]
    faults.pause("before_report")
    return _report_judged(ctx, name) if _judged(ctx, name) else _report_exact(ctx, name)


def _report_exact(ctx: StageContext, name: str) -> dict:
    data = load_bench(name, ctx.pipeline.benches[name], ctx.pipeline)
    generated = ctx.run.stage_dir("generate") / name
    if not ctx.run.is_done(generated):
        raise FileNotFoundError(
            f"{generated / 'answers.jsonl'}: generate is not done for bench {name!r}; submit generate first"
        )
    summary = exact_report.summarize(data, read_jsonl(generated / "answers.jsonl"), generated / "answers.jsonl")
    directory = output_dir(ctx, name)
    atomic_write_json(directory / "summary.json", summary)
    exact_report.write_report(summary, directory)
    ctx.run.mark_done(directory, {"exact_match": summary["exact_match"], "n": summary["n"]})
    log.info("%s: exact match %.3f over %d questions (chance %.3f)", name, summary["exact_match"], summary["n"],
             summary["chance"])
    return {"bench": name, "exact_match": summary["exact_match"], "n": summary["n"]}


def _report_judged(ctx: StageContext, name: str) -> dict:
    judged = ctx.run.stage_dir("judge") / name
    if not ctx.run.is_done(judged):
        raise FileNotFoundError(f"{judged / 'reviews.jsonl'}: the judge is not done for bench {name!r}; submit judge first")
    judge_summary = json.loads((judged / "summary.json").read_text())
    directory = output_dir(ctx, name)
    atomic_write_json(directory / "summary.json", judged_report.bench_summary(name, judge_summary))
    judged_report.write_report(judge_summary, directory)
    score = judge_summary["scores"]["all"]["relative_score"]
    ctx.run.mark_done(directory, {"relative_score": score, "n": judge_summary["scores"]["all"]["n"]})
    log.info("%s: relative score %s %% (judge %s)", name, score, judge_summary.get("judge_model"))
    return {"bench": name, "relative_score": score}


def progress(ctx: StageContext) -> str | None:
    notes = []
    for name in ctx.pipeline.generate_benches():
        summary_path = output_dir(ctx, name) / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if summary["metric"] == exact_report.METRIC:
                score, chance = exact_report.percent(summary["exact_match"]), exact_report.percent(summary["chance"])
                notes.append(f"{name}: {score} exact match (chance {chance})")
            else:
                notes.append(f"{name}: {summary['all']['relative_score']} % relative")
        elif _judged_on_login_side(ctx, name):
            notes.append(f"{name}: written by `llava-hpc judge` on the login side once judged")
        elif _judged(ctx, name):
            notes.append(f"{name}: waits for the judge")
    return "; ".join(notes) or None


STAGE = Stage(name="report", after=("generate", "judge"), plan=plan, run=run, is_done=is_done, progress=progress,
              login_side=login_side, not_applicable=not_applicable, inputs_ready=inputs_ready)
