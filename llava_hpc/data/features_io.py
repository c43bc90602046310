"""Parquet shards of precomputed vision features.

One row per sample: `id`, `image` (the path as the dataset names it) and `features`, the [num_patches,
hidden_size] fp16 matrix flattened into a fixed-size list of halffloat (readable by pyarrow and
`datasets` alike). The shape lives in the schema metadata. Each shard has a small JSON sidecar
(`part-00000.json`) written before the shard itself is renamed into place, so a visible shard always has
its row count, checksum and bad records beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llava_hpc.rundir import SUCCESS, append_jsonl, atomic_path, atomic_write_json

SHAPE_KEY = b"llava_hpc.features_shape"
QUARANTINE = "quarantine"  # where shards that failed their checksum go: kept for a post-mortem, never read again


class CorruptShardError(RuntimeError):
    pass


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def features_table(ids: list[str], images: list[str], features: np.ndarray) -> pa.Table:
    if features.ndim != 3 or len(features) != len(ids) or len(ids) != len(images):
        raise ValueError(f"features must be [rows, patches, hidden] with one row per id; got {features.shape} for {len(ids)} ids")
    rows, patches, hidden = features.shape
    flat = pa.array(np.ascontiguousarray(features, dtype=np.float16).reshape(-1), type=pa.float16())
    column = pa.FixedSizeListArray.from_arrays(flat, patches * hidden)
    schema = pa.schema(
        [("id", pa.string()), ("image", pa.string()), ("features", column.type)],
        metadata={SHAPE_KEY: json.dumps([patches, hidden]).encode()},
    )
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(images, pa.string()), column], schema=schema)


def write_shard(
    directory: Path,
    index: int,
    ids: list[str],
    images: list[str],
    features: np.ndarray,
    bad_records: list[dict],
    compression: str = "zstd",
) -> dict:
    """Write `part-XXXXX.parquet` and its sidecar; the Parquet file appears last and atomically."""
    directory = Path(directory)
    name = shard_name(index)
    table = features_table(ids, images, features)
    target = directory / f"{name}.parquet"
    with atomic_path(target) as tmp:
        # Features are near-incompressible floats: a dictionary only slows reading (measured: 2.5x), and
        # byte-stream-split lets zstd find the exponent bytes' redundancy while reading faster still.
        pq.write_table(table, tmp, compression=None if compression == "none" else compression,
                       use_dictionary=["id", "image"], column_encoding={"features": "BYTE_STREAM_SPLIT"})
        meta = {
            "shard": index,
            "rows": len(ids),
            "bad": len(bad_records),
            "bad_records": bad_records,
            "bytes": tmp.stat().st_size,
            "sha256": file_sha256(tmp),
            "shape": list(features.shape[1:]),
            "compression": compression,
        }
        atomic_write_json(directory / f"{name}.json", meta)
    return meta


def read_shard(path: Path, verify: bool = False) -> tuple[list[str], list[str], np.ndarray]:
    path = Path(path)
    if verify:
        verify_shard(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _unreadable(path, exc) from exc
    return table.column("id").to_pylist(), table.column("image").to_pylist(), _features_of(table)


def _unreadable(path: Path, exc: Exception) -> CorruptShardError:
    return CorruptShardError(f"{path}: unreadable Parquet shard ({exc}); delete it and rerun the features stage")


def _features_of(table: pa.Table) -> np.ndarray:
    patches, hidden = json.loads(table.schema.metadata[SHAPE_KEY])
    flat = table.column("features").combine_chunks().values.to_numpy(zero_copy_only=False)
    return flat.reshape(table.num_rows, patches, hidden)


def _sidecar_sha256(path: Path) -> str:
    sidecar = path.with_suffix(".json")
    try:
        return json.loads(sidecar.read_text())["sha256"]
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptShardError(f"{sidecar}: missing or unreadable shard sidecar ({exc})") from exc


def _checksum_mismatch(path: Path, actual: str, expected: str) -> CorruptShardError:
    return CorruptShardError(f"{path}: checksum {actual[:12]}... does not match {expected[:12]}... in "
                             f"{path.with_suffix('.json').name}")


def verify_shard(path: Path) -> None:
    """Compare a shard with the checksum in its sidecar: a flipped byte on a shared filesystem is caught here."""
    path = Path(path)
    expected = _sidecar_sha256(path)
    actual = file_sha256(path)
    if actual != expected:
        raise _checksum_mismatch(path, actual, expected)


def quarantine_shard(path: Path, reason: str) -> Path | None:
    """Move a shard that failed its checksum (and its sidecar) into `quarantine/` and withdraw the dataset's
    `_SUCCESS`: the features stage then sees exactly that shard missing and recomputes it, nothing else.
    Returns where the shard went; None when it was already gone (another rank moved it first)."""
    path = Path(path)
    directory = path.parent
    stamp = time.strftime("%Y%m%dT%H%M%S")
    destination = directory / QUARANTINE / f"{path.name}.{stamp}.{os.getpid()}"
    destination.parent.mkdir(exist_ok=True)
    # The done marker goes first: whatever happens next, the dataset is no longer claimed complete.
    with contextlib.suppress(FileNotFoundError):
        (directory / SUCCESS).unlink()
    try:
        os.rename(path, destination)
    except FileNotFoundError:
        return None
    with contextlib.suppress(FileNotFoundError):
        os.rename(path.with_suffix(".json"), destination.with_name(destination.name + ".json"))
    append_jsonl(directory / QUARANTINE / "quarantined.jsonl",
                 {"shard": path.name, "moved_to": destination.name, "reason": reason, "time": time.time()})
    return destination


def shard_paths(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("part-*.parquet"))


class FeatureStore:
    """All shards of one dataset's features, looked up by sample id, in bounded memory.

    Opening reads only the `id` and `image` columns. A shard's features are decoded when one of its samples is
    first asked for, and at most `cache_shards` decoded shards stay in memory (least recently used go first): a
    real pretraining set is ~660 GB of fp16 features. Training asks in shard-local windows (`SampleStream` with
    `groups`), so each shard is decoded about once per epoch.

    With `verify`, a shard is checked against the sha256 in its sidecar when it is first loaded (once per shard
    and process); one that fails is quarantined (`quarantine_shard`) and CorruptShardError says how to get it
    recomputed."""

    def __init__(self, directory: Path, verify: bool = False, cache_shards: int = 8):
        if cache_shards < 1:
            raise ValueError(f"cache_shards must be at least 1, got {cache_shards}")
        self.directory = Path(directory)
        self.verify, self.cache_shards = verify, cache_shards
        self.paths = shard_paths(self.directory)
        if not self.paths:
            raise FileNotFoundError(f"{self.directory}: no feature shards (part-*.parquet); run the features stage first")
        self._index: dict[str, tuple[int, int]] = {}
        self.images: dict[str, str] = {}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._verified: set[int] = set()
        self.shard_loads = 0  # decodes so far: a caller reading out of shard order shows up here
        shapes = {}
        for shard_number, path in enumerate(self.paths):
            ids, images, shapes[path] = self._read_index(path)
            for row, (sample_id, image) in enumerate(zip(ids, images)):
                self._index[sample_id] = (shard_number, row)
                self.images[sample_id] = image
        (self.num_patches, self.hidden_size), first = shapes[self.paths[0]], self.paths[0]
        for path, shape in shapes.items():
            if shape != (self.num_patches, self.hidden_size):
                raise ValueError(f"{path}: features of shape {list(shape)}, but {first.name} has "
                                 f"{[self.num_patches, self.hidden_size]}; recompute the dataset's features (--force)")

    def _read_index(self, path: Path) -> tuple[list[str], list[str], tuple[int, int]]:
        try:
            table = pq.read_table(path, columns=["id", "image"])
            patches, hidden = json.loads(table.schema.metadata[SHAPE_KEY])
        except FileNotFoundError:
            raise self._gone(path) from None
        except (pa.ArrowInvalid, OSError, KeyError, TypeError, ValueError) as exc:
            if self.verify:  # a damaged file: quarantined with the checksum's verdict if that is what happened
                self._check(path, file_sha256(path))
            raise _unreadable(path, exc) from exc
        return table.column("id").to_pylist(), table.column("image").to_pylist(), (patches, hidden)

    def _load(self, shard_number: int) -> np.ndarray:
        path = self.paths[shard_number]
        try:
            if self.verify and shard_number not in self._verified:
                self._check(path, file_sha256(path))
                self._verified.add(shard_number)
            # From the path, not from the bytes just hashed: pyarrow reading a Parquet file from an in-memory
            # buffer aborts the process at exit now and then ("terminate called without an active exception",
            # 7 of 30 runs with torch imported; 0 of 30 reading from the path).
            table = pq.read_table(path)
        except FileNotFoundError:
            raise self._gone(path) from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise _unreadable(path, exc) from exc
        self.shard_loads += 1
        return _features_of(table)

    @staticmethod
    def _gone(path: Path) -> CorruptShardError:
        return CorruptShardError(f"{path}: gone while reading (quarantined by another rank after a failed checksum?); "
                                 "resubmit (`llava-hpc submit all`) to recompute it")

    @staticmethod
    def _check(path: Path, actual: str) -> None:
        expected = _sidecar_sha256(path)
        if actual == expected:
            return
        exc = _checksum_mismatch(path, actual, expected)
        moved = quarantine_shard(path, str(exc))
        where = f"moved to {moved}" if moved else "already quarantined"
        raise CorruptShardError(
            f"{exc}: the file changed after it was written ({where}; the features stage is no longer done). "
            "Resubmit (`llava-hpc submit all`): only this shard is recomputed, then training resumes."
        )

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._index

    @property
    def ids(self) -> list[str]:
        return list(self._index)

    def shard_of(self, sample_id: str) -> int:
        return self._locate(sample_id)[0]

    def _locate(self, sample_id: str) -> tuple[int, int]:
        try:
            return self._index[sample_id]
        except KeyError:
            raise KeyError(f"{self.directory}: no features for sample id {sample_id!r}") from None

    def get(self, sample_id: str) -> np.ndarray:
        """The sample's [num_patches, hidden_size] features: a read-only view into its decoded shard."""
        shard_number, row = self._locate(sample_id)
        features = self._cache.get(shard_number)
        if features is None:
            features = self._load(shard_number)
            self._cache[shard_number] = features
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard_number)
        return features[row]
