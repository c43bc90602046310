"""The scheduler's checkpoint signal (USR2 before a time limit, or at preemption), deferred to where work can save.

submitit answers USR2 at once: it requeues the job and exits. Work whose progress lives in finished files (feature
shards, answer chunks) loses at most the unit in flight, but a training loop would lose every step since its last
save (up to `save_every_steps`). So the job wrapper calls `defer(signal)` and training runs inside
`checkpoint_window()`: there the signal only raises a flag; the loop saves a checkpoint at its next step boundary
(every rank together) and then calls `release()`, which runs the handler that was deferred (requeue and exit on
rank 0). Outside a window the handler runs as soon as the signal arrives, as it always did.

This module knows nothing of submitit: the deferred handler is whatever was installed for the signal.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Callable, Iterator

log = logging.getLogger("llava_hpc.signal")

# After its part of a checkpoint, a rank other than 0 waits this long for rank 0's requeue to end the job.
WAIT_FOR_REQUEUE_S = 120

_deferred: Callable | None = None
_signum: int | None = None
_requested = False
_open_windows = 0


def defer(signum: int) -> None:
    """From now on, `signum` in a checkpoint window only requests a checkpoint; elsewhere it runs its handler."""
    global _deferred, _signum
    handler = signal.getsignal(signum)
    if not callable(handler) or handler is _on_signal:
        return
    _deferred, _signum = handler, signum
    signal.signal(signum, _on_signal)


def _on_signal(signum, frame) -> None:
    global _requested
    _requested = True
    if _open_windows == 0:
        _run_deferred(frame)
    else:
        log.warning("caught %s: checkpointing at the end of this step, then the job is requeued",
                    signal.Signals(signum).name)


def _run_deferred(frame=None) -> None:
    if _deferred is not None and _signum is not None:
        _deferred(_signum, frame)


@contextlib.contextmanager
def checkpoint_window() -> Iterator[None]:
    global _open_windows
    _open_windows += 1
    try:
        yield
    finally:
        _open_windows -= 1


def requested() -> bool:
    """Whether the signal arrived (in a window, where its handler has not run yet)."""
    return _requested


def release() -> None:
    """After the checkpoint: run the deferred handler (rank 0 requeues the job and exits). Where it returns (the
    other ranks, or no handler was deferred), wait for the requeue to end this process, then give up."""
    log.warning("checkpoint saved after the signal: handing over to the requeue")
    _run_deferred()
    if _deferred is None:
        raise SystemExit("interrupted by the scheduler's signal; checkpoint saved")
    time.sleep(WAIT_FOR_REQUEUE_S)
    raise SystemExit(f"no requeue within {WAIT_FOR_REQUEUE_S} s after the checkpoint; exiting")


def reset() -> None:
    """Forget a request (tests; a debug-executor stage runs in the caller's process)."""
    global _requested
    _requested = False
