"""The judge stage end to end against the local OpenAI-compatible stub and the real LLaVA-Bench (COCO) tables:
reviews and summary, asking again after an unreadable reply, the cache, resuming a killed job (sync and batch)
without paying twice, the API key never on disk, folder benches with reference answers and a baseline, dry runs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    KEY,
    KEY_ENV,
    LLAVA_EVAL,
    REQUIRE_EVAL_DATA,
    assert_key_nowhere,
    coco_context,
    context_from,
    fake_generate,
    openai_stub_fixture,
    qa90,
    qa90_scores,
    wait_for,
)
from openai_stub import OpenAIStub, question_of, user_text
from PIL import Image

from llava_hpc.eval import judging
from llava_hpc.eval.bench_judging import AnswersFileError
from llava_hpc.eval.judge_estimate import dry_run_estimate
from llava_hpc.eval.judge_transport import MissingApiKeyError
from llava_hpc.rundir import read_jsonl
from llava_hpc.stages import StageContext

needs_tables = pytest.mark.skipif(not REQUIRE_EVAL_DATA and not (LLAVA_EVAL / "qa90_questions.jsonl").exists(),
                                  reason=f"{LLAVA_EVAL} is not here")
REVIEW_FIELDS = {"id", "question_id", "answer1_id", "answer2_id", "category", "content", "tuple", "judge_model"}

stub = openai_stub_fixture(expected_key=KEY, scores=qa90_scores, env={KEY_ENV: KEY})


def judge_dir(ctx: StageContext, bench: str = "llava-bench") -> Path:
    return ctx.run.stage_dir("judge") / bench


@needs_tables
def test_coco_bench_reviews_summary_and_key_hygiene(tmp_path, stub, caplog):
    caplog.set_level("DEBUG")
    ctx = coco_context(tmp_path, stub)
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()])
    summary = judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)

    directory = judge_dir(ctx)
    reviews = read_jsonl(directory / "reviews.jsonl")
    assert len(reviews) == 90 and REVIEW_FIELDS <= set(reviews[0])
    first = reviews[0]
    assert (first["id"], first["question_id"], first["answer1_id"], first["answer2_id"]) == (1, 0, 0, "cand-0")
    assert first["category"] == "conv" and first["tuple"] == [8.0, 6.0] and first["judge_model"] == "gpt-4o-2024-11-20"
    scores = summary["scores"]
    assert (scores["conv"]["relative_score"], scores["detail"]["relative_score"], scores["complex"]["relative_score"]) \
        == (75.0, 50.0, 100.0)
    assert scores["all"]["relative_score"] == round(round(17 / 3, 3) / round(24 / 3, 3) * 100, 1)
    assert (summary["n"], summary["parse_failures"], summary["requests_sent"]) == (90, 0, 90)
    assert summary["tokens_in"] > 0 and summary["cost_usd"] > 0 and summary["judge_model"] == "gpt-4o-2024-11-20"
    assert json.loads((directory / "summary.json").read_text()) == summary
    assert (directory / "_SUCCESS").exists() and len(list((directory / "cache").glob("*.json"))) == 90
    logged = read_jsonl(directory / "requests.jsonl")
    assert len(logged) == 90 and logged[0]["url"] == "/v1/chat/completions" and logged[0]["body"]["temperature"] == 0.2

    assert {e["authorization"] for e in stub.log} == {f"Bearer {KEY}"}  # the env key, on every request
    assert_key_nowhere(tmp_path)
    assert not any(KEY in record.getMessage() for record in caplog.records)


@needs_tables
def test_second_run_is_served_by_the_cache(tmp_path, stub, monkeypatch):
    ctx = coco_context(tmp_path, stub)
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()])
    first = judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)
    stub.reset_log()
    monkeypatch.delenv(KEY_ENV)  # a fully cached rerun needs no key at all
    second = judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)
    assert stub.log == []
    assert (second["requests_sent"], second["requests_from_cache"]) == (0, 90)
    assert second["scores"] == first["scores"] and second["cost_usd"] == first["cost_usd"]


@needs_tables
def test_unreadable_reply_is_asked_again_once_then_counted_as_a_parse_failure(tmp_path, stub):
    questions = qa90()
    flaky, hopeless = questions[0]["text"], questions[1]["text"]  # a conv and a detail question, texts used once

    def reply(body, seen):
        question = question_of(body)
        if question == hopeless or (question == flaky and seen == 1):
            return "The first answer is better.\nScores: 8 and 6."
        first, second = stub.script.scores[question]
        return f"{first} {second}\nfine"

    stub.script.reply = reply
    ctx = coco_context(tmp_path, stub)
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in questions])
    summary = judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)
    reviews = {r["question_id"]: r for r in read_jsonl(judge_dir(ctx) / "reviews.jsonl")}
    assert reviews[0]["attempts"] == 2 and reviews[0]["tuple"] == [8.0, 6.0]
    assert reviews[1]["attempts"] == 2 and reviews[1]["tuple"] is None
    assert (summary["n"], summary["parse_failures"], summary["asked_again"], summary["requests_sent"]) == (89, 1, 2, 92)
    detail = summary["scores"]["detail"]
    assert (detail["n"], detail["parse_failures"], detail["relative_score"]) == (29, 1, 50.0)  # excluded, not -1


@needs_tables
def test_transport_failures_fail_the_task_and_a_rerun_sends_only_those(tmp_path, stub):
    ctx = coco_context(tmp_path, stub, max_retries=0, max_concurrency=1)
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()])
    stub.script.actions.extend(["ok"] * 10 + ["500", "500"])
    with pytest.raises(judging.JudgeIncompleteError, match="2 judge requests failed"):
        judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)
    assert not (judge_dir(ctx) / "_SUCCESS").exists()
    stub.reset_log()
    summary = judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)
    assert summary["requests_sent"] == 2 and len(stub.chat_log()) == 2


def test_missing_key_and_bad_answers_are_named(tmp_path, monkeypatch):
    with OpenAIStub() as stub:
        ctx = coco_context(tmp_path, stub, base_url=None) if (LLAVA_EVAL / "rule.json").exists() else None
    if ctx is None:
        if not REQUIRE_EVAL_DATA:
            pytest.skip(f"{LLAVA_EVAL} is not here")
    monkeypatch.delenv(KEY_ENV, raising=False)
    fake_generate(ctx, "llava-bench", [0, 1])
    with pytest.raises(MissingApiKeyError, match=f"export {KEY_ENV} in this shell"):
        judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)
    answers = ctx.run.stage_dir("generate") / "llava-bench" / "answers.jsonl"
    answers.write_text('{"question_id": 0, "text": "ok"}\n{"text": "which question?"}\n')
    with pytest.raises(AnswersFileError, match=r"answers.jsonl:2: answer has no 'question_id' field"):
        judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)


# ---------------------------------------------------------------------------------------------- resuming
def start_judge_job(ctx: StageContext, extra_env: dict | None = None) -> subprocess.Popen:
    """The judge task as a job runs it, in its own process."""
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from llava_hpc.stages.runner import load_context\n"
            "from llava_hpc.eval.judging import judge_bench\n"
            f"ctx = load_context({str(ctx.run.root)!r})\n"
            "judge_bench(ctx.pipeline, ctx.run, 'llava-bench', local=False)\n")
    env = {**os.environ, KEY_ENV: KEY, **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_on_job(condition, job: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """conftest's wait_for, failing at once with the job's output if it ends first, and killing it on a timeout."""
    def met() -> bool:
        if condition():
            return True
        if job.poll() is not None:
            raise AssertionError(f"the judge job ended early:\n{job.stdout.read().decode()[-3000:]}")
        return False

    try:
        wait_for(met, timeout=timeout_s, poll=0.05, what="the judge job")
    except AssertionError:
        job.kill()
        raise


@needs_tables
def test_killed_sync_job_resumes_without_paying_twice(tmp_path, stub):
    ctx = coco_context(tmp_path, stub)
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()])
    cache = judge_dir(ctx) / "cache"
    stub.script.hold_after = 30  # then requests hang: the job is killed with requests in flight
    job = start_judge_job(ctx)

    def settled() -> bool:
        held = stub.chat_log("held")
        cached = len(list(cache.glob("*.json"))) if cache.exists() else 0
        return bool(held) and cached == len(stub.answered_keys())

    wait_on_job(settled, job)
    job.send_signal(signal.SIGKILL)
    job.wait()
    answered_before = len(stub.answered_keys())
    assert 30 <= answered_before < 90 and not (judge_dir(ctx) / "_SUCCESS").exists()

    stub.script.hold_after = None
    summary = judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=False)
    answered = stub.answered_keys()
    assert len(answered) == len(set(answered)) == 90  # every judgement paid for exactly once
    assert summary["requests_sent"] == 90 - answered_before and summary["n"] == 90
    assert_key_nowhere(tmp_path)


@needs_tables
def test_killed_batch_job_polls_the_same_batch_again(tmp_path, stub, monkeypatch):
    ctx = coco_context(tmp_path, stub, transport="batch")
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()])
    state = judge_dir(ctx) / "batches.json"
    stub.script.batch_polls = 10**9  # the batch stays in progress until the test says otherwise
    job = start_judge_job(ctx, {judging.BATCH_POLL_ENV: "0.05"})
    wait_on_job(lambda: state.exists() and json.loads(state.read_text())["batches"][0]["batch_id"], job)
    job.send_signal(signal.SIGKILL)
    job.wait()

    stub.script.batch_polls = 0
    monkeypatch.setenv(judging.BATCH_POLL_ENV, "0.01")
    summary = judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=False)
    assert len(stub.requests_to("POST", "/v1/batches")) == 1 and len(stub.requests_to("POST", "/v1/files")) == 1
    answered = stub.answered_keys()
    assert len(answered) == len(set(answered)) == 90 and summary["n"] == 90
    assert summary["requests_sent"] == 0  # the resumed job only polled and collected
    assert read_jsonl(judge_dir(ctx) / "reviews.jsonl")[0]["cost_usd"] == pytest.approx(
        0.5 * (read_jsonl(judge_dir(ctx) / "reviews.jsonl")[0]["prompt_tokens"] * 2.5
               + read_jsonl(judge_dir(ctx) / "reviews.jsonl")[0]["completion_tokens"] * 10) / 1e6)
    assert_key_nowhere(tmp_path)


# ---------------------------------------------------------------------------------------------- images, folders
@needs_tables
def test_include_image_sends_the_image_and_logs_only_its_digest(tmp_path, stub):
    ctx = coco_context(tmp_path, stub, bench={"max_questions": 6}, include_image=True)
    for index, name in enumerate(("000000441147.jpg", "000000353536.jpg")):
        Image.new("RGB", (64, 48), (40 * index, 90, 160)).save(tmp_path / "images" / name)
    fake_generate(ctx, "llava-bench", list(range(6)))
    judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)
    sent = [e["body"]["messages"][1]["content"] for e in stub.chat_log()]
    assert len(sent) == 6
    assert all(c[0]["image_url"]["url"].startswith("data:image/jpeg;base64,") and "[Context]" in c[1]["text"]
               for c in sent)
    logged = (judge_dir(ctx) / "requests.jsonl").read_text()
    assert "base64," not in logged and "<image sha256:" in logged


def test_folder_bench_reference_answers_and_baseline(tmp_path, monkeypatch):
    images = tmp_path / "skyview"
    for index, name in enumerate(("field/a.png", "field/b.png", "roof/c.png", "roof/d.png")):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (60 * index, 120, 30)).save(images / name)
    monkeypatch.setenv(KEY_ENV, KEY)
    with OpenAIStub() as stub:
        def reply(body, seen):
            text = user_text(body)
            if "[Question]" not in text:  # the reference model answering the question with the image
                image_url = body["messages"][0]["content"][0]["image_url"]["url"]
                return f"Land on the clear patch (reference for image {image_url[-20:]})."
            candidate = text.split("[Assistant 2]\n", 1)[1]
            return "8 2\nwrong image" if candidate.startswith("Land on the clear patch") else "8 6\nfine"

        stub.script.reply = reply
        ctx = context_from(tmp_path, benches={"skyview": {"kind": "folder", "images": str(images),
                                                          "question": "Where can the drone land safely?"}},
                           judge={"base_url": stub.url, "api_key_env": KEY_ENV, "max_retries": 1, "timeout_s": 5})
        fake_generate(ctx, "skyview", ["field/a.png", "field/b.png", "roof/c.png", "roof/d.png"])
        summary = judging.judge_bench(ctx.pipeline, ctx.run, "skyview", local=True)
        distinct_requests = {e["body_key"] for e in stub.chat_log()}
    directory = judge_dir(ctx, "skyview")
    references = read_jsonl(directory / "reference_answers.jsonl")
    assert [r["question_id"] for r in references] == ["field/a.png", "field/b.png", "roof/c.png", "roof/d.png"]
    assert summary["reference_model"] == "gpt-4o-mini" and len(distinct_requests) == 4 + 4 + 4
    baseline = read_jsonl(directory / "baseline_reviews.jsonl")
    by_id = {r["answer_id"]: r["question_id"] for r in references}
    for review in baseline:  # each answer is another image's reference answer, never its own
        assert review["answer2_id"].startswith("baseline:")
        assert by_id[review["answer2_id"].removeprefix("baseline:")] != review["question_id"]
    assert summary["scores"]["all"]["relative_score"] == 75.0 and summary["baseline"]["all"]["relative_score"] == 25.0
    assert set(summary["scores"]) == {"field", "roof", "all"}


@needs_tables
def test_dry_run_estimate_counts_cache_and_prices_batch_at_half(tmp_path, stub):
    ctx = coco_context(tmp_path, stub)
    estimate = dry_run_estimate(ctx.pipeline, ctx.run)["llava-bench"]  # before generate: stand-in answers
    judge_phase = estimate["phases"][0]
    assert (judge_phase["requests"], judge_phase["cached"], judge_phase["to_send"]) == (90, 0, 90)
    assert judge_phase["prompt_tokens"] > 90 * 300 and judge_phase["completion_tokens"] == 90 * 167
    assert judge_phase["cost_batch_usd"] == pytest.approx(judge_phase["cost_sync_usd"] / 2)
    assert any("generate is not done" in note for note in estimate["notes"])
    assert stub.log == []

    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()][:45])
    judging.judge_bench(ctx.pipeline, ctx.run, "llava-bench", local=True)
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()])
    after = dry_run_estimate(ctx.pipeline, ctx.run)["llava-bench"]["total"]
    assert (after["requests"], after["cached"], after["to_send"]) == (90, 45, 45)

    (tmp_path / "other").mkdir()
    unknown = coco_context(tmp_path / "other", stub, model="my-local-judge")
    row = dry_run_estimate(unknown.pipeline, unknown.run)["llava-bench"]["total"]
    assert row["to_send"] == 90 and row["prompt_tokens"] > 0 and row["cost_sync_usd"] is None
