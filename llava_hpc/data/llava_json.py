"""LLaVA conversation files: a JSON list of `{"id", "image", "conversations"}` records (or JSON Lines).

Errors name the file and the record (index and id); record contents are validated by the templates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llava_hpc.data.templates import RecordError, record_id_of


def load_llava_json(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: conversation file does not exist")
    if path.suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    records.append(_parse(line, path, f"line {line_number}"))
    else:
        records = _parse(path.read_text(encoding="utf-8"), path, "")
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RecordError(
                f"#{index}", "<record>", f"expected a JSON object, got {type(record).__name__}", str(path)
            )
        record_id = record_id_of(record, index)
        if "id" not in record:
            raise RecordError(record_id, "id", "missing (features and answers are joined by id)", str(path))
        if record_id in seen:
            raise RecordError(record_id, "id", f"duplicate of record #{seen[record_id]} (record #{index})", str(path))
        seen[record_id] = index
        if not isinstance(record.get("conversations"), list):
            raise RecordError(record_id, "conversations", f"missing or not a list (record #{index})", str(path))
    return records


def _parse(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        place = where or f"line {exc.lineno} column {exc.colno}"
        raise ValueError(f"{path}: invalid JSON at {place}: {exc.msg}") from None
