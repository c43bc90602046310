"""Benches: the questions a model answers, their images, and (where they exist) exact answers.

Questions use the LLaVA-Bench question format: `{"question_id", "image", "text", "category"}` (`image` relative to
the bench's image folder, or None for a text-only question), plus `"answer"` on benches with exact answers.

Kinds:
- `synthetic`: the pipeline's synthetic world bench; one-word exact answers, images rendered in memory.
- `llava-bench-coco`, `llava-bench-wild`: the reference questions file (JSON lines). COCO image names appear with or
  without the `COCO_val2014_` prefix depending on where the images were downloaded from, so both spellings are tried.
- `folder`: every image under a folder (recursively, sorted), each asked `bench.question`; the category is the
  top-level sub-folder (or "folder" for images at the root). Reference answers for these come with the judge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llava_hpc.rundir import read_jsonl_objects
from llava_hpc.config import Bench, Pipeline
from llava_hpc.data.images import BadRecord, open_image

if TYPE_CHECKING:
    from PIL import Image

COCO_PREFIX = "COCO_val2014_"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
QUESTION_FIELDS = ("question_id", "image", "text", "category")
FOLDER_CATEGORY = "folder"


class BenchFileError(ValueError):
    """A bench file that cannot be used at all; the message names the file and the line."""


@dataclass
class BenchData:
    name: str
    kind: str
    questions: list[dict]
    exact: bool  # questions carry an exact `answer` (scored by exact match, no judge needed)
    _load_image: Callable[[str], Image.Image] = field(repr=False)
    _choices: Callable[[str], list[str]] | None = field(default=None, repr=False)

    def load_image(self, relative_path: str) -> Image.Image:
        """The question's image as RGB. FileNotFoundError (missing) or BadRecord (corrupt), naming the file."""
        return self._load_image(relative_path)

    def choices(self, category: str) -> list[str]:
        """Every possible answer of a category of an exact bench: chance is 1 / len(choices)."""
        if self._choices is None:
            raise ValueError(f"bench {self.name!r} ({self.kind}) has no fixed answer choices: it needs the judge")
        return self._choices(category)


def load_bench(name: str, bench: Bench, pipeline: Pipeline) -> BenchData:
    if bench.kind == "synthetic":
        data = _synthetic_bench(name, pipeline)
    elif bench.kind in ("llava-bench-coco", "llava-bench-wild"):
        data = _llava_bench(name, bench)
    else:
        data = _folder_bench(name, bench)
    if bench.max_questions is not None:
        data.questions = data.questions[: bench.max_questions]
    if not data.questions:
        raise BenchFileError(f"bench {name!r} ({bench.kind}) has no questions")
    return data


def _synthetic_bench(name: str, pipeline: Pipeline) -> BenchData:
    from llava_hpc.synthetic import SyntheticWorld  # numpy and PIL: only for the synthetic bench

    world = SyntheticWorld.from_config(pipeline.synthetic)

    def load(relative_path: str) -> Image.Image:
        try:
            return world.load_image(relative_path)
        except ValueError as exc:
            raise BadRecord(str(exc)) from None

    return BenchData(name, "synthetic", world.bench_questions(), True, load, world.answer_choices)


def _llava_bench(name: str, bench: Bench) -> BenchData:
    questions = read_questions(bench.questions)
    root = Path(bench.images)
    try_prefix = bench.kind == "llava-bench-coco"

    def load(relative_path: str) -> Image.Image:
        candidates = [relative_path]
        if try_prefix:
            directory, _, filename = relative_path.rpartition("/")
            other = filename.removeprefix(COCO_PREFIX) if filename.startswith(COCO_PREFIX) else COCO_PREFIX + filename
            candidates.append(f"{directory}/{other}" if directory else other)
        return open_image(root, candidates)

    return BenchData(name, bench.kind, questions, False, load)


def _folder_bench(name: str, bench: Bench) -> BenchData:
    root = Path(bench.images)
    if not root.is_dir():
        raise BenchFileError(f"bench {name!r}: images = {root} is not a folder")
    paths = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )
    questions = [
        {
            "question_id": relative,
            "image": relative,
            "text": bench.question,
            "category": relative.split("/", 1)[0] if "/" in relative else FOLDER_CATEGORY,
        }
        for relative in paths
    ]
    return BenchData(name, "folder", questions, False, lambda relative: open_image(root, [relative]))


def read_questions(path: str | Path) -> list[dict]:
    """A LLaVA-Bench questions file (JSON lines); a malformed line or a repeated question_id fails with file:line."""
    path = Path(path)
    questions: list[dict] = []
    seen: set = set()
    for number, question in read_jsonl_objects(path, BenchFileError):
        missing = [key for key in QUESTION_FIELDS if key not in question]
        if missing:
            raise BenchFileError(f"{path}:{number}: missing {', '.join(missing)}")
        if not isinstance(question["text"], str):
            raise BenchFileError(f"{path}:{number}: 'text' must be a string")
        if question["image"] is not None and (not isinstance(question["image"], str) or not question["image"]):
            raise BenchFileError(f"{path}:{number}: 'image' must be a non-empty string or null")
        if question["question_id"] in seen:
            raise BenchFileError(f"{path}:{number}: question_id {question['question_id']!r} appears twice")
        seen.add(question["question_id"])
        questions.append({key: question[key] for key in QUESTION_FIELDS})
    return questions
