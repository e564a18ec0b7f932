"""Eager allocation in the serving engine: which free slots to back, and for how long.

After launching a step's forward the engine's host thread has nothing to do
until the sampled tokens come back, so that is when it maps pages for the
requests the *next* iteration admits (``KVManager.prewarm``): their first
chunks then start on committed memory instead of waiting for the driver
before their prefill, with the GPU idle (on an H200 a 2 MiB page costs about
30 us of host time; a 4K-token Llama-3-8B prompt in the per-layer layout is
256 of them).

How much: at most :data:`PREWARM_SHARE` of the step's expected GPU time, so
that the mapping never delays the next launch. The expected time is learned
from the engine's own steps (decode-only steps, and mixed ones per scheduled
token), and the cost of a page from ``KVManager.prewarm``'s own calls.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PREWARM_SHARE", "Prewarmer", "first_chunks"]

#: Share of a step's expected duration that eager allocation may spend on the host.
PREWARM_SHARE = 0.5


class Prewarmer:
    """The engine's eager-allocation policy over its scheduler and KV manager.

    ``after_launch(batch)`` backs the free slots of the waiting requests the
    next iteration admits (one slot for ``default_tokens`` when none waits: a
    request that arrives next); ``record(batch, seconds)`` learns the step's
    duration. Only :class:`~torch_vkv.serving.Engine` calls these."""

    def __init__(self, kv: Any, scheduler: Any, *, chunk_size: int, default_tokens: int) -> None:
        self.kv, self.scheduler = kv, scheduler
        self.chunk_size, self.default_tokens = chunk_size, default_tokens
        self._decode_seconds = 0.0  # a decode-only step (moving average)
        self._token_seconds = 0.0  # a mixed step, per scheduled token (the last one)
        self._spent = 0.0  # prewarm seconds of the step being run

    def expected_seconds(self, batch: Any) -> float:
        """The step's duration, as learned (0 before a step of its kind ran)."""
        if batch.decode_only:
            return self._decode_seconds
        return self._token_seconds * batch.num_tokens

    def after_launch(self, batch: Any) -> int:
        """Backs the next admissions' slots while ``batch`` runs on the device;
        returns the pool pages committed."""
        sched = self.scheduler
        # Slots the next iteration can hand out: not more than the batch has room for (a slot warmed
        # for a request that cannot start would hold pages that running requests may need to reclaim).
        room = min(self.kv.num_free_slots, sched.max_batch_size - len(sched.running))
        chunks = first_chunks(sched.waiting, max_tokens=self.chunk_size, free_slots=room)
        before = self.kv.prewarm_seconds
        # One slot for each first chunk (within the cache's rows), or one for whoever comes next.
        counts = [min(n, self.default_tokens) for n in chunks] or [self.default_tokens]
        pages = self.kv.prewarm(counts, seconds=PREWARM_SHARE * self.expected_seconds(batch))
        self._spent = self.kv.prewarm_seconds - before
        return pages

    def record(self, batch: Any, seconds: float) -> None:
        """``seconds``: the host's wall time of the step that ran ``batch``."""
        busy = max(seconds - self._spent, 0.0)  # not the prewarm's own time: no feedback from it
        self._spent = 0.0
        if batch.decode_only:
            ema = self._decode_seconds
            self._decode_seconds = busy if not ema else 0.5 * (ema + busy)
        elif batch.num_tokens:
            self._token_seconds = busy / batch.num_tokens


def first_chunks(waiting: Any, *, max_tokens: int, free_slots: int) -> list[int]:
    """Tokens of the first chunks of the waiting requests (queue order) that one
    iteration's ``max_tokens`` admits, at most one per free slot."""
    out: list[int] = []
    left = max_tokens
    for req in waiting:
        if len(out) >= free_slots or left <= 0:
            break
        n = min(req.num_tokens, left)
        out.append(n)
        left -= n
    return out
