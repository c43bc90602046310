"""A local OpenAI-compatible server for tests and benchmarks: the real `openai` client talks to it over HTTP.

    with OpenAIStub() as stub:            # 127.0.0.1 (or host=...), a free port, one thread per connection
        client = openai.OpenAI(base_url=stub.url, api_key="sk-test")
        stub.script.actions.extend(["429:1", "500"])   # the next two chat requests fail that way

Endpoints: POST /v1/chat/completions, POST /v1/files (multipart), GET /v1/files/{id}/content, POST /v1/batches,
GET /v1/batches/{id}, GET /v1/batches (list).

Scripted behaviour (`stub.script`, change it at any time):
- reply(body, seen) -> text: the judge's reply; `seen` counts earlier requests with the same body (1 the first time),
  so "malformed, then good when asked again" is one function. Default: scores from `scores` (question text -> pair).
- actions: consumed one per chat request (or batch line): "ok", "429:<retry-after s>", "500", "slow:<s>"
  (reply after that long, past a client timeout), "malformed" (a reply with no numbers).
- latency_s: every chat request takes this long (the benchmark's fixed latency).
- hold_after: after that many answered chat requests, hold every further one without answering (until stop):
  lets a test kill a client with requests in flight at a known point.

A chat request is logged when it arrives ("received") and its outcome filled in when it ends: "answered",
"rate_limited", "server_error", "held" (never answered).
- expected_key: requests whose Authorization is not "Bearer <key>" get 401.
- batch_polls: retrieves a batch answers "in_progress" before it ends.
- batch_expire_after: a queue; each new batch takes the next entry: None = complete, k = expire after k lines
  (partial output, the rest `batch_expired` in the error file).

`stub.log` holds every request: method, path, authorization, status, outcome, and for chat requests and batch lines
the body's digest (`body_key`), so a test can assert nothing was answered twice; chat entries keep the `body`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def user_text(body: dict) -> str:
    """The text of the last user message of a chat body (string content or the text part)."""
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def body_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def question_of(body: dict) -> str:
    """The [Question] section of a LLaVA-Bench judge prompt ('' for other requests)."""
    text = user_text(body)
    if "[Question]\n" not in text:
        return ""
    return text.split("[Question]\n", 1)[1].split("\n\n", 1)[0]


@dataclass
class StubScript:
    scores: dict = field(default_factory=dict)  # question text -> (reference score, candidate score)
    default_scores: tuple = (8, 6)
    reply: Callable[[dict, int], str] | None = None
    actions: deque = field(default_factory=deque)
    latency_s: float = 0.0
    hold_after: int | None = None
    expected_key: str | None = None
    batch_polls: int = 1
    batch_expire_after: deque = field(default_factory=deque)

    def reply_text(self, body: dict, seen: int) -> str:
        if self.reply is not None:
            return self.reply(body, seen)
        if "[Question]" not in user_text(body):  # a reference-answer request (folder benches)
            return f"A reference answer to: {user_text(body)[:60]}"
        first, second = self.scores.get(question_of(body), self.default_scores)
        return f"{first} {second}\nAssistant 1 is accurate; Assistant 2 is less detailed."


class OpenAIStub:
    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        """`port` 0 picks a free one; a test that takes the endpoint down and brings it back passes the old one.
        `host`: loopback by default; the local cluster's bridge address for an endpoint inside the cluster, which
        its (offline) compute nodes reach."""
        self.host = host
        self.script = StubScript()
        self.log: list[dict] = []
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._answered = 0
        self._in_flight = 0
        self.max_in_flight = 0  # the most chat requests the stub was serving at once
        self._ids = itertools.count(1)
        self._release = threading.Event()
        self._connections: set = set()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    # -- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}/v1"

    def start(self) -> OpenAIStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Down, as a crashed server is: no new connections, and the kept-alive ones are cut too."""
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests read
    def chat_log(self, outcome: str | None = None) -> list[dict]:
        with self._lock:
            return [e for e in self.log
                    if e["path"] == "/v1/chat/completions" and (outcome is None or e["outcome"] == outcome)]

    def answered_keys(self) -> list[str]:
        """Body digests of every chat request answered 200 and every batch line run, in order."""
        with self._lock:
            return [e["body_key"] for e in self.log if e["outcome"] in ("answered", "batch_line")]

    def requests_to(self, method: str, path_prefix: str) -> list[dict]:
        with self._lock:
            return [e for e in self.log if e["method"] == method and e["path"].startswith(path_prefix)]

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    # -- behaviour
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"

    def _completion(self, body: dict, text: str) -> dict:
        prompt_tokens = len(json.dumps(body["messages"])) // 4
        completion_tokens = max(1, len(text) // 4)
        return {
            "id": self._new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def _next_action(self) -> str:
        with self._lock:
            return self.script.actions.popleft() if self.script.actions else "ok"

    def _count_seen(self, key: str) -> int:
        with self._lock:
            self._seen[key] = self._seen.get(key, 0) + 1
            return self._seen[key]

    def _run_batch(self, batch: dict) -> None:
        """Run a batch's lines (at its final poll): outputs, errors, and expiry after `expire_after` lines."""
        lines = [json.loads(line) for line in self.files[batch["input_file_id"]]["data"].decode().splitlines() if line]
        outputs, errors = [], []
        for position, line in enumerate(lines):
            if batch["expire_after"] is not None and position >= batch["expire_after"]:
                errors.append({"id": self._new_id("batch_req"), "custom_id": line["custom_id"], "response": None,
                               "error": {"code": "batch_expired", "message": "not run before the window expired"}})
                continue
            action = self._next_action()
            key = body_key(line["body"])
            if action == "500":
                errors.append({"id": self._new_id("batch_req"), "custom_id": line["custom_id"],
                               "response": {"status_code": 500, "request_id": "r",
                                            "body": {"error": {"message": "stub server error",
                                                               "type": "server_error"}}},
                               "error": None})
                self._record("POST", "(batch line)", "", 500, "batch_error", key)
                continue
            seen = self._count_seen(key)
            text = "no scores here, sorry" if action == "malformed" else self.script.reply_text(line["body"], seen)
            outputs.append({"id": self._new_id("batch_req"), "custom_id": line["custom_id"],
                            "response": {"status_code": 200, "request_id": "r",
                                         "body": self._completion(line["body"], text)},
                            "error": None})
            self._record("POST", "(batch line)", "", 200, "batch_line", key)
        for name, rows in (("output_file_id", outputs), ("error_file_id", errors)):
            if rows:
                file_id = self._new_id("file")
                self.files[file_id] = {"data": "".join(json.dumps(r) + "\n" for r in rows).encode(),
                                       "purpose": "batch_output", "filename": f"{name}.jsonl"}
                batch[name] = file_id
        expired = batch["expire_after"] is not None and batch["expire_after"] < len(lines)
        batch.update(status="expired" if expired else "completed",
                     request_counts={"total": len(lines), "completed": len(outputs), "failed": len(errors)})

    def _record(self, method, path, authorization, status, outcome, key=None) -> dict:
        entry = {"method": method, "path": path, "authorization": authorization, "status": status,
                 "outcome": outcome, "body_key": key, "time": time.time()}
        with self._lock:
            self.log.append(entry)
        return entry

    # -- HTTP
    def _handler_class(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body in one segment, sent at once: otherwise Nagle + delayed ACK add ~40 ms per response.
            wbufsize = 1 << 16
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet test output
                pass

            def setup(self):
                super().setup()
                with stub._lock:
                    stub._connections.add(self.connection)

            def finish(self):
                with stub._lock:
                    stub._connections.discard(self.connection)
                super().finish()

            def _send(self, status: int, payload: dict | bytes, headers: dict | None = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes)
                                     else "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or was killed
                    self.close_connection = True

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorized(self, authorization: str) -> bool:
                if stub.script.expected_key is None or authorization == f"Bearer {stub.script.expected_key}":
                    return True
                stub._record(self.command, self.path, authorization, 401, "unauthorized")
                self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}})
                return False

            def do_POST(self):
                authorization = self.headers.get("Authorization", "")
                raw = self._body()
                if not self._authorized(authorization):
                    return
                if self.path == "/v1/chat/completions":
                    self._chat(json.loads(raw), authorization)
                elif self.path == "/v1/files":
                    self._upload(raw, authorization)
                elif self.path == "/v1/batches":
                    self._create_batch(json.loads(raw), authorization)
                else:
                    stub._record("POST", self.path, authorization, 404, "not_found")
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_GET(self):
                authorization = self.headers.get("Authorization", "")
                if not self._authorized(authorization):
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content":
                    entry = stub.files.get(parts[2])
                    stub._record("GET", self.path, authorization, 200 if entry else 404, "file_content")
                    if entry is None:
                        self._send(404, {"error": {"message": "no such file"}})
                    else:
                        self._send(200, entry["data"])
                elif parts == ["v1", "batches"]:
                    stub._record("GET", self.path, authorization, 200, "batch_list")
                    data = sorted(stub.batches.values(), key=lambda b: b["created_at"], reverse=True)
                    self._send(200, {"object": "list", "data": [_public(b) for b in data], "has_more": False})
                elif parts[:2] == ["v1", "batches"] and len(parts) == 3:
                    self._retrieve_batch(parts[2], authorization)
                else:
                    stub._record("GET", self.path, authorization, 404, "not_found")
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def _chat(self, body: dict, authorization: str):
                with stub._lock:
                    stub._in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub._in_flight)
                try:
                    self._answer_chat(body, authorization)
                finally:
                    with stub._lock:
                        stub._in_flight -= 1

            def _answer_chat(self, body: dict, authorization: str):
                key = body_key(body)
                entry = stub._record("POST", self.path, authorization, None, "received", key)
                entry["body"] = body

                def finish(status, outcome):
                    with stub._lock:
                        entry.update(status=status, outcome=outcome)

                if stub.script.hold_after is not None:
                    with stub._lock:
                        hold = stub._answered >= stub.script.hold_after
                    if hold:
                        finish(None, "held")
                        stub._release.wait()
                        self.close_connection = True
                        return
                action = stub._next_action()
                if action.startswith("429"):
                    retry_after = action.split(":", 1)[1] if ":" in action else "1"
                    finish(429, "rate_limited")
                    self._send(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                               "code": "rate_limit_exceeded"}}, {"Retry-After": retry_after})
                    return
                if action == "500":
                    finish(500, "server_error")
                    self._send(500, {"error": {"message": "stub server error", "type": "server_error"}})
                    return
                delay = stub.script.latency_s + (float(action.split(":", 1)[1]) if action.startswith("slow") else 0)
                if delay:
                    time.sleep(delay)
                seen = stub._count_seen(key)
                text = "no scores here, sorry" if action == "malformed" else stub.script.reply_text(body, seen)
                # Counted as answered before the bytes go out: a client killed while reading it has still been
                # answered (and, on a real API, billed).
                finish(200, "answered")
                with stub._lock:
                    stub._answered += 1
                self._send(200, stub._completion(body, text))

            def _upload(self, raw: bytes, authorization: str):
                message = BytesParser(policy=HTTP).parsebytes(
                    f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw)
                fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
                file_id = stub._new_id("file")
                data = fields["file"].get_payload(decode=True)
                purpose = fields["purpose"].get_payload(decode=True).decode()
                stub.files[file_id] = {"data": data, "purpose": purpose, "filename": fields["file"].get_filename()}
                stub._record("POST", self.path, authorization, 200, "file_created")
                self._send(200, {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                 "filename": fields["file"].get_filename(), "purpose": purpose})

            def _create_batch(self, body: dict, authorization: str):
                if body.get("input_file_id") not in stub.files:
                    stub._record("POST", self.path, authorization, 400, "bad_batch")
                    self._send(400, {"error": {"message": "unknown input_file_id"}})
                    return
                with stub._lock:
                    expire_after = stub.script.batch_expire_after.popleft() if stub.script.batch_expire_after else None
                batch = {"id": stub._new_id("batch"), "object": "batch", "endpoint": body["endpoint"],
                         "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                         "status": "validating", "created_at": time.time(), "output_file_id": None,
                         "error_file_id": None, "errors": None, "metadata": body.get("metadata"),
                         "request_counts": {"total": 0, "completed": 0, "failed": 0},
                         "polls": 0, "expire_after": expire_after}
                stub.batches[batch["id"]] = batch
                stub._record("POST", self.path, authorization, 200, "batch_created")
                self._send(200, _public(batch))

            def _retrieve_batch(self, batch_id: str, authorization: str):
                batch = stub.batches.get(batch_id)
                stub._record("GET", self.path, authorization, 200 if batch else 404, "batch_retrieved")
                if batch is None:
                    self._send(404, {"error": {"message": "no such batch"}})
                    return
                with stub._lock:
                    batch["polls"] += 1
                    running = batch["status"] in ("validating", "in_progress")
                    finish = running and batch["polls"] > stub.script.batch_polls
                    # "finalizing" while the lines run, so a concurrent poll cannot run them twice
                    if finish:
                        batch["status"] = "finalizing"
                    elif batch["status"] == "validating":
                        batch["status"] = "in_progress"
                if finish:
                    stub._run_batch(batch)
                self._send(200, _public(batch))

        return Handler


def _public(batch: dict) -> dict:
    shown = {k: v for k, v in batch.items() if k not in ("polls", "expire_after")}
    shown["created_at"] = int(batch["created_at"])
    return shown
