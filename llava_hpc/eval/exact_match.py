"""Exact-match scoring for benches whose questions have one-word answers (the synthetic bench).

Normalization: lowercase, strip surrounding whitespace, then strip punctuation at both ends ("Red." -> "red",
"'left'," -> "left"); punctuation inside a word stays ("left-hand" is not "left"). An answer is correct when its
FIRST whitespace-separated word, normalized, equals the normalized expected answer: the bench asks for one word, and
a model that goes on after it ("red. the shape is ...") is still right, while one that hedges first ("it is red") is
not. An empty answer is wrong.

Chance is the mean over scored questions of 1 / (number of possible answers of the question's category): the score of
a model that guesses uniformly.
"""

from __future__ import annotations

import string
from collections.abc import Callable

PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u2026"  # ASCII plus curly quotes and the ellipsis


def normalize(text: str) -> str:
    return text.strip().lower().strip(PUNCTUATION + string.whitespace)


def first_word(text: str) -> str:
    words = text.split()
    return normalize(words[0]) if words else ""


def is_exact_match(answer: str, expected: str) -> bool:
    return first_word(answer) == normalize(expected) != ""


def score(questions: list[dict], answers: dict, choices: Callable[[str], list[str]]) -> dict:
    """Exact match and chance, overall and by category.

    `questions`: the bench's questions (question_id, category, answer); `answers`: question_id -> answer text.
    Questions without an answer (skipped for a bad image) are left out of every fraction and counted as `missing`."""
    totals: dict[str, dict[str, float]] = {}
    missing = 0
    for question in questions:
        if question["question_id"] not in answers:
            missing += 1
            continue
        entry = totals.setdefault(question["category"], {"correct": 0, "n": 0, "chance_sum": 0.0})
        entry["correct"] += is_exact_match(answers[question["question_id"]], question["answer"])
        entry["n"] += 1
        entry["chance_sum"] += 1 / len(choices(question["category"]))

    def fractions(correct: float, n: int, chance_sum: float) -> dict:
        return {
            "exact_match": correct / n if n else None,
            "n": n,
            "correct": int(correct),
            "chance": chance_sum / n if n else None,
        }

    overall = fractions(*(sum(entry[key] for entry in totals.values()) for key in ("correct", "n", "chance_sum")))
    return {
        **overall,
        "missing": missing,
        "by_category": {category: fractions(**entry) for category, entry in sorted(totals.items())},
    }
