"""Fault-injection points for the test suite (tests/test_faults.py, docs/reliability.md).

A stage calls `pause("after_shard")` where a test may want to find it mid-work; with
LLAVA_HPC_FAULT_SLEEP_AFTER_SHARD=2 in the job's environment it sleeps 2 s there, so a test can kill, preempt or
crash the job between two units of work at a known point. Unset (always, outside tests) it does nothing.

Points: after_shard (features), after_step (stage1, stage2), after_chunk (generate), before_report (report).
`exit_after_step` makes training exit hard after that step (LLAVA_HPC_FAULT_EXIT_AFTER_STEP).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("llava_hpc.faults")
PREFIX = "LLAVA_HPC_FAULT_"


def env_name(point: str) -> str:
    return f"{PREFIX}SLEEP_{point.upper()}"


def pause(point: str) -> None:
    seconds = float(os.environ.get(env_name(point)) or 0)
    if seconds > 0:
        time.sleep(seconds)


def exit_after_step() -> int | None:
    """The step after which training should exit (os._exit), or None."""
    return int(os.environ.get(f"{PREFIX}EXIT_AFTER_STEP") or 0) or None
