"""The embedded default world: small images with known content, their captions, instructions and a bench.

Every image shows one coloured shape (or 2-3 identical copies in the count variant) in the left or right
half of a black or white square. Everything is a pure function of (seed, split, index), so any single
sample renders without generating the others (array tasks render only their shard) and no files are needed
until `write()` materialises a split.

What a tiny LLaVA with a random frozen CLIP tower learns from this on CPU (notes/synthetic-world.md):
colour (100 % held-out) and left/right position (95 %), but hardly shape. So the default bench asks only
about colour and position; shape, background and count still appear in captions and instructions.

`SyntheticSpec.shuffle_images` is the control run: every training sample (pretrain and instruct) is paired
with another sample's image through a fixed derangement, so answers cannot come from the image and a model
should fall to chance. The bench is never shuffled: the control is evaluated on the real images.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from llava_hpc.rundir import atomic_write_bytes

if TYPE_CHECKING:
    from llava_hpc.config import SyntheticConfig

IMAGE_TOKEN = "<image>"
SPLITS = ("pretrain", "instruct", "bench")
TRAINING_SPLITS = ("pretrain", "instruct")
CATEGORIES = ("colour", "position", "shape", "background", "count")

# Base colours stay within [20, 235] so that the +-20 jitter never leaves [0, 255], and they are far enough
# apart (and from black and white) that a jittered sample never looks like another name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 70, 215),
    "yellow": (225, 210, 40),
    "purple": (140, 50, 185),
    "orange": (235, 125, 25),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_JITTER = 20
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("left", "right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255)}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
COUNT_WORDS = ("one", "two", "three")
MAX_INDEX = 10**6  # paths carry six digits

PRETRAIN_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "What is in the image?",
    "Summarize the picture in a few words.",
)

# {Is}/{is}/{noun} take the singular or the plural form, so the count variant stays grammatical.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour {is} the {noun}?",
        "Which colour {is} the {noun}?",
        "What is the colour of the {noun}?",
    ),
    "position": (
        "{Is} the {noun} on the left or on the right?",
        "On which side {is} the {noun}?",
        "Where {is} the {noun}, left or right?",
    ),
    "shape": (
        "What kind of {noun} {is} drawn?",
        "Name the {noun} in the image.",
        "Which {noun} {is} in the image: square, circle or triangle?",
    ),
    "background": (
        "What colour is the background?",
        "Is the background black or white?",
        "Which colour does the background have?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes do you see?",
        "How many shapes are in the image?",
    ),
}
SINGULAR = {"Is": "Is", "is": "is", "noun": "shape"}
PLURAL = {"Is": "Are", "is": "are", "noun": "shapes"}

_SPLIT_IDS = {split: number for number, split in enumerate(SPLITS)}
# Separate random streams per sample: changing the wording never changes an image, and vice versa.
_SCENE_STREAM, _TEXT_STREAM, _DERANGEMENT_STREAM = 0, 1, 2
_PATH_PATTERN = re.compile(r"(pretrain|instruct|bench)/(\d{6})\.png")
_WORD_PATTERN = re.compile(r"<image>|[a-z]+|[^\sa-z]")


def split_words(text: str) -> list[str]:
    """Lowercased words, each punctuation mark its own token, `<image>` kept whole: the word-level view
    that `SyntheticWorld.vocabulary()` is built from."""
    return _WORD_PATTERN.findall(text.lower())


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    image_size: int = 64
    n_pretrain: int = 3000
    n_instruct: int = 3000
    n_bench: int = 200
    bench_categories: tuple[str, ...] = ("colour", "position")
    instruct_categories: tuple[str, ...] = ("colour", "position", "shape", "background")
    max_count: int = 1  # > 1 draws 1..max_count copies of the shape and allows the "count" category
    # CONTROL: pair each training sample's conversation with another sample's image (a fixed derangement),
    # so answers cannot come from the image. The bench stays un-shuffled.
    shuffle_images: bool = False

    def __post_init__(self) -> None:
        # Configs loaded from TOML/JSON give lists; tuples keep the spec hashable.
        object.__setattr__(self, "bench_categories", tuple(self.bench_categories))
        object.__setattr__(self, "instruct_categories", tuple(self.instruct_categories))
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 to fit three separated shapes, got {self.image_size}")
        for name in ("n_pretrain", "n_instruct", "n_bench"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_INDEX:
                raise ValueError(f"{name} must be in [0, {MAX_INDEX}], got {value}")
        if not 1 <= self.max_count <= len(COUNT_WORDS):
            raise ValueError(f"max_count must be in [1, {len(COUNT_WORDS)}], got {self.max_count}")
        for name in ("bench_categories", "instruct_categories"):
            categories = getattr(self, name)
            if not categories:
                raise ValueError(f"{name} must not be empty")
            if len(set(categories)) != len(categories):
                raise ValueError(f"{name} has duplicates: {categories}")
            unknown = [category for category in categories if category not in CATEGORIES]
            if unknown:
                raise ValueError(f"{name}: unknown categories {unknown}; known: {CATEGORIES}")
            if "count" in categories and self.max_count == 1:
                raise ValueError(f"{name} asks about count but max_count is 1 (every answer would be 'one')")
        if self.shuffle_images and 1 in (self.n_pretrain, self.n_instruct):
            raise ValueError("shuffle_images needs at least 2 samples per training split (no derangement of 1)")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str  # "left" or "right": every copy lies wholly in that half, clear of the centre line
    size: int  # side of each copy's bounding box, in pixels
    background: str
    x: int  # centre of the first (usually only) copy
    y: int
    rgb: tuple[int, int, int]  # the jittered fill colour
    count: int
    centres: tuple[tuple[int, int], ...]  # centre of every copy, top to bottom


class SyntheticWorld:
    def __init__(self, spec: SyntheticSpec = SyntheticSpec()):
        self.spec = spec
        size = spec.image_size
        self._border = max(1, size // 32)
        self._gap = size // 16  # free columns either side of the centre line, so left/right is never ambiguous
        self._min_size = round(0.2 * size)
        self._max_size = round(0.34 * size)

    @classmethod
    def from_config(cls, config: SyntheticConfig) -> SyntheticWorld:
        """The world a pipeline's `[synthetic]` table describes (it has the spec's fields, validated)."""
        return cls(SyntheticSpec(**config.model_dump()))

    # ----- scenes and images -----

    def split_size(self, split: str) -> int:
        self._check_split(split)
        return getattr(self.spec, f"n_{split}")

    def scene(self, split: str, index: int) -> Scene:
        """A pure function of (seed, split, index), plus bench_categories for the bench's balanced answers;
        each split is its own random stream."""
        n = self.split_size(split)
        if not 0 <= index < n:
            raise IndexError(f"{split} index {index} out of range [0, {n})")
        rng = self._rng(split, index, _SCENE_STREAM)
        attributes = {
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
            "position": POSITIONS[rng.integers(len(POSITIONS))],
            "background": BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))],
            "count": COUNT_WORDS[rng.integers(self.spec.max_count)],
        }
        if split == "bench":
            # The asked attribute cycles through its answers, so every answer is equally common and a model
            # that always gives the same answer scores chance, not the luck of the draw.
            category = self.bench_category(index)
            choices = self.answer_choices(category)
            attributes[category] = choices[(index // len(self.spec.bench_categories)) % len(choices)]
        colour_name, position = attributes["colour"], attributes["position"]
        count = COUNT_WORDS.index(attributes["count"]) + 1
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = tuple(int(base + delta) for base, delta in zip(COLOURS[colour_name], jitter))

        image_size = self.spec.image_size
        # Copies are stacked in equal horizontal slots of the stated half, so they never overlap.
        slot_height = (image_size - 2 * self._border) // count
        side = int(rng.integers(self._min_size, min(self._max_size, slot_height) + 1))
        if position == "left":
            first_column, last_column = self._border, image_size // 2 - self._gap - 1
        else:
            first_column, last_column = image_size - image_size // 2 + self._gap, image_size - 1 - self._border
        centres = []
        for slot in range(count):
            slot_top = self._border + slot * slot_height
            left = int(rng.integers(first_column, last_column - side + 2))
            top = int(rng.integers(slot_top, slot_top + slot_height - side + 1))
            centres.append((left + side // 2, top + side // 2))
        return Scene(
            shape=attributes["shape"],
            colour=colour_name,
            position=position,
            size=side,
            background=attributes["background"],
            x=centres[0][0],
            y=centres[0][1],
            rgb=rgb,
            count=count,
            centres=tuple(centres),
        )

    def image(self, split: str, index: int) -> Image.Image:
        return self.render(self.scene(split, index))

    def render(self, scene: Scene) -> Image.Image:
        size = self.spec.image_size
        image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
        draw = ImageDraw.Draw(image)
        for x, y in scene.centres:
            left, top = x - scene.size // 2, y - scene.size // 2
            right, bottom = left + scene.size - 1, top + scene.size - 1
            if scene.shape == "square":
                draw.rectangle((left, top, right, bottom), fill=scene.rgb)
            elif scene.shape == "circle":
                draw.ellipse((left, top, right, bottom), fill=scene.rgb)
            else:
                draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=scene.rgb)
        return image

    def image_path(self, split: str, index: int) -> str:
        self._check_split(split)
        return f"{split}/{index:06d}.png"

    def load_image(self, relative_path: str | os.PathLike) -> Image.Image:
        """Inverse of `image_path`: renders in memory, so a data loader needs no files."""
        text = Path(relative_path).as_posix()
        match = _PATH_PATTERN.fullmatch(text)
        if match is None or int(match[2]) >= self.split_size(match[1]):
            raise ValueError(
                f"{str(relative_path)!r} is not an image of this synthetic world "
                f"(expected '<split>/NNNNNN.png' with split in {SPLITS} and the index below the split size)"
            )
        return self.image(match[1], int(match[2]))

    # ----- text -----

    def pretrain_records(self) -> list[dict]:
        records = []
        image_indices = self._image_indices("pretrain")
        for index in range(self.spec.n_pretrain):
            rng = self._rng("pretrain", index, _TEXT_STREAM)
            prompt = PRETRAIN_PROMPTS[rng.integers(len(PRETRAIN_PROMPTS))]
            records.append(
                {
                    "id": f"pretrain-{index:06d}",
                    "image": self.image_path("pretrain", image_indices[index]),
                    "conversations": [
                        {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                        {"from": "gpt", "value": caption(self.scene("pretrain", index))},
                    ],
                }
            )
        return records

    def instruct_records(self) -> list[dict]:
        records = []
        categories = self.spec.instruct_categories
        image_indices = self._image_indices("instruct")
        for index in range(self.spec.n_instruct):
            scene = self.scene("instruct", index)
            rng = self._rng("instruct", index, _TEXT_STREAM)
            turns = int(rng.integers(1, min(3, len(categories)) + 1))
            conversations = []
            for choice in rng.choice(len(categories), size=turns, replace=False):
                question = _question(categories[choice], scene, rng)
                if not conversations:
                    question = f"{IMAGE_TOKEN}\n{question}"
                conversations.append({"from": "human", "value": question})
                conversations.append({"from": "gpt", "value": answer(categories[choice], scene)})
            records.append(
                {
                    "id": f"instruct-{index:06d}",
                    "image": self.image_path("instruct", image_indices[index]),
                    "conversations": conversations,
                }
            )
        return records

    def records(self, split: str) -> list[dict]:
        if split == "pretrain":
            return self.pretrain_records()
        if split == "instruct":
            return self.instruct_records()
        raise ValueError(f"records() serves {TRAINING_SPLITS}, got {split!r} (the bench is bench_questions())")

    def bench_category(self, index: int) -> str:
        """Categories take turns, so each gets n_bench / len(bench_categories) questions (within one)."""
        return self.spec.bench_categories[index % len(self.spec.bench_categories)]

    def bench_questions(self) -> list[dict]:
        """One question per bench image, with answers balanced within each category (see `scene`)."""
        questions = []
        for index in range(self.spec.n_bench):
            scene = self.scene("bench", index)
            category = self.bench_category(index)
            rng = self._rng("bench", index, _TEXT_STREAM)
            questions.append(
                {
                    "question_id": index,
                    "image": self.image_path("bench", index),
                    "text": _question(category, scene, rng),
                    "answer": answer(category, scene),
                    "category": category,
                }
            )
        return questions

    def answer_choices(self, category: str) -> list[str]:
        """Every possible answer of a category: chance level is 1 / len(choices)."""
        if category == "colour":
            return list(COLOUR_NAMES)
        if category == "position":
            return list(POSITIONS)
        if category == "shape":
            return list(SHAPES)
        if category == "background":
            return list(BACKGROUND_NAMES)
        if category == "count":
            return list(COUNT_WORDS[: self.spec.max_count])
        raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")

    def vocabulary(self) -> list[str]:
        """Sorted unique words (see `split_words`) of every text this world can produce; `<image>` is left
        out because a tokenizer adds it as a special token."""
        plural_forms = [SINGULAR] if self.spec.max_count == 1 else [SINGULAR, PLURAL]
        texts = list(PRETRAIN_PROMPTS)
        for category in dict.fromkeys(self.spec.instruct_categories + self.spec.bench_categories):
            texts += [template.format(**forms) for template in QUESTION_TEMPLATES[category] for forms in plural_forms]
            texts += self.answer_choices(category)
        for count in range(1, self.spec.max_count + 1):
            for colour_name in COLOUR_NAMES:
                for shape in SHAPES:
                    for position in POSITIONS:
                        for background in BACKGROUND_NAMES:
                            texts.append(_caption_text(count, colour_name, shape, position, background))
        words = {word for text in texts for word in split_words(text)}
        words.discard(IMAGE_TOKEN)
        return sorted(words)

    # ----- files -----

    def write_images(self, root: str | os.PathLike, split: str, indices: range | list[int] | None = None) -> list[Path]:
        """Render the given indices (default: the whole split) to root/<split>/NNNNNN.png."""
        root = Path(root)
        (root / split).mkdir(parents=True, exist_ok=True)
        paths = []
        for index in range(self.split_size(split)) if indices is None else indices:
            buffer = io.BytesIO()
            self.image(split, index).save(buffer, format="PNG")
            path = root / self.image_path(split, index)
            atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
        return paths

    def write(self, root: str | os.PathLike) -> dict[str, Path]:
        """Materialise every split: PNGs under root/<split>/, pretrain.json and instruct.json (JSON lists,
        LLaVA format), bench.jsonl, and spec.json recording what was generated."""
        root = Path(root)
        for split in SPLITS:
            self.write_images(root, split)
        paths = {
            "pretrain": root / "pretrain.json",
            "instruct": root / "instruct.json",
            "bench": root / "bench.jsonl",
            "spec": root / "spec.json",
        }
        for split in TRAINING_SPLITS:
            atomic_write_bytes(paths[split], json.dumps(self.records(split)).encode())
        bench_lines = "".join(json.dumps(question) + "\n" for question in self.bench_questions())
        atomic_write_bytes(paths["bench"], bench_lines.encode())
        atomic_write_bytes(paths["spec"], json.dumps(asdict(self.spec), indent=2).encode())
        for split in SPLITS:
            paths[f"{split}_images"] = root / split
        return paths

    # ----- internals -----

    def _check_split(self, split: str) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def _rng(self, split: str, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, _SPLIT_IDS[split], index, stream])

    def _image_indices(self, split: str) -> list[int]:
        """Which image each training sample shows: itself, or under shuffle_images a fixed derangement."""
        n = self.split_size(split)
        if not self.spec.shuffle_images:
            return list(range(n))
        # Sattolo's algorithm draws a uniformly random single cycle, which never maps an index to itself.
        rng = self._rng(split, 0, _DERANGEMENT_STREAM)
        indices = list(range(n))
        for i in range(n - 1, 0, -1):
            j = int(rng.integers(i))
            indices[i], indices[j] = indices[j], indices[i]
        return indices


def caption(scene: Scene) -> str:
    return _caption_text(scene.count, scene.colour, scene.shape, scene.position, scene.background)


def answer(category: str, scene: Scene) -> str:
    if category == "count":
        return COUNT_WORDS[scene.count - 1]
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")
    return getattr(scene, category)


def _caption_text(count: int, colour_name: str, shape: str, position: str, background: str) -> str:
    if count == 1:
        article = "an" if colour_name[0] in "aeiou" else "a"
        return f"{article} {colour_name} {shape} on the {position} of a {background} background."
    return f"{COUNT_WORDS[count - 1]} {colour_name} {shape}s on the {position} of a {background} background."


def _question(category: str, scene: Scene, rng: np.random.Generator) -> str:
    templates = QUESTION_TEMPLATES[category]
    return templates[rng.integers(len(templates))].format(**(SINGULAR if scene.count == 1 else PLURAL))

