"""Judging one bench and writing its outputs under RUN/judge/<bench>/ (the judge stage's job and `llava-hpc judge`
on the login side both call `judge_bench`):

    cache/<key>.json          every reply, by request key (llava_hpc.eval.judge): nothing is ever paid for twice
    batches.json              Batch API transport: the batches submitted (a requeued job polls, never resubmits)
    reference_answers.jsonl   benches without an answers table: the reference model's answers (LLaVA-Bench ships
                              GPT-4's)
    requests.jsonl            every request, in the Batch API line format, images as pixel-digest placeholders; no key
    reviews.jsonl             the reference's review lines + judge snapshot, attempts, tokens, cost
    baseline_reviews.jsonl    the same questions judged with an answer written for another image (benches whose
                              reference answers the reference model writes)
    summary.json              scores (llava_hpc.eval.judged_report), n, parse failures, judge model, tokens, cost
    _SUCCESS

If some requests cannot be completed (server errors past all retries), everything else is still judged and cached,
then judging fails naming them; running it again sends only those. The API key is read from the environment
variable `judge.api_key_env` of the process that sends, only when something must be sent (a fully cached rerun
needs none).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llava_hpc.config import Pipeline
from llava_hpc.eval.bench_judging import BenchJudging, read_candidate_answers
from llava_hpc.eval.endpoint import key_from_file
from llava_hpc.eval.judge import CachedAsker, JudgeItem, Transport, judge_items, reply_cost
from llava_hpc.eval.judge_transport import (
    BatchPending,
    BatchTransport,
    ChatReply,
    ChatRequest,
    RequestFailure,
    SyncTransport,
    api_key_from_env,
    make_client,
    scrubber,
)
from llava_hpc.eval.judged_report import summarize_reviews
from llava_hpc.rundir import RunDir, atomic_write_json, atomic_write_jsonl

log = logging.getLogger("llava_hpc.judge")

BATCH_POLL_ENV = "LLAVA_HPC_BATCH_POLL_S"  # seconds between Batch API polls (default 60); tests make it short
DEFAULT_BATCH_POLL_S = 60.0


class JudgeIncompleteError(RuntimeError):
    """Some requests failed after every retry; the rest is cached and a rerun sends only the failed ones."""


def judge_bench(pipeline: Pipeline, run: RunDir, bench_name: str, local: bool, wait: bool = True) -> dict:
    """Judge one bench and write its outputs; returns the summary.

    local=True: `llava-hpc judge` on this machine (a login node with network; the CLI sets the private umask first,
    as for every command); local=False: inside the judge stage's job. The work is the same; they differ in where the
    API key comes from. wait=False (Batch API only): submit what is needed, collect what has finished, and return
    {"pending": ...} instead of waiting while batches still run; call again to go on."""
    judging = BenchJudging(pipeline, run, bench_name)
    run.clear_done(judging.directory)
    generated = run.stage_dir("generate") / bench_name
    if not run.is_done(generated):
        raise FileNotFoundError(f"{generated / 'answers.jsonl'}: generate is not done for bench {bench_name!r}; "
                                "submit generate first")
    answers = read_candidate_answers(generated / "answers.jsonl", {q["question_id"] for q in judging.data.questions})
    asker = CachedAsker(judging.cache, _transport_factory(judging, local, wait))
    try:
        return _judge(run, judging, answers, asker)
    except BatchPending as pending:
        log.info("%s: %s", bench_name, pending)
        return {"bench": bench_name, "pending": str(pending),
                "batches": [r["batch_id"] for r in pending.records]}


# ---------------------------------------------------------------------------------------------- transport
def _batch_poll_s() -> float:
    value = os.environ.get(BATCH_POLL_ENV)
    return float(value) if value else DEFAULT_BATCH_POLL_S


def _transport_factory(judging: BenchJudging, local: bool, wait: bool):
    config = judging.config

    def make() -> Transport:
        where = ("in this shell" if local else
                 f"in the job's environment, or write it to {config.key_file()} (mode 600; sbatch is never given it)")
        key = api_key_from_env(config.api_key_env, config.base_url, where,
                               fallback=None if local else key_from_file(judging.pipeline))
        client = make_client(config.base_url, key, config.max_retries, config.timeout_s)
        if config.transport == "batch":
            return BatchTransport(client, judging.directory / "batches.json", poll_s=_batch_poll_s(),
                                  scrub=scrubber(key), label=f"llava-hpc {judging.pipeline.name} judge {judging.name}",
                                  wait=wait)
        return SyncTransport(client, config.max_concurrency, scrub=scrubber(key))

    return make


def _fail_incomplete(name: str, directory: Path, failures: list[RequestFailure]) -> None:
    shown = "; ".join(list(dict.fromkeys(f.error for f in failures))[:3])
    raise JudgeIncompleteError(
        f"bench {name!r}: {len(failures)} judge requests failed after all retries (e.g. {shown}). "
        f"Everything else is cached in {directory / 'cache'}; run the judge again to send only these."
    )


class _RequestLog:
    """requests.jsonl: every request the bench's reviews rest on, rewritten whole as requests are added."""

    def __init__(self, path: Path):
        self.path = path
        self.requests: list[ChatRequest] = []

    def add(self, requests: list[ChatRequest]) -> None:
        self.requests.extend(requests)
        atomic_write_jsonl(self.path, [r.batch_line(described=True) for r in self.requests])


# ---------------------------------------------------------------------------------------------- judging
def _judge(run: RunDir, judging: BenchJudging, answers: dict, asker: CachedAsker) -> dict:
    requests = _RequestLog(judging.directory / "requests.jsonl")
    references, reference_replies = _references(judging, asker, requests)
    items = judging.items(answers, references)
    baseline_items = _baseline_items(judging, items, references)
    # Candidate and baseline judgements go out together: one batch (one 24 h window) instead of two.
    requests.add([item.request(judging.settings, 1) for item in items + baseline_items])
    outcome = judge_items(asker, items + baseline_items, judging.settings)
    requests.add([r for r in outcome.requests if r.attempt > 1])
    if outcome.failures:
        _fail_incomplete(judging.name, judging.directory, outcome.failures)
    reviews = outcome.reviews[: len(items)]
    baseline_reviews = outcome.reviews[len(items):] if baseline_items else None

    summary = _summary(judging, answers, items, reviews, baseline_reviews, reference_replies, asker,
                       len(requests.requests))
    _write(run, judging, reviews, baseline_reviews, summary)
    log.info("%s: relative score %s %% over %d questions (%d parse failures), judge %s, %d requests sent, %d cached",
             judging.name, summary["scores"]["all"]["relative_score"], summary["n"], summary["parse_failures"],
             judging.config.model, asker.sent, asker.from_cache)
    return summary


def _references(judging: BenchJudging, asker: CachedAsker, requests: _RequestLog
                ) -> tuple[dict, dict[str, ChatReply]]:
    """(question_id -> reference answer, the reference model's replies): the bench's table, or asked of the
    reference model and written to reference_answers.jsonl."""
    if not judging.kind.reference_model_answers:
        return judging.table_references, {}
    reference_requests = [judging.reference_request(q) for q in judging.questions]
    requests.add(reference_requests)
    replies, failures = asker.ask(reference_requests)
    if failures:
        _fail_incomplete(judging.name, judging.directory, failures)
    references = judging.references_from_replies(replies)
    atomic_write_jsonl(judging.directory / "reference_answers.jsonl",
                       [{"question_id": qid, **ref} for qid, ref in references.items()])
    return references, replies


def _baseline_items(judging: BenchJudging, items: list[JudgeItem], references: dict) -> list[JudgeItem]:
    if not judging.kind.reference_model_answers:
        return []
    baseline = judging.baseline_items({item.question_id for item in items}, references)
    if not baseline:
        log.warning("%s: a baseline needs two questions at least; none judged", judging.name)
    return baseline


def _reference_spend(replies: dict[str, ChatReply], model: str) -> dict:
    costs = [reply_cost(r, model) for r in replies.values()]
    return {
        "prompt_tokens": sum(r.prompt_tokens for r in replies.values()),
        "completion_tokens": sum(r.completion_tokens for r in replies.values()),
        "cost_usd": None if any(c is None for c in costs) else round(sum(costs), 4),
    }


def _summary(judging: BenchJudging, answers: dict, items: list[JudgeItem], reviews: list[dict],
             baseline_reviews: list[dict] | None, reference_replies: dict[str, ChatReply], asker: CachedAsker,
             requests: int) -> dict:
    config = judging.config
    answer_model = ", ".join(sorted({answers[item.question_id]["model_id"] for item in items})) or "unknown"
    summary = {
        "bench": judging.name,
        "kind": judging.bench.kind,
        **summarize_reviews(reviews, config.model, answer_model, baseline_reviews),
    }
    all_reviews = reviews + (baseline_reviews or [])
    reference_spend = _reference_spend(reference_replies, config.reference_model)
    judge_spend = summary["spend"]
    summary.update(
        judge_models_served=sorted({r["judge_model_served"] for r in all_reviews}),
        transport=config.transport,
        include_image=judging.include_image,
        questions=len(judging.data.questions),
        n=summary["scores"]["all"]["n"],
        parse_failures=summary["scores"]["all"]["parse_failures"],
        asked_again=sum(r["attempts"] > 1 for r in all_reviews),
        missing_answers=sum(q.question_id not in answers for q in judging.questions),
        unusable_questions=judging.unusable,
        requests=requests,
        requests_sent=asker.sent,
        requests_from_cache=asker.from_cache,
        tokens_in=judge_spend["prompt_tokens"] + reference_spend["prompt_tokens"],
        tokens_out=judge_spend["completion_tokens"] + reference_spend["completion_tokens"],
        cost_usd=(None if judge_spend["cost_usd"] is None or reference_spend["cost_usd"] is None
                  else round(judge_spend["cost_usd"] + reference_spend["cost_usd"], 4)),
    )
    if judging.kind.reference_model_answers:
        summary.update(reference_model=config.reference_model, reference_spend=reference_spend)
    return summary


def _write(run: RunDir, judging: BenchJudging, reviews: list[dict], baseline_reviews: list[dict] | None,
           summary: dict) -> None:
    directory = judging.directory
    atomic_write_jsonl(directory / "reviews.jsonl", reviews)
    if baseline_reviews is not None:
        atomic_write_jsonl(directory / "baseline_reviews.jsonl", baseline_reviews)
    atomic_write_json(directory / "summary.json", summary)
    run.mark_done(directory, {"n": summary["n"], "relative_score": summary["scores"]["all"]["relative_score"],
                              "judge_model": judging.config.model})
