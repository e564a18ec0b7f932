"""``EngineLoop``: the engine in its own thread, fed by commands, answering with events.

The engine is touched only by its thread (the package docstring draws the two
threads); a request waits on its own queue, so no request blocks another's
tokens. Events reach a request's ``sink``: ``Accepted`` or ``Rejected`` once,
then ``Delta``\\ s (the last with a ``finish_reason``), or ``Failed`` when the
engine itself failed.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch_vkv._lifetime import ThreadBusyError, thread_guard
from torch_vkv.serving.inputs import token_level
from torch_vkv.serving.llm import LLM, TextStream
from torch_vkv.serving.outputs import RequestOutput
from torch_vkv.serving.params import SamplingParams

__all__ = ["DEFAULT_MAX_WAITING", "Accepted", "Delta", "EngineLoop", "Failed", "QueueFullError", "Rejected"]

log = logging.getLogger("torch_vkv.serve")

DEFAULT_MAX_WAITING = 256


class QueueFullError(RuntimeError):
    """The server holds ``max_batch_size + max_waiting`` unfinished requests (HTTP 503)."""


@dataclass
class Accepted:
    """The engine took choice ``index`` of a client request."""

    index: int


@dataclass
class Rejected:
    """The engine refused choice ``index`` (``message``: why): a bad request, or
    with ``shutting_down`` the server stopped accepting, or the engine failed,
    before it arrived (503)."""

    index: int
    message: str
    shutting_down: bool = False


@dataclass
class Delta:
    """New text of choice ``index``; ``num_tokens`` generated so far; ``finish_reason`` on the last."""

    index: int
    text: str
    num_tokens: int
    finish_reason: Optional[str]


@dataclass
class Failed:
    """The engine itself failed: every request in flight ends."""

    message: str


@dataclass
class _Stream:
    """The engine thread's record of one request."""

    index: int
    sink: Callable[[Any], None]
    num_prompt_tokens: int
    text: Optional[TextStream] = None  # set when the engine accepts the request
    num_tokens: int = 0  # generated so far (the last Delta's)


class EngineLoop:
    """Runs an :class:`LLM`'s engine in its own thread.

    :meth:`submit` and :meth:`abort` may be called from any thread; events
    (``Accepted``/``Rejected`` once, then ``Delta``\\ s, the last with a
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
        self._ended = False  # the engine thread answers no more commands (under _lock)
        # A snapshot of engine.stats(), replaced per iteration by the engine thread (the only thread that may
        # call into the engine while the loop runs); empty until the loop has the engine.
        self.stats: dict[str, Any] = {"num_pending": 0}
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
            if not self._accepting or self._ended:
                raise RuntimeError("the server is shutting down")
            if self._in_flight + len(requests) > self.max_in_flight:
                raise QueueFullError(
                    f"the server is full: {self._in_flight} requests in flight, at most {self.max_in_flight} "
                    "(max_batch_size + max_waiting); retry later"
                )
            self._in_flight += len(requests)
            # Queued under the lock: the engine thread marks itself ended under it before answering what
            # is left, so no command can land after that last look and wait for an answer forever.
            ids = [f"{uuid.uuid4().hex}-{i}" for i in range(len(requests))]
            # One command for all the choices: the engine thread takes them together, so every Accepted or
            # Rejected of this request reaches the sink before any Delta (no step runs between two choices).
            adds = [(rid, prompt, params, _Stream(i, sink, len(prompt)))
                    for i, (rid, (prompt, params)) in enumerate(zip(ids, requests))]  # fmt: skip
            self._commands.put(("add", adds))
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
        """Aborts everything, ends the thread and closes the engine. Every
        request in flight still gets its final ``Delta`` (``finish_reason``
        ``"abort"``) before the thread ends, so open streams end. The engine is
        left open (a warning is logged) while another thread's call is inside it."""
        self.abort_all()
        self._commands.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            try:
                self.engine.close()
            except ThreadBusyError as exc:  # an in-process call is inside it: its call goes on, unharmed
                log.warning("the engine was left open: %s", exc)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # ---------------------------------------------------------- engine thread
    def _run(self) -> None:
        # The loop holds the engine's thread guard while it runs: an in-process llm.generate on the served LLM
        # meanwhile raises RuntimeError in its caller at once, instead of taking the engine between two of the
        # loop's steps (which made the loop fail, and every request with it). A call already inside when the
        # server starts is waited for.
        while True:
            try:
                with thread_guard(self.engine, "the HTTP server's engine loop", wait=0.25):
                    self._serve()
                return
            except ThreadBusyError:
                with self._lock:
                    if not self._accepting:  # stopped before it could start
                        break
        self._answer_queued()

    def _serve(self) -> None:
        engine = self.engine
        try:
            if engine.device.type == "cuda":  # the current device is per thread
                import torch

                torch.cuda.set_device(engine.device)
            self.stats = dict(engine.stats(), num_pending=0)
            while True:
                busy = engine.has_unfinished_requests()
                if self._drain(block=not busy):
                    self._end_streams()
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
                s.sink(Failed(f"engine failure: {exc}"))
            self._streams.clear()
        self._answer_queued()

    def _answer_queued(self) -> None:
        """After the loop ends: requests still queued are refused (their handlers wait)."""
        with self._lock:
            self._ended = True  # submit() queues nothing more
        # After a failure the queued requests meet the engine's error (503 engine_failure), not a shutdown.
        why = "the server is shutting down" if self.error is None else f"the engine failed: {self.error}"
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                for _, _, _, stream in cmd[1]:
                    self._release(1)
                    stream.sink(Rejected(stream.index, why, shutting_down=True))

    def _end_streams(self) -> None:
        """On "stop": every request still in flight is aborted and its final
        output delivered (``"abort"``), so its handler sees the end: the
        "abort_all" that stop() queues ahead is drained in the same pass as
        the "stop", with no step() after it to return the aborted outputs."""
        for rid in list(self._streams):
            self.engine.abort(rid)
        if self.engine.has_unfinished_requests():
            self._deliver(self.engine.step())  # nothing runs: it returns the aborted requests' final outputs
        for rid, stream in list(self._streams.items()):  # not returned by that step: ended here all the same
            del self._streams[rid]
            self._release(1)
            stream.sink(Delta(stream.index, "", stream.num_tokens, "abort"))

    def _drain(self, block: bool) -> bool:
        """Runs queued commands (waiting for one when ``block``); True on "stop"."""
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            kind = cmd[0]
            if kind == "add":
                for rid, prompt, params, stream in cmd[1]:
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
            stream.sink(Rejected(stream.index, "the server is shutting down", shutting_down=True))
            return
        try:
            # Stop strings stay with the stream's TextStream below; the engine, which has no tokenizer, refuses them.
            self.engine.add_request(prompt, token_level(params), request_id=rid)
        except (ValueError, TypeError) as exc:
            self._release(1)
            stream.sink(Rejected(stream.index, str(exc)))
            return
        stream.text = TextStream(self.llm.tokenizer, prompt, params.stop)
        self._streams[rid] = stream
        stream.sink(Accepted(stream.index))

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
            n = stream.num_tokens = len(completion)
            if reason is not None:
                # Counted before the final Delta goes out: a client that reads /metrics once answered sees it.
                del self._streams[out.request_id]
                self._release(1)
                if self._on_finish is not None:
                    try:
                        self._on_finish(out, reason, stream.num_prompt_tokens)
                    except Exception:  # the metrics must never keep a request from its answer
                        log.exception("recording request %s failed", out.request_id)
            if delta or reason is not None:
                stream.sink(Delta(stream.index, delta, n, reason))
