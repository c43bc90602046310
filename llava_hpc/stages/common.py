"""Helpers every stage shares: pipeline settings -> model specs, dataset records, image loading, devices."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llava_hpc.config import Dataset, Pipeline
from llava_hpc.data.images import BadRecord, open_image
from llava_hpc.data.llava_json import UnparsedLine, read_records
from llava_hpc.model.specs import LlavaSpec, LLMSpec, VisionTowerSpec
# numpy, PIL, the synthetic world and the model builders (torch) are imported by the functions that use them:
# planning and `llava-hpc status` import this module too.
if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from llava_hpc.synthetic import SyntheticWorld

log = logging.getLogger("llava_hpc")


def vision_spec(pipeline: Pipeline) -> VisionTowerSpec:
    model = pipeline.model
    return VisionTowerSpec(
        name=model.vision_tower,
        select_layer=model.vision_select_layer,
        image_aspect_ratio=model.image_aspect_ratio,
        tiny=model.tiny_vision,
    )


def llava_spec(pipeline: Pipeline) -> LlavaSpec:
    from llava_hpc.synthetic import SyntheticWorld

    model = pipeline.model
    # The tiny LLM's word-level tokenizer knows the synthetic world's words: the demo's whole language.
    vocabulary = tuple(SyntheticWorld.from_config(pipeline.synthetic).vocabulary()) if model.llm == "tiny" else ()
    return LlavaSpec(
        vision=vision_spec(pipeline),
        llm=LLMSpec(name=model.llm, tiny=model.tiny_llm, vocabulary=vocabulary),
        projector=model.projector,
        max_length=model.max_length,
        standardize_features=model.standardize_features,
    )


def model_preflight(pipeline: Pipeline) -> list[str]:
    """The vision tower and the LLM (with its tokenizer) must load offline: jobs run with HF_HUB_OFFLINE=1."""
    from llava_hpc.model.builders import missing_models

    return missing_models([pipeline.model.vision_tower, pipeline.model.llm])


def compute_device() -> tuple[torch.device, torch.dtype]:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def subset_positions(total: int, max_samples: int | None, seed: int) -> np.ndarray:
    """A seeded random `max_samples` of `total` record positions, in file order (all of them when None or more):
    not the head of the file, which in LLaVA's JSONs is ordered by source and would skew a subset."""
    import numpy as np

    if max_samples is None or max_samples >= total:
        return np.arange(total, dtype=np.int64)
    chosen = np.random.default_rng(seed).choice(total, size=max_samples, replace=False)
    return np.sort(chosen).astype(np.int64)


def load_positioned_records(name: str, dataset: Dataset, world: SyntheticWorld) -> tuple[list, np.ndarray]:
    """(records, their positions in the file): the dataset's seeded subset (`max_samples`, `subset_seed`) in file
    order; a synthetic dataset's records come from `world`. Items are whatever the file holds: validation per record
    happens where a record is used, so one bad record never hides the others."""
    if dataset.kind == "synthetic":
        records = world.records(dataset.split)
    else:
        records = read_records(dataset.path, name)
    positions = subset_positions(len(records), dataset.max_samples, dataset.subset_seed)
    if len(positions) < len(records):
        records = [records[p] for p in positions]
    return records, positions


@dataclass(frozen=True)
class ImageRecord:
    id: str
    image: str


def image_record(record, position: int) -> ImageRecord | None:
    """The (id, image) of a record; None for a text-only record; BadRecord for a malformed one."""
    if isinstance(record, UnparsedLine):
        raise BadRecord(f"record #{position}: {record.describe()}")
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

    def __init__(self, dataset: Dataset, world: SyntheticWorld):
        self.world = world if dataset.kind == "synthetic" else None
        self.root = None if dataset.images is None else Path(dataset.images).resolve()

    def load(self, relative: str) -> Image.Image:
        if self.world is not None:
            try:
                return self.world.load_image(relative)
            except ValueError as exc:
                raise BadRecord(str(exc)) from None
        try:
            return open_image(self.root, [relative])
        except FileNotFoundError as exc:  # a training record with no image is skipped and reported, like a bad one
            raise BadRecord(str(exc)) from None


def stage1_projector_path(run) -> Path:
    return run.stage_dir("stage1") / "projector.safetensors"


def stage2_model_dir(run) -> Path:
    return run.stage_dir("stage2") / "model"


def load_trained_model(ctx, which: str, device: torch.device | str = "cpu"):
    """(model with vision tower, template, model_id) of a trained stage in the run directory.

    stage2: the exported transformers-format model. stage1: the base LLM with the stage-1 projector (what
    `llava-hpc export` writes after stage 1 alone)."""
    import torch

    from llava_hpc.data.templates import ConversationTemplate
    from llava_hpc.model.builders import build_llava
    from llava_hpc.model.export import load_exported
    from llava_hpc.model.llava import load_projector

    run, pipeline = ctx.run, ctx.pipeline
    if which == "stage2":
        directory = stage2_model_dir(run)
        if not run.is_done(run.stage_dir("stage2")):
            raise FileNotFoundError(f"{directory}: stage2 is not done in {run.root}; submit stage2 first")
        model, _, _, template = load_exported(directory, device)
        return model, template, f"{pipeline.name}/stage2"
    if which == "stage1":
        path = stage1_projector_path(run)
        if not path.exists():
            raise FileNotFoundError(f"{path}: stage1 is not done in {run.root}; submit stage1 first")
        model, tokenizer = build_llava(llava_spec(pipeline), device=device, with_vision_tower=True)
        model.multi_modal_projector = load_projector(path).to(device=device, dtype=torch.float32)
        model.eval()
        return model, ConversationTemplate(pipeline.model.template, tokenizer), f"{pipeline.name}/stage1"
    raise ValueError(f"unknown trained stage {which!r}: stage1 or stage2")
