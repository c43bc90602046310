"""LLaVA-shaped training records at real scale, for benchmarks: the reference's data files are the user's
(hundreds of MB of JSON, 558K / 158K records), so benchmarks build records of the same shape and lengths.

- pretrain (LLaVA-Pretrain `blip_laion_cc_sbu_558k.json`): one human/gpt pair per record; the human turn is
  one of the reference's 11 brief-caption instructions with `<image>` before or after it, the answer a
  BLIP-style caption (3-25 words, mean ~10).
- instruct (`llava_instruct_150k.json`): conversation (multi-turn, 1-5 exchanges), detail and complex
  reasoning records in the real mix (58K : 23K : 77K), their questions and answers drawn from the real
  LLaVA-Bench COCO texts (../shared/data/llava-eval: GPT-4's answers of the same three kinds, so answer
  lengths follow the real distribution), COCO-style image names shared by ~1.95 records per image (158K
  records over 81K images), `<image>` in the first human turn.

Records are deterministic in (split, n, seed).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

# As the tests find them: beside the checkout, or where LLAVA_HPC_EVAL_DATA says.
EVAL_DATA = Path(os.environ.get("LLAVA_HPC_EVAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "llava-eval"))
if not EVAL_DATA.exists() and Path("/work/shared/data/llava-eval").exists():
    EVAL_DATA = Path("/work/shared/data/llava-eval")

BRIEF_PROMPTS = (  # the reference's brief-description instructions (LLaVA paper, Table 8)
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
CAPTION_WORDS = (
    "a man woman child dog cat car street table room kitchen beach city building tree sky water boat train "
    "with of on in the and at near red blue white black green wooden old new large small two three people "
    "standing sitting walking playing holding looking stock photo vector illustration background view house "
    "for sale luxury modern vintage close up portrait group bicycle phone food plate pizza field grass snow"
).split()
INSTRUCT_MIX = (("conv", 58), ("detail", 23), ("complex", 77))  # thousands of records per kind in the 150K
RECORDS_PER_IMAGE = 158 / 81


def _eval_texts() -> dict[str, list[tuple[str, str]]]:
    """(question, GPT-4 answer) pairs per category from the real LLaVA-Bench COCO tables."""
    questions = [json.loads(line) for line in (EVAL_DATA / "qa90_questions.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (EVAL_DATA / "qa90_gpt4_answer.jsonl").read_text().splitlines()]
    pairs: dict[str, list[tuple[str, str]]] = {}
    for question, answer in zip(questions, answers):
        pairs.setdefault(question["category"], []).append((question["text"], answer["text"]))
    return pairs


def pretrain_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        prompt = rng.choice(BRIEF_PROMPTS)
        human = f"{prompt}\n<image>" if rng.random() < 0.5 else f"<image>\n{prompt}"
        caption = " ".join(rng.choice(CAPTION_WORDS) for _ in range(max(3, min(25, round(rng.gauss(10, 4))))))
        records.append({
            "id": f"{i:09d}",
            "image": f"{i // 10_000:05d}/{i:09d}.jpg",
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}],
        })
    return records


def instruct_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    texts = _eval_texts()
    kinds = [kind for kind, weight in INSTRUCT_MIX for _ in range(weight)]
    n_images = max(1, round(n / RECORDS_PER_IMAGE))
    records = []
    for i in range(n):
        kind = rng.choice(kinds)
        exchanges = rng.randint(1, 5) if kind == "conv" else 1
        conversations = []
        for turn in range(exchanges):
            question, answer = rng.choice(texts[kind])
            if turn == 0:
                question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        image = i if i < n_images else rng.randrange(n_images)  # every image used at least once
        records.append({"id": f"{kind}-{i:07d}", "image": f"{image:012d}.jpg", "conversations": conversations})
    return records


def write_json(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f)
    return path
