"""LLaVA conversation files: a JSON list of `{"id", "image", "conversations"}` records, or JSON Lines (`.jsonl`).

`read_records` returns the items as the file holds them, in file order, so that a position is a record's place in
the file. Only what makes the whole file unreadable fails here (`DatasetFileError`, naming the file and line); what a
record holds is checked where it is used, where a bad one is skipped and named, never hiding the others. Ids are not
required to be unique: LLaVA-665K's mix repeats some, and records are named by position and id together.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class DatasetFileError(ValueError):
    """A dataset file that cannot be read at all: fail fast."""


@dataclass(frozen=True)
class UnparsedLine:
    """A JSON Lines line that is not valid JSON, kept in its place (positions stay file positions) and reported as a
    bad record by whoever validates records."""

    line: int
    problem: str

    def describe(self) -> str:
        return f"line {self.line} is not valid JSON: {self.problem}"


def read_records(path: str | os.PathLike, name: str | None = None) -> list:
    """The records of a `.json` (a list) or `.jsonl` (one object per non-blank line) conversation file."""
    path = Path(path)
    label = f"dataset {name!r}: " if name else ""
    try:
        if path.suffix == ".jsonl":
            return _read_lines(path)
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetFileError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DatasetFileError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    except FileNotFoundError:
        raise DatasetFileError(f"{label}{path} does not exist") from None
    except OSError as exc:
        raise DatasetFileError(f"{label}cannot read {path}: {exc.strerror}") from None
    if not isinstance(records, list):
        raise DatasetFileError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return records


def _read_lines(path: Path) -> list:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                records.append(UnparsedLine(number, exc.msg))
    return records
