"""`llava-hpc judge --bench llava-bench` as written, against the local OpenAI-compatible stub, then the report."""

import json
import tomllib
from functools import partial

import pytest
import tomli_w
from conftest import (
    KEY,
    KEY_ENV,
    LLAVA_EVAL,
    REQUIRE_EVAL_DATA,
    SCORES_BY_CATEGORY,
    assert_key_nowhere,
    coco_context,
    fake_generate,
    invoke as invoke_cli,
    openai_stub_fixture,
    qa90,
    qa90_scores,
)

pytestmark = pytest.mark.skipif(not REQUIRE_EVAL_DATA and not (LLAVA_EVAL / "rule.json").exists(),
                                reason=f"{LLAVA_EVAL} is not here")

invoke = partial(invoke_cli, env={KEY_ENV: KEY})  # every command here runs with the judge's key in its environment
stub = openai_stub_fixture(expected_key=KEY, scores=qa90_scores)


def test_dry_run_then_judge_locally_then_report(tmp_path, stub):
    ctx = coco_context(tmp_path, stub)
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()])
    pipeline = str(tmp_path / "pipeline.toml")

    dry = invoke("judge", "--bench", "llava-bench", "-p", pipeline, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "nothing sent" in dry.output and "90" in dry.output
    assert stub.chat_log() == []

    judged = invoke("judge", "--bench", "llava-bench", "-p", pipeline, "--local")
    assert judged.exit_code == 0, judged.output
    assert len(stub.chat_log()) == 90

    fake_generate(ctx, "synthetic", list(range(20)))  # the test pipeline's other bench, scored by exact match
    report = invoke("submit", "report", "-p", pipeline, "--executor", "debug")
    assert report.exit_code == 0, report.output
    summary = json.loads((ctx.run.stage_dir("report") / "llava-bench" / "summary.json").read_text())
    assert summary["judge_model"] == ctx.pipeline.judge.model
    for category, (reference, candidate) in SCORES_BY_CATEGORY.items():
        row = summary[category]
        assert row["n"] == 30 and row["parse_failures"] == 0
        assert row["relative_score"] == pytest.approx(candidate / reference * 100, abs=0.05)
        assert (row["reference_mean"], row["candidate_mean"]) == (reference * 10, candidate * 10)
    assert {"relative_score", "reference_mean", "candidate_mean", "n", "parse_failures"} <= set(summary["all"])
    assert (ctx.run.stage_dir("report") / "llava-bench" / "scores.png").stat().st_size > 1000

    # Judging again pays nothing: every reply comes from the cache.
    again = invoke("judge", "--bench", "llava-bench", "-p", pipeline, "--local")
    assert again.exit_code == 0 and len(stub.chat_log()) == 90
    assert_key_nowhere(ctx.run.root)


def test_judge_submits_the_judge_job_for_that_bench(tmp_path, stub):
    ctx = coco_context(tmp_path, stub)
    pipeline = str(tmp_path / "pipeline.toml")
    refused = invoke("judge", "--bench", "llava-bench", "-p", pipeline, "--executor", "debug")
    assert refused.exit_code == 1 and "needs generate, which is neither done nor queued" in refused.output
    # Only that bench's answers are needed: the pipeline's other bench (synthetic) has none yet.
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()[:6]])
    result = invoke("judge", "--bench", "llava-bench", "-p", pipeline, "--executor", "debug")
    assert result.exit_code == 0, result.output
    assert "judge     submitted" in result.output
    assert ctx.run.is_done(ctx.run.stage_dir("judge") / "llava-bench")
    assert json.loads(ctx.run.jobs_file.read_text().splitlines()[-1])["stage"] == "judge"
    assert_key_nowhere(ctx.run.root)


def test_judge_refuses_unknown_and_exact_benches(tmp_path, stub):
    coco_context(tmp_path, stub, bench=None)
    pipeline = str(tmp_path / "pipeline.toml")
    assert "no bench 'nope'" in invoke("judge", "--bench", "nope", "-p", pipeline).output


def test_on_slurm_the_batch_api_is_driven_from_the_login_side(tmp_path, stub):
    """The seed recipe's judge on a cluster whose nodes have no internet: `llava-hpc judge` submits the batch and
    returns; `status` shows it; `--collect` before the batch ends collects nothing and says so; once it ends,
    `--collect` writes reviews, summary and the bench's report. Nothing is submitted to Slurm."""
    ctx = coco_context(tmp_path, stub, transport="batch")
    data = tomllib.loads((tmp_path / "pipeline.toml").read_text())
    data["executor"] = "slurm"
    (tmp_path / "pipeline.toml").write_text(tomli_w.dumps(data))
    pipeline = str(tmp_path / "pipeline.toml")
    fake_generate(ctx, "llava-bench", [q["question_id"] for q in qa90()[:9]])
    stub.script.batch_polls = 10**9  # in progress until the test says otherwise

    assert "nothing to collect" in invoke("judge", "--collect", "-p", pipeline).output
    submitted = invoke("judge", "-p", pipeline)
    assert submitted.exit_code == 0, submitted.output
    assert "judging on this machine" in submitted.output and "batch(es) still running" in submitted.output
    assert len(stub.requests_to("POST", "/v1/batches")) == 1
    status = json.loads(invoke("status", "-p", pipeline, "--json").output)
    judge_row = next(row for row in status if row["stage"] == "judge")
    assert judge_row["state"] == "login-side" and "batch(es) at the API" in judge_row["progress"]
    assert "llava-hpc judge --collect" in judge_row["progress"]
    report_row = next(row for row in status if row["stage"] == "report")  # the synthetic bench is still a job's
    assert report_row["state"] == "not submitted" and "llava-bench: written by `llava-hpc judge`" in report_row["progress"]

    pending = invoke("judge", "--collect", "-p", pipeline)
    assert pending.exit_code == 0 and "still running" in pending.output
    assert not ctx.run.is_done(ctx.run.stage_dir("judge") / "llava-bench")

    stub.script.batch_polls = 0
    collected = invoke("judge", "--collect", "-p", pipeline)
    assert collected.exit_code == 0, collected.output
    assert ctx.run.is_done(ctx.run.stage_dir("judge") / "llava-bench")
    assert ctx.run.is_done(ctx.run.stage_dir("report") / "llava-bench")  # written here, after the judging
    assert len(stub.requests_to("POST", "/v1/batches")) == 1  # one batch, never submitted twice
    assert not ctx.run.jobs_file.exists() or all(
        json.loads(line)["executor"] != "slurm" for line in ctx.run.jobs_file.read_text().splitlines())
    assert_key_nowhere(ctx.run.root)
