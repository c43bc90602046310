"""Scores from judge reviews, the reference's arithmetic, and their report (a Markdown table and a box plot).

The reference (`summarize_gpt_review.py`) groups review tuples by category and into "all", takes the column means
with numpy, rounds them to 3 decimals and prints

    relative score = round(mean_candidate / mean_reference * 100, 1)   (a ratio of means, not a mean of ratios)
    reference mean x 10, candidate mean x 10                            (each rounded to 1 decimal)

We compute exactly that, from the same rounded means, so the numbers equal the reference's on the same reviews.
One difference: reviews whose reply could not be read (`"tuple": null`) are counted as parse failures and left out,
where the reference averages its [-1, -1] into both means. So that figures compare with published ones, the
reference-style numbers (`*_reference_style`: failures as [-1, -1], averaged in) are given beside ours; with no
failures the two are equal.

Beside it, the distribution the seed study plots: each question's own candidate / reference x 100 (median, quartiles).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from llava_hpc.plots import new_figure, png_bytes
from llava_hpc.rundir import atomic_write_bytes, atomic_write_text

ALL = "all"
METRIC = "relative_score"


# What the reference's parser records for a reply it cannot read (eval_gpt_review*.py), and averages in.
REFERENCE_FAILURE = (-1.0, -1.0)


def _printed_means(tuples: list) -> tuple[float | None, float, float]:
    import numpy as np

    """summarize_gpt_review's arithmetic: (relative score, reference mean x10, candidate mean x10)."""
    reference_mean, candidate_mean = (round(x, 3) for x in np.asarray(tuples, dtype=float).mean(0).tolist())
    # A reference mean of 0 cannot happen with the 1-10 scale, but a judge can write "0 0".
    relative = round(candidate_mean / reference_mean * 100, 1) if reference_mean else None
    return relative, round(reference_mean * 10, 1), round(candidate_mean * 10, 1)


def _category_scores(reviews: list[dict]) -> dict:
    import numpy as np

    tuples = [review["tuple"] for review in reviews if review["tuple"] is not None]
    row = {"n": len(tuples), "parse_failures": len(reviews) - len(tuples), "relative_score": None,
           "reference_mean": None, "candidate_mean": None, "relative_score_reference_style": None,
           "reference_mean_reference_style": None, "candidate_mean_reference_style": None,
           "relative_median": None, "relative_q1": None, "relative_q3": None, "relative_scores": []}
    if reviews:
        with_failures = [review["tuple"] if review["tuple"] is not None else REFERENCE_FAILURE for review in reviews]
        (row["relative_score_reference_style"], row["reference_mean_reference_style"],
         row["candidate_mean_reference_style"]) = _printed_means(with_failures)
    if not tuples:
        return row
    row["relative_score"], row["reference_mean"], row["candidate_mean"] = _printed_means(tuples)
    per_question = [candidate / reference * 100 for reference, candidate in tuples if reference > 0]
    if per_question:
        q1, median, q3 = np.percentile(per_question, [25, 50, 75]).tolist()
        row.update(relative_median=round(median, 1), relative_q1=round(q1, 1), relative_q3=round(q3, 1),
                   relative_scores=[round(x, 2) for x in per_question])
    return row


def score_table(reviews: list[dict]) -> dict:
    """category -> scores, categories in sorted order, then "all"."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for review in reviews:
        by_category[review["category"]].append(review)
    table = {category: _category_scores(by_category[category]) for category in sorted(by_category)}
    table[ALL] = _category_scores(reviews)
    return table


def _spend(reviews: list[dict]) -> dict:
    costs = [review.get("cost_usd") for review in reviews]
    return {
        "prompt_tokens": sum(review.get("prompt_tokens", 0) for review in reviews),
        "completion_tokens": sum(review.get("completion_tokens", 0) for review in reviews),
        "cost_usd": None if any(c is None for c in costs) else round(sum(costs), 4),
    }


def summarize_reviews(reviews: list[dict], judge_model: str, answer_model: str,
                      baseline_reviews: list[dict] | None = None) -> dict:
    """Scores per category and "all" (relative_score, reference_mean, candidate_mean, n, parse_failures, the same
    three means reference-style with failures averaged in as -1, and the per-question distribution), the judge and
    answer models, and the spend of these reviews. `baseline_reviews`: the same questions judged with an answer
    written for another image, scored the same way."""
    summary = {
        "judge_model": judge_model,
        "answer_model": answer_model,
        "scores": score_table(reviews),
        "spend": _spend(reviews + (baseline_reviews or [])),
    }
    if baseline_reviews is not None:
        summary["baseline"] = score_table(baseline_reviews)
    return summary


# ---------------------------------------------------------------------------------------------- report
def bench_summary(name: str, judge_summary: dict) -> dict:
    """The report's summary.json: categories and "all" at the top level (relative_score, reference_mean,
    candidate_mean, n, parse_failures), beside the judge and answer models: scores from different judge snapshots do
    not compare."""
    return {"bench": name, "metric": METRIC, **judge_summary["scores"],
            **{key: value for key, value in judge_summary.items() if key != "scores"}}


def _number(value, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{suffix}"


def _ordered(scores: dict) -> list[str]:
    """Categories sorted, "all" last (summary.json is written with sorted keys, which puts "all" first)."""
    return sorted(c for c in scores if c != ALL) + [ALL]


def _table(scores: dict) -> list[str]:
    lines = [
        "| category | relative score | reference x10 | candidate x10 | per-question median [q1, q3] | n "
        "| parse failures | relative score (reference-style, failures as -1) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for category in _ordered(scores):
        row = scores[category]
        name = f"**{category}**" if category == ALL else category
        spread = "-"
        if row["relative_median"] is not None:
            quartiles = f"[{_number(row['relative_q1'])}, {_number(row['relative_q3'])}]"
            spread = f"{_number(row['relative_median'], ' %')} {quartiles}"
        # .get: a judge summary written before the reference-style columns existed still renders.
        reference_style = _number(row.get("relative_score_reference_style"), " %")
        lines.append(f"| {name} | {_number(row['relative_score'], ' %')} | {_number(row['reference_mean'])} | "
                     f"{_number(row['candidate_mean'])} | {spread} | {row['n']} | {row['parse_failures']} | "
                     f"{reference_style} |")
    return lines


def markdown(summary: dict) -> str:
    bench = summary.get("bench", "")
    served = summary.get("judge_models_served") or []
    served_note = f" (the server answered as {', '.join(f'`{m}`' for m in served)})" if served else ""
    lines = [
        f"# {bench}: judged by {summary['judge_model']}".strip(),
        "",
        f"Answers by `{summary['answer_model']}`, judged by `{summary['judge_model']}`{served_note}.",
        "Relative score = mean(candidate score) / mean(reference score) x 100 over the category (a ratio of means, "
        "the reference's arithmetic); both means are shown x10. Replies without a readable score were asked once "
        "more, then counted as parse failures and left out. The reference-style column averages them in as -1 for "
        "both scores, as the reference does, so it compares with published figures; without failures the two agree.",
        "Scores from different judge models or snapshots do not compare.",
        "",
        *_table(summary["scores"]),
    ]
    if "baseline" in summary:
        lines += ["", "## Baseline: an answer written for another image",
                  "How this judge scores a fluent answer that is about the wrong picture (a calibration floor).", "",
                  *_table(summary["baseline"])]
    spend = summary["spend"]
    cost = "unknown (model not in the price table)" if spend["cost_usd"] is None else f"${spend['cost_usd']:.4f}"
    lines += ["", f"Spend: {spend['prompt_tokens']} prompt + {spend['completion_tokens']} completion tokens, {cost}."]
    return "\n".join(lines) + "\n"


def box_plot(summary: dict) -> bytes:
    """PNG bytes: per-question relative scores per category (and "all"), baseline boxes beside them if present."""
    import numpy as np

    categories = _ordered(summary["scores"])
    series = [("candidate", summary["scores"], "#4c72b0")]
    if "baseline" in summary:
        series.append(("baseline (answer for another image)", summary["baseline"], "#c44e52"))
    width = 0.8 / len(series)
    figure = new_figure(1.5 + 1.4 * len(categories), 4.4)
    axes = figure.add_subplot()
    for index, (label, scores, colour) in enumerate(series):
        positions = [c + (index - (len(series) - 1) / 2) * width for c in range(len(categories))]
        data = [scores.get(category, {}).get("relative_scores") or [np.nan] for category in categories]
        boxes = axes.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True,
                             medianprops={"color": "black"})
        for box in boxes["boxes"]:
            box.set_facecolor(colour)
        axes.plot([], [], color=colour, linewidth=8, label=label)
    axes.axhline(100, color="grey", linestyle="--", linewidth=1)
    labels = [f"{c}\n(n={summary['scores'][c]['n']})" for c in categories]
    axes.set_xticks(range(len(categories)), labels, fontsize=8)
    axes.set_ylabel("relative score per question (%)")
    axes.set_title(f"{summary.get('bench', '')} {summary['answer_model']} judged by {summary['judge_model']}".strip(),
                   fontsize=9)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(series), fontsize=8, frameon=False)
    figure.tight_layout()
    return png_bytes(figure)


def write_report(summary: dict, out_dir: str | Path) -> None:
    """report.md and scores.png under out_dir (each written atomically)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "report.md", markdown(summary))
    atomic_write_bytes(out_dir / "scores.png", box_plot(summary))
