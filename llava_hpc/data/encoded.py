"""The encoded-records cache: each training dataset tokenized once per run, memory-mapped by every rank.

Layout (RUN/cache/encoded/<stage>/<dataset>-<key>/, complete when `_SUCCESS` exists):
    spec.json                      what the key hashes (data file, tokenizer, template, lengths, subset)
    part-00000-of-00002.arrow      Arrow IPC files, uncompressed (so they memory-map), in record order
    part-00000-of-00002.json       each part's counts and skipped records
    skipped.jsonl                  every skipped record: file, position, id, field, reason
    subset.json                    the record positions chosen (seeded subset) and how
    report.json                    counts, parts, rows per part
    _SUCCESS
Columns: id, image (null: text only), input_ids / labels (list<int32>), num_images, length (with each
`<image>` expanded to the image tokens), position (the record's index in the file's JSON list).

The key hashes the data file's path, size and mtime, not its bytes: a rerun or a requeue opens the cache without
reading (or hashing) a 665K-record JSON. The sha256 of the file is recorded in spec.json when the cache is built,
for provenance; an edit that keeps both size and mtime is not noticed (touch the file to force a rebuild).

Building: rank r of w encodes the contiguous slice r of w of the chosen records into a build directory
(`.<name>.build-w<w>/`) with atomic part files, so a requeue with the same world size keeps the parts that were
finished; rank 0 then checks every part, writes the report and `_SUCCESS`, and renames the build directory onto
the final name. A build that died never has the final name; of two jobs racing, the first rename wins and the
other discards its copy (the contents are identical). Once a cache is published, the same stage's caches of the
same dataset under other keys (an edited data file, another max_length) are deleted: each is as large as the
dataset's tokens and would never be read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from llava_hpc.data.shard_layout import file_sha256
from llava_hpc.data.templates import (
    ConversationTemplate,
    RecordError,
    TemplateError,
    fit_to_length,
    record_id_of,
)
from llava_hpc.rundir import SUCCESS, atomic_path, atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger("llava_hpc.encoded")

CACHE_VERSION = 1  # bump when the encoding or the layout changes: old caches then get new keys
SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())), ("num_images", pa.int32()), ("length", pa.int32()), ("position", pa.int64()),
])
# A pool pays for its fork only on big slices. Measured with SmolLM2's tokenizer on 2 shared cores: 4-turn chat
# records 980/s serial, 1430/s with 2 workers; plain captions 8700/s and 12000/s.
MIN_RECORDS_PER_WORKER = 2000


class NoUsableRecordsError(ValueError):
    """Every record of a dataset was skipped: a wrong file, template or max_length, not a few bad records."""


@dataclass(frozen=True)
class EncodeSettings:
    image_tokens: int
    max_length: int
    overlong: str = "truncate"


def file_fingerprint(path: str | os.PathLike) -> dict:
    """What the cache key knows of a data file: cheap (one stat), so opening a cache never reads the file."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the fast tokenizer's full serialization: vocabulary, merges, added tokens, normalizer, bos rule."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def cache_spec(source: dict, template: ConversationTemplate, settings: EncodeSettings, subset: dict) -> dict:
    return {
        "version": CACHE_VERSION,
        "source": source,
        "tokenizer_sha256": tokenizer_fingerprint(template.tokenizer),
        "template": template.name,
        "template_sha256": hashlib.sha256(template.jinja.encode()).hexdigest(),
        "image_tokens": settings.image_tokens,
        "max_length": settings.max_length,
        "overlong": settings.overlong,
        "subset": subset,
    }


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# ----- encoding one record: shared by the cache and the in-memory datasets -----


def encode_one(template: ConversationTemplate, record, position: int, settings: EncodeSettings,
               source: str | None) -> tuple[dict | None, dict | None, bool]:
    """(row, None, truncated) for a record that trains; (None, skip, False) for one that is skipped, with the
    skip naming the file, the record's position and id, the field and why."""
    record_id = record_id_of(record, position)

    def skip(kind: str, field: str, reason: str):
        return None, {"file": source, "position": position, "id": record_id, "kind": kind, "field": field,
                      "reason": reason}, False

    image = record.get("image") if isinstance(record, dict) else None
    if image is not None and (not isinstance(image, str) or not image):
        return skip("bad_record", "image", f"must be a non-empty string (the features are keyed by it), got {image!r}")
    try:
        encoded = template.encode(record, position)
    except RecordError as exc:
        return skip("bad_record", exc.field, exc.problem)
    except TemplateError as exc:
        return skip("bad_record", "conversations", str(exc))
    fitted = fit_to_length(encoded, template.image_token_id, settings.image_tokens, settings.max_length,
                           settings.overlong)
    if fitted is None:
        length = encoded.length(settings.image_tokens)
        return skip("overlong", "conversations",
                    f"{length} tokens with the image expanded > max_length {settings.max_length} "
                    f"(overlong = {settings.overlong!r})")
    row = {"id": fitted.id, "image": image, "input_ids": fitted.input_ids, "labels": fitted.labels,
           "num_images": fitted.num_images, "length": fitted.length(settings.image_tokens), "position": position}
    return row, None, fitted is not encoded


def _encode_span(template, records: Sequence, positions: Sequence[int], settings, source) -> tuple[list, list, int]:
    rows, skipped, truncated = [], [], 0
    for record, position in zip(records, positions):
        row, skip, was_truncated = encode_one(template, record, int(position), settings, source)
        if row is None:
            skipped.append(skip)
        else:
            rows.append(row)
            truncated += was_truncated
    return rows, skipped, truncated


def rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def encode_in_memory(records: Sequence, positions: Sequence[int] | None, template: ConversationTemplate,
                     settings: EncodeSettings, source: str | None = None) -> tuple[pa.Table, dict, list[dict]]:
    """(table, counts, skipped) without a cache: benchmarks and small datasets."""
    positions = range(len(records)) if positions is None else positions
    rows, skipped, truncated = _encode_span(template, records, positions, settings, source)
    counts = _counts(len(records), len(rows), truncated, skipped)
    if records and not rows:
        raise _nothing_usable(source or "<records>", counts, skipped)
    return rows_table(rows), counts, skipped


def _nothing_usable(source: str, counts: dict, skipped: list[dict]) -> NoUsableRecordsError:
    first = "; ".join(f"position {s['position']} id {s['id']!r} field {s['field']}: {s['reason']}" for s in skipped[:3])
    return NoUsableRecordsError(f"{source}: all {counts['records']} records were skipped ({counts['skipped_bad_record']} "
                                f"malformed, {counts['skipped_overlong']} over-long), e.g. {first}")


def _counts(records: int, encoded: int, truncated: int, skipped: list[dict]) -> dict:
    return {"records": records, "encoded": encoded, "truncated": truncated,
            "skipped_bad_record": sum(s["kind"] == "bad_record" for s in skipped),
            "skipped_overlong": sum(s["kind"] == "overlong" for s in skipped)}


# The fork-based pool's shared state: inherited by the children, never pickled.
_POOL_STATE: dict = {}


def _worker_signals() -> None:
    """A forked worker inherits the job's Python signal handlers: submitit's, which ignore SIGTERM and requeue the
    job on USR2. Then the pool's terminate (SIGTERM) could never end a worker (the pool would hang on exit), and
    Slurm's USR2, sent to every process of the job, would have each worker requeue the job. Workers get the
    defaults back: SIGTERM ends them; USR2 and Ctrl-C are the parent's to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_encode(span: tuple[int, int]):
    state = _POOL_STATE
    start, stop = span
    return _encode_span(state["template"], state["records"][start:stop], state["positions"][start:stop],
                        state["settings"], state["source"])


def rank_slice(count: int, rank: int, world: int) -> slice:
    """The contiguous share of rank `rank`: concatenating the parts in rank order gives record order."""
    return slice(count * rank // world, count * (rank + 1) // world)


def part_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}"


class EncodedCache:
    """One dataset's encoded records under `root` (RUN/cache/encoded/<stage>), named by `name` and the spec's key."""

    def __init__(self, root: Path, name: str, spec: dict):
        self.spec, self.key = spec, spec_key(spec)
        self.directory = Path(root) / f"{name}-{self.key}"

    def build_directory(self, world: int) -> Path:
        return self.directory.with_name(f".{self.directory.name}.build-w{world}")

    def is_complete(self) -> bool:
        return (self.directory / SUCCESS).exists()

    def encode_part(self, records: Sequence, positions: Sequence[int], template: ConversationTemplate,
                    settings: EncodeSettings, rank: int, world: int, source: str | None = None, workers: int = 1,
                    progress: bool = False) -> Path:
        """Encode this rank's share of `records` (the chosen subset, `positions` their indices in the file) into
        an atomic part file; a part already there (a requeue) is kept."""
        build = self.build_directory(world)
        target = build / f"{part_name(rank, world)}.arrow"
        if target.exists():
            return target
        share = rank_slice(len(records), rank, world)
        mine, my_positions = records[share], np.asarray(positions, dtype=np.int64)[share]
        rows, skipped, truncated = [], [], 0
        chunk = 256
        spans = [(start, min(start + chunk, len(mine))) for start in range(0, len(mine), chunk)]
        workers = max(1, min(workers, len(mine) // MIN_RECORDS_PER_WORKER))
        bar = tqdm(total=len(mine), desc=f"encoding {self.directory.name}", unit="rec", disable=not progress,
                   mininterval=5, dynamic_ncols=True)
        started = time.time()
        if workers > 1:
            # The tokenizer's own threads must not be running when the children fork.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            _POOL_STATE.update(template=template, records=mine, positions=my_positions, settings=settings,
                               source=source)
            try:
                with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_signals) as pool:
                    for span, (r, s, t) in zip(spans, pool.imap(_pool_encode, spans)):
                        rows += r
                        skipped += s
                        truncated += t
                        bar.update(span[1] - span[0])
            finally:
                _POOL_STATE.clear()
        else:
            for start, stop in spans:
                r, s, t = _encode_span(template, mine[start:stop], my_positions[start:stop], settings, source)
                rows += r
                skipped += s
                truncated += t
                bar.update(stop - start)
        bar.close()
        counts = _counts(len(mine), len(rows), truncated, skipped)
        counts["seconds"] = round(time.time() - started, 3)
        counts["workers"] = workers
        # The sidecar first: a visible part always has its counts and skips beside it.
        atomic_write_json(build / f"{part_name(rank, world)}.json", {"counts": counts, "skipped": skipped})
        with atomic_path(target) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
                writer.write_table(rows_table(rows), max_chunksize=65536)
        return target

    def finalize(self, world: int, subset: dict) -> dict:
        """Rank 0, after every rank's encode_part: check the parts, write the report and `_SUCCESS`, publish.
        Raises NoUsableRecordsError (publishing nothing) when every record was skipped."""
        if self.is_complete():  # another job won the race; ours is the same content
            shutil.rmtree(self.build_directory(world), ignore_errors=True)
            return self.report()
        build = self.build_directory(world)
        parts, skipped, totals = [], [], {}
        for rank in range(world):
            name = part_name(rank, world)
            sidecar, arrow = build / f"{name}.json", build / f"{name}.arrow"
            if not arrow.exists():
                raise FileNotFoundError(f"{arrow}: rank {rank}'s part of the encoded-records cache is missing")
            meta = json.loads(sidecar.read_text())
            rows = _open_ipc(arrow).num_rows
            if rows != meta["counts"]["encoded"]:
                raise ValueError(f"{arrow}: {rows} rows, but its sidecar counts {meta['counts']['encoded']}")
            parts.append({"file": arrow.name, "rows": rows})
            skipped += meta["skipped"]
            for field, value in meta["counts"].items():
                if field not in ("seconds", "workers"):
                    totals[field] = totals.get(field, 0) + value
            totals["encode_seconds_max_rank"] = max(totals.get("encode_seconds_max_rank", 0), meta["counts"]["seconds"])
        if totals["records"] and not totals["encoded"]:
            raise _nothing_usable(self.spec["source"].get("path", "synthetic"), totals, skipped)
        spec = dict(self.spec)
        if "path" in spec["source"]:
            spec["source_sha256"] = file_sha256(Path(spec["source"]["path"]))
        atomic_write_json(build / "spec.json", spec)
        atomic_write_jsonl(build / "skipped.jsonl", skipped)
        atomic_write_text(build / "subset.json", json.dumps(subset, sort_keys=True) + "\n")
        report = {"key": self.key, "counts": totals, "parts": parts, "world_size": world, "built_at": time.time()}
        atomic_write_json(build / "report.json", report)
        atomic_write_json(build / SUCCESS, {"finished_at": time.time(), "rows": sum(p["rows"] for p in parts)})
        try:
            os.rename(build, self.directory)
        except OSError:
            if not self.is_complete():
                raise
            shutil.rmtree(build, ignore_errors=True)  # lost the race to an identical cache
        self.prune_others()
        return self.report()

    def prune_others(self) -> list[str]:
        """Delete this root's caches (and unfinished builds) of the same dataset under any other key."""
        name, key = self.directory.name.rsplit("-", 1)
        others = re.compile(rf"^\.?{re.escape(name)}-(?!{key})[0-9a-f]{{{len(key)}}}(\.build-w\d+)?$")
        removed = [str(path) for path in self.directory.parent.iterdir() if others.match(path.name)]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        if removed:
            log.info("encoded cache %s published; removed %d stale one(s): %s", self.directory.name, len(removed),
                     ", ".join(Path(p).name for p in removed))
        return removed

    def report(self) -> dict:
        return json.loads((self.directory / "report.json").read_text())

    def skipped(self) -> list[dict]:
        text = (self.directory / "skipped.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def open(self) -> EncodedSamples:
        if not self.is_complete():
            raise FileNotFoundError(f"{self.directory}: the encoded-records cache is not complete (no {SUCCESS})")
        tables = [_open_ipc(self.directory / part["file"]) for part in self.report()["parts"]]
        return EncodedSamples(pa.concat_tables(tables), self.spec["image_tokens"], str(self.directory))


def _open_ipc(path: Path) -> pa.Table:
    # Uncompressed IPC read from a memory map is zero-copy: the columns are views of the page cache.
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


class EncodedSamples:
    """Row access to an encoded table (memory-mapped or in memory) without turning columns into Python lists."""

    def __init__(self, table: pa.Table, image_tokens: int, origin: str = "<memory>"):
        self.table, self.image_tokens, self.origin = table, image_tokens, origin
        self.num_rows = table.num_rows
        self._chunks = []
        starts = [0]
        ids, labels = table.column("input_ids"), table.column("labels")
        for chunk_ids, chunk_labels in zip(ids.chunks, labels.chunks):
            # Offsets are small and values are zero-copy numpy views of the (mapped) buffers.
            self._chunks.append((chunk_ids.offsets.to_numpy(), chunk_ids.values.to_numpy(),
                                 chunk_labels.offsets.to_numpy(), chunk_labels.values.to_numpy()))
            starts.append(starts[-1] + len(chunk_ids))
        self._starts = np.asarray(starts, dtype=np.int64)
        self._id_column = table.column("id")
        self._image_column = table.column("image")
        self.lengths = table.column("length").to_numpy()
        self.num_images = table.column("num_images").to_numpy()
        self.positions = table.column("position").to_numpy()

    def __len__(self) -> int:
        return self.num_rows

    def tokens(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        local = row - self._starts[chunk]
        id_offsets, id_values, label_offsets, label_values = self._chunks[chunk]
        return (id_values[id_offsets[local] : id_offsets[local + 1]],
                label_values[label_offsets[local] : label_offsets[local + 1]])

    def id(self, row: int) -> str:
        return self._id_column[row].as_py()

    def image(self, row: int) -> str | None:
        return self._image_column[row].as_py()

    def images(self) -> list[str | None]:
        return self._image_column.to_pylist()

