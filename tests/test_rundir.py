import json
import multiprocessing
import os
import stat
import time

import pytest

from llava_hpc.rundir import (
    AlreadyLockedError,
    RunDir,
    Submission,
    append_jsonl,
    atomic_path,
    atomic_write_json,
    make_private,
    read_jsonl,
)


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "b.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["b.json"]


def test_atomically_written_files_are_readable_by_the_group(tmp_path):
    """The run directory is shared with the lab's group: an atomic write must not keep mkstemp's 0600."""
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "summary.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o640


def test_failed_write_leaves_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_done_marker(tmp_path):
    run = RunDir(tmp_path)
    stage = run.stage_dir("stage1")
    assert not run.is_done(stage)
    run.mark_done(stage, {"steps": 3})
    assert run.is_done(stage)
    assert json.loads((stage / "_SUCCESS").read_text())["steps"] == 3
    run.clear_done(stage)
    assert not run.is_done(stage)


def test_submissions_round_trip(tmp_path):
    run = RunDir(tmp_path)
    first = Submission("features", "slurm", ["12_0", "12_1"], 2, time.time(), str(tmp_path / "logs"), ["a", "b"])
    run.record_submission(first)
    run.record_submission(Submission("features", "slurm", ["15"], 1, time.time(), str(tmp_path / "logs")))
    assert run.submissions()[0] == first
    assert run.latest_submission("features").job_ids == ["15"]
    assert run.latest_submission("stage1") is None
    assert first.array_job_id == "12"


def test_malformed_jobs_line_names_file_and_line(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"jobs\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def _hold_lock(root, ready, release):
    run = RunDir(root)
    with run.lock("holder"):
        ready.set()
        release.wait(10)


def test_lock_refuses_a_second_process_and_names_the_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(AlreadyLockedError, match=f"pid {holder.pid} \\(holder\\)"):
            with RunDir(tmp_path).lock("second"):
                pass
    finally:
        release.set()
        holder.join(10)
    with RunDir(tmp_path).lock("after"):  # free again once the holder is gone
        pass


def _append_many(path, worker):
    for i in range(200):
        append_jsonl(path, {"worker": worker, "i": i, "pad": "x" * 500})


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "metrics.jsonl"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(path, w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    rows = read_jsonl(path)
    assert len(rows) == 800
    assert sorted((r["worker"], r["i"]) for r in rows) == [(w, i) for w in range(4) for i in range(200)]


def test_private_umask_keeps_files_from_others(tmp_path):
    old = os.umask(0o022)
    try:
        make_private()
        atomic_write_json(tmp_path / "x.json", {})
        mode = stat.S_IMODE((tmp_path / "x.json").stat().st_mode)
        assert mode & 0o007 == 0
    finally:
        os.umask(old)


def test_full_disk_is_named_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """Some writers do not say the disk is full (torch.save: "unexpected pos"); the free space does."""
    import llava_hpc.rundir as rundir

    target = tmp_path / "state.pt"
    monkeypatch.setattr(rundir, "_free_bytes", lambda directory: 0)
    with pytest.raises(rundir.DiskFullError, match=r"state.pt: no space left on the device .*RuntimeError: .*unexpected pos"):
        with rundir.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_stay_what_they_are(tmp_path):
    from llava_hpc.rundir import atomic_path

    with pytest.raises(ValueError, match="not a disk problem"):
        with atomic_path(tmp_path / "x.json"):
            raise ValueError("not a disk problem")


def test_append_on_a_full_disk_never_leaves_half_a_line(tmp_path, monkeypatch):
    import errno
    import os as real_os

    import llava_hpc.rundir as rundir

    path = tmp_path / "metrics.jsonl"
    rundir.append_jsonl(path, {"step": 1})
    before = path.read_bytes()
    write = real_os.write

    def half_then_full(fd, data):
        write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "write", half_then_full)
    with pytest.raises(rundir.DiskFullError, match="metrics.jsonl: no space left"):
        rundir.append_jsonl(path, {"step": 2, "loss": 0.5})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert rundir.read_jsonl(path) == [{"step": 1}]
