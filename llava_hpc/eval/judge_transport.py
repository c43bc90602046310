"""Getting chat completions from any OpenAI-compatible server: concurrent calls, or the OpenAI Batch API.

One request format serves both: a `ChatRequest` holds the chat-completions body (model, messages, temperature,
max_tokens) that the sync transport passes to `chat.completions.create(**body)` and the batch transport writes as
the `body` of a Batch API line whose `custom_id` is the request's key. Replies come back through `on_reply(key,
reply)` as soon as each arrives (the caller caches it at once, so a killed job loses at most what was in flight);
requests that could not be completed come back as `RequestFailure`s, and the caller decides (the judge stage fails
after everything else is done and cached, and a rerun sends only those).

Retries: the openai client retries 408/409/429/5xx, timeouts and connection errors itself (`max_retries`,
exponential backoff 0.5 s x 2^n capped at 8 s, honouring Retry-After up to 2 minutes), so the sync transport adds no
loop of its own. The batch transport resubmits what an expired or cancelled batch left undone and lines that failed
with a retryable status, at most `max_submissions` times.

The API key is read from the environment variable the pipeline names, in the process that sends (the job), and
lives only in the client object: never in a file, a log line, or a pickled job. Error text from the server is
scrubbed of it before it is logged or returned, in case a server echoes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llava_hpc.rundir import atomic_write_json

if TYPE_CHECKING:  # imported where a request is made: `status` and `--help` never pay for the client
    import openai

log = logging.getLogger("llava_hpc.judge")

CHAT_ENDPOINT = "/v1/chat/completions"
MAX_BATCH_REQUESTS = 50_000  # the Batch API's limit per batch
MAX_BATCH_BYTES = 190 * 2**20  # the limit is 200 MB per input file; keep a margin for the multipart envelope
BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")
RETRYABLE_STATUS = (408, 409, 429)
# Batch error codes for lines that never ran (the batch ran out of time or was cancelled): worth sending again.
UNRUN_LINE_CODES = ("batch_expired", "batch_cancelled")
NO_KEY_PLACEHOLDER = "no-key"


class JudgeTransportError(RuntimeError):
    """Nothing more can be sent: a bad key, an unknown model or base_url, an exhausted quota, a rejected batch."""


class MissingApiKeyError(JudgeTransportError):
    pass


class BatchPending(Exception):
    """The Batch API is still working (a non-waiting transport polled once): everything finished so far is handed
    over, the batches are recorded, and a later call collects the rest."""

    def __init__(self, records: list[dict]):
        self.records = records
        done = sum(r.get("completed", 0) for r in records)
        total = sum(len(r["keys"]) for r in records)
        ids = ", ".join(r["batch_id"] or "(being created)" for r in records)
        super().__init__(f"{len(records)} batch(es) still running ({ids}; {done}/{total} requests done)")


# ---------------------------------------------------------------------------------------------- requests, replies
@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to get. `body` is sent; `described` is the same body with each image replaced by a
    placeholder naming its pixel digest (see llava_bench.EncodedImage): it is what request logs show and what the key
    hashes. `attempt` > 1 marks asking the same thing again (after an unreadable reply): same body, its own key."""

    body: dict
    described: dict
    attempt: int = 1
    key: str = field(init=False)

    def __post_init__(self):
        material = json.dumps({"request": self.described, "attempt": self.attempt}, sort_keys=True, ensure_ascii=False)
        object.__setattr__(self, "key", hashlib.sha256(material.encode()).hexdigest())

    def batch_line(self, described: bool = False) -> dict:
        """The Batch API's input line (the sent body, or the described one for a request log)."""
        return {"custom_id": self.key, "method": "POST", "url": CHAT_ENDPOINT,
                "body": self.described if described else self.body}


def chat_request(model: str, messages: list[dict], described_messages: list[dict], temperature: float,
                 max_tokens: int, attempt: int = 1) -> ChatRequest:
    parameters = {"model": model, "temperature": temperature, "max_tokens": max_tokens}
    return ChatRequest(
        body={**parameters, "messages": messages},
        described={**parameters, "messages": described_messages},
        attempt=attempt,
    )


@dataclass(frozen=True)
class ChatReply:
    text: str
    model: str  # the snapshot the server says answered (e.g. gpt-4o-2024-11-20 for gpt-4o)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    transport: str

    @classmethod
    def from_completion(cls, body: dict, transport: str) -> ChatReply:
        """From a chat.completion object as JSON (what both the API and a Batch output line hold)."""
        choices = body.get("choices") or [{}]
        message = choices[0].get("message") or {}
        usage = body.get("usage") or {}
        return cls(
            text=message.get("content") or "",
            model=body.get("model") or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choices[0].get("finish_reason"),
            transport=transport,
        )

    @classmethod
    def from_json(cls, record: dict) -> ChatReply:
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})

    def to_json(self) -> dict:
        return {"text": self.text, "model": self.model, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
                "transport": self.transport}


@dataclass(frozen=True)
class RequestFailure:
    key: str
    error: str
    retryable: bool


OnReply = Callable[[str, ChatReply], None]


# ---------------------------------------------------------------------------------------------- client
def api_key_from_env(variable: str, base_url: str | None, where: str, fallback: str | None = None) -> str:
    """The key from the environment variable the pipeline names, else `fallback` (a judge job's key file). A local
    OpenAI-compatible server (base_url set) usually wants none, so a missing key there sends a placeholder; the
    OpenAI API gets a clear error."""
    key = os.environ.get(variable, "") or fallback or ""
    if key:
        return key
    if base_url:
        log.warning("$%s is not set; sending no key to %s", variable, base_url)
        return NO_KEY_PLACEHOLDER
    raise MissingApiKeyError(
        f"the judge's API key is not set: export {variable} {where} (judge.api_key_env names the variable; "
        "the key is never written into the pipeline file or the run directory)"
    )


def make_client(base_url: str | None, api_key: str, max_retries: int, timeout_s: float) -> openai.OpenAI:
    import openai

    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout_s)


def scrubber(secret: str) -> Callable[[str], str]:
    """A function that removes the secret from text (error messages a server may have echoed it into)."""
    if not secret or secret == NO_KEY_PLACEHOLDER:
        return lambda text: text
    return lambda text: text.replace(secret, "***")


def _describe_error(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    text = f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "") + f": {exc}"
    url = getattr(getattr(exc, "request", None), "url", None)
    if status is None and url is not None:  # no answer at all (refused, timed out, DNS): say where it went
        text += f" ({url.scheme}://{url.host}{f':{url.port}' if url.port else ''}{url.path})"
    return text


def _is_fatal(exc: Exception) -> bool:
    """Errors that every other request would hit too: stop sending instead of failing them one by one."""
    import openai

    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)):
        return True
    return isinstance(exc, openai.RateLimitError) and getattr(exc, "code", None) == "insufficient_quota"


# ---------------------------------------------------------------------------------------------- sync
class SyncTransport:
    """Chat completions, `max_concurrency` at a time, from a thread pool (the openai client is thread-safe and pools
    its connections). Judge calls spend their time waiting on the server, so threads are all the parallelism needed."""

    name = "sync"

    def __init__(self, client: openai.OpenAI, max_concurrency: int, scrub: Callable[[str], str] = lambda t: t):
        self.client = client
        self.max_concurrency = max_concurrency
        self.scrub = scrub
        self.sent = 0  # requests put on the wire (first tries; the client's own retries are not counted)

    def _send(self, request: ChatRequest) -> ChatReply:
        completion = self.client.chat.completions.create(**request.body)
        return ChatReply.from_completion(completion.model_dump(), self.name)

    def complete(self, requests: list[ChatRequest], on_reply: OnReply) -> list[RequestFailure]:
        import openai

        failures: list[RequestFailure] = []
        fatal: str | None = None
        if not requests:
            return failures
        every = max(1, len(requests) // 10)  # a progress line per tenth: enough for a job log
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            futures = {pool.submit(self._send, request): request for request in requests}
            for finished, future in enumerate(as_completed(futures), 1):
                if finished % every == 0:
                    log.info("%d/%d requests finished (%d failed)", finished, len(requests), len(failures))
                request = futures[future]
                if future.cancelled():
                    continue
                self.sent += 1
                try:
                    reply = future.result()
                except openai.OpenAIError as exc:
                    message = self.scrub(_describe_error(exc))
                    if _is_fatal(exc) and fatal is None:
                        fatal = message
                        # Stop what has not started; still collect what is in flight (it is being paid for).
                        for other in futures:
                            other.cancel()
                    retryable = not isinstance(exc, openai.BadRequestError)
                    failures.append(RequestFailure(request.key, message, retryable=retryable))
                    continue
                on_reply(request.key, reply)
        if fatal is not None:
            raise JudgeTransportError(f"the judge server refused the requests: {fatal}")
        return failures


# ---------------------------------------------------------------------------------------------- batch
def batch_chunks(requests: list[ChatRequest]) -> Iterable[tuple[list[ChatRequest], bytes]]:
    """Requests cut into Batch API input files: at most MAX_BATCH_REQUESTS lines and MAX_BATCH_BYTES each."""
    chunk: list[ChatRequest] = []
    lines: list[bytes] = []
    size = 0
    for request in requests:
        line = (json.dumps(request.batch_line(), ensure_ascii=False) + "\n").encode()
        if len(line) > MAX_BATCH_BYTES:
            raise JudgeTransportError(f"request {request.key} is {len(line)} bytes, more than a batch file may hold")
        if chunk and (len(chunk) == MAX_BATCH_REQUESTS or size + len(line) > MAX_BATCH_BYTES):
            yield chunk, b"".join(lines)
            chunk, lines, size = [], [], 0
        chunk.append(request)
        lines.append(line)
        size += len(line)
    if chunk:
        yield chunk, b"".join(lines)


class BatchTransport:
    """The OpenAI Batch API (half the price, results within 24 h).

    Every batch is recorded in `state_path` (JSON) from the moment its input file is uploaded: input file id, then
    batch id, the keys it carries, and whether its results were collected. A job killed while waiting (a time limit,
    a preemption) and started again finds its open batches there and polls them instead of submitting again; a
    record with an uploaded file but no batch id (killed between the two calls) is matched against the server's
    batch list by input file before anything is created.

    An expired or cancelled batch returns what it finished; the rest, and lines that failed with 408/409/429/5xx,
    are submitted again in a new batch, at most `max_submissions` rounds per call."""

    name = "batch"

    def __init__(self, client: openai.OpenAI, state_path: Path, poll_s: float = 60.0, max_submissions: int = 3,
                 scrub: Callable[[str], str] = lambda t: t, label: str = "llava-hpc judge", wait: bool = True):
        """wait=False: poll each open batch once and raise BatchPending if any is still running (the login side's
        `llava-hpc judge`, which must not sit for hours); what finished is handed over first."""
        self.client = client
        self.wait = wait
        self.state_path = Path(state_path)
        self.poll_s = poll_s
        self.max_submissions = max_submissions
        self.scrub = scrub
        self.label = label
        self.sent = 0  # batch lines submitted by this process (a resumed batch's lines are not counted again)

    # -- the state file
    def _load(self) -> list[dict]:
        if not self.state_path.exists():
            return []
        return json.loads(self.state_path.read_text())["batches"]

    def _save(self, records: list[dict]) -> None:
        atomic_write_json(self.state_path, {"batches": records})

    # -- submitting
    def _create_batch(self, input_file_id: str):
        return self.client.batches.create(
            input_file_id=input_file_id, endpoint=CHAT_ENDPOINT, completion_window="24h",
            metadata={"source": self.label[:512]},
        )

    def _submit(self, requests: list[ChatRequest], records: list[dict]) -> None:
        for chunk, data in batch_chunks(requests):
            uploaded = self.client.files.create(file=("judge-requests.jsonl", data), purpose="batch")
            record = {"input_file_id": uploaded.id, "batch_id": None, "keys": [r.key for r in chunk],
                      "submitted_at": time.time(), "status": "uploaded", "collected": False}
            records.append(record)
            self._save(records)
            self.sent += len(chunk)
            record["batch_id"] = self._create_batch(uploaded.id).id
            record["status"] = "validating"
            self._save(records)
            log.info("submitted batch %s: %d requests (%.1f MB)", record["batch_id"], len(chunk), len(data) / 2**20)

    def _adopt_or_create(self, record: dict, records: list[dict]) -> None:
        """A record whose batch may or may not have been created before the job died."""
        for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == record["input_file_id"]:
                record["batch_id"] = batch.id
                break
        else:
            record["batch_id"] = self._create_batch(record["input_file_id"]).id
        self._save(records)

    # -- collecting
    def _read_file(self, file_id: str | None) -> list[dict]:
        if not file_id:
            return []
        text = self.client.files.content(file_id).read().decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _collect(self, record: dict, batch, on_reply: OnReply) -> dict[str, RequestFailure]:
        """Hand over every result of a finished batch; return the failures of its other keys."""
        failures: dict[str, RequestFailure] = {}
        replied: set[str] = set()
        if batch.status == "failed":
            errors = "; ".join(f"{e.code}: {e.message}" for e in (batch.errors.data if batch.errors else []) or [])
            message = self.scrub(f"batch {batch.id} failed validation: {errors or 'no reason given'}")
            log.error("%s", message)
            return {key: RequestFailure(key, message, retryable=False) for key in record["keys"]}
        for line in self._read_file(batch.output_file_id) + self._read_file(batch.error_file_id):
            key = line.get("custom_id")
            response = line.get("response") or {}
            error = line.get("error") or {}
            status = response.get("status_code")
            if status == 200:
                on_reply(key, ChatReply.from_completion(response.get("body") or {}, self.name))
                replied.add(key)
                continue
            code = error.get("code") or ""
            body = response.get("body") if isinstance(response.get("body"), dict) else {}
            body_error = body.get("error") or {}
            message = error.get("message") or body_error.get("message") or ""
            retryable = code in UNRUN_LINE_CODES or status in RETRYABLE_STATUS or (status or 0) >= 500
            failures[key] = RequestFailure(key, self.scrub(f"batch {batch.id}: {status or code}: {message}"), retryable)
        for key in record["keys"]:
            if key not in replied and key not in failures:
                failures[key] = RequestFailure(key, f"batch {batch.id} ended {batch.status} before this request ran",
                                               retryable=True)
        return failures

    def _wait(self, records: list[dict], on_reply: OnReply) -> dict[str, RequestFailure]:
        """Poll every open batch until each has ended, collecting each as it ends."""
        failures: dict[str, RequestFailure] = {}
        while True:
            open_records = [r for r in records if not r["collected"]]
            if not open_records:
                return failures
            for record in open_records:
                if record["batch_id"] is None:
                    self._adopt_or_create(record, records)
                batch = self.client.batches.retrieve(record["batch_id"])
                counts = batch.request_counts
                if batch.status != record["status"]:
                    log.info("batch %s: %s (%s of %d done)", batch.id, batch.status,
                             counts.completed if counts else "?", len(record["keys"]))
                record["status"] = batch.status
                record["completed"] = counts.completed if counts else 0
                if batch.status in BATCH_TERMINAL:
                    failures.update(self._collect(record, batch, on_reply))
                    record["collected"] = True
                self._save(records)
            still_open = [r for r in records if not r["collected"]]
            if still_open and not self.wait:
                raise BatchPending(still_open)
            if still_open:
                time.sleep(self.poll_s)

    def complete(self, requests: list[ChatRequest], on_reply: OnReply) -> list[RequestFailure]:
        wanted = {r.key: r for r in requests}
        replied: set[str] = set()

        def record_reply(key: str, reply: ChatReply) -> None:
            replied.add(key)
            on_reply(key, reply)

        records = self._load()
        in_flight = {key for r in records if not r["collected"] for key in r["keys"]}
        resumed = [r for r in records if not r["collected"]]
        if resumed:
            log.info("resuming %d batch(es) a previous job submitted (%d requests)", len(resumed), len(in_flight))
        to_send = [r for key, r in wanted.items() if key not in in_flight]
        failures: dict[str, RequestFailure] = {}
        submissions = 0
        while True:
            if to_send:
                self._submit(to_send, records)
                submissions += 1
            failures.update(self._wait(records, record_reply))
            for key in replied:
                failures.pop(key, None)
            to_send = [wanted[key] for key, f in failures.items() if f.retryable and key in wanted]
            if not to_send or submissions >= self.max_submissions:
                break
            log.info("sending %d unfinished requests again in a new batch", len(to_send))
        return [f for key, f in failures.items() if key in wanted]
