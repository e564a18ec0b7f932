"""The server's app in process (fastapi's TestClient, or uvicorn in a thread):
error messages of union-typed fields, requests that can never fit, clients
that leave a non-streamed request, refusals while shutting down."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx (test extra)")

from fastapi.testclient import TestClient  # noqa: E402

from _tiny_checkpoint import build_checkpoint  # noqa: E402
from torch_vkv.serving import LLM, SamplingParams  # noqa: E402
from torch_vkv.serving.server import EngineLoop, create_app  # noqa: E402
from torch_vkv.serving.server.protocol import HTTPError  # noqa: E402
from torch_vkv.serving.server.streaming import start  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

MAX_SEQ_LEN = 512


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


def _llm(ckpt, max_batch_size: int = 4) -> LLM:
    # The app's engine loop closes the engine when it stops: one LLM per app.
    return LLM(str(ckpt), max_batch_size=max_batch_size, max_seq_len=MAX_SEQ_LEN, page_size=64 << 10)


@pytest.fixture(scope="module")
def client(ckpt):
    app = create_app(_llm(ckpt, max_batch_size=2), served_model_name="tiny", max_waiting=1)
    with TestClient(app) as c:
        yield c


# ------------------------------------------------------ union-typed fields
PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"
CONTENT_FORMS = 'a string or a list of text parts ({"type": "text", "text": ...})'
CHAT = "/v1/chat/completions"
UNION_ERRORS = [
    ("/v1/completions", {"prompt": 5}, "prompt", f"prompt: expected {PROMPT_FORMS}, got 5"),
    ("/v1/completions", {"prompt": None}, "prompt", f"prompt: expected {PROMPT_FORMS}, got null"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt", f'prompt: expected {PROMPT_FORMS}, got {{"a": 1}}'),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", f'prompt: expected {PROMPT_FORMS}, got [1, "a"]'),
    ("/v1/completions", {"prompt": [[1], "a"]}, "prompt", f'prompt: expected {PROMPT_FORMS}, got [[1], "a"]'),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop", "stop: expected a string or a list of strings, got 5"),
    ("/v1/completions", {"prompt": "x", "stop": [5]}, "stop",
     "stop: expected a string or a list of strings, got [5] (stop.0: Input should be a valid string, got 5)"),
    ("/v1/completions", {"prompt": "x", "logprobs": "a"}, "logprobs",
     'logprobs: expected a boolean or an integer, got "a"'),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
     f"messages.0.content: expected {CONTENT_FORMS}, got 5"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content",
     f'messages.0.content: expected {CONTENT_FORMS}, got [{{"type": "image_url"}}] '
     f"(messages.0.content.0.type: Input should be 'text', got \"image_url\")"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, param, message", UNION_ERRORS,
                         ids=[json.dumps(b)[:40] for _, b, _, _ in UNION_ERRORS])  # fmt: skip
def test_a_union_typed_field_error_names_the_field_its_forms_and_the_value(client, path, body, param, message):
    """A field that takes several forms (``prompt``, ``stop``, a message's
    ``content``) is named with every form it accepts and the value sent, not
    as its first (string) form."""
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param,
                                 "code": "invalid_value"}  # fmt: skip


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "x"}),
                                        (CHAT, {"messages": [{"role": "user", "content": "x"}]})])
def test_stream_options_without_stream_is_a_400(client, path, body):
    """``stream_options`` with ``stream`` false (or absent) was accepted and ignored; OpenAI answers 400."""
    for extra in ({}, {"stream": False}):
        r = client.post(path, json={**body, **extra, "stream_options": {"include_usage": True}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "stream_options"
        assert r.json()["error"]["message"] == 'stream_options: expected stream_options only with "stream": true, got "stream": false'
    r = client.post(path, json={**body, "max_tokens": 2, "stream": False, "stream_options": None})
    assert r.status_code == 200, r.text


def test_a_long_value_is_cut_in_the_message(client):
    r = client.post("/v1/completions", json={"prompt": [[1]] * 300 + ["x"]})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and message.startswith(f"prompt: expected {PROMPT_FORMS}, got [[1], [1]")
    assert len(message) < 300 and message.endswith("...")


# ------------------------------------------------------ what the server cannot honour or read
SURROGATE = "a\ud800b"  # valid JSON ("a\\ud800b"), no valid UTF-8: a tokenizer raised a bare TypeError (500)


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", {"prompt": SURROGATE}, "prompt", "prompt: expected text that encodes as UTF-8, got a string "
     "with an unpaired surrogate '\\ud800' at character 1"),
    ("/v1/completions", {"prompt": ["x", SURROGATE]}, "prompt.1", "prompt.1: expected text that encodes as UTF-8, "
     "got a string with an unpaired surrogate '\\ud800' at character 1"),
    (CHAT, {"messages": [{"role": "user", "content": SURROGATE}]}, "messages", "messages[0].content: expected text "
     "that encodes as UTF-8, got a string with an unpaired surrogate '\\ud800' at character 1"),
])  # fmt: skip
def test_text_that_is_not_utf8_is_a_400_naming_the_field(client, path, body, param, message):
    payload = json.dumps({**body, "max_tokens": 2}).encode()  # ASCII escapes: httpx's json= cannot encode it
    r = client.post(path, content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param,
                                 "code": "invalid_value"}  # fmt: skip
    assert client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"logit_bias": {"42": 100}}, "logit_bias"),
    (CHAT, {"logit_bias": {"42": -100.0}}, "logit_bias"),
    (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"functions": [{"name": "f"}]}, "functions"),
])  # fmt: skip
def test_fields_that_would_change_the_answer_are_refused_not_ignored(client, path, extra, param):
    """``logit_bias`` was accepted and ignored (200, the unbiased text); like penalties, what the server
    cannot honour is a 400 ``unsupported``. Their empty or trivial forms are served."""
    body = {"prompt": [5, 6, 7]} if path != CHAT else {"messages": [{"role": "user", "content": "hi"}]}
    r = client.post(path, json={**body, **extra, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "unsupported", r.json()
    trivial = {"logit_bias": {}, "response_format": {"type": "text"}, "tools": [], "functions": None}[param]
    r = client.post(path, json={**body, param: trivial, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_an_out_of_vocabulary_stop_token_names_stop_token_ids(client):
    r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "stop_token_ids": [3, 99999]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "stop_token_ids" and err["message"].startswith("stop_token_ids: expected token ids in [0, ")
    assert err["message"].endswith("got 99999")


def test_stop_lists_are_bounded(client):
    """Every generated token is matched against every stop string in the engine thread: 4 requests of 2000
    stop strings of 2000 characters slowed another client's stream 31x. At most 16 of 1024 characters."""
    from torch_vkv.serving.server.app import MAX_STOP_CHARS, MAX_STOP_STRINGS

    for stop in (["x"] * (MAX_STOP_STRINGS + 1), "y" * (MAX_STOP_CHARS + 1)):
        r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "stop": stop})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "stop" and err["message"].startswith(f"stop: expected at most {MAX_STOP_STRINGS} strings")
    ok = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "stop": ["z" * MAX_STOP_CHARS] * 16})
    assert ok.status_code == 200, ok.text


def test_requests_ended_by_a_stop_string_reach_the_latency_histograms(ckpt):
    """The server ends a request on a stop string before the engine records its finish time: such requests
    were counted as successes but left out of the e2e and per-token histograms."""
    app = create_app(_llm(ckpt), served_model_name="tiny")
    with TestClient(app) as c:
        first = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0,
                                                "ignore_eos": True}).json()["choices"][0]["text"]  # fmt: skip
        # Two characters after the first, not blank (the seeded tiny model's greedy text is fixed; a text with
        # none would leave nothing to cut at).
        stop = next((first[i:i + 2] for i in range(1, len(first) - 1) if first[i:i + 2].strip()), None)
        if stop is None:
            pytest.skip(f"the tiny model's greedy text {first!r} has no printable stop string to cut at")
        r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "stop": stop,
                                            "ignore_eos": True})  # fmt: skip
        assert r.json()["choices"][0]["finish_reason"] == "stop", r.text
        text = c.get("/metrics").text
        e2e = float(re.search(r"^vkv_e2e_request_latency_seconds_count\{[^}]*\} (\S+)$", text, re.M).group(1))
        assert e2e == 2, text  # both requests, the one ended by its stop string too


def test_a_body_the_server_cannot_read_answers_the_openai_error_body(client):
    """JSON sent as text/plain: the message names the header; a body that is not UTF-8: OpenAI's error body,
    not FastAPI's ``{"detail": ...}``."""
    r = client.post("/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "body: expected a JSON object sent with Content-Type: application/json, "
                                 "got Content-Type: text/plain", "type": "invalid_request_error", "param": None,
                                 "code": "invalid_content_type"}  # fmt: skip
    r = client.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and err["message"].startswith("body: expected a UTF-8 JSON object"), err


# ------------------------------------------------------ requests that never fit
def test_more_prompts_than_the_server_ever_holds_is_a_400_not_a_retryable_503(client):
    """max_batch_size=2 + max_waiting=1: 4 prompts could never be taken, so
    "retry later" (503) would be a lie; 3 are served."""
    r = client.post("/v1/completions", json={"prompt": ["a"] * 4, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and err["code"] == "invalid_value", err
    assert err["message"] == "prompt: expected at most 3 prompts (max_batch_size + max_waiting), got 4"
    r = client.post("/v1/completions", json={"prompt": ["a"] * 3, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


# ------------------------------------------------ a client that goes away
def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M).group(1))


def test_a_non_streamed_client_that_disconnects_is_aborted_while_tokens_still_flow(ckpt):
    """The engine yields a token every step, so the handler's queue is never
    idle for a second: the disconnect must be noticed anyway (its slot and
    pages return) rather than after the whole generation."""
    llm = _llm(ckpt)
    step = llm.engine.step

    def slow_step():  # 500 tokens take at least 10 s: a finish within a few seconds is the abort
        time.sleep(0.02)
        return step()

    llm.engine.step = slow_step
    app = create_app(llm, served_model_name="tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        body = {"prompt": "hello", "max_tokens": 500, "ignore_eos": True, "temperature": 0}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json=body, timeout=0.5)  # the client gives up, closing the connection
        left = time.monotonic()
        while _metric(url, "vkv_num_requests_running") or _metric(url, "vkv_num_requests_waiting"):
            assert time.monotonic() - left < 4, "the abandoned request still runs"
            time.sleep(0.1)
        text = httpx.get(url + "/metrics").text
        assert re.search(r'vkv_request_success_total\{finished_reason="abort"[^}]*\} 1\.0', text), text
        assert _metric(url, "vkv_kv_used_bytes") == 0
        r = httpx.post(url + "/v1/completions", json=dict(body, max_tokens=3), timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # the others are served
    finally:
        server.should_exit = True
        thread.join(30)


# ------------------------------------------------------------- shutting down
def test_a_request_queued_when_shutdown_begins_answers_503_not_400(ckpt):
    """A request handed to the loop just before SIGTERM reaches the engine
    thread after it stopped accepting: that is the server going away (503,
    retryable), not a bad prompt (400)."""
    loop = EngineLoop(_llm(ckpt))

    async def race():
        handler = asyncio.ensure_future(start(loop, [([5, 6, 7], SamplingParams(max_tokens=2))]))
        await asyncio.sleep(0)  # submitted: its "add" command waits for the engine thread
        loop.abort_all()
        loop.start()
        with pytest.raises(HTTPError) as e:
            await asyncio.wait_for(handler, 30)
        return e.value

    try:
        err = asyncio.run(race())
    finally:
        loop.stop()
    assert err.status == 503 and err.code == "shutting_down" and err.param is None, vars(err)


def test_a_submit_racing_the_engine_threads_end_is_answered(ckpt, monkeypatch):
    """The engine thread ends (stop) between ``submit``'s checks and its queueing:
    the request is still answered (refused, shutting down), never left waiting.
    The race is forced by stopping the loop from inside ``submit``, where the
    request ids are made; the stop may wait for ``submit`` to finish queueing."""
    import torch_vkv.serving.server.loop as loop_module

    loop = EngineLoop(_llm(ckpt))
    loop.start()
    real_uuid4 = loop_module.uuid.uuid4

    stoppers = []

    def uuid4_that_races_a_stop():
        stopper = threading.Thread(target=loop.stop)
        stoppers.append(stopper)
        stopper.start()
        stopper.join(2.0)  # before the fix: the thread ended and answered the queue here
        return real_uuid4()

    monkeypatch.setattr(loop_module.uuid, "uuid4", uuid4_that_races_a_stop)
    answered = threading.Event()
    answers = []

    def sink(event):
        answers.append(event)
        answered.set()

    try:
        loop.submit([([5, 6, 7], SamplingParams(max_tokens=2))], sink)
    except RuntimeError:
        answered.set()  # refused at submit: answered too
    monkeypatch.setattr(loop_module.uuid, "uuid4", real_uuid4)
    assert answered.wait(10), "the request was never answered"
    for stopper in stoppers:
        stopper.join(30)
    assert not loop.alive


# ------------------------------------------------------------------ models
def test_a_model_is_retrieved_by_its_name(client):
    card = client.get("/v1/models/tiny")
    assert card.status_code == 200 and card.json()["id"] == "tiny" and card.json()["max_model_len"] == MAX_SEQ_LEN
    other = client.get("/v1/models/other")
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert "expected 'tiny'" in other.json()["error"]["message"]


def test_a_served_name_with_a_slash_is_retrieved(ckpt):
    app = create_app(_llm(ckpt, max_batch_size=1), served_model_name="org/tiny")
    with TestClient(app) as c:
        assert c.get("/v1/models/org/tiny").json()["id"] == "org/tiny"
        assert c.get("/v1/models/org").status_code == 404


# ---------------------------------------------------------- engine failure
def test_requests_after_an_engine_failure_answer_503_engine_failure(ckpt, monkeypatch):
    llm = _llm(ckpt)

    def failing_step():
        raise RuntimeError("boom")

    monkeypatch.setattr(llm.engine, "step", failing_step)
    loop = EngineLoop(llm)
    loop.start()
    params = SamplingParams(max_tokens=2)
    try:
        loop.submit([([5, 6, 7], params)], lambda event: None)  # its step fails: the loop ends
        deadline = time.monotonic() + 30
        while loop.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not loop.alive and loop.error is not None
        with pytest.raises(HTTPError) as e:  # every later one
            asyncio.run(asyncio.wait_for(start(loop, [([5, 6, 7], params)]), 30))
    finally:
        loop.stop()
    assert e.value.status == 503 and e.value.code == "engine_failure", vars(e.value)
    assert "boom" in str(e.value)


def test_a_request_queued_when_the_engine_fails_answers_engine_failure(ckpt, monkeypatch):
    """A request whose "add" waits in the queue while the step that fails runs is answered
    by the loop's last look at the queue: that is the engine failing (503 engine_failure,
    as for every later request), not the server shutting down (it said "shutting_down")."""
    llm = _llm(ckpt)
    in_step, fail_now = threading.Event(), threading.Event()

    def failing_step():
        in_step.set()
        fail_now.wait(30)
        raise RuntimeError("boom")

    monkeypatch.setattr(llm.engine, "step", failing_step)
    loop = EngineLoop(llm)
    loop.start()
    params = SamplingParams(max_tokens=2)

    async def queued_while_failing():
        loop.submit([([5, 6, 7], params)], lambda event: None)
        assert await asyncio.to_thread(in_step.wait, 30)
        handler = asyncio.ensure_future(start(loop, [([5, 6, 7], params)]))
        await asyncio.sleep(0)  # submitted: its "add" waits behind the failing step
        fail_now.set()
        with pytest.raises(HTTPError) as e:
            await asyncio.wait_for(handler, 30)
        return e.value

    try:
        err = asyncio.run(queued_while_failing())
    finally:
        fail_now.set()
        loop.stop()
    assert err.status == 503 and err.code == "engine_failure", vars(err)
    assert "boom" in err.message


# ------------------------------------------------------------ small budgets
def test_chat_without_max_tokens_is_clipped_to_what_the_budget_holds(ckpt):
    # 16 pages of 4 KiB hold 128 tokens of one request, less than max_seq_len=512: the default max_tokens is the
    # rest of those 128, not of max_seq_len (which the engine would refuse as never fitting).
    llm = LLM(str(ckpt), max_batch_size=2, max_seq_len=MAX_SEQ_LEN, page_size=4096, memory_budget=16 * 4096)
    assert llm.engine.kv.longest_alone(MAX_SEQ_LEN) == 128
    app = create_app(llm, served_model_name="tiny")
    with TestClient(app) as c:
        body = {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0, "ignore_eos": True}
        r = c.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["total_tokens"] == 128 and r.json()["choices"][0]["finish_reason"] == "length"
        too_many = c.post(CHAT, json=dict(body, max_tokens=500))  # an explicit max_tokens is still checked
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "messages"
