"""How long a person waits for `llava-hpc --help` and `llava-hpc status`, against a bare Python start, and which
heavy libraries each one loads (none of torch, transformers, deepspeed, openai, matplotlib, pyarrow is the goal).

Each command runs as a user runs it (a fresh process of the installed entry point), bytecode caches warm
(one untimed run first), median of `--repeats` runs. `status` is asked about a run directory that holds a
finished features stage and a submitted stage 1, so it reads the run's files and every stage's progress.

    .venv/bin/python benchmarks/bench_cli.py            # ~15 s
    .venv/bin/python benchmarks/bench_cli.py --quick    # 3 repeats
Goals (laptop): --help < 0.3 s, status < 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonrows  # noqa: E402  (benchmarks/jsonrows.py: stdout holds the JSON rows only)

jsonrows.claim_stdout()  # before the heavy imports, which may print
emit = jsonrows.emit

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "llava-hpc")
HEAVY = ("torch", "transformers", "deepspeed", "openai", "matplotlib", "pyarrow", "datasets")
GOALS = {"help": 0.3, "status": 0.5}


def timed(command: list[str], env: dict, repeats: int) -> float:
    subprocess.run(command, env=env, capture_output=True, check=True, timeout=120)  # warm the bytecode caches
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, env=env, capture_output=True, check=True, timeout=120)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def heavy_imports(args: list[str], env: dict) -> list[str]:
    """The heavy top-level packages a command has imported when it ends."""
    probe = (
        "import atexit, sys\n"
        f"atexit.register(lambda: print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr))\n"
        f"sys.argv = ['llava-hpc', *{args!r}]\n"
        "from llava_hpc.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    line = next((l for l in done.stderr.splitlines() if l.startswith("HEAVY=")), "HEAVY=?")
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def run_dir_with_history(root: Path) -> Path:
    """A run directory as status finds it mid-run: features done, stage 1 submitted (a job that has ended)."""
    from llava_hpc.rundir import RunDir, Submission

    run = RunDir(root)
    features = run.stage_dir("features") / "pretrain"
    features.mkdir(parents=True)
    for i in range(4):
        (features / f"part-{i:05d}.parquet").write_bytes(b"")
    run.mark_done(features, {"shards": 4})
    run.mark_done(run.stage_dir("features") / "instruct", {"shards": 4})
    (run.stage_dir("stage1")).mkdir(parents=True)
    (run.stage_dir("stage1") / "metrics.jsonl").write_text(json.dumps({"step": 40, "loss": 1.5}) + "\n")
    logs = run.log_dir("stage1")
    logs.mkdir(parents=True)
    run.record_submission(Submission("stage1", "local", ["999999"], 1, time.time() - 60, str(logs)))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    # Bytecode caches as on a user's machine (this environment may disable writing them).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["COLUMNS"] = "160"
    with tempfile.TemporaryDirectory(prefix="llava-bench-cli-") as tmp:
        run_dir = run_dir_with_history(Path(tmp) / "run")
        pipeline = str(REPO / "pipelines" / "demo.toml")
        bare = timed([sys.executable, "-c", "pass"], env, repeats)
        emit("python_start_s", round(bare, 3), "s", repeats=repeats, note="`python -c pass`: the floor")
        commands = {"help": ["--help"], "status": ["status", "-p", pipeline, "--run-dir", str(run_dir)]}
        for name, cli_args in commands.items():
            seconds = timed([CLI, *cli_args], env, repeats)
            emit(f"{name}_s", round(seconds, 3), "s", goal_s=GOALS[name], ratio_to_python_start=round(seconds / bare, 1),
                 heavy_imports=heavy_imports(cli_args, env), command="llava-hpc " + " ".join(cli_args[:1]),
                 repeats=repeats)


if __name__ == "__main__":
    main()
