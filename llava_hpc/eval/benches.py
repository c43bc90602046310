"""Benches: the questions a model answers, their images, and (where they exist) exact answers; and the bench kinds,
each declared once in BENCH_KINDS (how it loads, whether the judge scores it, what the judge is shown).

Questions use the LLaVA-Bench question format: `{"question_id", "image", "text", "category"}` (`image` relative to
the bench's image folder, or None for a text-only question), plus `"answer"` on benches with exact answers.

Kinds:
- `synthetic`: the pipeline's synthetic world bench; one-word exact answers, images rendered in memory.
- `llava-bench-coco`, `llava-bench-wild`: the reference questions file (JSON lines). COCO image names appear with or
  without the `COCO_val2014_` prefix depending on where the images were downloaded from, so both spellings are tried.
- `folder`: every image under a folder (recursively, sorted), each asked `bench.question`; the category is the
  top-level sub-folder (or "folder" for images at the root). Reference answers for these come with the judge.

A new kind is a loader below and one record in BENCH_KINDS. The pipeline file's validation reads the registry
(config.Bench), so this module imports nothing heavy and nothing that imports the config when it loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llava_hpc.data.images import BadRecord, open_image
from llava_hpc.eval.llava_bench import FOLDER_RULE, WILD_CATEGORY_PREFIX, coco_context, rule_for, wild_context
from llava_hpc.rundir import read_jsonl_objects

if TYPE_CHECKING:
    from PIL import Image

    from llava_hpc.config import Bench, Pipeline

COCO_PREFIX = "COCO_val2014_"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
QUESTION_FIELDS = ("question_id", "image", "text", "category")
FOLDER_CATEGORY = "folder"


class BenchFileError(ValueError):
    """A bench file that cannot be used at all; the message names the file and the line."""


@dataclass(frozen=True)
class BenchKind:
    name: str
    needs: tuple[str, ...]  # the bench's keys a pipeline file must set
    load: Callable[[str, Bench, Pipeline], BenchData]
    judged: bool  # scored by the LLM judge; otherwise its questions carry exact answers, scored by exact match
    # What the judge is shown (judged kinds only):
    context: Callable[[dict], str] | None = None  # context-table record -> text; None: no table, the image is all
    category_prefix: str = ""  # review categories and rule keys are prefix + question category, as the reference
    fixed_rule: dict | None = None  # one rule for every question, unless the rules file has one under the kind's name
    reference_model_answers: bool = False  # no answers table: judge.reference_model answers, and a baseline is judged

    @property
    def label(self) -> str:
        return "judged" if self.judged else "exact match"

    def review_category(self, category: str) -> str:
        return self.category_prefix + category

    def rule(self, rules: dict, rules_path: str | Path | None, category: str) -> dict:
        """The judge's {role, prompt} for a question of this category."""
        if self.fixed_rule is not None:
            return rule_for(rules, rules_path, self.name, self.fixed_rule)
        return rule_for(rules, rules_path, self.review_category(category))


@dataclass
class BenchData:
    name: str
    kind: str
    questions: list[dict]
    _load_image: Callable[[str], Image.Image] = field(repr=False)
    _choices: Callable[[str], list[str]] | None = field(default=None, repr=False)

    @property
    def exact(self) -> bool:
        """Questions carry an exact `answer` (scored by exact match, no judge needed)."""
        return not BENCH_KINDS[self.kind].judged

    def load_image(self, relative_path: str) -> Image.Image:
        """The question's image as RGB. FileNotFoundError (missing) or BadRecord (corrupt), naming the file."""
        return self._load_image(relative_path)

    def choices(self, category: str) -> list[str]:
        """Every possible answer of a category of an exact bench: chance is 1 / len(choices)."""
        if self._choices is None:
            raise ValueError(f"bench {self.name!r} ({self.kind}) has no fixed answer choices: it needs the judge")
        return self._choices(category)


def bench_kind(pipeline: Pipeline, name: str) -> BenchKind:
    return BENCH_KINDS[pipeline.benches[name].kind]


def judged_benches(pipeline: Pipeline) -> list[str]:
    """The benches the judge scores (of those generate answers), decided by kind, without reading their files."""
    return [name for name in pipeline.generate_benches() if bench_kind(pipeline, name).judged]


def load_bench(name: str, bench: Bench, pipeline: Pipeline) -> BenchData:
    data = BENCH_KINDS[bench.kind].load(name, bench, pipeline)
    if bench.max_questions is not None:
        data.questions = data.questions[: bench.max_questions]
    if not data.questions:
        raise BenchFileError(f"bench {name!r} ({bench.kind}) has no questions")
    return data


# ---------------------------------------------------------------------------------------------- loaders
def synthetic_bench(name: str, bench: Bench, pipeline: Pipeline) -> BenchData:
    from llava_hpc.synthetic import SyntheticWorld  # numpy and PIL: only for the synthetic bench

    world = SyntheticWorld.from_config(pipeline.synthetic)

    def load(relative_path: str) -> Image.Image:
        try:
            return world.load_image(relative_path)
        except ValueError as exc:
            raise BadRecord(str(exc)) from None

    return BenchData(name, bench.kind, world.bench_questions(), load, world.answer_choices)


def _questions_bench(name: str, bench: Bench, other_spelling: Callable[[str], str] | None) -> BenchData:

    questions = read_questions(bench.questions)
    root = Path(bench.images)

    def load(relative_path: str) -> Image.Image:
        candidates = [relative_path]
        if other_spelling is not None:
            directory, _, filename = relative_path.rpartition("/")
            other = other_spelling(filename)
            candidates.append(f"{directory}/{other}" if directory else other)
        return open_image(root, candidates)

    return BenchData(name, bench.kind, questions, load)


def _coco_spelling(filename: str) -> str:
    return filename.removeprefix(COCO_PREFIX) if filename.startswith(COCO_PREFIX) else COCO_PREFIX + filename


def coco_bench(name: str, bench: Bench, pipeline: Pipeline) -> BenchData:
    return _questions_bench(name, bench, _coco_spelling)


def wild_bench(name: str, bench: Bench, pipeline: Pipeline) -> BenchData:
    return _questions_bench(name, bench, None)


def folder_bench(name: str, bench: Bench, pipeline: Pipeline) -> BenchData:

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
    return BenchData(name, bench.kind, questions, lambda relative: open_image(root, [relative]))


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


# ---------------------------------------------------------------------------------------------- the kinds
_TABLES = ("questions", "answers", "context", "rules", "images")
# In this order in the pipeline file's error for an unknown kind.
BENCH_KINDS: dict[str, BenchKind] = {kind.name: kind for kind in (
    BenchKind("llava-bench-coco", _TABLES, coco_bench, judged=True, context=coco_context),
    BenchKind("llava-bench-wild", _TABLES, wild_bench, judged=True, context=wild_context,
              category_prefix=WILD_CATEGORY_PREFIX),
    BenchKind("folder", ("images", "question"), folder_bench, judged=True, fixed_rule=FOLDER_RULE,
              reference_model_answers=True),
    BenchKind("synthetic", (), synthetic_bench, judged=False),
)}
