"""One bench's judging material: its questions with the judge's context, rule and (encoded) image, the reference
answers (from the bench's table, or asked of the reference model), and the items the judge is asked.

What the judge is shown depends on the bench's kind (llava_hpc.eval.benches.BENCH_KINDS): a context table or the
image alone, a rule per category or one for the bench, reference answers from a table or the reference model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from llava_hpc.config import Pipeline
from llava_hpc.eval.benches import BENCH_KINDS, load_bench
from llava_hpc.eval.judge import JudgeItem, JudgeSettings, ResponseCache
from llava_hpc.eval.judge_transport import ChatReply, ChatRequest, chat_request
from llava_hpc.eval.llava_bench import (
    FOLDER_CONTEXT,
    EncodedImage,
    encode_image,
    judge_content,
    read_contexts,
    read_reference_answers,
    read_rules,
    user_message,
)
from llava_hpc.rundir import RunDir, read_jsonl_objects
from llava_hpc.data.images import BadRecord

log = logging.getLogger("llava_hpc.judge")

# Reference answers are the bench's yardstick: the model's most likely answer, not a sample.
REFERENCE_TEMPERATURE = 0.0


class AnswersFileError(ValueError):
    """A generate answers file that cannot be judged; the message names the file, the line and the field."""


def judge_dir(run: RunDir, bench: str) -> Path:
    """RUN/judge/<bench>/: the judge's cache, requests, reviews and summary of one bench."""
    return run.stage_dir("judge") / bench


@dataclass(frozen=True)
class PreparedQuestion:
    review_id: int  # 1-based position in the bench, as the reference numbers its reviews
    question_id: object
    category: str  # the review category (rule key)
    text: str
    context: str
    rule: dict
    image: EncodedImage | None


def read_candidate_answers(path: Path, question_ids: set) -> dict:
    """question_id -> {"text", "answer_id", "model_id"} from generate's answers.jsonl (reference answer format)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no answers to judge (run the generate stage first)")
    answers = {}
    for number, row in read_jsonl_objects(path, AnswersFileError):
        for field in ("question_id", "text"):
            if field not in row:
                raise AnswersFileError(f"{path}:{number}: answer has no '{field}' field")
        if not isinstance(row["text"], str):
            raise AnswersFileError(f"{path}:{number}: field 'text' must be a string")
        question_id = row["question_id"]
        if question_id not in question_ids:
            raise AnswersFileError(
                f"{path}:{number}: question_id {question_id!r} is not a question of this bench as it is now "
                "(was the bench changed after generate? resubmit generate with --force)"
            )
        if question_id in answers:
            raise AnswersFileError(f"{path}:{number}: question_id {question_id!r} is answered twice")
        answers[question_id] = {"text": row["text"], "answer_id": row.get("answer_id", question_id),
                                "model_id": row.get("model_id", "unknown")}
    return answers


class BenchJudging:
    """One bench's judging material: its questions with context, rule and (encoded) image, and the requests."""

    def __init__(self, pipeline: Pipeline, run: RunDir, name: str):
        if name not in pipeline.benches:
            raise ValueError(f"no bench {name!r} in the pipeline; benches: {', '.join(sorted(pipeline.benches))}")
        self.pipeline = pipeline
        self.name = name
        self.bench = pipeline.benches[name]
        self.kind = BENCH_KINDS[self.bench.kind]
        if not self.kind.judged:
            raise ValueError(f"bench {name!r} is a {self.bench.kind} bench: it has exact answers and needs no judge")
        self.config = pipeline.judge
        self.settings = JudgeSettings(self.config.model, self.config.temperature, self.config.max_tokens)
        self.directory = judge_dir(run, name)
        self.cache = ResponseCache(self.directory / "cache")
        # Without a context table the image is the judge's only context.
        self.include_image = self.config.include_image or self.kind.context is None
        self.data = load_bench(name, self.bench, pipeline)
        self.unusable: list[dict] = []  # questions skipped for an image that cannot be read
        self.questions = self._prepare_questions()
        self.table_references = (None if self.kind.reference_model_answers
                                 else read_reference_answers(self.bench.answers))

    def _prepare_questions(self) -> list[PreparedQuestion]:
        rules = read_rules(self.bench.rules) if self.bench.rules else {}
        contexts = None if self.kind.context is None else read_contexts(self.bench.context, self.kind.context)
        prepared = []
        for position, question in enumerate(self.data.questions):
            if contexts is None:
                context = FOLDER_CONTEXT
            elif question["image"] in contexts:
                context = contexts[question["image"]]
            else:
                raise ValueError(f"{self.bench.context}: no context record for image {question['image']!r} "
                                 f"(question {question['question_id']!r} of bench {self.name!r})")
            image = None
            if self.include_image and question["image"] is not None:
                try:
                    image = encode_image(self.data.load_image(question["image"]))
                except (FileNotFoundError, BadRecord) as exc:
                    log.warning("%s: question %r skipped: %s", self.name, question["question_id"], exc)
                    self.unusable.append({"question_id": question["question_id"], "reason": str(exc)})
                    continue
            prepared.append(PreparedQuestion(
                review_id=position + 1,
                question_id=question["question_id"],
                category=self.kind.review_category(question["category"]),
                text=question["text"],
                context=context,
                rule=self.kind.rule(rules, self.bench.rules, question["category"]),
                image=image,
            ))
        return prepared

    # -- benches without an answers table: reference answers by the reference model
    def reference_request(self, question: PreparedQuestion) -> ChatRequest:
        return chat_request(
            self.config.reference_model,
            [user_message(question.text, question.image)],
            [user_message(question.text, question.image, described=True)],
            REFERENCE_TEMPERATURE,
            self.config.max_tokens,
        )

    def references_from_replies(self, replies: dict[str, ChatReply]) -> dict:
        references = {}
        for question in self.questions:
            request = self.reference_request(question)
            if request.key in replies:
                reply = replies[request.key]
                references[question.question_id] = {"text": reply.text, "answer_id": f"ref-{request.key[:16]}",
                                                    "model": reply.model, "category": question.category}
        return references

    # -- what the judge is asked
    def _item(self, question: PreparedQuestion, reference: dict, answer_text: str, answer_id) -> JudgeItem:
        content = judge_content(question.context, question.text, reference["text"], answer_text, question.rule)
        return JudgeItem(question.review_id, question.question_id, question.category, reference["answer_id"],
                         answer_id, content, question.image)

    def items(self, answers: dict, references: dict) -> list[JudgeItem]:
        """Candidate items: questions with both a candidate answer and a reference answer."""
        answered = [q for q in self.questions if q.question_id in answers]
        missing = [q.question_id for q in answered if q.question_id not in references]
        if missing:
            source = (self.directory / "reference_answers.jsonl" if self.kind.reference_model_answers
                      else self.bench.answers)
            raise ValueError(f"{source}: no reference answer for question(s) {missing[:5]}")
        return [self._item(q, references[q.question_id], answers[q.question_id]["text"],
                           answers[q.question_id]["answer_id"]) for q in answered]

    def baseline_items(self, judged_ids: set, references: dict) -> list[JudgeItem]:
        """Each question paired with the reference answer of the question half the bench away: a fluent answer
        written for a different image (a derangement: never its own). Needs two questions at least."""
        with_reference = [q for q in self.questions if q.question_id in references]
        count = len(with_reference)
        if count < 2:
            return []
        items = []
        for position, question in enumerate(with_reference):
            if question.question_id not in judged_ids:
                continue
            other = references[with_reference[(position + count // 2) % count].question_id]
            items.append(self._item(question, references[question.question_id], other["text"],
                                    f"baseline:{other['answer_id']}"))
        return items
