"""The scheduler's USR2, deferred inside a checkpoint window (training saves first), immediate outside one."""

import os
import signal

import pytest

from llava_hpc import checkpoint_signal


class Requeued(Exception):
    pass


@pytest.fixture
def deferred(monkeypatch):
    """USR2 with a stand-in for submitit's handler (which requeues the job and exits), deferred as a stage job does."""
    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)
        raise Requeued

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    monkeypatch.setattr(checkpoint_signal, "_deferred", None)
    monkeypatch.setattr(checkpoint_signal, "_requested", False)
    checkpoint_signal.defer(signal.SIGUSR2)
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_in_a_window_the_signal_only_asks_and_release_hands_over(deferred):
    with checkpoint_signal.checkpoint_window():
        os.kill(os.getpid(), signal.SIGUSR2)  # delivered to this (main) thread before kill returns
        assert checkpoint_signal.requested() and deferred == []  # the work goes on to its next safe point
        with pytest.raises(Requeued):
            checkpoint_signal.release()  # after the checkpoint: submitit's handler requeues
    assert deferred == [signal.SIGUSR2]


def test_outside_a_window_the_handler_runs_at_once(deferred):
    with pytest.raises(Requeued):
        os.kill(os.getpid(), signal.SIGUSR2)
    assert deferred == [signal.SIGUSR2]


def test_a_rank_whose_handler_returns_waits_for_the_requeue_then_gives_up(monkeypatch):
    """submitit's handler only returns on ranks other than 0 (rank 0 requeues the job for all)."""
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    monkeypatch.setattr(checkpoint_signal, "_deferred", None)
    monkeypatch.setattr(checkpoint_signal, "WAIT_FOR_REQUEUE_S", 0.01)
    try:
        checkpoint_signal.defer(signal.SIGUSR2)
        with pytest.raises(SystemExit, match="no requeue"):
            checkpoint_signal.release()
    finally:
        signal.signal(signal.SIGUSR2, previous)
