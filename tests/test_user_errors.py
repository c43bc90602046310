"""Errors a user can cause, as the user sees them: one message naming the file, line/record and field, a hint, a
non-zero exit, no traceback (docs/troubleshooting.md lists each). Run through the installed `llava-hpc`, as typed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LLAVA_EVAL, REQUIRE_EVAL_DATA, small_pipeline_dict, write_pipeline

from llava_hpc.rundir import RunDir, atomic_write_jsonl

CLI = str(Path(sys.executable).parent / "llava-hpc")


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environ = {**os.environ, "COLUMNS": "300", **(env or {})}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=environ)


def failed_with(result: subprocess.CompletedProcess, *texts: str, code: int = 2) -> str:
    """The result failed with `code`, one message holding every text, and no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    for text in texts:
        assert text in output, output
    return output


def test_a_mistyped_key_names_the_line_and_suggests_the_key(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(write_pipeline(tmp_path / "ok.toml", small_pipeline_dict(tmp_path / "run")).read_text()
                    .replace('dataset = "pretrain"', 'dataset = "pretrain"\nbatch_sise = 8'))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("batch_sise"))
    failed_with(cli("validate", "-p", str(path)), str(path), f"line {line}: stages.stage1.batch_sise: unknown key",
                "did you mean 'batch_size'?")


def test_a_wrong_type_names_the_key_and_what_it_got(tmp_path):
    data = small_pipeline_dict(tmp_path / "run")
    data["stages"]["stage1"]["batch_size"] = "many"
    path = write_pipeline(tmp_path / "p.toml", data)
    failed_with(cli("validate", "-p", str(path)), "stages.stage1.batch_size", "valid integer", "(got 'many')")


def test_a_missing_pipeline_file(tmp_path):
    failed_with(cli("status", "-p", str(tmp_path / "nothere.toml")), "nothere.toml: pipeline file not found")


def test_an_unwritable_run_directory_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = write_pipeline(tmp_path / "p.toml", small_pipeline_dict(blocker / "run"))
    failed_with(cli("submit", "features", "-p", str(path)), str(blocker / "run"), "cannot create the run directory")


def test_status_of_a_missing_or_new_run_directory(tmp_path):
    path = write_pipeline(tmp_path / "p.toml", small_pipeline_dict(tmp_path / "run"))
    failed_with(cli("status", "-p", str(path), "--run-dir", str(tmp_path / "typo")), "typo: no such run directory")
    new = cli("status", "-p", str(path))
    assert new.returncode == 0 and "nothing submitted yet" in new.stdout and str(tmp_path / "run") in new.stdout


def test_an_unknown_stage_lists_the_stages(tmp_path):
    path = write_pipeline(tmp_path / "p.toml", small_pipeline_dict(tmp_path / "run"))
    for command in (["submit", "stage3"], ["logs", "stage3"], ["cancel", "stage3"]):
        failed_with(cli(*command, "-p", str(path)), "unknown stage 'stage3'", "features, stage1, stage2")


def test_chat_with_a_missing_model_or_image(tmp_path):
    image = tmp_path / "i.png"
    failed_with(cli("chat", "what?", "--model", str(tmp_path), "--image", str(image)), f"image {image} does not exist")
    image.write_bytes(b"\x89PNG")
    failed_with(cli("chat", "what?", "--model", str(tmp_path / "nomodel"), "--image", str(image)),
                f"model {tmp_path / 'nomodel'} does not exist")
    failed_with(cli("chat", "what?", "--model", str(tmp_path), "--image", str(image)),
                f"{tmp_path}: no llava_hpc.json; this directory was not written by `llava-hpc export`")


def test_a_truncated_dataset_file_names_the_line(tmp_path):
    data_file = tmp_path / "pretrain.json"
    data_file.write_text('[{"id": 1, "image": "a.png", "conversations": []},\n {"id": ')
    data = small_pipeline_dict(tmp_path / "run", executor="local",
                               datasets={"pretrain": {"kind": "llava-json", "path": str(data_file),
                                                      "images": str(tmp_path)},
                                         "instruct": {"kind": "synthetic", "split": "instruct"}})
    path = write_pipeline(tmp_path / "p.toml", data)
    failed_with(cli("submit", "features", "-p", str(path)), f"{data_file}: not valid JSON at line 2 column")


def _judged_pipeline(tmp_path: Path, base_url: str | None) -> Path:
    """LLaVA-Bench (the real tables) with made-up answers already generated: what `llava-hpc judge` starts from."""
    if not (LLAVA_EVAL / "rule.json").exists():
        if REQUIRE_EVAL_DATA:
            pytest.fail(f"{LLAVA_EVAL} is missing")
        pytest.skip(f"{LLAVA_EVAL} is not here")
    (tmp_path / "images").mkdir(parents=True)
    bench = {"kind": "llava-bench-coco", "questions": str(LLAVA_EVAL / "qa90_questions.jsonl"),
             "answers": str(LLAVA_EVAL / "qa90_gpt4_answer.jsonl"),
             "context": str(LLAVA_EVAL / "caps_boxes_coco2014_val_80.jsonl"), "rules": str(LLAVA_EVAL / "rule.json"),
             "images": str(tmp_path / "images")}
    data = small_pipeline_dict(tmp_path / "run", benches={"llava-bench": bench},
                               judge={k: v for k, v in {"base_url": base_url, "api_key_env": "LLAVA_TEST_JUDGE_KEY",
                                                            "max_retries": 0, "timeout_s": 2}.items() if v is not None})
    path = write_pipeline(tmp_path / "p.toml", data)
    run = RunDir(tmp_path / "run")
    answers = run.stage_dir("generate") / "llava-bench"
    atomic_write_jsonl(answers / "answers.jsonl", [{"question_id": q, "prompt": "?", "text": "an answer",
                                                    "answer_id": f"a{q}", "model_id": "t", "metadata": {}}
                                                   for q in range(3)])
    run.mark_done(answers)
    return path


def test_a_judge_without_its_key_or_endpoint_says_which(tmp_path):
    with socket.socket() as closed:  # a port nothing listens on: the endpoint is unreachable
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    openai = _judged_pipeline(tmp_path / "openai", None)  # the OpenAI API itself: a key is needed
    environ = {k: v for k, v in os.environ.items() if k != "LLAVA_TEST_JUDGE_KEY"}
    no_key = subprocess.run([CLI, "judge", "--bench", "llava-bench", "--local", "-p", str(openai)],
                            capture_output=True, text=True, timeout=300, env={**environ, "COLUMNS": "300"})
    failed_with(no_key, "LLAVA_TEST_JUDGE_KEY", "export LLAVA_TEST_JUDGE_KEY", code=1)
    path = _judged_pipeline(tmp_path / "local", f"http://127.0.0.1:{port}/v1")
    unreachable = cli("judge", "--bench", "llava-bench", "--local", "-p", str(path),
                      env={"LLAVA_TEST_JUDGE_KEY": "sk-test-unreachable"})
    output = failed_with(unreachable, f"127.0.0.1:{port}", code=1)
    assert "sk-test-unreachable" not in output


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path, monkeypatch):
    """A bug (here: a pipeline file that is a directory) is one line and the way to see more."""
    folder = tmp_path / "p.toml"
    folder.mkdir()
    quiet = cli("validate", "-p", str(folder))
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr and str(folder) in quiet.stderr
    loud = cli("--debug", "validate", "-p", str(folder))
    assert loud.returncode != 0 and ("Traceback" in loud.stderr or str(folder) in loud.stderr)


def _slow_run_pipeline(tmp_path: Path) -> Path:
    data = small_pipeline_dict(tmp_path / "run", executor="local")
    data["stages"]["stage1"].update(save_every_steps=1, log_every_steps=1, epochs=4)
    return write_pipeline(tmp_path / "p.toml", data)


def _stop_run_mid_stage1(tmp_path: Path, signum: int) -> tuple[Path, Path, str]:
    """Start `run`, send `signum` once stage 1 has saved a checkpoint; the command exits 128 + signum with one
    message and no traceback, and the stage's job and tasks are gone within 30 s. (pipeline, run dir, stderr)."""
    path = _slow_run_pipeline(tmp_path)
    run_dir = tmp_path / "run"
    environ = {**os.environ, "COLUMNS": "300", "LLAVA_HPC_FAULT_SLEEP_AFTER_STEP": "1.5"}
    first = subprocess.Popen([CLI, "run", "-p", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=environ)
    checkpoints = run_dir / "stage1" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints.exists() and any(checkpoints.glob("step-*/_COMPLETE"))):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.5)
    first.send_signal(signum)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 128 + signum, out + err
    assert "stopped the running stage" in err and "Traceback" not in err, err
    stage1_job = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()][-1]
    assert stage1_job["stage"] == "stage1"
    pid = int(stage1_job["job_ids"][0])
    deadline = time.time() + 30
    while (_alive(pid) or _processes_of(run_dir / "logs" / "stage1")) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(pid), "the stage's job outlived the interrupted command"
    assert not _processes_of(run_dir / "logs" / "stage1"), "the stage's task outlived the interrupted command"
    return path, run_dir, err


@pytest.mark.slow
def test_ctrl_c_during_run_stops_the_stage_and_the_rerun_goes_on(tmp_path):
    """Ctrl-C mid stage 1: the stage's job stops with the command, finished stages and checkpoints stay; the same
    command again does not redo the features and resumes stage 1 from its checkpoint."""
    path, run_dir, err = _stop_run_mid_stage1(tmp_path, signal.SIGINT)
    assert "interrupted: stopped the running stage" in err, err

    again = cli("run", "-p", str(path), timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    stages = [json.loads(line)["stage"] for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    assert stages.count("features") == 1 and stages.count("stage1") == 2
    assert "features  skipped-done" in again.stdout
    assert json.loads((run_dir / "stage1" / "summary.json").read_text())["resumed_from_step"] >= 1


@pytest.mark.slow
def test_sigterm_to_run_stops_the_stage_like_ctrl_c(tmp_path):
    """`kill` (or a `timeout`/CI limit) on `run`: without a handler the command died alone and its local stage,
    whose tasks ignore SIGTERM, trained on beside the next run in the same directory."""
    _, _, err = _stop_run_mid_stage1(tmp_path, signal.SIGTERM)
    assert "SIGTERM received: stopped the running stage" in err, err


def _processes_of(log_folder: Path) -> list[int]:
    """Processes whose command line names the stage's log folder (its submitit controller and tasks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(log_folder) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_refuses_clearly(tmp_path):
    path = _slow_run_pipeline(tmp_path)
    environ = {**os.environ, "COLUMNS": "300", "LLAVA_HPC_FAULT_SLEEP_AFTER_SHARD": "3"}
    first = subprocess.Popen([CLI, "run", "-p", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=environ)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "jobs.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.3)
        second = cli("run", "-p", str(path))
        failed_with(second, "another llava-hpc command is submitting into this run directory",
                    f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)


def test_a_signal_the_caller_ignores_stays_ignored():
    """`nohup llava-hpc run &` ignores SIGHUP on purpose: logging out must not stop it; SIGTERM still does."""
    from llava_hpc import cli as cli_module

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        cli_module._stop_like_ctrl_c()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)
        assert cli_module._stopped_by == signal.SIGTERM
    finally:
        cli_module._stopped_by = None
        for s, h in saved.items():
            signal.signal(s, h)
