"""Parquet shards of precomputed vision features, one row per unique image.

A row is `image` (the path exactly as the dataset's records name it: the key records are joined on),
`content_hash` (what the image's bytes were when its features were computed: provenance, and what tells a
changed image from an unchanged one) and `features`, the [num_patches, hidden_size] fp16 matrix flattened into
a fixed-size list of halffloat (readable by pyarrow and `datasets` alike). The shape lives in the schema
metadata. Each shard has a small JSON sidecar (`part-00000.json`) written before the shard itself is renamed
into place, so a visible shard always has its row count, checksum and bad images beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llava_hpc.data.shard_layout import file_sha256, shard_name, shard_number, shard_paths  # noqa: F401 (re-exported)
from llava_hpc.rundir import SUCCESS, append_jsonl, atomic_path, atomic_write_json

log = logging.getLogger("llava_hpc.features")

SHAPE_KEY = b"llava_hpc.features_shape"
QUARANTINE = "quarantine"  # where shards that failed their checksum go: kept for a post-mortem, never read again


class CorruptShardError(RuntimeError):
    pass


class Shard(NamedTuple):
    images: list[str]
    content_hashes: list[str | None]
    features: np.ndarray


def features_table(images: Sequence[str], features: np.ndarray, content_hashes: Sequence[str | None] | None = None) -> pa.Table:
    if content_hashes is None:
        content_hashes = [None] * len(images)
    if features.ndim != 3 or len(features) != len(images) or len(content_hashes) != len(images):
        raise ValueError(f"features must be [rows, patches, hidden] with one row and one content hash per image; got "
                         f"{features.shape} for {len(images)} images and {len(content_hashes)} hashes")
    if len(set(images)) != len(images):
        duplicate = next(i for i in images if images.count(i) > 1)
        raise ValueError(f"image {duplicate!r} appears more than once: a shard holds one row per unique image")
    rows, patches, hidden = features.shape
    flat = pa.array(np.ascontiguousarray(features, dtype=np.float16).reshape(-1), type=pa.float16())
    column = pa.FixedSizeListArray.from_arrays(flat, patches * hidden)
    schema = pa.schema(
        [("image", pa.string()), ("content_hash", pa.string()), ("features", column.type)],
        metadata={SHAPE_KEY: json.dumps([patches, hidden]).encode()},
    )
    return pa.Table.from_arrays(
        [pa.array(list(images), pa.string()), pa.array(list(content_hashes), pa.string()), column], schema=schema
    )


def write_shard(
    directory: Path,
    index: int,
    *,
    images: Sequence[str],
    features: np.ndarray,
    content_hashes: Sequence[str | None] | None = None,
    bad_images: Sequence[dict] = (),
    compression: str = "zstd",
) -> dict:
    """Write `part-XXXXX.parquet` and its sidecar; the Parquet file appears last and atomically.

    Keyword-only: the per-record layout this replaced took (ids, images, features) positionally, and an old call
    must fail rather than key the store by record id. `content_hashes` may be None where there are no image bytes
    (benchmarks, tests); the features stage always gives them."""
    directory = Path(directory)
    name = shard_name(index)
    table = features_table(images, features, content_hashes)
    target = directory / f"{name}.parquet"
    with atomic_path(target) as tmp:
        # Features are near-incompressible floats: a dictionary only slows reading (measured: 2.5x), and
        # byte-stream-split lets zstd find the exponent bytes' redundancy while reading faster still.
        pq.write_table(table, tmp, compression=None if compression == "none" else compression,
                       use_dictionary=False, column_encoding={"features": "BYTE_STREAM_SPLIT"})
        meta = {
            "shard": index,
            "rows": len(images),
            "bad": len(bad_images),
            "bad_images": list(bad_images),
            "bytes": tmp.stat().st_size,
            "sha256": file_sha256(tmp),
            "shape": list(features.shape[1:]),
            "compression": compression,
        }
        atomic_write_json(directory / f"{name}.json", meta)
    return meta


def read_shard(path: Path, verify: bool = False) -> Shard:
    path = Path(path)
    if verify:
        verify_shard(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _unreadable(path, exc) from exc
    return Shard(table.column("image").to_pylist(), table.column("content_hash").to_pylist(), _features_of(table))


def feature_statistics(directory: Path, max_images: int = 512) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, std, images) of each feature dimension over the first shards' images, up to `max_images`.

    Records reach shards by a seeded permutation, so the first shards are a random sample; 512 images hold
    8K (tiny tower) to 295K (CLIP-L, 576 patches) patch vectors, plenty for a per-dimension mean and std."""
    total = squares = None
    images = vectors = 0
    for path in shard_paths(Path(directory)):
        features = read_shard(path, verify=True).features[: max_images - images]
        flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
        total = flat.sum(0) + (0 if total is None else total)
        squares = (flat * flat).sum(0) + (0 if squares is None else squares)
        images, vectors = images + len(features), vectors + len(flat)
        if images >= max_images:
            break
    if not vectors:
        raise FileNotFoundError(f"{directory}: no feature shards (part-*.parquet); run the features stage first")
    mean = total / vectors
    std = np.sqrt(np.maximum(squares / vectors - mean * mean, 0.0))
    # A constant dimension carries nothing: left unscaled rather than divided by ~0.
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32), images


def shard_bytes_estimate(directory: Path) -> int:
    """Decoded bytes of the dataset's largest shard (rows x patches x hidden x 2, fp16): what one entry of a
    FeatureStore's cache holds, so a caller can size it from a memory budget:
    `cache_shards = max(2, budget_bytes // shard_bytes_estimate(directory))`. Reads only Parquet footers."""
    paths = shard_paths(directory)
    if not paths:
        raise FileNotFoundError(f"{directory}: no feature shards (part-*.parquet); run the features stage first")
    largest = 0
    for path in paths:
        try:
            metadata = pq.read_metadata(path)
            patches, hidden = json.loads(metadata.schema.to_arrow_schema().metadata[SHAPE_KEY])
        except (pa.ArrowInvalid, OSError, KeyError, TypeError, ValueError) as exc:
            raise _unreadable(path, exc) from exc
        largest = max(largest, metadata.num_rows * patches * hidden * 2)
    return largest


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


class FeatureStore:
    """All shards of one dataset's features, looked up by image path (as the records name it), in bounded memory.

    Opening reads only the `image` column. A shard's features are decoded when one of its images is first asked
    for, or ahead of time by `prefetch` in one background thread (pyarrow and hashlib release the GIL, so the
    decode really overlaps training). Shards are numbered by their file name (`shard_of`, `prefetch`).

    Memory: at most `cache_shards` decoded shards exist at any time, in-flight prefetches included (size it with
    `shard_bytes_estimate`). A prefetch takes a free slot or evicts the least recently used decoded shard, but
    never the shard read last (training is reading it now) nor one named in the same prefetch call; when no slot
    can be had it stops there (a prefetch is a hint: what it skips is decoded on demand by `get`). A `get` that
    needs a slot evicts the least recently used decoded shard, else cancels the newest pending prefetch, else
    waits for the running one and drops it: the bound holds without exception.

    With `verify`, a shard is checked against the sha256 in its sidecar when it is first loaded (once per shard
    and process); one that fails is quarantined (`quarantine_shard`) and CorruptShardError says how to get it
    recomputed. A failure in the prefetch thread is kept and raised, the same error, by the `get` that reads that
    shard: never swallowed, never a hang.

    One reading thread per store. A forked or unpickled copy (DataLoader workers) starts with an empty cache and
    its own prefetch thread."""

    def __init__(self, directory: Path, verify: bool = False, cache_shards: int = 8):
        if cache_shards < 1:
            raise ValueError(f"cache_shards must be at least 1, got {cache_shards}")
        self.directory = Path(directory)
        self.verify, self.cache_shards = verify, cache_shards
        self.paths = shard_paths(self.directory)
        if not self.paths:
            raise FileNotFoundError(f"{self.directory}: no feature shards (part-*.parquet); run the features stage first")
        self._path_of = {shard_number(path): path for path in self.paths}
        self._index: dict[str, tuple[int, int]] = {}
        shapes = {}
        for number, path in self._path_of.items():
            images, shapes[path] = self._read_index(path)
            for row, image in enumerate(images):
                if image in self._index:
                    other = self._path_of[self._index[image][0]].name
                    raise ValueError(f"{path}: image {image!r} is also in {other}; a dataset holds each image once, "
                                     "recompute its features (--force)")
                self._index[image] = (number, row)
        (self.num_patches, self.hidden_size), first = shapes[self.paths[0]], self.paths[0]
        for path, shape in shapes.items():
            if shape != (self.num_patches, self.hidden_size):
                raise ValueError(f"{path}: features of shape {list(shape)}, but {first.name} has "
                                 f"{[self.num_patches, self.hidden_size]}; recompute the dataset's features (--force)")
        self._verified: set[int] = set()
        self.shard_loads = 0  # decodes so far, both threads: a caller reading out of shard order shows up here
        self._reset_reader_state()

    def _reset_reader_state(self) -> None:
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._inflight: dict[int, Future] = {}  # submission order: the newest pending is cancelled first
        self._failed: dict[int, BaseException] = {}  # prefetches that raised, until a get reads that shard
        self._last_read: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # shard_loads and _verified are written by both threads
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_cache", "_inflight", "_failed", "_executor", "_lock", "_last_read", "_pid"):
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_reader_state()

    def _forked_check(self) -> None:
        # A forked child inherits the executor object but not its thread: a submit there would never run.
        if self._pid != os.getpid():
            self._reset_reader_state()

    def _read_index(self, path: Path) -> tuple[list[str], tuple[int, int]]:
        try:
            table = pq.read_table(path, columns=["image"])
            patches, hidden = json.loads(table.schema.metadata[SHAPE_KEY])
        except FileNotFoundError:
            raise self._gone(path) from None
        except (pa.ArrowInvalid, OSError, KeyError, TypeError, ValueError) as exc:
            if self.verify:  # a damaged file: quarantined with the checksum's verdict if that is what happened
                self._check(path, file_sha256(path))
            raise _unreadable(path, exc) from exc
        return table.column("image").to_pylist(), (patches, hidden)

    def _load(self, number: int) -> np.ndarray:
        """Verify (once) and decode one shard. Runs in the reading thread or the prefetch thread."""
        path = self._path_of[number]
        try:
            with self._lock:
                needs_check = self.verify and number not in self._verified
            if needs_check:
                self._check(path, file_sha256(path))
                with self._lock:
                    self._verified.add(number)
            # From the path, not from the bytes just hashed: pyarrow reading a Parquet file from an in-memory
            # buffer aborts the process at exit now and then ("terminate called without an active exception",
            # 7 of 30 runs with torch imported; 0 of 30 reading from the path).
            table = pq.read_table(path, columns=["features"])
        except FileNotFoundError:
            raise self._gone(path) from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise _unreadable(path, exc) from exc
        features = _features_of(table)
        with self._lock:
            self.shard_loads += 1
        return features

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

    def __contains__(self, image: object) -> bool:
        return image in self._index

    @property
    def images(self) -> list[str]:
        """Every image with features, in shard order."""
        return list(self._index)

    @property
    def shards(self) -> list[int]:
        return list(self._path_of)

    def shard_of(self, image: str) -> int:
        return self._locate(image)[0]

    def _locate(self, image: str) -> tuple[int, int]:
        try:
            return self._index[image]
        except KeyError:
            raise KeyError(f"{self.directory}: no features for image {image!r}") from None

    def get(self, image: str) -> np.ndarray:
        """The image's [num_patches, hidden_size] features: a read-only view into its decoded shard."""
        number, row = self._locate(image)
        return self._decoded(number)[row]

    def _decoded(self, number: int) -> np.ndarray:
        self._forked_check()
        self._harvest_failures()
        features = self._cache.get(number)
        if features is None:
            if number in self._failed:
                raise self._failed.pop(number)  # the prefetch thread's error, raised where training reads
            future = self._inflight.pop(number, None)  # its slot passes to the cache entry
            if future is not None:
                try:
                    features = future.result()  # wait for the prefetch: never decode a shard twice
                except CancelledError:
                    features = None
            if features is None:
                self._make_room_for_read()
                features = self._load(number)
            self._cache[number] = features
        self._cache.move_to_end(number)
        self._last_read = number
        return features

    def prefetch(self, shards: Iterable[int]) -> None:
        """Start decoding these shards in the background, in the order given; returns at once. Shards already
        decoded or on their way are not decoded again (the decoded ones become most recently used)."""
        self._forked_check()
        self._harvest_failures()
        requested = list(dict.fromkeys(shards))
        for number in requested:
            if number not in self._path_of:
                raise KeyError(f"{self.directory}: no shard {number} (have {len(self._path_of)} shards)")
        protected = set(requested) | {self._last_read}
        for number in requested:
            if number in self._cache:
                self._cache.move_to_end(number)
                continue
            if number in self._inflight or number in self._failed:
                continue
            if not self._free_slot(protected):
                break
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-prefetch")
            self._inflight[number] = self._executor.submit(self._load, number)

    def _occupied(self) -> int:
        return len(self._cache) + len(self._inflight)

    def _free_slot(self, protected: set) -> bool:
        while self._occupied() >= self.cache_shards:
            victim = next((n for n in self._cache if n not in protected), None)
            if victim is None:
                return False
            del self._cache[victim]
        return True

    def _make_room_for_read(self) -> None:
        while self._occupied() >= self.cache_shards:
            if self._cache:
                self._cache.popitem(last=False)
                continue
            pending = next((n for n in reversed(self._inflight) if not self._inflight[n].running()), None)
            if pending is not None and self._inflight[pending].cancel():
                del self._inflight[pending]
                continue
            # Only the running decode holds a slot: let it finish (keeping a failure for its get) and drop it.
            number, future = next(iter(self._inflight.items()))
            del self._inflight[number]
            with contextlib.suppress(CancelledError):
                if future.exception() is not None:
                    self._failed[number] = future.exception()

    def _harvest_failures(self) -> None:
        """Failed prefetches hold no memory: move them out of the bound, keeping the error for their `get`."""
        for number, future in list(self._inflight.items()):
            if future.done() and not future.cancelled() and future.exception() is not None:
                log.warning("prefetch of %s failed: %s", self._path_of[number].name, future.exception())
                self._failed[number] = future.exception()
                del self._inflight[number]

    def close(self) -> None:
        """Stop the prefetch thread (pending prefetches are cancelled) and drop the decoded shards."""
        if self._executor is not None and self._pid == os.getpid():
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None
        self._inflight.clear()
        self._cache.clear()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
