"""What ``Engine.step`` and ``Engine.generate`` return (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["CompletionOutput", "RequestMetrics", "RequestOutput"]


class RequestMetrics:
    """Times of one request, in seconds of ``time.monotonic()`` (one clock).

    ``first_scheduled_time``, ``first_token_time`` and ``finished_time`` are
    ``None`` until they happen; ``token_times[i]`` is when output token ``i``
    was sampled. A snapshot: it never changes after the step that returned it.
    """

    __slots__ = ("arrival_time", "first_scheduled_time", "first_token_time", "finished_time", "_source", "_n", "_times")

    def __init__(
        self,
        arrival_time: float,
        first_scheduled_time: Optional[float] = None,
        first_token_time: Optional[float] = None,
        finished_time: Optional[float] = None,
        token_times: Optional[list[float]] = None,
        *,
        _source: Optional[list[float]] = None,
        _n: int = 0,
    ) -> None:
        self.arrival_time = arrival_time
        self.first_scheduled_time = first_scheduled_time
        self.first_token_time = first_token_time
        self.finished_time = finished_time
        # Either a list, or (the request's append-only list, length) copied on first access.
        self._times = list(token_times) if token_times is not None else None
        self._source, self._n = _source, _n

    @property
    def token_times(self) -> list[float]:
        if self._times is None:
            self._times = [] if self._source is None else self._source[: self._n]
            self._source = None
        return self._times

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestMetrics):
            return NotImplemented
        fields = ("arrival_time", "first_scheduled_time", "first_token_time", "finished_time", "token_times")
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value (as CompletionOutput)

    def __repr__(self) -> str:
        return (
            f"RequestMetrics(arrival_time={self.arrival_time}, first_scheduled_time={self.first_scheduled_time}, "
            f"first_token_time={self.first_token_time}, finished_time={self.finished_time}, "
            f"num_token_times={len(self.token_times)})"
        )


class CompletionOutput:
    """One completion of a request: its output ``token_ids`` so far and ``finish_reason``
    (``"length"``, ``"stop"``, ``"abort"``, or ``None`` while running). ``text``
    is the decoded output, filled by the text API (:class:`torch_vkv.serving.LLM`);
    the engine alone leaves it ``""``.

    Outputs are cumulative snapshots: ``token_ids`` holds every token generated
    up to the step that returned this object and never changes afterwards. The
    list is copied from the request's append-only history on first access, so
    a step costs O(1) per request whatever the output length.
    """

    __slots__ = ("index", "finish_reason", "text", "_source", "_n", "_ids")

    def __init__(
        self,
        index: int,
        token_ids: Sequence[int],
        finish_reason: Optional[str] = None,
        text: str = "",
        *,
        _n: Optional[int] = None,
    ) -> None:
        # CompletionOutput(index, token_ids, finish_reason), as documented; the engine passes
        # the request's append-only list with ``_n`` (its length now), copied on first access.
        self.index = index
        self.finish_reason = finish_reason
        self.text = text
        if _n is None:
            self._source, self._n, self._ids = None, len(token_ids), list(token_ids)
        else:
            self._source, self._n, self._ids = token_ids, _n, None

    @property
    def token_ids(self) -> list[int]:
        if self._ids is None:
            self._ids = self._source[: self._n]
            self._source = None
        return self._ids

    def __len__(self) -> int:
        return self._n

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompletionOutput):
            return NotImplemented
        return (self.index, self.finish_reason, self.token_ids) == (other.index, other.finish_reason, other.token_ids)

    def __repr__(self) -> str:
        return f"CompletionOutput(index={self.index}, token_ids={self.token_ids}, finish_reason={self.finish_reason!r})"


@dataclass
class RequestOutput:
    """The state of one request after a step.

    Attributes:
        request_id: the id given to (or returned by) ``Engine.add_request``.
        prompt_token_ids: the prompt.
        outputs: the request's ``SamplingParams.n`` completions, in ``index`` order (vLLM's shape).
        finished: whether the request is done (``finish_reason`` is set).
        metrics: a :class:`RequestMetrics` snapshot.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def token_ids(self) -> list[int]:
        """``outputs[0].token_ids``: the generated tokens so far."""
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> Optional[str]:
        """``outputs[0].finish_reason``."""
        return self.outputs[0].finish_reason
