"""Answers to completion requests: hand them to the engine loop, then one JSON
body or a server-sent event stream (``stream: true``).

Each client request gets its own ``asyncio.Queue``, fed from the engine thread
with ``loop.call_soon_threadsafe``, so no request waits on another's tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from torch_vkv.serving.params import SamplingParams
from torch_vkv.serving.server.loop import EngineLoop, QueueFullError, Accepted, Delta, Failed, Rejected
from torch_vkv.serving.server.protocol import HTTPError, error_body

__all__ = ["DISCONNECT_CHECK_S", "respond", "start", "usage"]

DISCONNECT_CHECK_S = 1.0  # how often a non-streamed request asks whether its client is still there


async def start(loop: EngineLoop, reqs: list[tuple[list[int], SamplingParams]],
                prompt_param: str = "prompt") -> tuple[list[str], asyncio.Queue]:
    """Hands the requests to the engine thread; returns their ids and the
    event queue once the engine accepted all of them. A request the engine
    refuses answers a 400 naming ``prompt_param`` (``messages`` for chat).
    Events that arrive while it waits (a choice's ``Delta``, even its last)
    stay in the queue, in their order, for the caller."""
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
        raise HTTPError(503, str(exc), "service_unavailable", None, "queue_full") from None
    except RuntimeError as exc:  # the engine failed, or the server is going away
        code = "engine_failure" if loop.error is not None else "shutting_down"
        raise HTTPError(503, str(exc), "service_unavailable", None, code) from None
    waiting, rejected = set(range(len(reqs))), None
    early: list[Any] = []  # a choice's Deltas that came before another choice's answer: the caller's
    try:
        while waiting:
            ev = await events.get()
            if isinstance(ev, Accepted):
                waiting.discard(ev.index)
            elif isinstance(ev, Rejected):
                waiting.discard(ev.index)
                rejected = rejected or ev
            elif isinstance(ev, Failed):
                raise HTTPError(500, ev.message, "server_error", None, "engine_failure")
            else:
                early.append(ev)
    except BaseException:
        loop.abort(ids)
        raise
    if rejected is not None:
        loop.abort(ids)
        if rejected.shutting_down:  # submitted just before shutdown began: retryable elsewhere, not a bad prompt
            code = "engine_failure" if loop.error is not None else "shutting_down"  # or before the engine failed
            raise HTTPError(503, rejected.message, "service_unavailable", None, code)
        raise HTTPError(400, rejected.message, param=prompt_param, code="invalid_value")
    if early:  # put them back ahead of what came since, in order (no await here: the engine thread's
        # events reach the queue only through this event loop, so none lands in between)
        later = [events.get_nowait() for _ in range(events.qsize())]
        for ev in early + later:
            events.put_nowait(ev)
    return ids, events

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's ``usage`` field."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

async def respond(loop: EngineLoop, name: str, raw: Request, reqs: list[tuple[list[int], SamplingParams]],
                  stream: bool, chat: bool, include_usage: bool) -> Any:  # fmt: skip
    """Runs ``reqs`` (the choices of one client request) and answers: one JSON
    body, or with ``stream`` a server-sent event stream (a chunk per text delta,
    then usage when ``include_usage``, then ``[DONE]``). A client that goes
    away has its requests aborted (their pages return). ``name``: the model
    name in the answers."""
    ids, events = await start(loop, reqs, "messages" if chat else "prompt")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    obj = "chat.completion" if chat else "text_completion"
    num_prompt = sum(len(p) for p, _ in reqs)
    k = len(reqs)

    if not stream:
        texts, tokens, reasons = [""] * k, [0] * k, [None] * k
        next_check = time.monotonic() + DISCONNECT_CHECK_S
        try:
            while any(r is None for r in reasons):
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=max(0.0, next_check - time.monotonic()))
                except asyncio.TimeoutError:
                    ev = None
                # Checked on a clock, not only when the queue idles: tokens may arrive every step until the end.
                if time.monotonic() >= next_check:
                    if await raw.is_disconnected():  # nobody waits for the answer: free the pages
                        return Response(status_code=499)
                    next_check = time.monotonic() + DISCONNECT_CHECK_S
                if ev is None:
                    continue
                if isinstance(ev, Failed):
                    raise HTTPError(500, ev.message, "server_error", None, "engine_failure")
                if isinstance(ev, Delta):
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
                if isinstance(ev, Failed):
                    yield f"data: {json.dumps(error_body(ev.message, 'server_error', None, 'engine_failure'))}\n\n"
                    return
                if not isinstance(ev, Delta):
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
