"""The LLaVA-Bench judging protocol: what the judge is asked, how its reply is read, what a review line holds.

This follows the reference's `eval_gpt_review_visual.py` (LLaVA-Bench COCO) and `eval_gpt_review_bench.py`
(LLaVA-Bench In-the-Wild) to the character, so scores compare with published ones judged by the same snapshot:

    system: "You are a helpful and precise assistant for checking the quality of the answer."
    user:   "[Context]\\n{context}\\n\\n[Question]\\n{question}\\n\\n"
            "[Assistant 1]\\n{reference}\\n\\n[End of Assistant 1]\\n\\n"
            "[Assistant 2]\\n{candidate}\\n\\n[End of Assistant 2]\\n\\n[System]\\n{rule prompt}\\n\\n"

COCO context: the five captions, one per line, a blank line, then one `category: [x1, y1, x2, y2]` line per object.
The reference writes the box as Python's repr of the list read from the JSON table (whose values carry at most
three decimals), so `[0.0, 0.609, 0.097, 0.722]` stays exactly that; we do the same rather than reformat.
In-the-Wild context: the `caption` field (a list is joined by newlines).

Two departures, both on purpose:
- A reply whose first line is not two numbers is a parse failure (`None`), not the reference's `[-1, -1]`, which the
  reference then averages into the scores. The caller asks again once and otherwise counts it and leaves it out.
- The seed study's variant shows the judge the image itself (`include_image`): the JPEG goes in as a data-URL
  `image_url` part next to the unchanged text. Folder benches (no captions exist) always do, with FOLDER_RULE.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llava_hpc.rundir import read_jsonl_objects

if TYPE_CHECKING:
    from PIL import Image

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
WILD_CATEGORY_PREFIX = "llava_bench_"  # In-the-Wild review categories and rule keys, as the reference writes them
FOLDER_CONTEXT = "The image the question is about is attached."
FOLDER_RULE = {
    "role": "Assistant",
    "prompt": (
        "We would like to request your feedback on the performance of two AI assistants in response to the user "
        "question displayed above. The user asks the question on observing an image, which is attached. \n"
        "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
        "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
        "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
        "respectively. The two scores are separated by a space.\n"
        "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
        "potential bias and ensuring that the order in which the responses were presented does not affect your "
        "judgment."
    ),
}
JPEG_QUALITY = 90


class BenchTableError(ValueError):
    """A rules / context / reference-answer table that cannot be used; the message names the file and record."""


# ------------------------------------------------------------------------------------------------ tables
def read_table(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each line of a JSON-lines table; a malformed line fails with file:line."""
    return read_jsonl_objects(Path(path), BenchTableError)


def read_reference_answers(path: str | Path) -> dict:
    """question_id -> {"text", "answer_id"} from a reference answers file (`qa90_gpt4_answer.jsonl` shape).

    The reference pairs questions and answers by line; we join on question_id (the files are aligned, so the pairs
    are the same) so that a reordered or filtered file cannot silently pair an answer with the wrong question.
    Like the reference, an answer without `answer_id` is identified by its question_id."""
    answers = {}
    for number, row in read_table(path):
        for field in ("question_id", "text"):
            if field not in row:
                raise BenchTableError(f"{path}:{number}: reference answer has no '{field}' field")
        if row["question_id"] in answers:
            raise BenchTableError(f"{path}:{number}: question_id {row['question_id']!r} appears twice")
        answers[row["question_id"]] = {"text": row["text"], "answer_id": row.get("answer_id", row["question_id"])}
    return answers


def read_contexts(path: str | Path, context_of: Callable[[dict], str]) -> dict[str, str]:
    """image -> the judge's context text, from a context table whose records `context_of` turns into text
    (`coco_context`, `wild_context`)."""
    contexts = {}
    for number, row in read_table(path):
        if "image" not in row:
            raise BenchTableError(f"{path}:{number}: context record has no 'image' field")
        try:
            contexts[row["image"]] = context_of(row)
        except KeyError as exc:
            raise BenchTableError(f"{path}:{number}: context record has no {exc.args[0]!r} field") from None
    return contexts


def coco_context(record: dict) -> str:
    captions = "\n".join(record["captions"])
    boxes = "\n".join(f"{instance['category']}: {instance['bbox']}" for instance in record["instances"])
    return f"{captions}\n\n{boxes}"


def wild_context(record: dict) -> str:
    caption = record["caption"]
    return "\n".join(caption) if isinstance(caption, list) else caption


def read_rules(path: str | Path) -> dict:
    path = Path(path)
    try:
        rules = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchTableError(f"{path}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(rules, dict):
        raise BenchTableError(f"{path}: expected a JSON object of rules by category")
    return rules


def rule_for(rules: dict, rules_path: str | Path | None, key: str, default: dict | None = None) -> dict:
    """The {role, prompt} rule under `key` (a review category: "conv", "llava_bench_complex"). With a `default` (one
    rule for a whole bench, e.g. FOLDER_RULE under "folder"), the rules file's entry overrides it; without, the rules
    file must have it."""
    if default is not None:
        rule = rules.get(key, default)
    elif key in rules:
        rule = rules[key]
    else:
        raise BenchTableError(f"{rules_path}: no rule for category {key!r} (has: {', '.join(sorted(rules))})")
    if not isinstance(rule, dict) or not isinstance(rule.get("prompt"), str) or not isinstance(rule.get("role"), str):
        raise BenchTableError(f"{rules_path}: rule {key!r} needs string fields 'role' and 'prompt'")
    return rule


# ------------------------------------------------------------------------------------------------ requests
def judge_content(context: str, question: str, reference: str, candidate: str, rule: dict) -> str:
    role = rule["role"]
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{candidate}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule['prompt']}\n\n"
    )


@dataclass(frozen=True)
class EncodedImage:
    """An image ready for a request: the data URL sent, and a digest of its pixels that names it in cache keys and
    logs. The digest is of the decoded RGB pixels, not of the JPEG: a JPEG encoder of another Pillow version may
    write other bytes for the same picture, and that must not make a rerun pay again."""

    data_url: str
    pixel_sha256: str
    jpeg_bytes: int
    size: tuple[int, int]

    def placeholder(self) -> str:
        return f"<image sha256:{self.pixel_sha256} {self.size[0]}x{self.size[1]} jpeg {self.jpeg_bytes} bytes>"


def encode_image(image: Image.Image) -> EncodedImage:
    rgb = image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    jpeg = buffer.getvalue()
    digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    return EncodedImage(
        data_url="data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"),
        pixel_sha256=digest,
        jpeg_bytes=len(jpeg),
        size=rgb.size,
    )


def user_message(text: str, image: EncodedImage | None, described: bool = False) -> dict:
    """The user turn: the text alone (the reference), or the image first and the same text after it.
    `described`: the image as its placeholder instead of its data URL, for cache keys and request logs."""
    if image is None:
        return {"role": "user", "content": text}
    url = image.placeholder() if described else image.data_url
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def judge_messages(content: str, image: EncodedImage | None = None, described: bool = False) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, user_message(content, image, described)]


# ------------------------------------------------------------------------------------------------ replies
def parse_score(review: str) -> tuple[float, float] | None:
    """The reference's reading of a judge reply: the first line, commas turned into spaces, split on single spaces,
    exactly two fields, both numbers. Anything else (three fields, "8  9" after a comma, words) is None.
    Kept literal on purpose: a kinder parser would score replies the published numbers counted as failures."""
    fields = review.split("\n")[0].replace(",", " ").split(" ")
    if len(fields) != 2:
        return None
    try:
        return float(fields[0]), float(fields[1])
    except ValueError:
        return None


def review_line(
    review_id: int,
    question_id,
    reference_answer_id,
    candidate_answer_id,
    category: str,
    content: str,
    scores: tuple[float, float] | None,
    judge_model: str,
) -> dict:
    """A review in the reference format, plus the judge snapshot. A parse failure has `"tuple": null` (not the
    reference's [-1, -1]): a tool that averages tuples then fails loudly instead of biasing the score."""
    return {
        "id": review_id,
        "question_id": question_id,
        "answer1_id": reference_answer_id,
        "answer2_id": candidate_answer_id,
        "category": category,
        "content": content,
        "tuple": None if scores is None else list(scores),
        "judge_model": judge_model,
    }
