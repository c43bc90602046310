"""Conversation templates and loss masks.

A LLaVA record (`{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}`) becomes token ids
with one `<image>` placeholder per image and labels that are -100 everywhere except on the assistant answers
and the token that ends each answer.

Every template is a Jinja chat template, rendered by the tokenizer's own machinery:
- `plain` (stage 1): bos + `<image>` + caption + "\n"; the human text is dropped (bos whenever the tokenizer has
  one, added by it or not).
- `vicuna_v1` (stage 2 of LLaVA v1): "{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>",
  where `</s>` is the tokenizer's eos token (the reference's Vicuna/Llama 2 eos).
- `chat_template` (stage 2): the tokenizer's own chat template (Llama 3, ChatML for SmolLM2, the tiny one).
The same Jinja string goes into the exported processor, so transformers' `processor.apply_chat_template`
renders exactly what the model was trained on.

Every template starts by setting `date_string` to a fixed date (`TEMPLATE_DATE`). Llama 3.x templates otherwise
print today's date (`strftime_now`) into the system header: a sample's tokens would change from day to day, the
prefix renderings of one record could straddle midnight, and inference would see another header than training.

Masks come from the template itself, never from hard-coded offsets: the answer of assistant turn k starts where
the rendering of turns [:k] with a generation prompt ends (incremental prefix rendering), and the full text is
tokenized once with character offsets, so training sees exactly the tokens inference sees. Each masked answer
is decoded back and compared with the answer text; a mismatch raises with the record id (the reference instead
silently zeroes the sample's loss).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
TEMPLATES = ("plain", "vicuna_v1", "chat_template")
OVERLONG_POLICIES = ("truncate", "skip")
ROLES = {"human": "user", "gpt": "assistant"}
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# The date Llama 3.1/3.2 templates fall back to when `strftime_now` is missing ("Today Date: 26 Jul 2024"), the
# Llama 3.1 release: Meta's own documented default. Set at the top level, it is defined for the template's
# `if not date_string is defined` test, so no rendering (training, generation, the exported processor) depends on
# the day, and a caller's own `date_string` cannot make training and inference disagree either.
TEMPLATE_DATE = "26 Jul 2024"
_FIX_DATE = "{%- set date_string = " + json.dumps(TEMPLATE_DATE) + " -%}\n"

# Turns content given as transformers' list of parts ([{"type": "image"}, {"type": "text", "text": ...}]) into
# the string the model was trained on: one "<image>\n" per image in front, then the stripped text. String
# content (training records) passes through unchanged.
_FLATTEN_CONTENT = r"""{%- set flattened = namespace(messages=[]) -%}
{%- for message in messages -%}
{%- if message['content'] is string -%}
{%- set flattened.messages = flattened.messages + [{'role': message['role'], 'content': message['content']}] -%}
{%- else -%}
{%- set parts = namespace(images='', text='') -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' -%}{%- set parts.images = parts.images + '<image>\n' -%}
{%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}{%- endif -%}
{%- endfor -%}
{%- set content = parts.images + (parts.text | trim) -%}
{%- set flattened.messages = flattened.messages + [{'role': message['role'], 'content': content}] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = flattened.messages -%}
"""

# bos first whenever the tokenizer has one: the reference gets it from Llama's tokenizer, which adds it; SmolLM2's
# (and other ChatML tokenizers') does not, and the image would sit at position 0, the attention sink of a pretrained
# LM. Measured with SmolLM2 frozen (docs/demo.md): caption loss 2.85 at step 60 without, 0.45 with.
_PLAIN = r"""{{- bos_token if bos_token else '' -}}{%- for message in messages -%}
{%- if message['role'] == 'user' and '<image>' in message['content'] -%}{{- '<image>' -}}
{%- elif message['role'] == 'assistant' -%}{{- message['content'] + '\n' -}}{%- endif -%}
{%- endfor -%}"""

_VICUNA_V1 = (
    "{{- "
    + json.dumps(VICUNA_SYSTEM + " ")
    + " -}}"
    + r"""{%- for message in messages -%}
{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}
{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + message['content'] + eos_token -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"""
)


class RecordError(ValueError):
    """A malformed training record; the message names the record and the field."""

    def __init__(self, record_id: str, field: str, problem: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}record {record_id!r}, field {field}: {problem}")
        self.record_id, self.field, self.problem = record_id, field, problem


class TemplateError(RuntimeError):
    """The template and the tokenizer disagree about a record: its loss mask cannot be trusted."""


@dataclass
class Encoded:
    id: str
    input_ids: list[int]
    labels: list[int]
    num_images: int

    def length(self, image_tokens: int) -> int:
        """Sequence length once each placeholder is expanded to `image_tokens` patch embeddings."""
        return len(self.input_ids) + self.num_images * (image_tokens - 1)


@dataclass
class EncodeStats:
    samples: int = 0
    truncated: int = 0
    skipped_overlong: int = 0
    skipped_missing_features: int = 0  # set by the feature-joined dataset
    skipped_ids: list[str] = field(default_factory=list)


def record_id_of(record: dict, index: int | None = None) -> str:
    if isinstance(record, dict) and "id" in record:
        return str(record["id"])
    return f"#{index}" if index is not None else "<no id>"


def normalize_record(
    record: dict, index: int | None = None, source: str | None = None, plain_pair: bool = False
) -> tuple[str, list[dict], int]:
    """Validate a LLaVA record; return (id, chat messages, number of images). `plain_pair`: exactly one exchange.

    As in the reference, `<image>` moves to the front of its human turn ("<image>\\n" + the rest, stripped).
    """
    record_id = record_id_of(record, index)

    def fail(field_name: str, problem: str):
        raise RecordError(record_id, field_name, problem, source)

    if not isinstance(record, dict):
        describe = getattr(record, "describe", None)  # a JSON Lines line that did not parse (data.llava_json)
        fail("<record>", describe() if describe else f"expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        fail("conversations", "missing or empty (expected a list of {'from', 'value'} turns)")
    has_image = record.get("image") is not None
    messages, images_seen = [], 0
    for number, turn in enumerate(turns):
        where = f"conversations[{number}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            fail(f"{where}.value", "missing or not a string")
        speaker = turn.get("from")
        if speaker not in ROLES:
            fail(f"{where}.from", f"unknown role {speaker!r} (expected 'human' or 'gpt')")
        role = ROLES[speaker]
        expected = "user" if number % 2 == 0 else "assistant"
        if role != expected:
            fail(f"{where}.from", f"roles must alternate human, gpt, human, ...; turn {number} is {speaker!r}")
        text = turn["value"]
        count = text.count(IMAGE_TOKEN)
        if count and role == "assistant":
            fail(f"{where}.value", f"{IMAGE_TOKEN} in a gpt turn")
        images_seen += count
        if count:
            text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
        else:
            text = text.strip()
        if role == "assistant" and not text:
            fail(f"{where}.value", "empty answer")
        messages.append({"role": role, "content": text})
    if plain_pair and len(messages) != 2:
        fail("conversations", f"the plain template takes one human/gpt pair (a caption), got {len(messages)} turns")
    if messages[-1]["role"] != "assistant":
        fail(f"conversations[{len(turns) - 1}].from", "the conversation ends with a human turn (no answer to learn)")
    if has_image and images_seen == 0:
        fail("conversations", f"the record has an image but no {IMAGE_TOKEN} in its turns")
    if has_image and images_seen > 1:
        fail("conversations", f"{images_seen} {IMAGE_TOKEN} placeholders for one image")
    if not has_image and images_seen:
        fail("image", f"{IMAGE_TOKEN} appears in the turns but the record has no image")
    return record_id, messages, images_seen


def image_token_id(tokenizer) -> int:
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise TemplateError(
            f"the tokenizer splits {IMAGE_TOKEN} into {len(ids)} tokens; it must be one added special token "
            "(build the tokenizer with llava_hpc.model.builders, which adds it)"
        )
    return ids[0]


class ConversationTemplate:
    """One template bound to one tokenizer."""

    def __init__(self, name: str, tokenizer):
        if name not in TEMPLATES:
            raise ValueError(f"unknown conversation template {name!r}; known: {TEMPLATES}")
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("loss masks need a fast tokenizer (character offsets); got a slow one")
        self.name = name
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id(tokenizer)
        if name == "plain":
            body = _PLAIN
        elif name == "vicuna_v1":
            if tokenizer.eos_token is None:
                raise TemplateError("vicuna_v1 ends answers with the eos token, but the tokenizer has none")
            body = _VICUNA_V1
        else:
            if not tokenizer.chat_template:
                raise TemplateError("template 'chat_template' needs a tokenizer with a chat template; it has none")
            body = tokenizer.chat_template
        self.jinja = _FIX_DATE + _FLATTEN_CONTENT + body
        self.stop_token_ids = self._stop_token_ids()

    # ----- rendering and tokenizing -----

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.render_many([messages], add_generation_prompt)[0]

    def render_many(self, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
        return self.tokenizer.apply_chat_template(
            conversations, chat_template=self.jinja, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize(self, text: str, offsets: bool = False):
        # The rule transformers' processor applies: a rendering that already starts with bos gets no second one.
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos is not None and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets)

    def prompt_ids(self, question: str, image: bool = True) -> list[int]:
        """The generation prompt for one question (with one image in front when `image`)."""
        text = question.replace(IMAGE_TOKEN, "").strip()
        content = f"{IMAGE_TOKEN}\n{text}" if image else text
        return self.tokenize(self.render([{"role": "user", "content": content}], add_generation_prompt=True))[
            "input_ids"
        ]

    # ----- training samples -----

    def encode(self, record: dict, index: int | None = None, source: str | None = None) -> Encoded:
        record_id, messages, num_images = normalize_record(record, index, source, plain_pair=self.name == "plain")
        turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
        # Answer k starts where turns [:k] + the generation prompt end, and its turn ends where turns [:k+1] end.
        befores = self.render_many([messages[:k] for k in turns], add_generation_prompt=True)
        throughs = self.render_many([messages[: k + 1] for k in turns])
        full = throughs[-1]  # a conversation always ends with an answer
        encoding = self.tokenize(full, offsets=True)
        ids = encoding["input_ids"]
        locate = _TokenLocator(encoding["offset_mapping"])
        labels = [IGNORE_INDEX] * len(ids)
        for number, (k, before, through) in enumerate(zip(turns, befores, throughs)):
            answer = messages[k]["content"]
            if not (through.startswith(before) and full.startswith(through)):
                raise TemplateError(
                    f"record {record_id!r}: template {self.name!r} does not render earlier turns as a prefix of later "
                    f"ones (turn {k}), so answers cannot be located; use another template"
                )
            start = through.find(answer, len(before))
            if start < 0:
                raise TemplateError(
                    f"record {record_id!r}: template {self.name!r} changes answer {number} as it renders"
                )
            chosen, stop = locate.answer(full, start, start + len(answer), len(through))
            if not chosen:
                raise TemplateError(f"record {record_id!r}: answer {number} has no end-of-turn token after it")
            for i in chosen:
                labels[i] = ids[i]
            self._check_round_trip(record_id, number, [ids[i] for i in chosen], full[start:stop])
        found = ids.count(self.image_token_id)
        if found != num_images:
            raise TemplateError(f"record {record_id!r}: {found} image tokens after tokenizing, expected {num_images}")
        return Encoded(record_id, ids, labels, num_images)

    def _check_round_trip(self, record_id: str, number: int, label_ids: list[int], answer_and_end: str) -> None:
        decoded = self.decode(label_ids).lstrip()
        if decoded == answer_and_end.lstrip():
            return
        # Else compare with the answer as the tokenizer can spell it (the tiny word-level one lowercases).
        expected = self.decode(self.tokenizer.encode(answer_and_end, add_special_tokens=False)).lstrip()
        if decoded != expected:
            raise TemplateError(
                f"record {record_id!r}: the loss mask of answer {number} decodes to {decoded!r}, expected {expected!r} "
                f"(template {self.name!r})"
            )

    def decode_answer(self, generated: Iterable[int]) -> str:
        """The text of a generated answer: up to its first stop token, special tokens dropped."""
        answer = []
        for token in map(int, generated):
            if token in self.stop_token_ids:
                break
            answer.append(token)
        return self.decode(answer, skip_special_tokens=True).strip()

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _stop_token_ids(self) -> list[int]:
        """Tokens that end an answer: the eos and whatever the template closes an assistant turn with."""
        messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]
        before, through = self.render(messages[:1], add_generation_prompt=True), self.render(messages)
        start = through.find("yes", len(before))
        encoding = self.tokenize(through, offsets=True)
        chosen, _ = _TokenLocator(encoding["offset_mapping"]).answer(through, start, start + 3, len(through))
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        closing = encoding["input_ids"][chosen[-1]] if chosen else None
        return stops + [closing] if closing is not None and closing not in stops else stops


class _TokenLocator:
    """Which tokens of a tokenized text cover a character span (binary search over the offsets)."""

    def __init__(self, offsets: list[tuple[int, int]]):
        # Tokens the tokenizer adds itself (bos) cover no characters and are never labels.
        self.real = [i for i, (s, e) in enumerate(offsets) if e > s]
        self.starts = [offsets[i][0] for i in self.real]
        self.ends = [offsets[i][1] for i in self.real]

    def answer(self, text: str, start: int, end: int, turn_end: int) -> tuple[list[int], int]:
        """(token indices of the answer text[start:end] and of the token that closes it, end of that token).

        The closing token covers the first non-blank character after the answer ("</s>", "<|im_end|>"), or the
        blank itself when nothing else follows in the turn (plain's "\n"). Empty if the turn has nothing after."""
        rest = text[end:turn_end]
        closing_at = end + len(rest) - len(rest.lstrip()) if rest.strip() else end
        if closing_at >= turn_end:
            return [], end
        first = bisect.bisect_right(self.ends, start)
        last = bisect.bisect_right(self.starts, closing_at)
        chosen = self.real[first:last]
        if not chosen or self.ends[last - 1] <= closing_at:
            return [], end
        return chosen, self.ends[last - 1]


def fit_to_length(
    encoded: Encoded, image_token_id: int, image_tokens: int, max_length: int, policy: str
) -> Encoded | None:
    """Apply the over-long policy; None means the sample is dropped (the caller counts it).

    `truncate` keeps the head of the sequence, as the reference does; a sample whose image or every answer
    token would be cut is dropped rather than trained with zero loss."""
    if policy not in OVERLONG_POLICIES:
        raise ValueError(f"unknown over-long policy {policy!r}; known: {OVERLONG_POLICIES}")
    if encoded.length(image_tokens) <= max_length:
        return encoded
    if policy == "skip":
        return None
    keep = max_length - encoded.num_images * (image_tokens - 1)
    ids, labels = encoded.input_ids[: max(keep, 0)], encoded.labels[: max(keep, 0)]
    if ids.count(image_token_id) != encoded.num_images or all(label == IGNORE_INDEX for label in labels):
        return None
    return Encoded(encoded.id, ids, labels, encoded.num_images)


def encode_records(
    records: list[dict],
    template: ConversationTemplate,
    image_tokens: int,
    max_length: int,
    overlong: str = "truncate",
    source: str | None = None,
) -> tuple[list[Encoded], EncodeStats]:
    """Encode a dataset up front: a bad record fails now, not hours into training; drops are counted."""
    stats = EncodeStats()
    kept = []
    for index, record in enumerate(records):
        encoded = template.encode(record, index, source)
        stats.samples += 1
        fitted = fit_to_length(encoded, template.image_token_id, image_tokens, max_length, overlong)
        if fitted is None:
            stats.skipped_overlong += 1
            stats.skipped_ids.append(encoded.id)
            continue
        stats.truncated += fitted is not encoded
        kept.append(fitted)
    return kept, stats
