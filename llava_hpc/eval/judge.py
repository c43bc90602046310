"""The judge: ask through a content-addressed cache, read scores the reference's way, ask again once, price it.

Cache: one JSON file per request under the bench's `cache/` folder, named by the request's key (sha256 of the model,
the messages with images as pixel digests, temperature, max_tokens and the attempt number). It is consulted before
anything is sent and written the moment a reply arrives, so a rerun, a requeued job or a new report of the same
answers never pays for a judgement twice. Change the judge model, the rules, an answer or a parameter and the key
changes: stale replies are never reused.

Unreadable replies: the reference turns a reply whose first line is not two numbers into [-1, -1] and averages it in.
Here the same request is asked once more (attempt 2, its own key: the cache must not hand back the same bad reply);
if that reply is unreadable too, the review is kept with `"tuple": null`, counted as a parse failure and left out of
every mean.

Prices (USD per million tokens) are OpenAI's list prices for the named snapshots as of 2025; check
https://openai.com/api/pricing before quoting a cost. Batch API requests cost half. Unknown models: cost None.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llava_hpc.eval.judge_transport import ChatReply, ChatRequest, RequestFailure, chat_request
from llava_hpc.eval.llava_bench import EncodedImage, judge_messages, parse_score, review_line
from llava_hpc.rundir import atomic_write_json

log = logging.getLogger("llava_hpc.judge")

PRICES_PER_MILLION: dict[str, tuple[float, float]] = {  # (input, output)
    "gpt-4o-2024-11-20": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o-mini-2024-07-18": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-2025-04-14": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4-turbo-2024-04-09": (10.00, 30.00),
}
BATCH_PRICE_FACTOR = 0.5
# Image input tokens per model: base + per 512-px tile (OpenAI's tile rule, detail "auto" on a large image).
# gpt-4o-mini counts ~33x the tokens at a ~17x lower price: the same image costs about twice as much as on gpt-4o.
IMAGE_TOKENS: dict[str, tuple[int, int]] = {"gpt-4o-mini": (2833, 5667), "gpt-4o-mini-2024-07-18": (2833, 5667)}
DEFAULT_IMAGE_TOKENS = (85, 170)
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text; estimates only, actual usage is recorded


def price(model: str) -> tuple[float, float] | None:
    return PRICES_PER_MILLION.get(model)


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int, batch: bool) -> float | None:
    rates = price(model)
    if rates is None:
        return None
    factor = BATCH_PRICE_FACTOR if batch else 1.0
    return factor * (prompt_tokens * rates[0] + completion_tokens * rates[1]) / 1e6


def image_tokens(model: str, size: tuple[int, int]) -> int:
    """Fit in 2048 x 2048, then shortest side 768 (never upscaled), count 512-px tiles."""
    width, height = size
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    base, per_tile = IMAGE_TOKENS.get(model, DEFAULT_IMAGE_TOKENS)
    return base + per_tile * math.ceil(width / 512) * math.ceil(height / 512)


def estimate_prompt_tokens(request: ChatRequest, images: list[EncodedImage]) -> int:
    """Text characters / 4 plus the image tokens of `images` (the request's images)."""
    chars = 0
    for message in request.described["messages"]:
        content = message["content"]
        parts = [content] if isinstance(content, str) else [p["text"] for p in content if p.get("type") == "text"]
        chars += sum(len(part) for part in parts)
    model = request.body["model"]
    return math.ceil(chars / CHARS_PER_TOKEN) + sum(image_tokens(model, image.size) for image in images)


# ---------------------------------------------------------------------------------------------- cache
class ResponseCache:
    """Replies by request key, one JSON file each, written atomically (a reader never sees half a reply)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> ChatReply | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return ChatReply.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable cache entry ({exc!r}); delete it to ask again") from None

    def put(self, key: str, reply: ChatReply) -> None:
        atomic_write_json(self.path(key), {"key": key, "received_at": time.time(), **reply.to_json()})


class Transport(Protocol):
    name: str
    sent: int

    def complete(self, requests: list[ChatRequest], on_reply: Callable[[str, ChatReply], None]) -> list[RequestFailure]:
        ...


class CachedAsker:
    """Sends only what the cache does not hold, through a transport made on first need (so a run that finds every
    reply cached needs no key and no network), and caches each reply as it arrives."""

    def __init__(self, cache: ResponseCache, make_transport: Callable[[], Transport]):
        self.cache = cache
        self._make_transport = make_transport
        self._transport: Transport | None = None
        self.from_cache = 0

    @property
    def sent(self) -> int:
        """Requests this process sent (a resumed batch's requests were sent by the job that submitted it)."""
        return 0 if self._transport is None else self._transport.sent

    def ask(self, requests: list[ChatRequest]) -> tuple[dict[str, ChatReply], list[RequestFailure]]:
        replies: dict[str, ChatReply] = {}
        todo: dict[str, ChatRequest] = {}
        for request in requests:
            if request.key in replies or request.key in todo:
                continue
            cached = self.cache.get(request.key)
            if cached is None:
                todo[request.key] = request
            else:
                replies[request.key] = cached
                self.from_cache += 1
        if not todo:
            return replies, []
        if self._transport is None:
            self._transport = self._make_transport()
        lock = threading.Lock()

        def on_reply(key: str, reply: ChatReply) -> None:
            self.cache.put(key, reply)
            with lock:
                replies[key] = reply

        log.info("sending %d requests (%d from the cache) via %s", len(todo), len(requests) - len(todo),
                 self._transport.name)
        failures = self._transport.complete(list(todo.values()), on_reply)
        return replies, failures


# ---------------------------------------------------------------------------------------------- judging
@dataclass(frozen=True)
class JudgeSettings:
    model: str
    temperature: float
    max_tokens: int


@dataclass(frozen=True)
class JudgeItem:
    """One (question, reference answer, answer to judge) triple, ready to ask."""

    review_id: int
    question_id: Any
    category: str  # the review's category, e.g. "conv" (COCO) or "llava_bench_conv" (In-the-Wild)
    reference_answer_id: Any
    answer_id: Any
    content: str  # llava_bench.judge_content(...)
    image: EncodedImage | None

    def request(self, settings: JudgeSettings, attempt: int) -> ChatRequest:
        return chat_request(
            settings.model,
            judge_messages(self.content, self.image),
            judge_messages(self.content, self.image, described=True),
            settings.temperature,
            settings.max_tokens,
            attempt,
        )


def reply_cost(reply: ChatReply, requested_model: str) -> float | None:
    model = requested_model if price(requested_model) else reply.model
    return cost_usd(model, reply.prompt_tokens, reply.completion_tokens, batch=reply.transport == "batch")


def _sum_costs(costs: list[float | None]) -> float | None:
    return None if any(c is None for c in costs) else sum(costs)


@dataclass
class JudgeOutcome:
    reviews: list[dict | None]  # one per item, in item order; None where a request failed
    failures: list[RequestFailure]
    requests: list[ChatRequest]  # every request the reviews rest on (first asks and second asks)
    replies: dict[str, ChatReply]


def judge_items(asker: CachedAsker, items: list[JudgeItem], settings: JudgeSettings) -> JudgeOutcome:
    first = [item.request(settings, 1) for item in items]
    replies, failures = asker.ask(first)
    unreadable = [(item, request) for item, request in zip(items, first)
                  if request.key in replies and parse_score(replies[request.key].text) is None]
    second = {request.key: item.request(settings, 2) for item, request in unreadable}  # by first ask's key
    if second:
        log.info("%d replies had no score on their first line: asking those again once", len(second))
        again, failed_again = asker.ask(list(second.values()))
        replies.update(again)
        failures += failed_again

    reviews: list[dict | None] = []
    for item, request in zip(items, first):
        reply = replies.get(request.key)
        if reply is None:
            reviews.append(None)
            continue
        used = [reply]
        scores = parse_score(reply.text)
        if scores is None:
            retry = replies.get(second[request.key].key)
            if retry is None:
                reviews.append(None)
                continue
            used.append(retry)
            reply, scores = retry, parse_score(retry.text)
        line = review_line(item.review_id, item.question_id, item.reference_answer_id, item.answer_id, item.category,
                           reply.text, scores, settings.model)
        line.update(
            judge_model_served=reply.model,
            attempts=len(used),
            prompt_tokens=sum(r.prompt_tokens for r in used),
            completion_tokens=sum(r.completion_tokens for r in used),
            cost_usd=_sum_costs([reply_cost(r, settings.model) for r in used]),
        )
        reviews.append(line)
    return JudgeOutcome(reviews, failures, first + list(second.values()), replies)
