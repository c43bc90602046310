"""Report stage: one task per bench, `RUN/report/<bench>/summary.json`, `report.md` and a plot.

- Benches with exact answers (the synthetic bench): exact match overall and per category, n, chance, the
  answering model (`llava_hpc.eval.exact_match`), and a bar per category against chance.
- Judged benches (LLaVA-Bench, folder benches): from the judge's reviews, per category and "all" the relative
  score as the reference defines it (ratio of means x 100) with both means, n and parse failures, the
  per-question distribution, the baseline's scores where the bench has one, judge and answer models, spend
  (`llava_hpc.eval.judged_report`), and a box plot of per-question relative scores.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from llava_hpc import faults
from llava_hpc.eval import exact_match, judged_report
from llava_hpc.eval.benches import BenchData, load_bench
from llava_hpc.eval.endpoint import judge_placement
from llava_hpc.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from llava_hpc.stages import Stage, StageContext, Task

log = logging.getLogger("llava_hpc.report")


def output_dir(ctx: StageContext, bench: str) -> Path:
    return ctx.run.stage_dir("report") / bench


def _load_bench(ctx: StageContext, name: str) -> BenchData:
    return load_bench(name, ctx.pipeline.benches[name], ctx.pipeline)


def _is_exact(ctx: StageContext, name: str) -> bool:
    # Decided by the bench's kind, without reading its files: only the synthetic bench has exact answers.
    return ctx.pipeline.benches[name].kind == "synthetic"


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
    return (ctx.executor == "slurm" and not _is_exact(ctx, name)
            and not ctx.run.is_done(ctx.run.stage_dir("judge") / name) and not judge_placement(ctx.pipeline).as_job)


def plan(ctx: StageContext, benches: list[str] | None = None) -> list[Task]:
    names = [name for name in ctx.pipeline.generate_benches() if benches is None or name in benches]
    return [
        Task(stage="report", index=index, label=f"{name} ({'exact match' if _is_exact(ctx, name) else 'judged'})",
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
        names = [name for name in names if not _is_exact(ctx, name)]
    return all(ctx.run.is_done(ctx.run.stage_dir(parent) / name) for name in names)


def run(ctx: StageContext, task: Task) -> dict:
    name = task.payload["bench"]
    faults.pause("before_report")
    if not _is_exact(ctx, name):
        return _report_judged(ctx, name)
    data = _load_bench(ctx, name)
    generated = ctx.run.stage_dir("generate") / name
    if not ctx.run.is_done(generated):
        raise FileNotFoundError(
            f"{generated / 'answers.jsonl'}: generate is not done for bench {name!r}; submit generate first"
        )
    answers = read_jsonl(generated / "answers.jsonl")
    scores = exact_match.score(data.questions, {a["question_id"]: a["text"] for a in answers}, data.choices)
    if scores["n"] == 0:
        raise ValueError(
            f"{generated / 'answers.jsonl'}: none of its {len(answers)} answers is to a question of bench {name!r} "
            "as it is now (was the bench changed after generate? resubmit generate with --force)"
        )
    summary = {
        "bench": name,
        "kind": data.kind,
        "metric": "exact_match",
        "answer_model": ", ".join(sorted({a["model_id"] for a in answers})),
        # answers written by another tool may carry no generation metadata: report what there is
        "generation": {key: answers[0].get("metadata", {}).get(key) for key in ("temperature", "top_p", "max_new_tokens")},
        **scores,
    }
    directory = output_dir(ctx, name)
    atomic_write_json(directory / "summary.json", summary)
    atomic_write_text(directory / "report.md", markdown(summary))
    atomic_write_bytes(directory / "scores.png", bar_chart(summary))
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
    # Categories and "all" at the top level (relative_score, reference_mean, candidate_mean, n, parse_failures),
    # beside the judge and answer models: scores from different judge snapshots do not compare.
    summary = {"bench": name, "metric": "relative_score", **judge_summary["scores"],
               **{key: value for key, value in judge_summary.items() if key != "scores"}}
    atomic_write_json(directory / "summary.json", summary)
    judged_report.write_report(judge_summary, directory)
    score = judge_summary["scores"]["all"]["relative_score"]
    ctx.run.mark_done(directory, {"relative_score": score, "n": judge_summary["scores"]["all"]["n"]})
    log.info("%s: relative score %s %% (judge %s)", name, score, judge_summary.get("judge_model"))
    return {"bench": name, "relative_score": score}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def markdown(summary: dict) -> str:
    lines = [
        f"# {summary['bench']}: exact match",
        "",
        f"Answers by `{summary['answer_model']}`, generation {json.dumps(summary['generation'], sort_keys=True)}.",
        "An answer is right when its first word, lowercased and stripped of surrounding punctuation, is the expected "
        "one-word answer. Chance: a uniform guess among the category's possible answers.",
        "",
        "| category | exact match | correct / n | chance |",
        "|---|---:|---:|---:|",
    ]
    for category, row in summary["by_category"].items():
        score, chance = _percent(row["exact_match"]), _percent(row["chance"])
        lines.append(f"| {category} | {score} | {row['correct']} / {row['n']} | {chance} |")
    score, chance = _percent(summary["exact_match"]), _percent(summary["chance"])
    lines.append(f"| **all** | **{score}** | {summary['correct']} / {summary['n']} | {chance} |")
    if summary["missing"]:
        lines += ["", f"Not scored: {summary['missing']} questions without an answer (bad image; see generate's "
                      "bad_questions.jsonl)."]
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict) -> bytes:
    """PNG bytes: exact match per category and overall, chance as a dashed mark on each bar."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in a library

    rows = [(category, row) for category, row in summary["by_category"].items()] + [("all", summary)]
    figure = Figure(figsize=(1.2 + 1.1 * len(rows), 3.6), dpi=100)
    axes = figure.add_subplot()
    positions = range(len(rows))
    values = [row["exact_match"] or 0.0 for _, row in rows]
    bars = axes.bar(positions, values, width=0.6, color=["#4c72b0"] * (len(rows) - 1) + ["#dd8452"])
    axes.bar_label(bars, labels=[_percent(row["exact_match"]) for _, row in rows], fontsize=8)
    for x, (_, row) in zip(positions, rows):
        if row["chance"] is not None:
            axes.hlines(row["chance"], x - 0.4, x + 0.4, colors="black", linestyles="--", linewidth=1.2,
                        label="chance" if x == 0 else None)
    axes.set_xticks(list(positions), [f"{name}\n(n={row['n']})" for name, row in rows], fontsize=8)
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("exact match")
    axes.set_title(f"{summary['bench']}: {summary['answer_model']}", fontsize=9)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def progress(ctx: StageContext) -> str | None:
    notes = []
    for name in ctx.pipeline.generate_benches():
        summary_path = output_dir(ctx, name) / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if summary["metric"] == "exact_match":
                score, chance = _percent(summary["exact_match"]), _percent(summary["chance"])
                notes.append(f"{name}: {score} exact match (chance {chance})")
            else:
                notes.append(f"{name}: {summary['all']['relative_score']} % relative")
        elif _judged_on_login_side(ctx, name):
            notes.append(f"{name}: written by `llava-hpc judge` on the login side once judged")
        elif not _is_exact(ctx, name):
            notes.append(f"{name}: waits for the judge")
    return "; ".join(notes) or None


STAGE = Stage(name="report", after=("generate", "judge"), plan=plan, run=run, is_done=is_done, progress=progress,
              login_side=login_side, not_applicable=not_applicable, inputs_ready=inputs_ready)
