"""What `llava-hpc status` costs Slurm: 1 job vs a 500-task array, against the per-job polling a hand-written
script (or a loop over submitit jobs' `.state`) does.

Needs the local Slurm (bash slurm/local/start.sh). Jobs are submitted held (they never run) and cancelled after.
    .venv/bin/python benchmarks/bench_status.py [--tasks 500]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from llava_hpc.rundir import RunDir, Submission
from llava_hpc.scheduler import QueryStats, Scheduler


def sbatch_held(array: int | None) -> str:
    command = ["sbatch", "--parsable", "--hold", "--job-name=bench-status", "--time=1", "--wrap", "true",
               "-o", "/dev/null"]
    if array:
        command.insert(1, f"--array=0-{array - 1}")
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().split(";")[0]


def submission(job_id: str, tasks: int, folder: Path) -> Submission:
    ids = [job_id] if tasks == 1 else [f"{job_id}_{i}" for i in range(tasks)]
    return Submission("features", "slurm", ids, tasks, time.time(), str(folder))


def ours(scheduler: Scheduler, sub: Submission) -> QueryStats:
    scheduler.query([sub])  # warm the Slurm caches once, so both sides see the same controller state
    stats = QueryStats()
    scheduler.query([sub], stats)
    return stats


def per_task_polling(sub: Submission) -> tuple[int, float]:
    """The baseline: one `sacct -j <task>` per job or array task, as a per-job poll loop does."""
    started = time.time()
    for job_id in sub.job_ids:
        subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return len(sub.job_ids), time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scheduler = Scheduler(RunDir(Path(tmp)), "slurm")
        single = sbatch_held(None)
        array = sbatch_held(args.tasks)
        try:
            time.sleep(2)  # let accounting see the new jobs
            rows = []
            for name, sub in (("1 job", submission(single, 1, Path(tmp))),
                              (f"{args.tasks}-task array", submission(array, args.tasks, Path(tmp)))):
                stats = ours(scheduler, sub)
                calls, seconds = per_task_polling(sub)
                rows.append((name, stats.squeue_calls + stats.sacct_calls, stats.seconds, calls, seconds))
        finally:
            subprocess.run(["scancel", single, array], check=False)
    print(f"{'jobs':<18} {'llava-hpc calls':>15} {'llava-hpc s':>12} {'per-task calls':>15} {'per-task s':>11} {'speed-up':>9}")
    for name, our_calls, our_s, base_calls, base_s in rows:
        print(f"{name:<18} {our_calls:>15} {our_s:>12.3f} {base_calls:>15} {base_s:>11.3f} {base_s / our_s:>8.1f}x")


if __name__ == "__main__":
    main()
