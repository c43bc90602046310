"""Report stage, first form: exact-match scores of the benches with exact answers (the synthetic bench).

Per bench, one task: `RUN/report/<bench>/summary.json` (overall and per-category exact match, n, chance, the answering
model), `report.md` (a table) and `scores.png` (a bar per category against chance). Scoring rules are in
`llava_hpc.eval.exact_match`. Benches without exact answers (LLaVA-Bench, folder benches) are scored by the judge,
which is not built yet: plan() leaves them out and says so, and `status` shows them as waiting for it.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from llava_hpc.eval import exact_match
from llava_hpc.eval.benches import BenchData, load_bench
from llava_hpc.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from llava_hpc.stages import StageContext, Task

log = logging.getLogger("llava_hpc.report")


def output_dir(ctx: StageContext, bench: str) -> Path:
    return ctx.run.stage_dir("report") / bench


def _load_bench(ctx: StageContext, name: str) -> BenchData:
    return load_bench(name, ctx.pipeline.benches[name], ctx.pipeline)


def _exact_benches(ctx: StageContext) -> list[str]:
    return [name for name in ctx.pipeline.generate_benches() if _load_bench(ctx, name).exact]


def is_done(ctx: StageContext) -> bool:
    return all(ctx.run.is_done(output_dir(ctx, name)) for name in _exact_benches(ctx))


def plan(ctx: StageContext) -> list[Task]:
    exact = _exact_benches(ctx)
    waiting = [name for name in ctx.pipeline.generate_benches() if name not in exact]
    note = f"; not {', '.join(waiting)}: judge not built yet" if waiting else ""
    if waiting:
        log.warning("report: %s need the judge (not built yet); reporting exact-match benches only", ", ".join(waiting))
    return [
        Task(stage="report", index=index, label=f"{name} (exact match{note})", payload={"bench": name})
        for index, name in enumerate(name for name in exact if not ctx.run.is_done(output_dir(ctx, name)))
    ]


def run(ctx: StageContext, task: Task) -> dict:
    name = task.payload["bench"]
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
        "generation": {key: answers[0]["metadata"][key] for key in ("temperature", "top_p", "max_new_tokens")},
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
            score, chance = _percent(summary["exact_match"]), _percent(summary["chance"])
            notes.append(f"{name}: {score} exact match (chance {chance})")
        elif not _load_bench(ctx, name).exact:
            notes.append(f"{name}: waits for the judge (not built yet)")
    return "; ".join(notes) or None
