"""Exact-match scoring and the report stage, on hand-made answers (no model needed)."""

import json

import pytest
from conftest import LLAVA_EVAL, REQUIRE_EVAL_DATA, fake_generate, small_pipeline_dict, write_pipeline

from llava_hpc.config import load_pipeline
from llava_hpc.eval import exact_match, llava_bench
from llava_hpc.eval.benches import load_bench
from llava_hpc.eval.judged_report import summarize_reviews, write_report
from llava_hpc.rundir import RunDir
from llava_hpc.stages import StageContext
from llava_hpc.stages import report as report_stage


@pytest.mark.parametrize(
    "answer, expected, right",
    [
        ("red", "red", True),
        ("Red.", "red", True),
        ("  RED, it is a red square", "red", True),
        ("'left'", "left", True),
        ("\u201cLeft\u201d!", "left", True),
        ("red\nblue", "red", True),
        ("it is red", "red", False),
        ("reddish", "red", False),
        ("left-hand", "left", False),
        ("", "red", False),
        ("...", "red", False),
    ],
)
def test_exact_match_normalization(answer, expected, right):
    assert exact_match.is_exact_match(answer, expected) is right


def test_score_arithmetic_and_chance():
    choices = {"colour": ["red", "green", "blue", "yellow", "purple", "orange"], "position": ["left", "right"]}.get
    questions = [
        {"question_id": 0, "category": "colour", "answer": "red"},
        {"question_id": 1, "category": "position", "answer": "left"},
        {"question_id": 2, "category": "colour", "answer": "blue"},
        {"question_id": 3, "category": "position", "answer": "right"},
        {"question_id": 4, "category": "position", "answer": "left"},
        {"question_id": 5, "category": "colour", "answer": "green"},  # no answer: skipped for a bad image
    ]
    answers = {0: "Red.", 1: "right", 2: "BLUE", 3: "Right!", 4: "the left"}
    scores = exact_match.score(questions, answers, choices)
    assert scores["n"] == 5 and scores["correct"] == 3 and scores["missing"] == 1
    assert scores["exact_match"] == pytest.approx(3 / 5)
    assert scores["chance"] == pytest.approx((2 / 6 + 3 / 2) / 5)
    assert scores["by_category"] == {
        "colour": {"exact_match": 1.0, "n": 2, "correct": 2, "chance": pytest.approx(1 / 6)},
        "position": {"exact_match": pytest.approx(1 / 3), "n": 3, "correct": 1, "chance": 0.5},
    }


def context(tmp_path, **sections) -> StageContext:
    data = small_pipeline_dict(tmp_path / "run", **sections)
    pipeline = load_pipeline(write_pipeline(tmp_path / "pipeline.toml", data))
    return StageContext(pipeline, RunDir(pipeline.run_dir))


GENERATION = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "model_stage": "stage2", "new_tokens": 2}


def test_report_scores_the_synthetic_bench(tmp_path):
    ctx = context(tmp_path)
    questions = load_bench("synthetic", ctx.pipeline.benches["synthetic"], ctx.pipeline).questions
    # Right on every colour question, wrong on every position question, one question left without an answer.
    texts = {
        q["question_id"]: (q["answer"].upper() + ".") if q["category"] == "colour" else "purple"
        for q in questions[:-1]
    }
    fake_generate(ctx, "synthetic", texts, GENERATION)
    assert not report_stage.is_done(ctx)
    tasks = report_stage.plan(ctx)
    assert [(t.label, t.payload) for t in tasks] == [("synthetic (exact match)", {"bench": "synthetic"})]
    assert report_stage.run(ctx, tasks[0])["n"] == 19
    assert report_stage.is_done(ctx) and report_stage.plan(ctx) == []

    out = ctx.run.stage_dir("report") / "synthetic"
    summary = json.loads((out / "summary.json").read_text())
    assert {"exact_match", "n", "chance", "by_category", "answer_model", "missing"} <= set(summary)
    colour, position = summary["by_category"]["colour"], summary["by_category"]["position"]
    assert (colour["exact_match"], colour["n"], colour["chance"]) == (1.0, 10, pytest.approx(1 / 6))
    assert (position["exact_match"], position["n"], position["chance"]) == (0.0, 9, 0.5)
    assert summary["exact_match"] == pytest.approx(10 / 19) and summary["missing"] == 1
    assert summary["chance"] == pytest.approx((10 / 6 + 9 / 2) / 19)
    assert summary["answer_model"] == "test/stage2" and summary["generation"]["max_new_tokens"] == 8

    table = (out / "report.md").read_text()
    assert "| colour | 100.0 % | 10 / 10 | 16.7 % |" in table and "| **all** | **52.6 %** | 10 / 19 |" in table
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report_stage.progress(ctx) == "synthetic: 52.6 % exact match (chance 32.5 %)"


def test_benches_without_exact_answers_wait_for_the_judge(tmp_path):
    images = tmp_path / "landing"
    images.mkdir()
    (images / "a.png").write_bytes(b"")  # never opened: the report does not look at images
    ctx = context(tmp_path, benches={
        "synthetic": {"kind": "synthetic"},
        "landing": {"kind": "folder", "images": str(images), "question": "Safe to land?"},
    })
    assert [t.label for t in report_stage.plan(ctx)] == ["synthetic (exact match)", "landing (judged)"]
    assert report_stage.progress(ctx) == "landing: waits for the judge"
    with pytest.raises(FileNotFoundError, match="generate is not done for bench 'synthetic'"):
        report_stage.run(ctx, report_stage.plan(ctx)[0])
    with pytest.raises(FileNotFoundError, match="the judge is not done for bench 'landing'"):
        report_stage.run(ctx, report_stage.plan(ctx)[1])


# ----- judged benches: our relative score and the reference-style one side by side -----

VICUNA_REVIEWS = LLAVA_EVAL / "vicuna-reviews"
needs_vicuna_reviews = pytest.mark.skipif(
    not REQUIRE_EVAL_DATA and not VICUNA_REVIEWS.exists(), reason=f"{VICUNA_REVIEWS} is not here"
)


def real_judged_reviews() -> list[dict]:
    """4 x 80 real GPT-4 replies, read by our parser: the math reviewer writes its scores last, so its 12 replies
    are parse failures ("tuple": null), as the reference's parser fails on them too ([-1, -1])."""
    def lines(path):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    categories = {q["question_id"]: q["category"] for q in lines(VICUNA_REVIEWS / "question.jsonl")}
    reviews = []
    for path in sorted(VICUNA_REVIEWS.glob("review_*.jsonl")):
        for review in lines(path):
            scores = llava_bench.parse_score(review["text"])
            reviews.append({"category": categories[review["question_id"]], "content": review["text"],
                            "tuple": None if scores is None else list(scores)})
    return reviews


def by_hand_reference_style(reviews: list[dict], category: str) -> tuple[float, float, float]:
    """summarize_gpt_review.py written out: a failed parse is [-1, -1]; column means rounded to 3 decimals; then
    round(candidate / reference * 100, 1) and each mean x10 rounded to 1 decimal."""
    pairs = [r["tuple"] or [-1, -1] for r in reviews if category == "all" or r["category"] == category]
    reference = round(sum(p[0] for p in pairs) / len(pairs), 3)
    candidate = round(sum(p[1] for p in pairs) / len(pairs), 3)
    return round(candidate / reference * 100, 1), round(reference * 10, 1), round(candidate * 10, 1)


def reference_style(row: dict) -> tuple:
    return row["relative_score_reference_style"], row["reference_mean_reference_style"], \
        row["candidate_mean_reference_style"]


@needs_vicuna_reviews
def test_judged_scores_give_the_reference_style_number_beside_ours(tmp_path):
    reviews = real_judged_reviews()
    # A few failures outside math too: mangle the score line of three readable generic replies.
    generic = [r for r in reviews if r["category"] == "generic" and r["tuple"] is not None][:3]
    for review in generic:
        review["content"] = "Scores: see below.\n" + review["content"]
        review["tuple"] = llava_bench.parse_score(review["content"])
        assert review["tuple"] is None
    summary = summarize_reviews(reviews, "gpt-4-0328", "vicuna-13b")
    scores = summary["scores"]
    assert scores["all"]["parse_failures"] == 15 and scores["generic"]["parse_failures"] == 3
    for category, row in scores.items():
        assert reference_style(row) == by_hand_reference_style(reviews, category), category
        if row["parse_failures"]:
            # The failures pull both reference-style means towards -1, ours leaves them out.
            assert reference_style(row)[1:] != (row["reference_mean"], row["candidate_mean"]), category
        else:
            assert reference_style(row) == (row["relative_score"], row["reference_mean"], row["candidate_mean"])
    # Math: every reply failed; ours has nothing to score, the reference prints -1 / -1 = 100 %.
    assert (scores["math"]["relative_score"], reference_style(scores["math"])) == (None, (100.0, -10.0, -10.0))
    assert scores["all"]["relative_score"] != scores["all"]["relative_score_reference_style"]

    write_report(summary, tmp_path)
    table = (tmp_path / "report.md").read_text()
    assert "relative score (reference-style, failures as -1)" in table
    everything = scores["all"]
    row = next(line for line in table.splitlines() if line.startswith("| **all** |"))
    assert row.startswith(f"| **all** | {everything['relative_score']:.1f} % | {everything['reference_mean']:.1f} | "
                          f"{everything['candidate_mean']:.1f} | ")
    assert row.endswith(f"| 305 | 15 | {everything['relative_score_reference_style']:.1f} % |")


@needs_vicuna_reviews
def test_without_parse_failures_both_numbers_are_equal():
    reviews = [r for r in real_judged_reviews() if r["tuple"] is not None]
    scores = summarize_reviews(reviews, "gpt-4-0328", "vicuna-13b")["scores"]
    assert "math" not in scores and scores["all"]["n"] == 308
    for category, row in scores.items():
        assert row["parse_failures"] == 0
        assert reference_style(row) == (row["relative_score"], row["reference_mean"], row["candidate_mean"]), category
