"""The LLaVA-Bench judging protocol against the reference's real tables: parsing real GPT-4 judge replies, the judge
request built from qa90 / caps_boxes / rule.json, and the summary arithmetic of summarize_gpt_review."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import LLAVA_EVAL, REQUIRE_EVAL_DATA
from PIL import Image

from llava_hpc.eval import llava_bench
from llava_hpc.eval.benches import BENCH_KINDS
from llava_hpc.eval.judge import JudgeItem, JudgeSettings, image_tokens
from llava_hpc.eval.judged_report import summarize_reviews, write_report

REVIEWS = sorted((LLAVA_EVAL / "vicuna-reviews").glob("review_*.jsonl"))
needs_tables = pytest.mark.skipif(not REQUIRE_EVAL_DATA and not (LLAVA_EVAL / "rule.json").exists(), reason=f"{LLAVA_EVAL} is not here")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- parsing
@needs_tables
def test_parsing_real_gpt4_replies_gives_the_recorded_scores():
    """vicuna-reviews: `text` is GPT-4's reply, `score` what was recorded. Every reply that follows the protocol (the
    scores on the first line) parses to the recorded pair. The math reviewer's replies put the scores at the end:
    the reference's parser gets [-1, -1] for them (their recorded scores were fixed by hand); ours reports a failure."""
    checked = failures = 0
    for path in REVIEWS:
        for review in jsonl(path):
            parsed = llava_bench.parse_score(review["text"])
            if review["reviewer_id"] == "gpt-4-0328-math":
                assert parsed is None, (path.name, review["question_id"])
                failures += 1
            else:
                assert parsed == tuple(float(s) for s in review["score"]), (path.name, review["question_id"])
                checked += 1
    assert (checked, failures) == (308, 12)


@pytest.mark.parametrize("reply, expected", [
    ("8 7\nexplanation", (8.0, 7.0)),
    ("8,7\nwhy", (8.0, 7.0)),
    ("9.5 6", (9.5, 6.0)),
    ("8, 7\nwhy", None),  # "8  7" after the comma: three fields, a failure in the reference too
    ("Assistant 1: 8\nAssistant 2: 7", None),
    ("8 7 6", None),
    ("", None),
    ("eight seven", None),
])
def test_parse_score_is_the_reference_rule(reply, expected):
    assert llava_bench.parse_score(reply) == expected


# ---------------------------------------------------------------------------------------------- requests
def reference_coco_content(question: dict, answer1: dict, answer2: dict, context: dict, rule: dict) -> str:
    """eval_gpt_review_visual.py's prompt, written the reference's way."""
    cap_str = "\n".join(context["captions"])
    box_str = "\n".join([f'{instance["category"]}: {instance["bbox"]}' for instance in context["instances"]])
    role = rule["role"]
    return (f"[Context]\n{cap_str}\n\n{box_str}\n\n"
            f"[Question]\n{question['text']}\n\n"
            f"[{role} 1]\n{answer1['text']}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2['text']}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


@needs_tables
def test_coco_judge_requests_match_the_reference_on_all_90_questions():
    questions = jsonl(LLAVA_EVAL / "qa90_questions.jsonl")
    gpt4 = jsonl(LLAVA_EVAL / "qa90_gpt4_answer.jsonl")
    contexts = {c["image"]: c for c in jsonl(LLAVA_EVAL / "caps_boxes_coco2014_val_80.jsonl")}
    rules = json.loads((LLAVA_EVAL / "rule.json").read_text())
    ours_contexts = llava_bench.read_contexts(LLAVA_EVAL / "caps_boxes_coco2014_val_80.jsonl", llava_bench.coco_context)
    ours_references = llava_bench.read_reference_answers(LLAVA_EVAL / "qa90_gpt4_answer.jsonl")
    settings = JudgeSettings("gpt-4o-2024-11-20", 0.2, 1024)
    for question, answer1 in zip(questions, gpt4):
        candidate = {"text": f"A made-up answer to question {question['question_id']}.", "answer_id": "c"}
        rule = BENCH_KINDS["llava-bench-coco"].rule(rules, "rule.json", question["category"])
        content = llava_bench.judge_content(ours_contexts[question["image"]], question["text"],
                                            ours_references[question["question_id"]]["text"], candidate["text"], rule)
        assert content == reference_coco_content(question, answer1, candidate, contexts[question["image"]],
                                                 rules[question["category"]])
        item = JudgeItem(1, question["question_id"], question["category"], question["question_id"], "c", content, None)
        body = item.request(settings, 1).body
        assert body == {
            "model": "gpt-4o-2024-11-20", "temperature": 0.2, "max_tokens": 1024,
            "messages": [{"role": "system", "content": llava_bench.SYSTEM_PROMPT},
                         {"role": "user", "content": content}],
        }
    # Spot checks that do not rest on the reimplementation: box lines as Python writes the table's floats.
    donuts = ours_contexts["000000296284.jpg"]
    assert donuts.startswith("A donut shop is full of different flavors of donuts.\nFruit flavored donuts")
    assert "\n\ndonut: [0.37, 0.584, 0.504, 0.709]\ndonut: [0.369, 0.22, 0.492, 0.317]\n" in donuts
    assert "donut: [0.0, 0.609, 0.097, 0.722]" in donuts
    assert llava_bench.SYSTEM_PROMPT == ("You are a helpful and precise assistant for checking the quality of the "
                                         "answer.")


@needs_tables
def test_in_the_wild_context_rules_and_category(tmp_path):
    context = tmp_path / "context.jsonl"
    context.write_text(json.dumps({"id": "001", "image": "001.jpg", "caption": "A ramen bowl.\nChopsticks."}) + "\n"
                       + json.dumps({"id": "002", "image": "002.jpg", "caption": ["Line one.", "Line two."]}) + "\n")
    contexts = llava_bench.read_contexts(context, llava_bench.wild_context)
    assert contexts == {"001.jpg": "A ramen bowl.\nChopsticks.", "002.jpg": "Line one.\nLine two."}
    rules = llava_bench.read_rules(LLAVA_EVAL / "rule.json")
    assert BENCH_KINDS["llava-bench-wild"].review_category("complex") == "llava_bench_complex"
    rule = BENCH_KINDS["llava-bench-wild"].rule(rules, "rule.json", "complex")
    assert rule == rules["llava_bench_complex"]
    with pytest.raises(llava_bench.BenchTableError, match="rule.json: no rule for category 'llava_bench_poetry'"):
        BENCH_KINDS["llava-bench-wild"].rule(rules, "rule.json", "poetry")


def test_include_image_puts_a_jpeg_data_url_beside_the_same_text():
    image = llava_bench.encode_image(Image.new("RGB", (640, 480), (200, 30, 30)))
    content = "[Context]\ncaptions\n\n[Question]\nq\n\n..."
    messages = llava_bench.judge_messages(content, image)
    parts = messages[1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,/9j/")
    assert parts[1] == {"type": "text", "text": content}
    described = llava_bench.judge_messages(content, image, described=True)[1]["content"][0]["image_url"]["url"]
    assert described == f"<image sha256:{image.pixel_sha256} 640x480 jpeg {image.jpeg_bytes} bytes>"
    assert image_tokens("gpt-4o-2024-11-20", (640, 480)) == 85 + 170 * 2  # never upscaled: 2 x 1 tiles of 512 px
    assert image_tokens("gpt-4o-2024-11-20", (1024, 1024)) == 765  # OpenAI's worked example: 768 x 768, 4 tiles


def test_unreadable_tables_name_the_file_and_line(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 0, "text": "a"}\n{"text": "no id"}\n')
    with pytest.raises(llava_bench.BenchTableError, match=r"answers.jsonl:2: reference answer has no 'question_id'"):
        llava_bench.read_reference_answers(answers)
    context = tmp_path / "caps.jsonl"
    context.write_text('{"image": "a.jpg", "captions": ["c"]}\n')
    with pytest.raises(llava_bench.BenchTableError, match=r"caps.jsonl:1: context record has no 'instances' field"):
        llava_bench.read_contexts(context, llava_bench.coco_context)


# ---------------------------------------------------------------------------------------------- summary arithmetic
def reference_summary(reviews: list[dict]) -> dict:
    """summarize_gpt_review.py, literally: tuples by category and 'all', numpy column means rounded to 3 decimals,
    then round(c / r * 100, 1), round(r * 10, 1), round(c * 10, 1). [-1, -1] tuples are averaged in."""
    scores = defaultdict(list)
    for review in reviews:
        if "category" in review:
            scores[review["category"]].append(review["tuple"])
            scores["all"].append(review["tuple"])
        else:
            scores["all"].append(review["tuple"])
    printed = {}
    for k, v in sorted(scores.items()):
        stats = np.asarray(v).mean(0).tolist()
        stats = [round(x, 3) for x in stats]
        printed[k] = (round(stats[1] / stats[0] * 100, 1), round(stats[0] * 10, 1), round(stats[1] * 10, 1))
    return printed


def vicuna_reviews_as_llava_reviews() -> list[dict]:
    """The real GPT-4 scores of the vicuna reviews, in LLaVA review lines with the questions' real categories."""
    categories = {q["question_id"]: q["category"] for q in jsonl(LLAVA_EVAL / "vicuna-reviews" / "question.jsonl")}
    reviews = []
    for path in REVIEWS:
        for review in jsonl(path):
            scores = llava_bench.parse_score(review["text"])
            reviews.append({"id": len(reviews) + 1, "question_id": review["question_id"],
                            "category": categories[review["question_id"]], "content": review["text"],
                            "tuple": None if scores is None else list(scores)})
    return reviews


def ours_as_printed(summary: dict) -> dict:
    return {k: (row["relative_score"], row["reference_mean"], row["candidate_mean"])
            for k, row in summary["scores"].items()}


@needs_tables
def test_summary_equals_the_reference_arithmetic_on_real_scores():
    reviews = vicuna_reviews_as_llava_reviews()
    clean = [r for r in reviews if r["tuple"] is not None]
    summary = summarize_reviews(clean, "gpt-4-0328", "vicuna-13b")
    assert ours_as_printed(summary) == reference_summary(clean)
    assert list(summary["scores"])[-1] == "all" and summary["scores"]["all"]["n"] == 308
    assert all(row["parse_failures"] == 0 for row in summary["scores"].values())


@needs_tables
def test_parse_failures_are_counted_and_excluded_not_averaged_as_minus_one():
    reviews = vicuna_reviews_as_llava_reviews()
    clean = [r for r in reviews if r["tuple"] is not None]
    summary = summarize_reviews(reviews, "gpt-4-0328", "vicuna-13b")
    # Ours on all reviews = the reference on the readable ones (math: all 12 replies unreadable, nothing to score) ...
    printed = ours_as_printed(summary)
    assert printed.pop("math") == (None, None, None)
    assert printed == reference_summary(clean)
    assert (summary["scores"]["math"]["n"], summary["scores"]["math"]["parse_failures"]) == (0, 12)
    assert summary["scores"]["all"]["parse_failures"] == 12
    # ... while the reference's own [-1, -1] handling moves the numbers.
    biased = reference_summary([{**r, "tuple": r["tuple"] or [-1, -1]} for r in reviews])
    assert biased["math"] == (100.0, -10.0, -10.0)
    assert biased["all"] != ours_as_printed(summary)["all"]


def test_per_question_distribution_baseline_and_report(tmp_path):
    def review(category, reference, candidate, cost=0.001):
        return {"category": category, "tuple": [reference, candidate], "prompt_tokens": 100,
                "completion_tokens": 20, "cost_usd": cost}

    reviews = [review("conv", 8, 4), review("conv", 10, 10), review("conv", 5, 1), review("detail", 8, 6),
               {**review("detail", 0, 0), "tuple": None}]
    baseline = [review("conv", 8, 1), review("conv", 9, 2), review("detail", 8, 1)]
    summary = summarize_reviews(reviews, "judge-x", "model-y", baseline_reviews=baseline)
    conv = summary["scores"]["conv"]
    assert conv["relative_score"] == round(round(15 / 3, 3) / round(23 / 3, 3) * 100, 1)
    assert conv["relative_scores"] == [50.0, 100.0, 20.0] and conv["relative_median"] == 50.0
    assert (conv["relative_q1"], conv["relative_q3"]) == (35.0, 75.0)
    assert summary["scores"]["detail"]["parse_failures"] == 1 and summary["scores"]["all"]["n"] == 4
    assert summary["baseline"]["all"]["n"] == 3
    assert summary["spend"] == {"prompt_tokens": 800, "completion_tokens": 160, "cost_usd": 0.008}
    write_report({"bench": "demo", **summary}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| conv | 65.2 % | 76.7 | 50.0 | 50.0 % [35.0, 75.0] | 3 | 0 |" in text
    assert "Baseline" in text and (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"
