"""``Request``: one request's tokens, progress and state inside the engine."""

from __future__ import annotations

import enum
from typing import Optional

from torch_vkv.serving.outputs import CompletionOutput, RequestMetrics, RequestOutput
from torch_vkv.serving.params import SamplingParams

__all__ = ["Request", "RequestStatus"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # in the queue: no slot, nothing cached (new or preempted)
    RUNNING = "running"  # holds a slot; prefilling (in chunks) or decoding
    FINISHED = "finished"


class Request:
    """A request's state. ``token_ids`` is prompt + output, append-only.

    ``num_computed_tokens`` tokens of ``token_ids`` have their K/V in the cache
    (slot ``slot``). The request *decodes* when exactly one token is left to
    compute (the last sampled one) and *prefills* when more are (a new prompt,
    or prompt + output again after a preemption, which recomputes).
    """

    __slots__ = (
        "request_id", "prompt_token_ids", "token_ids", "output_token_ids", "params", "seed", "stop_ids",
        "status", "slot", "num_computed_tokens", "finish_reason", "num_preemptions", "admitted_at",
        "arrival_time", "first_scheduled_time", "first_token_time", "finished_time", "token_times",
    )  # fmt: skip

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        seed: int,
        eos_token_ids: tuple[int, ...],
        arrival_time: float,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.seed = seed
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop.update(eos_token_ids)
        self.stop_ids = frozenset(stop)
        self.status = RequestStatus.WAITING
        self.slot: Optional[int] = None
        self.num_computed_tokens = 0
        self.finish_reason: Optional[str] = None
        self.num_preemptions = 0
        self.admitted_at = -1  # admission counter: larger = admitted more recently
        self.arrival_time = arrival_time
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None
        self.token_times: list[float] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token: int, now: float, max_seq_len: int) -> bool:
        """Records a sampled token; sets ``finish_reason`` and returns True when it ends the request."""
        self.token_ids.append(token)
        self.output_token_ids.append(token)
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= self.params.max_tokens or len(self.token_ids) >= max_seq_len:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def output(self) -> RequestOutput:
        """A cumulative snapshot of the request (O(1): lists are copied on first access)."""
        n = len(self.output_token_ids)
        metrics = RequestMetrics(
            self.arrival_time, self.first_scheduled_time, self.first_token_time, self.finished_time,
            _source=self.token_times, _n=n,
        )  # fmt: skip
        completion = CompletionOutput(0, self.output_token_ids, n, self.finish_reason)
        return RequestOutput(self.request_id, self.prompt_token_ids, [completion], self.finished, metrics)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, slot={self.slot}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, outputs={len(self.output_token_ids)})"
        )
