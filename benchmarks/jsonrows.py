"""The output rule of benchmarks/: stdout carries one JSON object per line ({"metric", "value", "unit", "detail"})
and nothing else, so `> figures.jsonl`, `jq` and the tests read it as it is.

Libraries print to stdout: DeepSpeed's logger writes there, from whichever import first pulls DeepSpeed in (a CI
run saw its "Setting accelerator to CPU" warning land above the rows). So a benchmark calls `claim_stdout()` before
its heavy imports: the rows keep the real stdout, and file descriptor 1, Python's and C's alike, points at stderr
from then on, where progress and library chatter belong.
"""

from __future__ import annotations

import json
import os
import sys

_rows = None  # the real stdout once claimed


def claim_stdout() -> None:
    """Keep stdout for rows; everything else written to stdout from now on (print, C code, children that inherit
    the descriptor) goes to stderr."""
    global _rows
    if _rows is None:
        sys.stdout.flush()
        _rows = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)


def print_json(obj) -> None:
    """One JSON object on its own line of the real stdout (a child process hands its result to its parent so)."""
    out = _rows if _rows is not None else sys.stdout
    out.write(json.dumps(obj) + "\n")
    out.flush()


def emit(metric: str, value, unit: str, **detail) -> None:
    print_json({"metric": metric, "value": value, "unit": unit, "detail": detail})
