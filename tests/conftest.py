from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

# A suite started in the background (`cmd &` in a script, nohup) inherits SIGINT ignored, and so would every
# process the tests start: the tests that stop a `run` or a local job with SIGINT need Python's usual handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
# The real LLaVA-Bench tables (../shared/data beside the checkout, as on the development and CI machines).
LLAVA_EVAL = Path(os.environ.get("LLAVA_HPC_EVAL_DATA", REPO.parent / "shared" / "data" / "llava-eval"))
if not LLAVA_EVAL.exists() and Path("/work/shared/data/llava-eval").exists():
    LLAVA_EVAL = Path("/work/shared/data/llava-eval")
# scripts/test.sh sets this: tests that need the tables then fail instead of skipping when they are missing.
REQUIRE_EVAL_DATA = os.environ.get("LLAVA_HPC_REQUIRE_EVAL_DATA") == "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The local cluster (slurm/local/start.sh) enforces accounts: every job names this one.
SLURM_ACCOUNT = "llava-lab"
SLURM_CONF = Path("/etc/slurm/slurm.conf")


def cluster_address() -> str:
    """The controller's address on the cluster bridge: the one login-side address compute nodes reach (a stand-in
    for a service inside the cluster, e.g. an OpenAI-compatible judge endpoint on another node)."""
    import re

    match = re.search(r"^SlurmctldHost=[^(\s]+\(([\d.]+)\)", SLURM_CONF.read_text(), re.M)
    if not match:
        raise RuntimeError(f"{SLURM_CONF}: no SlurmctldHost address (is the local cluster running?)")
    return match.group(1)


def wait_for(predicate, timeout: float = 300, poll: float = 0.5, what: str = "condition"):
    """predicate()'s first truthy value, polled every `poll` s; AssertionError naming `what` after `timeout` s."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def slurm_available() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked `slurm` need the local cluster. Without it they skip on a laptop, but fail where
    LLAVA_HPC_REQUIRE_SLURM=1 (CI, scripts/test.sh): a green CI run means they really ran."""
    if any(item.get_closest_marker("slurm") for item in items) and not slurm_available():
        if os.environ.get("LLAVA_HPC_REQUIRE_SLURM") == "1":
            for item in items:
                if item.get_closest_marker("slurm"):
                    item.add_marker(pytest.mark.usefixtures("_slurm_required"))
        else:
            skip = pytest.mark.skip(reason="local Slurm is not running (bash slurm/local/start.sh)")
            for item in items:
                if item.get_closest_marker("slurm"):
                    item.add_marker(skip)


@pytest.fixture
def _slurm_required():
    pytest.fail("LLAVA_HPC_REQUIRE_SLURM=1 but the local Slurm cluster does not answer (bash slurm/local/start.sh)")


def small_pipeline_dict(run_dir: Path, **sections) -> dict:
    """A demo-like pipeline small enough for a unit test: 64 + 48 synthetic samples, shards of 16."""
    data = {
        "name": "test",
        "run_dir": str(run_dir),
        "executor": "debug",
        "slurm": {"partition": "standard", "account": SLURM_ACCOUNT, "cpus": 1, "mem_gb": 1, "time": 10},
        "model": {"vision_tower": "tiny", "llm": "tiny", "max_length": 128},
        "synthetic": {"n_pretrain": 64, "n_instruct": 48, "n_bench": 20},
        "datasets": {
            "pretrain": {"kind": "synthetic", "split": "pretrain"},
            "instruct": {"kind": "synthetic", "split": "instruct"},
        },
        "stages": {
            "features": {"batch_size": 16, "shard_size": 16, "array_tasks": 2},
            # plain torch in one process: fast; DeepSpeed is exercised through Slurm in test_slurm_training
            "stage1": {"dataset": "pretrain", "zero_stage": 0},
            "stage2": {"dataset": "instruct", "zero_stage": 0},
        },
        "benches": {"synthetic": {"kind": "synthetic"}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def write_pipeline(path: Path, data: dict) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture
def small_pipeline(tmp_path) -> Path:
    return write_pipeline(tmp_path / "pipeline.toml", small_pipeline_dict(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------- the command line
def invoke(*args: str, env: dict | None = None):
    """`llava-hpc ARGS...` in-process (typer's runner), 200 columns wide, exceptions raised rather than caught;
    `env`: variables set for the call only (the judge's key, say)."""
    from typer.testing import CliRunner

    from llava_hpc.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})}, catch_exceptions=False)


# ---------------------------------------------------------------------------------------------- the judge's endpoint
def openai_stub_fixture(scope: str = "function", host=None, expected_key: str | None = None, scores=None,
                        env: dict | None = None):
    """A fixture serving an OpenAI-compatible stub (tests/openai_stub.py) for its `scope`; a module binds it to the
    name its tests ask for (`stub = openai_stub_fixture(...)`).
    `host`: a callable giving the address to bind (called when the fixture first runs: `cluster_address` reads the
    running cluster's config), else loopback. `expected_key`: requests without it get 401. `scores`: a callable giving
    question text -> (reference, candidate) scores. `env`: variables set while it serves."""

    @pytest.fixture(scope=scope)
    def stub():
        from openai_stub import OpenAIStub

        with pytest.MonkeyPatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            with OpenAIStub(**({} if host is None else {"host": host()})) as server:
                server.script.expected_key = expected_key
                if scores is not None:
                    server.script.scores = scores()
                yield server

    return stub


# ---------------------------------------------------------------------------------------------- judged benches
# The judge tests' key: the environment variable a pipeline names, and a value to search the run directory for.
KEY_ENV = "LLAVA_TEST_JUDGE_KEY"
KEY = "sk-test-judge-SECRET-7c1d0e"
# The stub's (reference, candidate) scores for each LLaVA-Bench COCO category.
SCORES_BY_CATEGORY = {"conv": (8, 6), "detail": (10, 5), "complex": (6, 6)}


def qa90() -> list[dict]:
    """The LLaVA-Bench COCO questions (LLAVA_EVAL/qa90_questions.jsonl)."""
    import json

    return [json.loads(line) for line in (LLAVA_EVAL / "qa90_questions.jsonl").read_text().splitlines()]


def qa90_scores() -> dict:
    """question text -> its category's SCORES_BY_CATEGORY (empty where the tables are not here)."""
    if not (LLAVA_EVAL / "qa90_questions.jsonl").exists():
        return {}
    return {q["text"]: SCORES_BY_CATEGORY[q["category"]] for q in qa90()}


def context_from(tmp_path: Path, **sections):
    """A StageContext of small_pipeline_dict(**sections), its run directory created with RUN/pipeline.toml in it."""
    from llava_hpc.config import load_pipeline
    from llava_hpc.rundir import RunDir, atomic_write_text
    from llava_hpc.stages import StageContext

    data = small_pipeline_dict(tmp_path / "run", **sections)
    pipeline = load_pipeline(write_pipeline(tmp_path / "pipeline.toml", data))
    run = RunDir(pipeline.run_dir)
    run.create()
    atomic_write_text(run.pipeline_file, pipeline.to_toml())  # what a job reads (stages.runner.load_context)
    return StageContext(pipeline, run)


def coco_context(tmp_path: Path, stub, bench: dict | None = None, **judge):
    """A context whose `llava-bench` bench is the real LLaVA-Bench COCO tables, judged by `stub` with KEY_ENV's key;
    `bench` and `judge` override its keys (a None judge value leaves the key out)."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    benches = {"llava-bench": {
        "kind": "llava-bench-coco",
        "questions": str(LLAVA_EVAL / "qa90_questions.jsonl"),
        "answers": str(LLAVA_EVAL / "qa90_gpt4_answer.jsonl"),
        "context": str(LLAVA_EVAL / "caps_boxes_coco2014_val_80.jsonl"),
        "rules": str(LLAVA_EVAL / "rule.json"),
        "images": str(images),
        **(bench or {}),
    }}
    settings = {"base_url": stub.url, "api_key_env": KEY_ENV, "max_retries": 2, "timeout_s": 5, "max_concurrency": 4,
                **judge}
    return context_from(tmp_path, benches=benches, judge={k: v for k, v in settings.items() if v is not None})


def fake_generate(ctx, bench: str, answers: list | dict, metadata: dict | None = None) -> None:
    """The generate stage's output for `bench` and its _SUCCESS, without a model. `answers`: question ids (each gets a
    made-up answer) or {question id: the answer's text}; `metadata`: each answer's generation settings."""
    from llava_hpc.rundir import atomic_write_jsonl

    if not isinstance(answers, dict):
        answers = {qid: f"A made-up answer for question {qid}." for qid in answers}
    directory = ctx.run.stage_dir("generate") / bench
    atomic_write_jsonl(directory / "answers.jsonl", [
        {"question_id": qid, "prompt": "?", "text": text, "answer_id": f"cand-{qid}", "model_id": "test/stage2",
         "metadata": metadata or {}}
        for qid, text in answers.items()
    ])
    ctx.run.mark_done(directory)


def assert_key_nowhere(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key was written into {path}"
