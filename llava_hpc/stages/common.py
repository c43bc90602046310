"""Helpers every stage shares: pipeline settings -> model specs, dataset records, image loading, devices."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from llava_hpc.config import Dataset, Pipeline
from llava_hpc.model.vision import TinyVisionSpec, VisionTowerSpec
from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld

log = logging.getLogger("llava_hpc")


def vision_spec(pipeline: Pipeline) -> VisionTowerSpec:
    model = pipeline.model
    return VisionTowerSpec(
        name=model.vision_tower,
        select_layer=model.vision_select_layer,
        image_aspect_ratio=model.image_aspect_ratio,
        tiny=TinyVisionSpec(**model.tiny_vision.model_dump()),
    )


def synthetic_world(pipeline: Pipeline) -> SyntheticWorld:
    s = pipeline.synthetic
    return SyntheticWorld(
        SyntheticSpec(
            seed=s.seed,
            image_size=s.image_size,
            n_pretrain=s.n_pretrain,
            n_instruct=s.n_instruct,
            n_bench=s.n_bench,
            bench_categories=tuple(s.bench_categories),
            shuffle_images=s.shuffle_images,
        )
    )


def compute_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


class BadRecord(Exception):
    """A record that is skipped and reported: the reason names the field or the file."""


class DatasetFileError(ValueError):
    """A dataset file that cannot be read at all: fail fast."""


def load_records(name: str, dataset: Dataset, pipeline: Pipeline) -> list:
    """The dataset's raw records in file order, capped at max_samples. Items are whatever the file holds:
    validation per record happens where a record is used, so one bad record never hides the others."""
    if dataset.kind == "synthetic":
        records = synthetic_world(pipeline).records(dataset.split)
    else:
        try:
            with open(dataset.path) as f:
                records = json.load(f)
        except json.JSONDecodeError as exc:
            raise DatasetFileError(f"{dataset.path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        except OSError as exc:
            raise DatasetFileError(f"dataset {name!r}: cannot read {dataset.path}: {exc.strerror}") from None
        if not isinstance(records, list):
            raise DatasetFileError(f"{dataset.path}: expected a JSON list of records, got a {type(records).__name__}")
    if dataset.max_samples is not None:
        records = records[: dataset.max_samples]
    return records


@dataclass(frozen=True)
class ImageRecord:
    id: str
    image: str


def image_record(record, position: int) -> ImageRecord | None:
    """The (id, image) of a record; None for a text-only record; BadRecord for a malformed one."""
    if not isinstance(record, dict):
        raise BadRecord(f"record #{position} is a {type(record).__name__}, not an object")
    if "id" not in record:
        raise BadRecord(f"record #{position} has no 'id' field")
    sample_id = record["id"]
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        raise BadRecord(f"record #{position}: field 'id' must be a string or integer, got {type(sample_id).__name__}")
    if "image" not in record or record["image"] is None:
        return None
    image = record["image"]
    if not isinstance(image, str) or not image:
        raise BadRecord(f"record {sample_id!r}: field 'image' must be a non-empty string")
    return ImageRecord(str(sample_id), image)


class ImageLoader:
    """Opens a dataset's images: files under an image root, or renders of the synthetic world."""

    def __init__(self, dataset: Dataset, pipeline: Pipeline):
        self.world = synthetic_world(pipeline) if dataset.kind == "synthetic" else None
        self.root = None if dataset.images is None else Path(dataset.images).resolve()

    def load(self, relative: str) -> Image.Image:
        if self.world is not None:
            try:
                return self.world.load_image(relative)
            except ValueError as exc:
                raise BadRecord(str(exc)) from None
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise BadRecord(f"image path {relative!r} escapes the image root {self.root}")
        if not path.is_file():
            raise BadRecord(f"image file missing: {path}")
        try:
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise BadRecord(f"corrupt image {path}: {exc}") from None
