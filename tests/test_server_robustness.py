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
from torch_vkv.serving.server.loop import Accepted, Delta  # noqa: E402
from torch_vkv.serving.server.streaming import respond, start  # noqa: E402

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


def _loop_whose_stop_lands_in_one_drain(ckpt, monkeypatch) -> tuple[EngineLoop, threading.Event]:
    """A loop whose step, once the returned event is set, waits until two
    commands are queued: stop()'s "abort_all" and "stop" are then drained in
    one pass (as when they land during a step)."""
    llm = _llm(ckpt)
    step = llm.engine.step
    hold = threading.Event()

    def step_that_waits_for_stop():
        deadline = time.monotonic() + 10
        while hold.is_set() and loop._commands.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        return step()

    monkeypatch.setattr(llm.engine, "step", step_that_waits_for_stop)
    loop = EngineLoop(llm)
    loop.start()
    return loop, hold


LONG = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)


def test_stop_ends_every_request_in_flight_with_abort(ckpt, monkeypatch):
    """``stop()`` queues "abort_all" then "stop"; the engine thread took both in
    one pass and ended before a step returned the aborted outputs, so a request
    in flight never got its last Delta (its stream never ended)."""
    loop, hold = _loop_whose_stop_lands_in_one_drain(ckpt, monkeypatch)
    events, streaming = [], threading.Event()

    def sink(event):
        events.append(event)
        if isinstance(event, Delta):
            streaming.set()

    loop.submit([([5, 6, 7], LONG)], sink)
    assert streaming.wait(30), events
    hold.set()
    loop.stop(timeout=30)
    assert not loop.alive and loop.engine.closed
    last = events[-1]
    assert isinstance(last, Delta) and last.finish_reason == "abort", events
    assert last.num_tokens == max(e.num_tokens for e in events if isinstance(e, Delta))
    assert loop._in_flight == 0


def test_a_stream_open_when_the_loop_stops_ends_with_abort_and_done(ckpt, monkeypatch):
    """The app's lifespan calls ``loop.stop()``: a stream still open then ends
    with ``finish_reason: "abort"`` and ``[DONE]`` (docs/serving.md), not never."""
    loop, hold = _loop_whose_stop_lands_in_one_drain(ckpt, monkeypatch)

    async def stream_then_stop():
        response = await respond(loop, "tiny", None, [([5, 6, 7], LONG)], stream=True, chat=False,
                                 include_usage=True)  # fmt: skip
        chunks, stopper = [], None
        async for chunk in response.body_iterator:
            chunks.append(chunk)
            if stopper is None:
                hold.set()
                stopper = asyncio.get_running_loop().run_in_executor(None, loop.stop, 30)
        await stopper
        return chunks

    try:
        chunks = asyncio.run(asyncio.wait_for(stream_then_stop(), 60))
    finally:
        loop.stop()
    assert chunks[-1] == "data: [DONE]\n\n", chunks
    bodies = [json.loads(c[6:]) for c in chunks[:-1]]
    assert bodies[-2]["choices"][0]["finish_reason"] == "abort", bodies
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"] > 0


class _LoopThatAnswersOutOfOrder:
    """An ``EngineLoop`` stand-in whose engine thread ran choice 0 to its end
    before it took choice 1: its final ``Delta`` reaches the sink between the
    two ``Accepted``\\ s."""

    error = None

    def __init__(self):
        self.aborted = []

    def submit(self, requests, sink):
        sink(Accepted(0))
        sink(Delta(0, "a", 1, "length"))
        sink(Accepted(1))
        sink(Delta(1, "b", 1, None))
        sink(Delta(1, "c", 2, "length"))
        return ["r0", "r1"]

    def abort(self, ids):
        self.aborted.extend(ids)


def test_start_keeps_a_delta_that_comes_before_another_choices_acceptance():
    """``start()`` waited for every choice's Accepted and dropped what came
    between: choice 0's final Delta was lost and its handler waited forever."""
    loop = _LoopThatAnswersOutOfOrder()
    params = SamplingParams(max_tokens=2)

    async def run():
        ids, events = await start(loop, [([5], params), ([6], params)])
        return ids, [events.get_nowait() for _ in range(events.qsize())]

    ids, left = asyncio.run(run())
    assert ids == ["r0", "r1"] and not loop.aborted
    assert left == [Delta(0, "a", 1, "length"), Delta(1, "b", 1, None), Delta(1, "c", 2, "length")]

    async def stream():  # the whole handler: both choices end, then [DONE]
        response = await respond(loop, "tiny", None, [([5], params), ([6], params)], stream=True, chat=False,
                                 include_usage=True)  # fmt: skip
        return [chunk async for chunk in response.body_iterator]

    chunks = asyncio.run(asyncio.wait_for(stream(), 10))
    assert chunks[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(c[6:]) for c in chunks[:-1]]
    assert [(b["choices"][0]["index"], b["choices"][0]["text"], b["choices"][0]["finish_reason"])
            for b in bodies[:-1]] == [(0, "a", "length"), (1, "b", None), (1, "c", "length")]  # fmt: skip
    assert bodies[-1]["usage"]["completion_tokens"] == 3


def test_a_choice_that_ends_before_the_next_is_taken_still_ends(ckpt, monkeypatch):
    """With a real loop: ``submit`` queued one "add" per choice, so the engine
    thread could take, step and finish choice 0 before choice 1's "add" was
    queued (forced here by a slow record for choice 1, as a thread switch
    between two puts does), and ``start()`` dropped choice 0's last Delta.
    The choices are now one command; every choice's last Delta reaches the
    handler."""
    import torch_vkv.serving.server.loop as loop_module

    real_stream = loop_module._Stream

    def slow_second_stream(index, *args, **kwargs):
        if index == 1:
            time.sleep(0.5)
        return real_stream(index, *args, **kwargs)

    monkeypatch.setattr(loop_module, "_Stream", slow_second_stream)
    loop = EngineLoop(_llm(ckpt))
    loop.start()
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    async def both():
        ids, events = await start(loop, [([5, 6, 7], params), ([8, 9, 10], params)])
        reasons = [None, None]
        while None in reasons:
            ev = await asyncio.wait_for(events.get(), 10)
            if isinstance(ev, Delta):
                reasons[ev.index] = ev.finish_reason
        return reasons

    try:
        assert asyncio.run(both()) == ["length", "length"]
    finally:
        loop.stop()


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
