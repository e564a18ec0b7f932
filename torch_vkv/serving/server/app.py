"""``create_app``: the FastAPI app and its routes.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (answered
by :mod:`~torch_vkv.serving.server.streaming`), ``GET /v1/models``,
``GET /health``, ``GET /metrics``. Requests are checked here (model name,
sampling fields, prompt length and token ids) before they reach the engine
thread, so a bad request costs the engine nothing.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run time.
import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from torch_vkv.serving.llm import LLM
from torch_vkv.serving.params import SamplingParams
from torch_vkv.serving.server.loop import DEFAULT_MAX_WAITING, EngineLoop
from torch_vkv.serving.server.metrics import make_registry
from torch_vkv.serving.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    HTTPError,
    error_body,
    validation_error_body,
)
from torch_vkv.serving.server.streaming import respond

#: Stop strings a request may give, and their length: every generated token is matched against each.
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1024

__all__ = ["create_app"]


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
    registry, on_finish = make_registry(loop, name)
    loop._on_finish = on_finish
    created = int(time.time())
    # Prompts are tokenized off the event loop (a megabyte of text takes seconds: /health and every stream
    # would wait), in one thread: a fast tokenizer's settings are not safe to change from several at once.
    tokenize = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vkv-tokenize")

    async def off_loop(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(tokenize, fn, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not loop._thread.is_alive():
            loop.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, loop.stop)
            tokenize.shutdown(wait=False)

    app = FastAPI(title="torch_vkv", lifespan=lifespan)
    app.state.engine_loop = loop
    app.state.served_model_name = name

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        content_type = request.headers.get("content-type", "")
        if errors and tuple(errors[0].get("loc", ())) == ("body",) and "json" not in content_type.lower():
            # FastAPI reads a body as JSON only when the request says so: the fix is the header.
            body = error_body(f"body: expected a JSON object sent with Content-Type: application/json, got "
                              f"Content-Type: {content_type or '(none)'}", "invalid_request_error", None,
                              "invalid_content_type")  # fmt: skip
            return JSONResponse(body, status_code=400)
        return JSONResponse(validation_error_body(errors), status_code=400)

    @app.exception_handler(400)
    async def _bad_body(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's own 400s, e.g. a body that is not UTF-8 ("There was an error parsing the body").
        detail = getattr(exc, "detail", None) or "bad request"
        body = error_body(f"body: expected a UTF-8 JSON object, got a body that could not be read ({detail})",
                          "invalid_request_error", None, "invalid_json")  # fmt: skip
        return JSONResponse(body, status_code=400)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}", "not_found_error",
                                        None, "not_found"), status_code=404)  # fmt: skip

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
        body = error_body(f"method {request.method} not allowed on {request.url.path}", "invalid_request_error",
                           None, "method_not_allowed")  # fmt: skip
        return JSONResponse(body, status_code=405)

    # ---------------------------------------------------------------- info
    @app.get("/health")
    async def health() -> Response:
        if not loop.alive:
            return JSONResponse(error_body("the engine loop is not running", "server_error", None, "engine_dead"),
                                status_code=503)  # fmt: skip
        return Response(status_code=200)

    def model_card() -> dict:
        # max_model_len as vLLM's card has it; vocab_size: token-id prompts must lie below it (bench serve's load
        # client reads it for its random prompts).
        return {"id": name, "object": "model", "created": created, "owned_by": "torch_vkv",
                "max_model_len": engine.max_seq_len, "vocab_size": engine.vocab_size}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")  # :path: a served name may hold "/" ("org/model")
    async def model(model_id: str) -> dict:
        if model_id != name:
            raise HTTPError(404, f"model: expected {name!r} (see /v1/models), got {model_id!r}",
                             "invalid_request_error", "model", "model_not_found")  # fmt: skip
        return model_card()

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------- helpers
    def check_model(req: Any) -> None:
        if req.model is not None and req.model != name:
            raise HTTPError(404, f"model: expected {name!r} (see /v1/models), got {req.model!r}",
                             "invalid_request_error", "model", "model_not_found")  # fmt: skip

    def sampling(req: Any, max_tokens: int) -> SamplingParams:
        if req.n != 1:
            raise HTTPError(400, f"n: expected 1 (one choice per prompt; the Engine supports n > 1), got {req.n}",
                             param="n", code="unsupported")  # fmt: skip
        for field_name in ("presence_penalty", "frequency_penalty"):
            v = getattr(req, field_name)
            if v not in (None, 0, 0.0):
                raise HTTPError(400, f"{field_name}: expected 0 or null (penalties are not supported), got {v}",
                                 param=field_name, code="unsupported")  # fmt: skip
        if req.logprobs not in (None, False, 0):
            raise HTTPError(400, f"logprobs: expected null (not supported), got {req.logprobs}",
                             param="logprobs", code="unsupported")  # fmt: skip
        if req.logit_bias:
            raise HTTPError(400, f"logit_bias: expected null or {{}} (not supported), got {len(req.logit_bias)} "
                             "biased token(s)", param="logit_bias", code="unsupported")  # fmt: skip
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            # Each generated token is matched against every stop string in the engine thread: an unbounded
            # list slowed every other request 31x (4 requests of 2000 strings of 2000 characters).
            raise HTTPError(400, f"stop: expected at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                             f"characters, got {len(stops)} string(s), the longest of {max(map(len, stops))}",
                             param="stop", code="invalid_value")  # fmt: skip
        bad = next((t for t in req.stop_token_ids or () if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise HTTPError(400, f"stop_token_ids: expected token ids in [0, {engine.vocab_size}), got {bad}",
                             param="stop_token_ids", code="invalid_value")  # fmt: skip
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
            raise HTTPError(400, str(exc), param=param, code="invalid_value") from None

    def check_prompt(ids: list[int], param: str) -> None:
        if not ids:
            raise HTTPError(400, f"{param}: expected at least one token, got an empty prompt", param=param,
                             code="invalid_value")  # fmt: skip
        if len(ids) >= engine.max_seq_len:
            raise HTTPError(400, f"{param}: expected fewer than max_seq_len={engine.max_seq_len} tokens, got "
                             f"{len(ids)} tokens", param=param, code="context_length_exceeded")  # fmt: skip
        bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise HTTPError(400, f"{param}: expected token ids in [0, {engine.vocab_size}), got {bad}",
                             param=param, code="invalid_value")  # fmt: skip

    # ------------------------------------------------------------ endpoints
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Any:  # type: ignore[valid-type]
        check_model(body)
        if body.echo or (body.best_of not in (None, 1)) or body.suffix:
            param = "echo" if body.echo else "best_of" if body.best_of not in (None, 1) else "suffix"
            raise HTTPError(400, f"{param}: not supported, got {getattr(body, param)!r}", param=param,
                             code="unsupported")  # fmt: skip
        p = body.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)) or not p:
            prompts = [p]
        else:
            prompts = list(p)
        if len(prompts) > loop.max_in_flight:  # 503 would say "retry later", and no retry could ever fit them
            raise HTTPError(400, f"prompt: expected at most {loop.max_in_flight} prompts (max_batch_size + "
                             f"max_waiting), got {len(prompts)}", param="prompt", code="invalid_value")  # fmt: skip
        ids = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            try:
                toks = await off_loop(llm.encode, prompt) if isinstance(prompt, str) else llm.encode(prompt)
            except ValueError as exc:  # text a tokenizer cannot take (a lone surrogate)
                raise HTTPError(400, f"{param}: {str(exc).split(': ', 1)[-1]}", param=param,
                                code="invalid_value") from None  # fmt: skip
            check_prompt(toks, param)
            ids.append(toks)
        params = sampling(body, body.max_tokens if body.max_tokens is not None else 16)
        include_usage = body.stream_options.include_usage if body.stream_options is not None else True
        return await respond(loop, name, raw, [(t, params) for t in ids], body.stream, False, include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Any:  # type: ignore[valid-type]
        check_model(body)
        form = (body.response_format or {}).get("type", "text")
        if form != "text":
            raise HTTPError(400, f'response_format: expected {{"type": "text"}} (no constrained decoding), got '
                             f"type {form!r}", param="response_format", code="unsupported")  # fmt: skip
        for field_name in ("tools", "functions"):
            if getattr(body, field_name):
                raise HTTPError(400, f"{field_name}: expected null or [] (tool calls are not supported), got "
                                 f"{len(getattr(body, field_name))} item(s)", param=field_name,
                                 code="unsupported")  # fmt: skip
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            ids = await off_loop(llm.apply_chat_template, messages)
        except (ValueError, TypeError) as exc:
            raise HTTPError(400, str(exc), param="messages", code="invalid_value") from None
        except Exception as exc:  # a template error (jinja2)
            raise HTTPError(400, f"messages: the chat template failed: {exc}", param="messages",
                             code="invalid_value") from None  # fmt: skip
        check_prompt(ids, "messages")
        # By default the rest of what one request can reach: max_seq_len, or less when the KV budget holds less.
        longest = engine.kv.longest_alone(engine.max_seq_len)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, longest - len(ids))
        params = sampling(body, max_tokens)
        include_usage = body.stream_options.include_usage if body.stream_options is not None else True
        return await respond(loop, name, raw, [(ids, params)], body.stream, True, include_usage)

    return app
