"""The judge's dry run: what judging a bench would send and cost, from the cache and the bench; sends nothing and
needs no key."""

from __future__ import annotations

import math

from llava_hpc.config import Pipeline
from llava_hpc.eval.bench_judging import BenchJudging, read_candidate_answers
from llava_hpc.eval.benches import judged_benches
from llava_hpc.eval.judge import CHARS_PER_TOKEN, JudgeItem, ResponseCache, cost_usd, estimate_prompt_tokens
from llava_hpc.eval.judge_transport import ChatRequest
from llava_hpc.eval.llava_bench import EncodedImage
from llava_hpc.rundir import RunDir

# Completion lengths for estimates, measured on the real tables: the mean of the 320 GPT-4 judge replies in LLaVA's
# vicuna-reviews (667 characters) and of GPT-4's 90 LLaVA-Bench (COCO) answers (405 characters).
ESTIMATED_REVIEW_CHARS = 667
ESTIMATED_ANSWER_CHARS = 405
TOTALLED = ("requests", "cached", "to_send", "prompt_tokens", "completion_tokens", "cost_sync_usd", "cost_batch_usd")


def dry_run_estimate(pipeline: Pipeline, run: RunDir, benches: list[str] | None = None) -> dict:
    """bench -> what judging would send and cost: per phase (reference answers, judge, baseline) the requests, how
    many the cache already holds, estimated prompt and completion tokens of the rest, and their cost sync and via the
    Batch API (None for a model not in the price table). `benches` limits it to some judged benches."""
    names = [name for name in judged_benches(pipeline) if benches is None or name in benches]
    return {name: bench_estimate(pipeline, run, name) for name in names}


def bench_estimate(pipeline: Pipeline, run: RunDir, name: str) -> dict:
    judging = BenchJudging(pipeline, run, name)
    notes = ["tokens are estimates: text characters / 4, images by OpenAI's 512-px tile rule; completions "
             f"{math.ceil(ESTIMATED_REVIEW_CHARS / CHARS_PER_TOKEN)} tokens per review, "
             f"{math.ceil(ESTIMATED_ANSWER_CHARS / CHARS_PER_TOKEN)} per reference "
             "answer (means of real GPT-4 replies); asking unreadable replies again is not included"]
    phases = []
    if judging.kind.reference_model_answers:
        requests = [judging.reference_request(q) for q in judging.questions]
        phases.append(_phase("reference answers", judging.config.reference_model, requests,
                             [[q.image] for q in judging.questions], judging.cache, ESTIMATED_ANSWER_CHARS))
        references = _known_references(judging, requests, notes)
    else:
        references = judging.table_references
    items = judging.items(_candidate_answers(run, judging, references, notes), references)
    phases.append(_judge_phase("judge", judging, items))
    if judging.kind.reference_model_answers:
        phases.append(_judge_phase("baseline", judging,
                                   judging.baseline_items({i.question_id for i in items}, references)))

    def total(field: str):
        values = [phase[field] for phase in phases]
        return None if any(v is None for v in values) else sum(values)

    return {"bench": name, "judge_model": judging.config.model, "transport": judging.config.transport,
            "phases": phases, "total": {field: total(field) for field in TOTALLED}, "notes": notes}


def _known_references(judging: BenchJudging, requests: list[ChatRequest], notes: list[str]) -> dict:
    """The reference answers already cached, and a stand-in of typical length for the others."""
    cache = judging.cache
    replies = {r.key: cache.get(r.key) for r in requests if cache.path(r.key).exists()}
    references = judging.references_from_replies(replies)
    stand_in = {"text": "x" * ESTIMATED_ANSWER_CHARS, "answer_id": "estimate"}
    if len(references) < len(judging.questions):
        notes.append("reference answers not all made yet: judge prompts use a stand-in of typical length")
    return {q.question_id: references.get(q.question_id, stand_in) for q in judging.questions}


def _candidate_answers(run: RunDir, judging: BenchJudging, references: dict, notes: list[str]) -> dict:
    generated = run.stage_dir("generate") / judging.name / "answers.jsonl"
    if run.is_done(generated.parent):
        return read_candidate_answers(generated, {q["question_id"] for q in judging.data.questions})
    notes.append("generate is not done: candidate answers are stood in for by reference-answer-length text")
    return {q.question_id: {"text": references[q.question_id]["text"], "answer_id": "estimate"}
            for q in judging.questions}


def _judge_phase(phase: str, judging: BenchJudging, items: list[JudgeItem]) -> dict:
    return _phase(phase, judging.config.model, [i.request(judging.settings, 1) for i in items],
                  [[i.image] if i.image else [] for i in items], judging.cache, ESTIMATED_REVIEW_CHARS)


def _phase(phase: str, model: str, requests: list[ChatRequest], images: list[list[EncodedImage]],
           cache: ResponseCache, completion_chars: int) -> dict:
    to_send = [(r, i) for r, i in zip(requests, images) if not cache.path(r.key).exists()]
    prompt_tokens = sum(estimate_prompt_tokens(r, i) for r, i in to_send)
    completion_tokens = len(to_send) * math.ceil(completion_chars / CHARS_PER_TOKEN)
    return {
        "phase": phase,
        "model": model,
        "requests": len(requests),
        "cached": len(requests) - len(to_send),
        "to_send": len(to_send),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_sync_usd": cost_usd(model, prompt_tokens, completion_tokens, batch=False),
        "cost_batch_usd": cost_usd(model, prompt_tokens, completion_tokens, batch=True),
    }
