"""``Request``: one request's tokens, progress and state inside the engine."""

from __future__ import annotations

import enum
from typing import Optional

from torch_vkv.serving.outputs import CompletionOutput, RequestMetrics, RequestOutput
from torch_vkv.serving.params import SamplingParams

__all__ = ["Request", "RequestStatus", "SequenceGroup"]


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
        "index", "group", "fanout", "block_keys",
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
        index: int = 0,
        group: Optional["SequenceGroup"] = None,
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
        #: Completion index in the request (``n > 1``) and the group of all its completions.
        self.index = index
        self.group = group
        #: Sequences this one becomes when its first token is sampled: ``n`` for
        #: completion 0 of a fresh ``n > 1`` request (the others are forked from
        #: its slot then), 1 otherwise.
        self.fanout = params.n if index == 0 else 1
        #: Prefix-cache keys of the prompt's full blocks (computed on first lookup).
        self.block_keys: Optional[list[int]] = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def max_num_tokens(self) -> int:
        """Tokens the request can reach: its prompt and ``max_tokens`` outputs."""
        return len(self.token_ids) - len(self.output_token_ids) + self.params.max_tokens

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

    def completion(self) -> CompletionOutput:
        """This sequence's :class:`CompletionOutput` snapshot."""
        return CompletionOutput(self.index, self.output_token_ids, self.finish_reason, _n=len(self.output_token_ids))

    def output(self) -> RequestOutput:
        """A cumulative snapshot of the request (O(1) per completion: lists are copied on first access)."""
        if self.group is not None:
            return self.group.output()
        n = len(self.output_token_ids)
        metrics = RequestMetrics(
            self.arrival_time, self.first_scheduled_time, self.first_token_time, self.finished_time,
            _source=self.token_times, _n=n,
        )  # fmt: skip
        return RequestOutput(self.request_id, self.prompt_token_ids, [self.completion()], self.finished, metrics)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, slot={self.slot}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, outputs={len(self.output_token_ids)})"
        )


class SequenceGroup:
    """The ``n`` completions of one ``n > 1`` request (parallel sampling).

    ``seqs[i]`` is completion ``i``. Completion 0 prefills the prompt; when it
    samples its first token the engine samples the others' first tokens from
    the same logits (each with its own seed) and forks their slots from its
    own. From then on the ``n`` sequences are peers: each decodes, finishes
    and may be preempted on its own. The request finishes when all have.
    """

    __slots__ = ("request_id", "seqs")

    def __init__(self, request_id: str, seqs: list[Request]) -> None:
        self.request_id = request_id
        self.seqs = seqs

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        """One :class:`RequestOutput` with ``n`` completions. ``metrics`` are
        completion 0's, except ``finished_time``: when the last one finished."""
        first = self.seqs[0]
        done = self.finished
        metrics = RequestMetrics(
            first.arrival_time, first.first_scheduled_time, first.first_token_time,
            max(s.finished_time for s in self.seqs) if done else None,
            _source=first.token_times, _n=len(first.output_token_ids),
        )  # fmt: skip
        completions = [s.completion() for s in self.seqs]
        return RequestOutput(self.request_id, first.prompt_token_ids, completions, done, metrics)
