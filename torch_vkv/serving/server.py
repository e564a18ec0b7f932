"""An OpenAI-compatible HTTP server on the engine: ``python -m torch_vkv serve --model PATH``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as
server-sent events with ``stream: true``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text format). See ``docs/serving.md``, "HTTP API".

Threads::

    asyncio event loop (uvicorn, FastAPI)           engine loop thread (owns the Engine)
    handler: validate, tokenize ----- commands -->  add_request / abort
             await its asyncio.Queue <-- events --  step(); detokenize; stop strings
                       (loop.call_soon_threadsafe)

The engine is touched only by its thread; a request waits on its own queue, so
no request blocks another's tokens. A client that goes away mid-stream has its
request aborted (its pages return). SIGINT/SIGTERM abort every request in
flight, end the streams, then close the engine; the process exits with 0.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run time.
import argparse
import asyncio
import json
import logging
import queue
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from torch_vkv._checks import non_negative_int_arg as _non_negative
from torch_vkv._checks import positive_int_arg as _positive
from torch_vkv.serving.llm import LLM, TextStream
from torch_vkv.serving.outputs import RequestOutput
from torch_vkv.serving.params import SamplingParams

__all__ = ["EngineLoop", "QueueFullError", "create_app", "main", "serve"]

log = logging.getLogger("torch_vkv.serve")

DEFAULT_MAX_WAITING = 256


class QueueFullError(RuntimeError):
    """The server holds ``max_batch_size + max_waiting`` unfinished requests (HTTP 503)."""


# ----------------------------------------------------------------- engine loop
@dataclass
class _Accepted:
    index: int


@dataclass
class _Rejected:
    index: int
    message: str


@dataclass
class _Delta:
    index: int
    text: str
    num_tokens: int
    finish_reason: Optional[str]


@dataclass
class _Failed:
    message: str


@dataclass
class _Stream:
    """The engine thread's record of one request."""

    index: int
    sink: Callable[[Any], None]
    num_prompt_tokens: int
    text: Optional[TextStream] = None  # set when the engine accepts the request


class EngineLoop:
    """Runs an :class:`LLM`'s engine in its own thread.

    :meth:`submit` and :meth:`abort` may be called from any thread; events
    (``_Accepted``/``_Rejected`` once, then ``_Delta``\\ s, the last with a
    ``finish_reason``) reach the request's ``sink`` from the engine thread.

    Args:
        llm: the engine and its tokenizer; the loop owns the engine while it runs.
        max_waiting: requests allowed to wait beyond the ``max_batch_size``
            running ones; more answer :class:`QueueFullError`.
        on_finish: called in the engine thread with every finished request's
            final ``RequestOutput`` and its reason (metrics).
    """

    def __init__(self, llm: LLM, *, max_waiting: int = DEFAULT_MAX_WAITING,
                 on_finish: Optional[Callable[[RequestOutput, str, int], None]] = None) -> None:  # fmt: skip
        self.llm = llm
        self.engine = llm.engine
        self.max_in_flight = self.engine.max_batch_size + max_waiting
        self._on_finish = on_finish
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted, not finished (under _lock)
        self._accepting = True
        self.stats: dict[str, Any] = dict(self.engine.stats(), num_pending=0)  # a snapshot, replaced per iteration
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="torch_vkv-engine", daemon=True)

    # ------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def submit(self, requests: Sequence[tuple[list[int], SamplingParams]], sink: Callable[[Any], None]) -> list[str]:
        """Queues ``requests`` (prompt ids, params) as choices ``0..k-1`` of one
        client request; raises :class:`QueueFullError` (nothing queued) when
        they do not fit, ``RuntimeError`` when the server is shutting down."""
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the engine failed: {self.error}")
            if not self._accepting:
                raise RuntimeError("the server is shutting down")
            if self._in_flight + len(requests) > self.max_in_flight:
                raise QueueFullError(
                    f"the server is full: {self._in_flight} requests in flight, at most {self.max_in_flight} "
                    "(max_batch_size + max_waiting); retry later"
                )
            self._in_flight += len(requests)
        ids = [f"{uuid.uuid4().hex}-{i}" for i in range(len(requests))]
        for i, (rid, (prompt, params)) in enumerate(zip(ids, requests)):
            self._commands.put(("add", rid, prompt, params, _Stream(i, sink, len(prompt))))
        return ids

    def abort(self, request_ids: Sequence[str]) -> None:
        """Aborts requests (those already finished are ignored)."""
        for rid in request_ids:
            self._commands.put(("abort", rid))

    def abort_all(self) -> None:
        """Stops accepting requests and aborts every one in flight (shutdown)."""
        with self._lock:
            self._accepting = False
        self._commands.put(("abort_all",))

    def stop(self, timeout: float = 10.0) -> None:
        """Aborts everything, ends the thread and closes the engine."""
        self.abort_all()
        self._commands.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # ---------------------------------------------------------- engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            if engine.device.type == "cuda":  # the current device is per thread
                import torch

                torch.cuda.set_device(engine.device)
            while True:
                busy = engine.has_unfinished_requests()
                if self._drain(block=not busy):
                    break
                if engine.has_unfinished_requests():
                    self._deliver(engine.step())
                with self._lock:
                    pending = self._in_flight
                stats = engine.stats()
                stats["num_pending"] = pending
                self.stats = stats
        except BaseException as exc:  # the engine failed: every request ends with an error
            log.exception("engine loop failed")
            with self._lock:
                self.error = exc
            for s in self._streams.values():
                s.sink(_Failed(f"engine failure: {exc}"))
            self._streams.clear()
        self._answer_queued()

    def _answer_queued(self) -> None:
        """After the loop ends: requests still queued are refused (their handlers wait)."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                self._release(1)
                cmd[4].sink(_Rejected(cmd[4].index, "the server is shutting down"))

    def _drain(self, block: bool) -> bool:
        """Runs queued commands (waiting for one when ``block``); True on "stop"."""
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            kind = cmd[0]
            if kind == "add":
                _, rid, prompt, params, stream = cmd
                self._add(rid, prompt, params, stream)
            elif kind == "abort":
                if cmd[1] in self._streams:
                    self.engine.abort(cmd[1])
            elif kind == "abort_all":
                for rid in list(self._streams):
                    self.engine.abort(rid)
            elif kind == "stop":
                return True
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return False

    def _add(self, rid: str, prompt: list[int], params: SamplingParams, stream: _Stream) -> None:
        if not self._accepting:
            self._release(1)
            stream.sink(_Rejected(stream.index, "the server is shutting down"))
            return
        try:
            self.engine.add_request(prompt, params, request_id=rid)
        except (ValueError, TypeError) as exc:
            self._release(1)
            stream.sink(_Rejected(stream.index, str(exc)))
            return
        stream.text = TextStream(self.llm.tokenizer, prompt, params.stop)
        self._streams[rid] = stream
        stream.sink(_Accepted(stream.index))

    def _release(self, n: int) -> None:
        with self._lock:
            self._in_flight -= n

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # ended by a stop string already
            completion = out.outputs[0]
            delta = stream.text.update(completion.token_ids, out.finished)
            reason = completion.finish_reason
            if stream.text.stopped:
                if not out.finished:
                    self.engine.abort(out.request_id)  # pages return now; its "abort" output is ignored
                reason = "stop"
            n = len(completion)
            if delta or reason is not None:
                stream.sink(_Delta(stream.index, delta, n, reason))
            if reason is not None:
                del self._streams[out.request_id]
                self._release(1)
                if self._on_finish is not None:
                    self._on_finish(out, reason, stream.num_prompt_tokens)


# ------------------------------------------------------------------ metrics
def _make_registry(loop: EngineLoop, model_name: str):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    labels = {"model_name": model_name}
    ln = list(labels)

    def gauge(name: str, doc: str, key: str) -> None:
        Gauge(name, doc, ln, registry=reg).labels(**labels).set_function(lambda: float(loop.stats.get(key) or 0))

    gauge("vkv_num_requests_running", "Requests running in the engine (holding a slot).", "num_running")
    Gauge("vkv_num_requests_waiting", "Requests waiting: queued in the engine or not yet handed to it.", ln,
          registry=reg).labels(**labels).set_function(
        lambda: float(max(loop.stats.get("num_pending", 0) - loop.stats.get("num_running", 0),
                          loop.stats.get("num_waiting", 0))))  # fmt: skip
    gauge("vkv_kv_committed_bytes", "Physical KV memory held (freed slots' cached pages included).", "committed_bytes")
    gauge("vkv_kv_used_bytes", "K/V bytes of running requests' computed tokens.", "used_bytes")
    gauge("vkv_kv_memory_budget_bytes", "The KV memory budget (0: a static cache's size).", "memory_budget")
    gauge("vkv_num_preemptions_total", "Preemptions so far (recompute).", "num_preemptions")
    buckets_ttft = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
    buckets_tpot = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                    0.5, 0.75, 1.0, 2.5)  # fmt: skip
    ttft = Histogram("vkv_time_to_first_token_seconds", "Time to first token (arrival in the engine to first token).",
                     ln, buckets=buckets_ttft, registry=reg).labels(**labels)  # fmt: skip
    tpot = Histogram("vkv_time_per_output_token_seconds", "Mean time per output token after the first, per request.",
                     ln, buckets=buckets_tpot, registry=reg).labels(**labels)  # fmt: skip
    e2e = Histogram("vkv_e2e_request_latency_seconds", "End-to-end request latency in the engine.", ln,
                    buckets=(0.1, 0.3, 0.5, 1, 2, 5, 10, 20, 40, 60, 120, 300),
                    registry=reg).labels(**labels)  # fmt: skip
    prompt_tokens = Counter("vkv_prompt_tokens", "Prompt tokens of finished requests.", ln,
                            registry=reg).labels(**labels)  # fmt: skip
    gen_tokens = Counter("vkv_generation_tokens", "Generated tokens of finished requests.", ln,
                         registry=reg).labels(**labels)  # fmt: skip
    success = Counter("vkv_request_success", "Finished requests by finish reason (stop, length, abort).",
                      ln + ["finished_reason"], registry=reg)  # fmt: skip
    for reason in ("stop", "length", "abort"):
        success.labels(finished_reason=reason, **labels)

    def on_finish(out: RequestOutput, reason: str, num_prompt: int) -> None:
        m = out.metrics
        n = len(out.outputs[0])
        if m.first_token_time is not None:
            ttft.observe(m.first_token_time - m.arrival_time)
            if n > 1 and m.finished_time is not None:
                tpot.observe((m.finished_time - m.first_token_time) / (n - 1))
        if m.finished_time is not None:
            e2e.observe(m.finished_time - m.arrival_time)
        prompt_tokens.inc(num_prompt)
        gen_tokens.inc(n)
        success.labels(finished_reason=reason, **labels).inc()

    return reg, on_finish


# ------------------------------------------------------------------ schemas
class _Base(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # strict: "5" is not an int, true is not 1


class StreamOptions(_Base):
    include_usage: bool = True


class _SamplingFields(_Base):
    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1)  # an extension (vLLM's)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None  # an extension (vLLM's)
    ignore_eos: bool = False  # an extension (vLLM's, SGLang's)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[Union[bool, int]] = None
    user: Optional[str] = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: OpenAI's fields (those that apply) and extensions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=1)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: Optional[Union[str, list[TextPart]]] = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[Union[str, int]] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------- app
def create_app(
    llm: LLM,
    *,
    served_model_name: Optional[str] = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    loop: Optional[EngineLoop] = None,
):
    """A FastAPI app serving ``llm``. The engine loop thread starts with the
    app (lifespan) and stops with it, closing the engine.

    Args:
        llm: the engine and its tokenizer.
        served_model_name: the name clients use as ``model`` (default the
            model's ``name_or_path``).
        max_waiting: requests allowed to wait beyond ``max_batch_size``
            running ones; more answer 503.
        loop: an :class:`EngineLoop` to use (default: a new one).
    """
    engine = llm.engine
    name = served_model_name or str(getattr(engine.model, "name_or_path", "") or "model")
    if loop is None:
        loop = EngineLoop(llm, max_waiting=max_waiting)
    registry, on_finish = _make_registry(loop, name)
    loop._on_finish = on_finish
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not loop._thread.is_alive():
            loop.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, loop.stop)

    app = FastAPI(title="torch_vkv", lifespan=lifespan)
    app.state.engine_loop = loop
    app.state.served_model_name = name

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, exc: _HTTPError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        # Union members add their type to the location ("stop", "str"): keep the field path.
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
        param = ".".join(loc) or None
        msg = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        got = first.get("input")
        if param is not None and not isinstance(got, (dict, list)):
            msg += f", got {json.dumps(got) if _jsonable(got) else repr(got)}"
        return JSONResponse(_error_body(msg, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_error_body(f"no route {request.method} {request.url.path}", "not_found_error",
                                        None, "not_found"), status_code=404)  # fmt: skip

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
        body = _error_body(f"method {request.method} not allowed on {request.url.path}", "invalid_request_error",
                           None, "method_not_allowed")  # fmt: skip
        return JSONResponse(body, status_code=405)

    # ---------------------------------------------------------------- info
    @app.get("/health")
    async def health() -> Response:
        if not loop.alive:
            return JSONResponse(_error_body("the engine loop is not running", "server_error", None, "engine_dead"),
                                status_code=503)  # fmt: skip
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": created, "owned_by": "torch_vkv",
            "max_model_len": engine.max_seq_len,
        }]}  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------- helpers
    def check_model(req: Any) -> None:
        if req.model is not None and req.model != name:
            raise _HTTPError(404, f"model: expected {name!r} (see /v1/models), got {req.model!r}",
                             "invalid_request_error", "model", "model_not_found")  # fmt: skip

    def sampling(req: Any, max_tokens: int) -> SamplingParams:
        if req.n != 1:
            raise _HTTPError(400, f"n: expected 1 (one choice per prompt; the Engine supports n > 1), got {req.n}",
                             param="n", code="unsupported")  # fmt: skip
        for field_name in ("presence_penalty", "frequency_penalty"):
            v = getattr(req, field_name)
            if v not in (None, 0, 0.0):
                raise _HTTPError(400, f"{field_name}: expected 0 or null (penalties are not supported), got {v}",
                                 param=field_name, code="unsupported")  # fmt: skip
        if req.logprobs not in (None, False, 0):
            raise _HTTPError(400, f"logprobs: expected null (not supported), got {req.logprobs}",
                             param="logprobs", code="unsupported")  # fmt: skip
        kw: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": req.ignore_eos}
        for k in ("temperature", "top_p", "top_k", "seed", "stop"):
            v = getattr(req, k)
            if v is not None:
                kw[k] = v
        if req.stop_token_ids:
            kw["stop_token_ids"] = tuple(req.stop_token_ids)
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as exc:
            param = str(exc).split(":", 1)[0].split(" ")[0]
            raise _HTTPError(400, str(exc), param=param, code="invalid_value") from None

    def check_prompt(ids: list[int], param: str) -> None:
        if not ids:
            raise _HTTPError(400, f"{param}: expected at least one token, got an empty prompt", param=param,
                             code="invalid_value")  # fmt: skip
        if len(ids) >= engine.max_seq_len:
            raise _HTTPError(400, f"{param}: expected fewer than max_seq_len={engine.max_seq_len} tokens, got "
                             f"{len(ids)} tokens", param=param, code="context_length_exceeded")  # fmt: skip
        bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise _HTTPError(400, f"{param}: expected token ids in [0, {engine.vocab_size}), got {bad}",
                             param=param, code="invalid_value")  # fmt: skip

    async def start(reqs: list[tuple[list[int], SamplingParams]]) -> tuple[list[str], asyncio.Queue]:
        """Hands the requests to the engine thread; returns their ids and the
        event queue once the engine accepted all of them."""
        aloop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event: Any) -> None:
            try:
                aloop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed (shutdown)
                pass

        try:
            ids = loop.submit(reqs, sink)
        except QueueFullError as exc:
            raise _HTTPError(503, str(exc), "service_unavailable", None, "queue_full") from None
        except RuntimeError as exc:
            raise _HTTPError(503, str(exc), "service_unavailable", None, "shutting_down") from None
        waiting, rejected = set(range(len(reqs))), None
        try:
            while waiting:
                ev = await events.get()
                if isinstance(ev, _Accepted):
                    waiting.discard(ev.index)
                elif isinstance(ev, _Rejected):
                    waiting.discard(ev.index)
                    rejected = rejected or ev.message
                elif isinstance(ev, _Failed):
                    raise _HTTPError(500, ev.message, "server_error", None, "engine_failure")
        except BaseException:
            loop.abort(ids)
            raise
        if rejected is not None:
            loop.abort(ids)
            raise _HTTPError(400, rejected, param="prompt", code="invalid_value")
        return ids, events

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    async def respond(raw: Request, reqs: list[tuple[list[int], SamplingParams]], stream: bool, chat: bool,
                      include_usage: bool) -> Any:  # fmt: skip
        ids, events = await start(reqs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        num_prompt = sum(len(p) for p, _ in reqs)
        k = len(reqs)

        if not stream:
            texts, tokens, reasons = [""] * k, [0] * k, [None] * k
            try:
                while any(r is None for r in reasons):
                    try:
                        ev = await asyncio.wait_for(events.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await raw.is_disconnected():  # nobody waits for the answer: free the pages
                            return Response(status_code=499)
                        continue
                    if isinstance(ev, _Failed):
                        raise _HTTPError(500, ev.message, "server_error", None, "engine_failure")
                    if isinstance(ev, _Delta):
                        texts[ev.index] += ev.text
                        tokens[ev.index] = ev.num_tokens
                        reasons[ev.index] = ev.finish_reason
            finally:
                if any(r is None for r in reasons):
                    loop.abort(ids)
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                            "finish_reason": reasons[i]} for i in range(k)]  # fmt: skip
            else:
                choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                           for i in range(k)]  # fmt: skip
            return {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": choices,
                    "usage": usage(num_prompt, sum(tokens))}  # fmt: skip

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, **extra: Any) -> str:
            body = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": name, "choices": choices}
            body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse() -> AsyncIterator[str]:
            tokens, done = [0] * k, [False] * k
            try:
                if chat:
                    for i in range(k):
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}])  # fmt: skip
                while not all(done):
                    ev = await events.get()
                    if isinstance(ev, _Failed):
                        yield f"data: {json.dumps(_error_body(ev.message, 'server_error', None, 'engine_failure'))}\n\n"
                        return
                    if not isinstance(ev, _Delta):
                        continue
                    tokens[ev.index] = ev.num_tokens
                    done[ev.index] = ev.finish_reason is not None
                    if chat:
                        delta = {"content": ev.text} if ev.text else {}
                        c = {"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": ev.finish_reason}
                    else:
                        c = {"index": ev.index, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
                    yield chunk([c])
                if include_usage:
                    yield chunk([], usage=usage(num_prompt, sum(tokens)))
                yield "data: [DONE]\n\n"
            finally:
                if not all(done):  # the client went away (or the server stops): free the pages now
                    loop.abort(ids)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    # ------------------------------------------------------------ endpoints
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Any:  # type: ignore[valid-type]
        check_model(body)
        if body.echo or (body.best_of not in (None, 1)) or body.suffix:
            param = "echo" if body.echo else "best_of" if body.best_of not in (None, 1) else "suffix"
            raise _HTTPError(400, f"{param}: not supported, got {getattr(body, param)!r}", param=param,
                             code="unsupported")  # fmt: skip
        p = body.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)) or not p:
            prompts = [p]
        else:
            prompts = list(p)
        ids = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            toks = list(llm.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)
            check_prompt(toks, param)
            ids.append(toks)
        params = sampling(body, body.max_tokens if body.max_tokens is not None else 16)
        include_usage = body.stream_options.include_usage if body.stream_options is not None else True
        return await respond(raw, [(t, params) for t in ids], body.stream, False, include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Any:  # type: ignore[valid-type]
        check_model(body)
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            ids = llm.apply_chat_template(messages)
        except (ValueError, TypeError) as exc:
            raise _HTTPError(400, str(exc), param="messages", code="invalid_value") from None
        except Exception as exc:  # a template error (jinja2)
            raise _HTTPError(400, f"messages: the chat template failed: {exc}", param="messages",
                             code="invalid_value") from None  # fmt: skip
        check_prompt(ids, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_seq_len - len(ids))
        params = sampling(body, max_tokens)
        include_usage = body.stream_options.include_usage if body.stream_options is not None else True
        return await respond(raw, [(ids, params)], body.stream, True, include_usage)

    return app


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|.*[\[\]-].*)$")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- serving
def serve(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Runs ``app`` with uvicorn until SIGINT/SIGTERM. On a signal, every
    request in flight is aborted at once (their streams end with
    ``finish_reason="abort"``), then connections close, the engine loop stops
    and the engine is closed; returns normally (exit status 0)."""
    import uvicorn

    loop: EngineLoop = app.state.engine_loop

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn would re-raise the signal after its shutdown (exit status
            # 128 + sig); a requested shutdown is a clean exit here.
            loop.abort_all()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="on")  # fmt: skip
    _Server(config).run()


def _parse_bytes(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}  # fmt: skip
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    unit = t[len(num) :]
    try:
        if unit not in units:
            raise ValueError
        value = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes (e.g. 4096, 64KiB, 8GiB), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


DTYPES = ("auto", "float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    from torch_vkv.attention import BACKENDS
    from torch_vkv.cache import LAYOUTS
    from torch_vkv.serving.engine import KV_KINDS

    p = argparse.ArgumentParser(prog="python -m torch_vkv serve",
                                description="An OpenAI-compatible HTTP server on the torch_vkv engine.")  # fmt: skip
    p.add_argument("--model", required=True, help="local checkpoint path (transformers causal LM)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--max-waiting", type=_non_negative, default=DEFAULT_MAX_WAITING,
                   help="requests allowed to wait beyond the running ones; more answer 503 (default %(default)s)")
    e = p.add_argument_group("engine")
    e.add_argument("--kv", choices=KV_KINDS, default="virtual")
    e.add_argument("--layout", choices=LAYOUTS, default="per_layer")
    e.add_argument("--max-batch-size", type=_positive, default=16)
    e.add_argument("--max-seq-len", type=_positive, default=None,
                   help="default: the model's max_position_embeddings, at most 8192")
    e.add_argument("--memory-budget", type=_parse_bytes, default=None, help="KV memory in bytes (4096, 512MiB, 8GiB)")
    e.add_argument("--page-size", type=_parse_bytes, default=None, help="host backend page size in bytes")
    e.add_argument("--block-size", type=_positive, default=16, help="tokens per block (--kv paged)")
    e.add_argument("--chunk-size", type=_positive, default=512, help="token budget of one iteration")
    e.add_argument("--attention-backend", choices=tuple(dict.fromkeys(("auto", *BACKENDS))), default="auto")
    e.add_argument("--no-cuda-graphs", action="store_true", help="do not replay CUDA graphs for decodes")
    e.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    e.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    kwargs: dict[str, Any] = {
        "kv": args.kv, "layout": args.layout, "max_batch_size": args.max_batch_size,
        "memory_budget": args.memory_budget, "page_size": args.page_size, "block_size": args.block_size,
        "chunk_size": args.chunk_size, "attention_backend": args.attention_backend,
        "cuda_graphs": not args.no_cuda_graphs, "device": args.device,
        "dtype": None if args.dtype == "auto" else getattr(torch, args.dtype),
    }  # fmt: skip
    if args.max_seq_len is not None:
        kwargs["max_seq_len"] = args.max_seq_len
    llm = LLM(args.model, tokenizer=args.tokenizer, **kwargs)
    app = create_app(llm, served_model_name=args.served_model_name or args.model, max_waiting=args.max_waiting)
    log.info("serving %s on http://%s:%d (max_batch_size=%d, max_seq_len=%d, kv=%s)", app.state.served_model_name,
             args.host, args.port, llm.engine.max_batch_size, llm.engine.max_seq_len, args.kv)  # fmt: skip
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
