"""How a features directory names its shards, and the checksum its sidecars record.

Apart from the Parquet reading and writing (`features_io`) so that planning, `status` and progress, which only
look at names, never import pyarrow."""

from __future__ import annotations

import hashlib
from pathlib import Path


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def shard_number(path: Path) -> int:
    """The index in a shard's file name (`part-00007.parquet` -> 7): stable when another shard is missing."""
    try:
        return int(Path(path).stem.removeprefix("part-"))
    except ValueError:
        raise ValueError(f"{path}: not a feature shard name (expected part-NNNNN.parquet)") from None


def shard_paths(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("part-*.parquet"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
