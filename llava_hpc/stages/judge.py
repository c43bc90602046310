"""Judge stage: every bench without exact answers (LLaVA-Bench COCO / In-the-Wild, folder benches) scored by an LLM
judge through any OpenAI-compatible API, the LLaVA-Bench way (see llava_hpc.eval.llava_bench).

Per bench, one task, writing under RUN/judge/<bench>/:
    cache/<key>.json          every reply, by request key (llava_hpc.eval.judge): nothing is ever paid for twice
    batches.json              Batch API transport: the batches submitted (a requeued job polls, never resubmits)
    reference_answers.jsonl   folder benches: the reference model's answers (LLaVA-Bench ships GPT-4's)
    requests.jsonl            every request, in the Batch API line format, images as pixel-digest placeholders; no key
    reviews.jsonl             the reference's review lines + judge snapshot, attempts, tokens, cost
    baseline_reviews.jsonl    folder benches: the same questions judged with an answer written for another image
    summary.json              scores (llava_hpc.eval.judged_report), n, parse failures, judge model, tokens, cost
    _SUCCESS

If some requests cannot be completed (server errors past all retries), everything else is still judged and cached,
then the task fails naming them; resubmitting sends only those. The API key is read from the environment variable
`judge.api_key_env` of the process that sends, only when something must be sent (a fully cached rerun needs none).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from llava_hpc.data.images import BadRecord
from llava_hpc.eval.benches import load_bench
from llava_hpc.eval.endpoint import job_key_problem, judge_placement, key_from_file
from llava_hpc.eval.judge import (
    CHARS_PER_TOKEN,
    CachedAsker,
    JudgeItem,
    JudgeSettings,
    ResponseCache,
    cost_usd,
    estimate_prompt_tokens,
    judge_items,
    reply_cost,
)
from llava_hpc.eval.judge_transport import (
    BatchPending,
    BatchTransport,
    ChatReply,
    ChatRequest,
    SyncTransport,
    api_key_from_env,
    chat_request,
    make_client,
    scrubber,
)
from llava_hpc.eval.judged_report import summarize_reviews
from llava_hpc.eval.llava_bench import (
    FOLDER_CONTEXT,
    EncodedImage,
    encode_image,
    judge_content,
    read_contexts,
    read_reference_answers,
    read_rules,
    review_category,
    rule_for,
    user_message,
)
from llava_hpc.rundir import atomic_write_json, atomic_write_jsonl, read_jsonl_objects
from llava_hpc.stages import Stage, StageContext, Task

log = logging.getLogger("llava_hpc.judge")

JUDGED_KINDS = ("llava-bench-coco", "llava-bench-wild", "folder")
BATCH_POLL_ENV = "LLAVA_HPC_BATCH_POLL_S"  # seconds between Batch API polls (default 60); tests make it short
DEFAULT_BATCH_POLL_S = 60.0
# Reference answers are the bench's yardstick: the model's most likely answer, not a sample.
REFERENCE_TEMPERATURE = 0.0
# Completion lengths for estimates, measured on the real tables: the mean of the 320 GPT-4 judge replies in LLaVA's
# vicuna-reviews (667 characters) and of GPT-4's 90 LLaVA-Bench (COCO) answers (405 characters).
ESTIMATED_REVIEW_CHARS = 667
ESTIMATED_ANSWER_CHARS = 405


class JudgeIncompleteError(RuntimeError):
    """Some requests failed after every retry; the rest is cached and a rerun sends only the failed ones."""


class AnswersFileError(ValueError):
    """A generate answers file that cannot be judged; the message names the file, the line and the field."""


def output_dir(ctx: StageContext, bench: str) -> Path:
    return ctx.run.stage_dir("judge") / bench


def judged_benches(ctx: StageContext) -> list[str]:
    return [name for name in ctx.pipeline.generate_benches() if ctx.pipeline.benches[name].kind in JUDGED_KINDS]


def is_done(ctx: StageContext, benches: list[str] | None = None) -> bool:
    return all(ctx.run.is_done(output_dir(ctx, name)) for name in judged_benches(ctx)
               if benches is None or name in benches)


def not_applicable(ctx: StageContext) -> str | None:
    """Why this pipeline has nothing for the judge at all (shown instead of a 'done' that never happened)."""
    if judged_benches(ctx):
        return None
    kinds = sorted({ctx.pipeline.benches[name].kind for name in ctx.pipeline.generate_benches()})
    scored = f" (its benches, {', '.join(kinds)}, are scored without a judge)" if kinds else ""
    return f"no judged bench in this pipeline{scored}"


def plan(ctx: StageContext, benches: list[str] | None = None) -> list[Task]:
    """One task per judged bench not done yet; `benches` limits it (the CLI's --bench)."""
    names = [name for name in judged_benches(ctx) if benches is None or name in benches]
    transport = ctx.pipeline.judge.transport
    return [
        Task(stage="judge", index=index, label=f"{name} ({ctx.pipeline.judge.model}, {transport})",
             payload={"bench": name})
        for index, name in enumerate(name for name in names if not ctx.run.is_done(output_dir(ctx, name)))
    ]


def inputs_ready(ctx: StageContext, parent: str, benches: list[str] | None = None) -> bool:
    """The answers of the benches it will judge, and only those: `judge --bench X` does not wait for the generation
    of other benches (exact-match ones are never judged)."""
    names = [name for name in judged_benches(ctx) if benches is None or name in benches]
    return all(ctx.run.is_done(ctx.run.stage_dir(parent) / name) for name in names)


def run(ctx: StageContext, task: Task) -> dict:
    return judge_bench(ctx, task.payload["bench"], local=False)


def login_side(ctx: StageContext) -> str | None:
    """On Slurm: why the judge is not a job (and what to run instead), or None where a job can do it."""
    if not judged_benches(ctx):
        return None
    placement = judge_placement(ctx.pipeline)
    return None if placement.as_job else placement.reason


def preflight(ctx: StageContext) -> list[str]:
    """What would make a judge job fail at once, found at submit time instead."""
    if not judged_benches(ctx) or not judge_placement(ctx.pipeline).as_job:
        return []
    problem = job_key_problem(ctx.pipeline)
    return [problem] if problem else []


def batches_pending(ctx: StageContext, bench: str) -> list[dict]:
    """The bench's Batch API batches not collected yet (recorded by the transport in batches.json)."""
    path = output_dir(ctx, bench) / "batches.json"
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["batches"] if not r["collected"]]


def progress(ctx: StageContext) -> str | None:
    notes = []
    for name in judged_benches(ctx):
        directory = output_dir(ctx, name)
        summary_path = directory / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            score = summary["scores"]["all"]["relative_score"]
            notes.append(f"{name}: {score} % relative ({summary['n']} judged)")
        elif pending := batches_pending(ctx, name):
            done = sum(r.get("completed", 0) for r in pending)
            total = sum(len(r["keys"]) for r in pending)
            notes.append(f"{name}: {len(pending)} batch(es) at the API ({done}/{total} done at the last look); "
                         "collect with `llava-hpc judge --collect`")
        elif (directory / "cache").is_dir():
            notes.append(f"{name}: {sum(1 for _ in (directory / 'cache').glob('*.json'))} replies cached")
    return "; ".join(notes) or None


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class PreparedQuestion:
    review_id: int  # 1-based position in the bench, as the reference numbers its reviews
    question_id: object
    category: str  # the review category (rule key)
    text: str
    context: str
    rule: dict
    image: EncodedImage | None


def read_candidate_answers(path: Path, question_ids: set) -> dict:
    """question_id -> {"text", "answer_id", "model_id"} from generate's answers.jsonl (reference answer format)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no answers to judge (run the generate stage first)")
    answers = {}
    for number, row in read_jsonl_objects(path, AnswersFileError):
        for field in ("question_id", "text"):
            if field not in row:
                raise AnswersFileError(f"{path}:{number}: answer has no '{field}' field")
        if not isinstance(row["text"], str):
            raise AnswersFileError(f"{path}:{number}: field 'text' must be a string")
        question_id = row["question_id"]
        if question_id not in question_ids:
            raise AnswersFileError(
                f"{path}:{number}: question_id {question_id!r} is not a question of this bench as it is now "
                "(was the bench changed after generate? resubmit generate with --force)"
            )
        if question_id in answers:
            raise AnswersFileError(f"{path}:{number}: question_id {question_id!r} is answered twice")
        answers[question_id] = {"text": row["text"], "answer_id": row.get("answer_id", question_id),
                                "model_id": row.get("model_id", "unknown")}
    return answers


class BenchJudging:
    """One bench's judging material: its questions with context, rule and (encoded) image, and the requests."""

    def __init__(self, ctx: StageContext, name: str):
        if name not in ctx.pipeline.benches:
            raise ValueError(f"no bench {name!r} in the pipeline; benches: {', '.join(sorted(ctx.pipeline.benches))}")
        self.ctx = ctx
        self.name = name
        self.bench = ctx.pipeline.benches[name]
        if self.bench.kind not in JUDGED_KINDS:
            raise ValueError(f"bench {name!r} is a {self.bench.kind} bench: it has exact answers and needs no judge")
        self.config = ctx.pipeline.judge
        self.settings = JudgeSettings(self.config.model, self.config.temperature, self.config.max_tokens)
        self.directory = output_dir(ctx, name)
        self.cache = ResponseCache(self.directory / "cache")
        self.is_folder = self.bench.kind == "folder"
        # Folder benches have no captions: the image is the judge's only context.
        self.include_image = self.config.include_image or self.is_folder
        self.data = load_bench(name, self.bench, ctx.pipeline)
        self.unusable: list[dict] = []  # questions skipped for an image that cannot be read
        self.questions = self._prepare_questions()
        self.table_references = None if self.is_folder else read_reference_answers(self.bench.answers)

    def _prepare_questions(self) -> list[PreparedQuestion]:
        rules = read_rules(self.bench.rules) if self.bench.rules else {}
        contexts = None if self.is_folder else read_contexts(self.bench.context, self.bench.kind)
        prepared = []
        for position, question in enumerate(self.data.questions):
            if contexts is None:
                context = FOLDER_CONTEXT
            elif question["image"] in contexts:
                context = contexts[question["image"]]
            else:
                raise ValueError(f"{self.bench.context}: no context record for image {question['image']!r} "
                                 f"(question {question['question_id']!r} of bench {self.name!r})")
            image = None
            if self.include_image and question["image"] is not None:
                try:
                    image = encode_image(self.data.load_image(question["image"]))
                except (FileNotFoundError, BadRecord) as exc:
                    log.warning("%s: question %r skipped: %s", self.name, question["question_id"], exc)
                    self.unusable.append({"question_id": question["question_id"], "reason": str(exc)})
                    continue
            prepared.append(PreparedQuestion(
                review_id=position + 1,
                question_id=question["question_id"],
                category=review_category(self.bench.kind, question["category"]),
                text=question["text"],
                context=context,
                rule=rule_for(rules, self.bench.rules, self.bench.kind, question["category"]),
                image=image,
            ))
        return prepared

    # -- folder benches: reference answers by the reference model
    def reference_request(self, question: PreparedQuestion) -> ChatRequest:
        return chat_request(
            self.config.reference_model,
            [user_message(question.text, question.image)],
            [user_message(question.text, question.image, described=True)],
            REFERENCE_TEMPERATURE,
            self.config.max_tokens,
        )

    def references_from_replies(self, replies: dict[str, ChatReply]) -> dict:
        references = {}
        for question in self.questions:
            request = self.reference_request(question)
            if request.key in replies:
                reply = replies[request.key]
                references[question.question_id] = {"text": reply.text, "answer_id": f"ref-{request.key[:16]}",
                                                    "model": reply.model, "category": question.category}
        return references

    # -- what the judge is asked
    def _item(self, question: PreparedQuestion, reference: dict, answer_text: str, answer_id) -> JudgeItem:
        content = judge_content(question.context, question.text, reference["text"], answer_text, question.rule)
        return JudgeItem(question.review_id, question.question_id, question.category, reference["answer_id"],
                         answer_id, content, question.image)

    def items(self, answers: dict, references: dict) -> list[JudgeItem]:
        """Candidate items: questions with both a candidate answer and a reference answer."""
        answered = [q for q in self.questions if q.question_id in answers]
        missing = [q.question_id for q in answered if q.question_id not in references]
        if missing:
            source = self.directory / "reference_answers.jsonl" if self.is_folder else self.bench.answers
            raise ValueError(f"{source}: no reference answer for question(s) {missing[:5]}")
        return [self._item(q, references[q.question_id], answers[q.question_id]["text"],
                           answers[q.question_id]["answer_id"]) for q in answered]

    def baseline_items(self, judged_ids: set, references: dict) -> list[JudgeItem]:
        """Each question paired with the reference answer of the question half the bench away: a fluent answer
        written for a different image (a derangement: never its own). Needs two questions at least."""
        with_reference = [q for q in self.questions if q.question_id in references]
        count = len(with_reference)
        if count < 2:
            return []
        items = []
        for position, question in enumerate(with_reference):
            if question.question_id not in judged_ids:
                continue
            other = references[with_reference[(position + count // 2) % count].question_id]
            items.append(self._item(question, references[question.question_id], other["text"],
                                    f"baseline:{other['answer_id']}"))
        return items


# ---------------------------------------------------------------------------------------------- judging
def _batch_poll_s() -> float:
    value = os.environ.get(BATCH_POLL_ENV)
    return float(value) if value else DEFAULT_BATCH_POLL_S


def _transport_factory(job: BenchJudging, local: bool, wait: bool):
    config = job.config

    def make():
        where = ("in this shell" if local else
                 f"in the job's environment, or write it to {config.key_file()} (mode 600; sbatch is never given it)")
        key = api_key_from_env(config.api_key_env, config.base_url, where,
                               fallback=None if local else key_from_file(job.ctx.pipeline))
        client = make_client(config.base_url, key, config.max_retries, config.timeout_s)
        if config.transport == "batch":
            return BatchTransport(client, job.directory / "batches.json", poll_s=_batch_poll_s(), scrub=scrubber(key),
                                  label=f"llava-hpc {job.ctx.pipeline.name} judge {job.name}", wait=wait)
        return SyncTransport(client, config.max_concurrency, scrub=scrubber(key))

    return make


def _fail_incomplete(name: str, directory: Path, outcome_failures: list) -> None:
    shown = "; ".join(list(dict.fromkeys(f.error for f in outcome_failures))[:3])
    raise JudgeIncompleteError(
        f"bench {name!r}: {len(outcome_failures)} judge requests failed after all retries (e.g. {shown}). "
        f"Everything else is cached in {directory / 'cache'}; run the judge again to send only these."
    )


def judge_bench(ctx: StageContext, bench_name: str, local: bool, wait: bool = True) -> dict:
    """Judge one bench and write its outputs; returns the summary.

    local=True: `llava-hpc judge` on this machine (a login node with network; the CLI sets the private umask first,
    as for every command); local=False: inside the judge stage's job. The work is the same; they differ in where the
    API key comes from. wait=False (Batch API only): submit what is needed, collect what has finished, and return
    {"pending": ...} instead of waiting while batches still run; call again to go on."""
    job = BenchJudging(ctx, bench_name)
    directory = job.directory
    ctx.run.clear_done(directory)
    generated = ctx.run.stage_dir("generate") / bench_name
    if not ctx.run.is_done(generated):
        raise FileNotFoundError(f"{generated / 'answers.jsonl'}: generate is not done for bench {bench_name!r}; "
                                "submit generate first")
    answers = read_candidate_answers(generated / "answers.jsonl", {q["question_id"] for q in job.data.questions})
    asker = CachedAsker(job.cache, _transport_factory(job, local, wait))
    try:
        return _judge(ctx, job, answers, asker)
    except BatchPending as pending:
        log.info("%s: %s", bench_name, pending)
        return {"bench": bench_name, "pending": str(pending),
                "batches": [r["batch_id"] for r in pending.records]}


def _judge(ctx: StageContext, job: BenchJudging, answers: dict, asker: CachedAsker) -> dict:
    bench_name, directory = job.name, job.directory
    logged: list[ChatRequest] = []

    def log_requests(requests: list[ChatRequest]) -> None:
        logged.extend(requests)
        atomic_write_jsonl(directory / "requests.jsonl", [r.batch_line(described=True) for r in logged])

    reference_replies: dict[str, ChatReply] = {}
    if job.is_folder:
        reference_requests = [job.reference_request(q) for q in job.questions]
        log_requests(reference_requests)
        reference_replies, failures = asker.ask(reference_requests)
        if failures:
            _fail_incomplete(bench_name, directory, failures)
        references = job.references_from_replies(reference_replies)
        atomic_write_jsonl(directory / "reference_answers.jsonl",
                           [{"question_id": qid, **ref} for qid, ref in references.items()])
    else:
        references = job.table_references

    items = job.items(answers, references)
    baseline_items = job.baseline_items({item.question_id for item in items}, references) if job.is_folder else []
    if job.is_folder and not baseline_items:
        log.warning("%s: a baseline needs two questions at least; none judged", bench_name)
    # Candidate and baseline judgements go out together: one batch (one 24 h window) instead of two.
    log_requests([item.request(job.settings, 1) for item in items + baseline_items])
    outcome = judge_items(asker, items + baseline_items, job.settings)
    log_requests([r for r in outcome.requests if r.attempt > 1])
    if outcome.failures:
        _fail_incomplete(bench_name, directory, outcome.failures)
    reviews = outcome.reviews[: len(items)]
    baseline_reviews = outcome.reviews[len(items):] if baseline_items else None

    answer_model = ", ".join(sorted({answers[item.question_id]["model_id"] for item in items})) or "unknown"
    summary = {
        "bench": bench_name,
        "kind": job.bench.kind,
        **summarize_reviews(reviews, job.config.model, answer_model, baseline_reviews),
    }
    all_reviews = reviews + (baseline_reviews or [])
    reference_costs = [reply_cost(r, job.config.reference_model) for r in reference_replies.values()]
    reference_spend = {
        "prompt_tokens": sum(r.prompt_tokens for r in reference_replies.values()),
        "completion_tokens": sum(r.completion_tokens for r in reference_replies.values()),
        "cost_usd": None if any(c is None for c in reference_costs) else round(sum(reference_costs), 4),
    }
    judge_spend = summary["spend"]
    summary.update(
        judge_models_served=sorted({r["judge_model_served"] for r in all_reviews}),
        transport=job.config.transport,
        include_image=job.include_image,
        questions=len(job.data.questions),
        n=summary["scores"]["all"]["n"],
        parse_failures=summary["scores"]["all"]["parse_failures"],
        asked_again=sum(r["attempts"] > 1 for r in all_reviews),
        missing_answers=sum(q.question_id not in answers for q in job.questions),
        unusable_questions=job.unusable,
        requests=len(logged),
        requests_sent=asker.sent,
        requests_from_cache=asker.from_cache,
        tokens_in=judge_spend["prompt_tokens"] + reference_spend["prompt_tokens"],
        tokens_out=judge_spend["completion_tokens"] + reference_spend["completion_tokens"],
        cost_usd=(None if judge_spend["cost_usd"] is None or reference_spend["cost_usd"] is None
                  else round(judge_spend["cost_usd"] + reference_spend["cost_usd"], 4)),
    )
    if job.is_folder:
        summary.update(reference_model=job.config.reference_model, reference_spend=reference_spend)
    atomic_write_jsonl(directory / "reviews.jsonl", reviews)
    if baseline_reviews is not None:
        atomic_write_jsonl(directory / "baseline_reviews.jsonl", baseline_reviews)
    atomic_write_json(directory / "summary.json", summary)
    ctx.run.mark_done(directory, {"n": summary["n"], "relative_score": summary["scores"]["all"]["relative_score"],
                                  "judge_model": job.config.model})
    log.info("%s: relative score %s %% over %d questions (%d parse failures), judge %s, %d requests sent, %d cached",
             bench_name, summary["scores"]["all"]["relative_score"], summary["n"], summary["parse_failures"],
             job.config.model, asker.sent, asker.from_cache)
    return summary


# ---------------------------------------------------------------------------------------------- dry run
def _phase_estimate(phase: str, model: str, requests: list[ChatRequest], images: list[list[EncodedImage]],
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


def _bench_estimate(ctx: StageContext, name: str) -> dict:
    job = BenchJudging(ctx, name)
    notes = ["tokens are estimates: text characters / 4, images by OpenAI's 512-px tile rule; completions "
             f"{math.ceil(ESTIMATED_REVIEW_CHARS / CHARS_PER_TOKEN)} tokens per review, "
             f"{math.ceil(ESTIMATED_ANSWER_CHARS / CHARS_PER_TOKEN)} per reference "
             "answer (means of real GPT-4 replies); asking unreadable replies again is not included"]
    phases = []
    if job.is_folder:
        requests = [job.reference_request(q) for q in job.questions]
        images = [[q.image] for q in job.questions]
        phases.append(_phase_estimate("reference answers", job.config.reference_model, requests, images, job.cache,
                                      ESTIMATED_ANSWER_CHARS))
        replies = {r.key: job.cache.get(r.key) for r in requests if job.cache.path(r.key).exists()}
        references = job.references_from_replies(replies)
        stand_in = {"text": "x" * ESTIMATED_ANSWER_CHARS, "answer_id": "estimate"}
        if len(references) < len(job.questions):
            notes.append("reference answers not all made yet: judge prompts use a stand-in of typical length")
        references = {q.question_id: references.get(q.question_id, stand_in) for q in job.questions}
    else:
        references = job.table_references
    generated = ctx.run.stage_dir("generate") / name / "answers.jsonl"
    if ctx.run.is_done(generated.parent):
        answers = read_candidate_answers(generated, {q["question_id"] for q in job.data.questions})
    else:
        notes.append("generate is not done: candidate answers are stood in for by reference-answer-length text")
        answers = {q.question_id: {"text": references[q.question_id]["text"], "answer_id": "estimate"}
                   for q in job.questions}
    items = job.items(answers, references)
    phases.append(_phase_estimate("judge", job.config.model, [i.request(job.settings, 1) for i in items],
                                  [[i.image] if i.image else [] for i in items], job.cache, ESTIMATED_REVIEW_CHARS))
    if job.is_folder:
        baseline = job.baseline_items({i.question_id for i in items}, references)
        phases.append(_phase_estimate("baseline", job.config.model, [i.request(job.settings, 1) for i in baseline],
                                      [[i.image] if i.image else [] for i in baseline], job.cache,
                                      ESTIMATED_REVIEW_CHARS))

    def total(field: str):
        values = [phase[field] for phase in phases]
        return None if any(v is None for v in values) else sum(values)

    totals = {field: total(field) for field in ("requests", "cached", "to_send", "prompt_tokens", "completion_tokens",
                                                 "cost_sync_usd", "cost_batch_usd")}
    return {"bench": name, "judge_model": job.config.model, "transport": job.config.transport, "phases": phases,
            "total": totals, "notes": notes}


def dry_run_estimate(ctx: StageContext, benches: list[str] | None = None) -> dict:
    """bench -> what judging would send and cost: per phase (reference answers, judge, baseline) the requests, how
    many the cache already holds, estimated prompt and completion tokens of the rest, and their cost sync and via the
    Batch API (None for a model not in the price table). Sends nothing and needs no key."""
    names = [name for name in judged_benches(ctx) if benches is None or name in benches]
    return {name: _bench_estimate(ctx, name) for name in names}


STAGE = Stage(name="judge", after=("generate",), plan=plan, run=run, is_done=is_done, progress=progress,
              preflight=preflight, login_side=login_side, not_applicable=not_applicable, inputs_ready=inputs_ready)
