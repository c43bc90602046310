"""The run directory: the contract between jobs.

Layout (DESIGN.md):
    RUN/pipeline.toml        the resolved pipeline as last submitted (no secrets)
    RUN/jobs.jsonl           one line per submission
    RUN/<stage>/...          each stage's outputs, done when `_SUCCESS` exists
    RUN/logs/<stage>/        submitit folders

Every write here is atomic (temporary file in the same folder, fsync, rename), so a reader never sees half a
file, whatever kills the writer. Files are created without world access: a run directory can hold data a
user does not want to share on a cluster's common filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

SUCCESS = "_SUCCESS"
PRIVATE_UMASK = 0o027


def make_private() -> None:
    """Group may read, others nothing: applied by the CLI and by every job before it writes."""
    os.umask(PRIVATE_UMASK)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DiskFullError(OSError):
    """A write ran out of space (or quota). Raised with the file's name instead of the writer's own error, which for
    some writers (torch.save) does not say so."""


# Below this much free space when a write fails, the failure is the full disk's, whatever the writer said.
_NEARLY_FULL_BYTES = 1 << 20


def _free_bytes(directory: Path) -> int | None:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
        return True
    free = _free_bytes(directory)
    return isinstance(exc, Exception) and free is not None and free < _NEARLY_FULL_BYTES


def disk_full_error(target: Path, exc: BaseException) -> DiskFullError:
    free = _free_bytes(Path(target).parent)
    return DiskFullError(
        errno.ENOSPC,
        f"{target}: no space left on the device (or quota) while writing it ({type(exc).__name__}: {exc}); "
        f"{'unknown' if free is None else f'{free / 2**20:.1f} MiB'} free there now. The partial file was removed and "
        "nothing was marked done: free space or raise the quota, then resubmit; finished work is kept.",
    )


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed onto `target`.

    On any error the temporary file is removed and `target` is untouched; a full disk or quota is reported as
    DiskFullError naming `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o640)  # mkstemp's 0600 would hide results from the group that shares the run directory
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        full = not isinstance(exc, DiskFullError) and is_disk_full(exc, target.parent)
        with contextlib.suppress(FileNotFoundError):
            # Truncate first: a writer that failed may still hold the file open (torch.save's does, through the
            # traceback), and an unlinked open file keeps its blocks, leaving no room even for the error message.
            os.truncate(tmp, 0)
            tmp.unlink()
        if full:
            raise disk_full_error(target, exc) from exc
        raise


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode())


def atomic_write_json(target: Path, obj) -> None:
    atomic_write_text(target, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_write_jsonl(target: Path, rows) -> None:
    atomic_write_text(target, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one line under an exclusive lock; a line is written with one write() so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, size)  # never leave half a line for readers to trip on
            if is_disk_full(exc, path.parent):
                raise disk_full_error(path, exc) from exc
            raise
    finally:
        os.close(fd)


def read_jsonl_objects(path: Path, error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file; a line that is not a JSON object
    raises `error` naming the file and the line."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{number}: expected a JSON object, got a {type(row).__name__}")
            rows.append((number, row))
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl_objects(path)]


@dataclass
class Submission:
    """One line of jobs.jsonl: what was submitted for a stage, where its logs are."""

    stage: str
    executor: str
    job_ids: list[str]
    array_size: int
    submitted_at: float
    log_folder: str
    tasks: list[str] = field(default_factory=list)  # human labels of the array tasks (e.g. "pretrain 0/4")
    gpus_per_task: int = 0
    depends_on: list[str] = field(default_factory=list)

    @property
    def array_job_id(self) -> str:
        return self.job_ids[0].split("_")[0]


class RunDirError(OSError):
    """The run directory cannot be made or written: the message names it and what to change."""


class AlreadyLockedError(RuntimeError):
    pass


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # layout
    @property
    def pipeline_file(self) -> Path:
        return self.root / "pipeline.toml"

    @property
    def jobs_file(self) -> Path:
        return self.root / "jobs.jsonl"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def log_dir(self, stage: str) -> Path:
        return self.root / "logs" / stage

    def create(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create the run directory {self.root}: {exc.strerror} ({exc.filename}); set "
                              "run_dir in the pipeline, or --run-dir, to a writable place on the shared "
                              "filesystem") from None

    # completion markers
    def is_done(self, directory: Path) -> bool:
        return (Path(directory) / SUCCESS).exists()

    def mark_done(self, directory: Path, summary: dict | None = None) -> None:
        atomic_write_json(Path(directory) / SUCCESS, {"finished_at": time.time(), **(summary or {})})

    def clear_done(self, directory: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            (Path(directory) / SUCCESS).unlink()

    # submissions
    def record_submission(self, submission: Submission) -> None:
        append_jsonl(self.jobs_file, asdict(submission))

    def submissions(self) -> list[Submission]:
        if not self.jobs_file.exists():
            return []
        return [Submission(**row) for row in read_jsonl(self.jobs_file)]

    def latest_submission(self, stage: str) -> Submission | None:
        found = [s for s in self.submissions() if s.stage == stage]
        return found[-1] if found else None

    # the lock that keeps two CLI calls from submitting into one run directory at once
    @contextlib.contextmanager
    def lock(self, purpose: str) -> Iterator[None]:
        self.create()
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = path.read_text().strip() or "another process"
                raise AlreadyLockedError(
                    f"{self.root} is locked by {holder}; wait for it to finish (or check `llava-hpc status`)"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} ({purpose})".encode())
            yield
        finally:
            os.close(fd)
