"""The report of a bench with exact answers (the synthetic bench): exact match overall and per category, n, chance
and the answering model (llava_hpc.eval.exact_match), and their report (a Markdown table and a bar chart)."""

from __future__ import annotations

import json
from pathlib import Path

from llava_hpc.eval import exact_match
from llava_hpc.eval.benches import BenchData
from llava_hpc.plots import new_figure, png_bytes
from llava_hpc.rundir import atomic_write_bytes, atomic_write_text

METRIC = "exact_match"


def summarize(data: BenchData, answers: list[dict], answers_path: Path) -> dict:
    """The bench's scores from generate's answers (read from `answers_path`, named in the error when none of them
    answers a question of the bench)."""
    scores = exact_match.score(data.questions, {a["question_id"]: a["text"] for a in answers}, data.choices)
    if scores["n"] == 0:
        raise ValueError(
            f"{answers_path}: none of its {len(answers)} answers is to a question of bench {data.name!r} "
            "as it is now (was the bench changed after generate? resubmit generate with --force)"
        )
    return {
        "bench": data.name,
        "kind": data.kind,
        "metric": METRIC,
        "answer_model": ", ".join(sorted({a["model_id"] for a in answers})),
        # answers written by another tool may carry no generation metadata: report what there is
        "generation": {key: answers[0].get("metadata", {}).get(key) for key in ("temperature", "top_p", "max_new_tokens")},
        **scores,
    }


def write_report(summary: dict, out_dir: Path) -> None:
    """report.md and scores.png under out_dir (each written atomically)."""
    atomic_write_text(out_dir / "report.md", markdown(summary))
    atomic_write_bytes(out_dir / "scores.png", bar_chart(summary))


def percent(value: float | None) -> str:
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
        score, chance = percent(row["exact_match"]), percent(row["chance"])
        lines.append(f"| {category} | {score} | {row['correct']} / {row['n']} | {chance} |")
    score, chance = percent(summary["exact_match"]), percent(summary["chance"])
    lines.append(f"| **all** | **{score}** | {summary['correct']} / {summary['n']} | {chance} |")
    if summary["missing"]:
        lines += ["", f"Not scored: {summary['missing']} questions without an answer (bad image; see generate's "
                      "bad_questions.jsonl)."]
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict) -> bytes:
    """PNG bytes: exact match per category and overall, chance as a dashed mark on each bar."""
    rows = [(category, row) for category, row in summary["by_category"].items()] + [("all", summary)]
    figure = new_figure(1.2 + 1.1 * len(rows), 3.6)
    axes = figure.add_subplot()
    positions = range(len(rows))
    values = [row["exact_match"] or 0.0 for _, row in rows]
    bars = axes.bar(positions, values, width=0.6, color=["#4c72b0"] * (len(rows) - 1) + ["#dd8452"])
    axes.bar_label(bars, labels=[percent(row["exact_match"]) for _, row in rows], fontsize=8)
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
    return png_bytes(figure)
