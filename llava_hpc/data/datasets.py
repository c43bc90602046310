"""Torch datasets and collators.

- `FeatureConversationDataset`: encoded conversations (the run's memory-mapped cache, `data.encoded`) joined
  by image path to precomputed CLIP features (Parquet shards); what both training stages read.
- `ImageConversationDataset`: the same conversations with raw images through the vision tower's
  preprocessing (training from pixels, and the features-vs-pixels benchmark).
- `PromptDataset`: bench questions as generation prompts, with their images.
- `Collator`: right padding for training, LEFT padding for generation; `LengthGroupedSampler` batches
  samples of similar length together.
Records are encoded up front, once per run (`data.encoded`): a malformed record or one dropped by the over-long
policy is skipped, named and counted, never fatal unless every record is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from llava_hpc.data.features_io import FeatureStore
from llava_hpc.data.encoded import EncodedSamples, EncodeSettings, encode_in_memory
from llava_hpc.data.templates import IGNORE_INDEX, ConversationTemplate
from llava_hpc.model.llava import ImageLayout

ImageLoader = Callable[[str], Image.Image]
Preprocess = Callable[[list[Image.Image]], torch.Tensor]


def file_image_loader(root: str | os.PathLike) -> ImageLoader:
    """Images from files under `root`, by the relative path the record names."""
    root = Path(root)

    def load(relative_path: str) -> Image.Image:
        path = root / relative_path
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        with Image.open(path) as image:
            return image.convert("RGB")

    return load


class FeatureConversationDataset(Dataset):
    """Encoded samples (the run's memory-mapped cache, `data.encoded`) joined by image path to the features.

    A sample whose image has no features (the features stage could not read it) is dropped, counted and named in
    `.missing_features`; a store that matches no sample at all is the wrong store."""

    def __init__(self, samples: EncodedSamples, store: FeatureStore, counts: dict | None = None):
        if samples.image_tokens != store.num_patches:
            raise ValueError(f"{samples.origin}: encoded for {samples.image_tokens} image tokens, but the features in "
                             f"{store.directory} have {store.num_patches} patches")
        self.samples, self.store = samples, store
        self.image_tokens = store.num_patches
        images = samples.images()
        kept, groups, self.missing_features = [], [], []
        for row, image in enumerate(images):
            if image is None:
                kept.append(row)
                groups.append(-1)
            elif image in store:
                kept.append(row)
                groups.append(store.shard_of(image))
            else:
                self.missing_features.append({"position": int(samples.positions[row]), "id": samples.id(row),
                                              "image": image})
        with_images = sum(image is not None for image in images)
        if with_images and with_images == len(self.missing_features):
            example = self.missing_features[0]
            raise KeyError(f"{store.directory}: none of the {with_images} samples with an image (e.g. {example['id']!r}, "
                           f"image {example['image']!r}) has features")
        self.rows = np.asarray(kept, dtype=np.int64)
        self.lengths = samples.lengths[self.rows]
        # Each sample's feature shard (-1: text only), so training can read shard-locally (SampleStream).
        self.groups = np.asarray(groups, dtype=np.int64)
        self.stats = dict(counts or {"encoded": len(samples)})
        self.stats["skipped_missing_features"] = len(self.missing_features)
        self.stats["samples"] = len(self.rows)

    @classmethod
    def from_records(cls, records: list, store: FeatureStore, template: ConversationTemplate, max_length: int,
                     overlong: str = "truncate", source: str | None = None) -> FeatureConversationDataset:
        """Encoded in memory, no cache (benchmarks, tests); bad records are skipped as in the cache."""
        table, counts, skipped = encode_in_memory(records, None, template,
                                                  EncodeSettings(store.num_patches, max_length, overlong), source)
        dataset = cls(EncodedSamples(table, store.num_patches), store, counts)
        dataset.skipped = skipped
        return dataset

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = int(self.rows[index])
        item = _token_item(self.samples, row)
        if self.samples.num_images[row]:
            # A copy: the store's arrays are read-only views of the Arrow buffers.
            item["image_features"] = torch.tensor(self.store.get(self.samples.image(row))).unsqueeze(0)
        return item

    def prefetch(self, indices) -> None:
        """Start decoding, in the background, the feature shards these samples read (the next step's)."""
        shards = [int(g) for g in dict.fromkeys(self.groups[np.asarray(list(indices), dtype=np.int64)].tolist())]
        self.store.prefetch([g for g in shards if g >= 0])


class ImageConversationDataset(Dataset):
    """Encoded in memory (the features-vs-pixels benchmark, export tests); bad records are skipped and listed in
    `.skipped`, as in the cache."""

    def __init__(
        self,
        records: list[dict],
        template: ConversationTemplate,
        preprocess: Preprocess,
        load_image: ImageLoader,
        image_tokens: int,
        max_length: int,
        overlong: str = "truncate",
        source: str | None = None,
    ):
        self.preprocess, self.load_image, self.image_tokens = preprocess, load_image, image_tokens
        table, self.stats, self.skipped = encode_in_memory(
            records, None, template, EncodeSettings(image_tokens, max_length, overlong), source)
        self.samples = EncodedSamples(table, image_tokens)
        self.lengths = self.samples.lengths

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        item = _token_item(self.samples, index)
        if self.samples.num_images[index]:
            item["pixel_values"] = _load(
                self.load_image, self.preprocess, self.samples.image(index), f"record {item['id']!r}"
            )
        return item


class PromptDataset(Dataset):
    """Generation prompts: `{"question_id", "image", "text"}` items (the LLaVA-Bench question format)."""

    def __init__(
        self, questions: list[dict], template: ConversationTemplate, preprocess: Preprocess, load_image: ImageLoader
    ):
        self.questions, self.template = questions, template
        self.preprocess, self.load_image = preprocess, load_image

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        question = self.questions[index]
        has_image = question.get("image") is not None
        item = {
            "id": question["question_id"],
            "input_ids": torch.tensor(self.template.prompt_ids(question["text"], image=has_image)),
        }
        if has_image:
            item["pixel_values"] = _load(
                self.load_image, self.preprocess, question["image"], f"question {question['question_id']!r}"
            )
        return item


def _token_item(samples: EncodedSamples, row: int) -> dict:
    input_ids, labels = samples.tokens(row)
    # int64 copies: the cache's int32 views are read-only and embedding lookups want long.
    return {"id": samples.id(row), "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
            "labels": torch.from_numpy(labels.astype(np.int64))}


def _load(load_image: ImageLoader, preprocess: Preprocess, relative_path: str, owner: str) -> torch.Tensor:
    try:
        image = load_image(relative_path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{owner}: {exc}") from None
    return preprocess([image])


@dataclass
class Batch:
    ids: list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    layout: ImageLayout | None = None

    def model_inputs(self) -> dict:
        """Keyword arguments for `LlavaForCausalLM.forward` / `.generate` (everything but the ids)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "ids" and getattr(self, f.name) is not None
        }

    def to(self, device: str | torch.device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, (torch.Tensor, ImageLayout)):
                moved[name] = value.to(device, non_blocking=True) if name != "layout" else value.to(device)
        return Batch(**moved)


class Collator:
    """Pads to the longest sample: `right` for training, `left` for generation (rows then end together).

    Image tensors of the batch are concatenated in sample order, matching the placeholders' order. With `layout`
    (training: the model's `image_layout` with its padding side and truncation bound), the batch also carries where
    its images go and which positions are scored, worked out here on the host so the forward pass never syncs."""

    def __init__(self, pad_token_id: int, padding_side: str = "right",
                 layout: Callable[..., ImageLayout] | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id, self.padding_side, self.layout = pad_token_id, padding_side, layout

    @classmethod
    def for_training(cls, model, pad_token_id: int) -> Collator:
        """Right padding, and the model's expanded layout of every micro-batch computed here on the host."""
        return cls(pad_token_id, "right", layout=partial(model.image_layout, padding_side="right", truncate=True))

    def __call__(self, items: list[dict]) -> Batch:
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        has_labels = "labels" in items[0]
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            span = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[row, span] = item["input_ids"]
            attention_mask[row, span] = 1
            if has_labels:
                labels[row, span] = item["labels"]

        def images(key: str) -> torch.Tensor | None:
            tensors = [item[key] for item in items if key in item]
            return torch.cat(tensors) if tensors else None

        pixel_values, image_features = images("pixel_values"), images("image_features")
        layout = None
        if self.layout is not None:
            num_images = sum(len(t) for t in (pixel_values, image_features) if t is not None)
            layout = self.layout(input_ids, attention_mask, labels, num_images)
        return Batch(
            ids=[item["id"] for item in items],
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            pixel_values=pixel_values,
            image_features=image_features,
            layout=layout,
        )


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices where each run of `batch_size` holds samples of similar length (less padding).

    As transformers' length-grouped sampler: shuffle, cut into megabatches of `megabatch_mult * batch_size`,
    sort each by length (longest first). With `num_replicas` > 1 each rank takes every num_replicas-th batch
    of the global order (padded by repetition so every rank gets the same number of samples)."""

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int = 0,
        megabatch_mult: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.megabatch_size = megabatch_mult * batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.num_samples = math.ceil(len(lengths) / (batch_size * num_replicas)) * batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.lengths:
            return iter([])
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        grouped = []
        for start in range(0, len(order), self.megabatch_size):
            megabatch = order[start : start + self.megabatch_size]
            grouped += sorted(megabatch, key=lambda i: self.lengths[i], reverse=True)
        total = self.num_samples * self.num_replicas
        while len(grouped) < total:  # repeat a few samples so every rank gets full batches
            grouped += grouped[: total - len(grouped)]
        batches = [grouped[i : i + self.batch_size] for i in range(0, total, self.batch_size)]
        return iter([index for batch in batches[self.rank :: self.num_replicas] for index in batch])
