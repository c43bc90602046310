"""The transports against the local OpenAI-compatible stub, driven by the real openai client: rate limits with
Retry-After, server errors, timeouts, a bad key, and the Batch API (expiry with partial results, resuming)."""

import json
import time

import pytest
from conftest import openai_stub_fixture
from openai_stub import OpenAIStub

from llava_hpc.eval.judge_transport import (
    BatchTransport,
    JudgeTransportError,
    SyncTransport,
    chat_request,
    make_client,
    scrubber,
)

KEY = "sk-test-transport-5f3a9c"


def requests(count: int, model: str = "gpt-4o-mini"):
    return [chat_request(model, [{"role": "user", "content": f"[Question]\nq{i}\n\nrest"}],
                         [{"role": "user", "content": f"[Question]\nq{i}\n\nrest"}], 0.2, 64) for i in range(count)]


stub = openai_stub_fixture(expected_key=KEY)


def collect(transport, batch):
    replies = {}
    failures = transport.complete(batch, lambda key, reply: replies.__setitem__(key, reply))
    return replies, failures


def test_sync_honours_retry_after_and_retries_server_errors(stub):
    client = make_client(stub.url, KEY, max_retries=3, timeout_s=5)
    stub.script.actions.extend(["429:1.0", "500"])
    started = time.time()
    replies, failures = collect(SyncTransport(client, max_concurrency=1), requests(1))
    assert failures == [] and len(replies) == 1
    assert time.time() - started >= 1.0  # waited the Retry-After, not the client's 0.5 s backoff
    outcomes = [e["outcome"] for e in stub.chat_log()]
    assert outcomes == ["rate_limited", "server_error", "answered"]
    assert {e["authorization"] for e in stub.log} == {f"Bearer {KEY}"}


def test_sync_gives_up_after_max_retries_and_reports_the_request(stub):
    client = make_client(stub.url, KEY, max_retries=1, timeout_s=5)
    batch = requests(3)
    stub.script.actions.extend(["500", "500"])  # the first request fails twice: its one retry is spent
    replies, failures = collect(SyncTransport(client, max_concurrency=1), batch)
    assert len(replies) == 2 and [f.key for f in failures] == [batch[0].key]
    assert "InternalServerError (HTTP 500)" in failures[0].error and failures[0].retryable


def test_sync_retries_a_timed_out_request(stub):
    client = make_client(stub.url, KEY, max_retries=1, timeout_s=0.5)
    stub.script.actions.append("slow:1.5")
    replies, failures = collect(SyncTransport(client, max_concurrency=2), requests(2))
    assert failures == [] and len(replies) == 2
    assert len(stub.chat_log()) == 3  # the slow one was sent again after the client's timeout


def test_a_wrong_key_stops_everything_and_the_error_does_not_show_the_key(stub):
    wrong = "sk-wrong-key-0001"
    client = make_client(stub.url, wrong, max_retries=0, timeout_s=5)
    with pytest.raises(JudgeTransportError, match="AuthenticationError") as raised:
        collect(SyncTransport(client, max_concurrency=2, scrub=scrubber(wrong)), requests(20))
    assert wrong not in str(raised.value)
    assert len(stub.requests_to("POST", "/v1/chat/completions")) < 20  # the rest was never sent


def test_concurrency_is_bounded(stub):
    stub.script.latency_s = 0.2
    client = make_client(stub.url, KEY, max_retries=0, timeout_s=5)
    started = time.time()
    replies, _ = collect(SyncTransport(client, max_concurrency=4), requests(12))
    assert len(replies) == 12 and stub.max_in_flight == 4
    assert time.time() - started >= 0.6  # three waves of four


def uploaded_keys(stub: OpenAIStub) -> list[list[str]]:
    """The custom_ids of every batch input file the stub received, in upload order."""
    files = [f for f in stub.files.values() if f["purpose"] == "batch"]
    return [[json.loads(line)["custom_id"] for line in f["data"].decode().splitlines()] for f in files]


def test_batch_round_trip_uses_the_one_request_format(stub, tmp_path):
    client = make_client(stub.url, KEY, max_retries=2, timeout_s=5)
    batch = requests(5)
    replies, failures = collect(BatchTransport(client, tmp_path / "batches.json", poll_s=0.01), batch)
    assert failures == [] and set(replies) == {r.key for r in batch}
    line = json.loads(next(iter(stub.files.values()))["data"].decode().splitlines()[0])
    assert line == {"custom_id": batch[0].key, "method": "POST", "url": "/v1/chat/completions", "body": batch[0].body}
    state = json.loads((tmp_path / "batches.json").read_text())["batches"]
    assert len(state) == 1 and state[0]["collected"] and state[0]["status"] == "completed"
    assert KEY not in (tmp_path / "batches.json").read_text()


def test_expired_batch_keeps_its_partial_results_and_resubmits_only_the_rest(stub, tmp_path):
    client = make_client(stub.url, KEY, max_retries=2, timeout_s=5)
    batch = requests(10)
    stub.script.batch_expire_after.append(6)  # the first batch runs 6 lines, then expires
    stub.script.actions.extend(["ok"] * 2 + ["500"])  # ... and its third line fails with a 500
    replies, failures = collect(BatchTransport(client, tmp_path / "batches.json", poll_s=0.01), batch)
    assert failures == [] and set(replies) == {r.key for r in batch}
    first, second = uploaded_keys(stub)
    assert first == [r.key for r in batch]
    assert sorted(second) == sorted([batch[2].key] + [r.key for r in batch[6:]])
    answered = stub.answered_keys()
    assert len(answered) == len(set(answered)) == 10  # every request ran exactly once


def test_batch_resumes_the_batch_a_killed_job_created(stub, tmp_path):
    """Killed after the batch was created but before its id was saved: found by input file, not created again."""
    client = make_client(stub.url, KEY, max_retries=2, timeout_s=5)
    batch = requests(4)
    lines = "".join(json.dumps(r.batch_line()) + "\n" for r in batch).encode()
    uploaded = client.files.create(file=("judge-requests.jsonl", lines), purpose="batch")
    client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    state = tmp_path / "batches.json"
    state.write_text(json.dumps({"batches": [{"input_file_id": uploaded.id, "batch_id": None,
                                              "keys": [r.key for r in batch], "submitted_at": 0,
                                              "status": "uploaded", "collected": False}]}))
    replies, failures = collect(BatchTransport(client, state, poll_s=0.01), batch)
    assert failures == [] and len(replies) == 4
    assert len(stub.requests_to("POST", "/v1/batches")) == 1
    assert len(stub.requests_to("POST", "/v1/files")) == 1
