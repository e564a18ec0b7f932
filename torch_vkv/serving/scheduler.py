"""``Scheduler``: Sarathi-Serve's chunked prefill over a token budget, with recompute preemption.

One iteration (``chunk_size`` = token budget)::

    running (admission order)         waiting (FIFO; preempted at the front)
    [A dec][B dec][C pre 300/900]     [D 700][E 40]
       |      |        |                 |
       v      v        v                 v
    budget 512:  A:1  B:1  C:510 (chunk) ..... D, E wait (budget spent)
    -> one ragged batch  [A][B][C c c c ... c]   (decodes first, no padding)
       cu_seqlens_q = [0, 1, 2, 512], cache_seqlens = [len A, len B, 300 + 510]

1. Decodes of running requests, oldest first, one token each.
2. Prefill chunks of running requests still prefilling, oldest first.
3. Waiting requests, in order, while budget, slots and memory last: admitted
   by the pages their first chunk needs now plus a small watermark (not by
   their maximum length). With prefix caching, a request starts by forking
   the slot that holds its longest cached prefix and prefills only the rest;
   one whose next prompt block another request computes in this step waits
   for the next step, which finds that block cached.
   An ``n > 1`` request is admitted only when its ``n`` slots are free.

When a running request cannot grow, the most recently admitted running
request is preempted (recompute): its slot and pages are released and it goes
back to the front of the queue with its tokens (prompt + output so far), which
are prefilled again later; its final output is unchanged. A request that
cannot fit in the whole budget even alone is refused at ``add_request``, so
the oldest running request always makes progress.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from torch_vkv import KVCacheCapacityError
from torch_vkv.serving.kv import KVManager
from torch_vkv.serving.request import Request, RequestStatus

__all__ = ["ScheduledBatch", "Scheduler"]


@dataclass
class ScheduledBatch:
    """What one iteration runs: ``requests[i]`` computes ``num_new_tokens[i]``
    tokens starting at its ``num_computed_tokens`` (decodes first).

    ``seq_lens``: int64 ``[num_slots]``, tokens each slot holds after the step
    (0 for slots not in the batch); ``decode_only``: every request computes one
    token (CUDA-graph eligible).
    """

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    seq_lens: Optional[np.ndarray] = None
    num_tokens: int = 0
    decode_only: bool = True


class Scheduler:
    """Chooses each iteration's batch and owns the queues.

    Args:
        kv: the KV manager (slots and pages).
        max_batch_size: most running requests.
        chunk_size: token budget of one iteration.
        watermark: fraction of the pool's pages kept free when admitting a
            request while others run (vLLM's 1%), so running requests can grow.
    """

    def __init__(self, kv: KVManager, *, max_batch_size: int, chunk_size: int, watermark: float = 0.01) -> None:
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.chunk_size = chunk_size
        self.watermark_pages = int(watermark * kv.usable_pages)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last is the youngest
        self.num_preemptions = 0
        #: Requests preempted while they ran alone: they had every usable page and
        #: could not grow, so they never will (the engine aborts them; see take_unschedulable).
        self.unschedulable: list[Request] = []
        self._admissions = 0

    # ---------------------------------------------------------------- queues
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Takes ``req`` out of the queues and releases its slot (finish or
        abort): with prefix caching the slot is parked with its prompt blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.kv.free(req.slot, park=True)
            req.slot = None
        elif req.status is RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)

    def start(self, req: Request, slot: int) -> None:
        """Runs ``req``, a completion forked from its first sequence's slot
        (``n > 1``), its K/V up to ``req.num_computed_tokens`` already in ``slot``."""
        req.slot, req.status = slot, RequestStatus.RUNNING
        self._admissions += 1
        req.admitted_at = self._admissions
        self.running.append(req)

    def take_unschedulable(self) -> list[Request]:
        """The requests that cannot run even alone (see :attr:`unschedulable`), and forgets them."""
        out, self.unschedulable = self.unschedulable, []
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, req: Request) -> None:
        """Recompute preemption: release the slot, back to the front of the queue.
        Pages the slot shares (a cached prefix, the prompt of ``n > 1``
        completions) stay with the other slots that map them: only this
        slot's references go."""
        self.running.remove(req)
        self.kv.free(req.slot)
        req.slot = None
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _give_back_spare(self) -> int:
        """Gives back the pages running requests hold past their tokens so far
        (prompt and output; virtual: a warm slot's pages up to the request's
        maximum length, a prefetched page). They hold no K/V, and no step
        needs them before the request has generated those tokens. Returns the
        pool pages given back."""
        return sum(self.kv.give_back_spare(r.slot, r.num_tokens) for r in self.running)

    # -------------------------------------------------------------- schedule
    def schedule(self, now: float) -> ScheduledBatch:
        """The next iteration's batch, its pages committed (``kv.grow``). Never
        raises for lack of memory: that is a preemption or a wait."""
        while True:
            batch = self._plan(now)
            if not batch.requests:
                return batch
            try:
                self.kv.grow(batch.seq_lens)
                return batch
            except KVCacheCapacityError:
                # The driver ran out below the budget: shed the youngest and plan again.
                self.preempt(self.running[-1])

    def _plan(self, now: float) -> ScheduledBatch:
        kv = self.kv
        seq = np.zeros(kv.num_slots, dtype=np.int64)
        sched: dict[int, tuple[Request, int]] = {}  # id(req) -> (req, tokens), in batch order
        budget = self.chunk_size
        preempted = False

        def unschedule(victim: Request) -> None:
            nonlocal budget
            entry = sched.pop(id(victim), None)
            if entry is not None:
                budget += entry[1]
            seq[victim.slot] = 0

        def make_room(req: Request) -> bool:
            """Preempt the youngest running requests until ``seq`` fits; False if ``req`` itself went."""
            nonlocal preempted
            spare_given_back = False
            while not kv.can_grow(seq):
                if not spare_given_back:
                    spare_given_back = True
                    if self._give_back_spare():
                        continue  # pages that hold no K/V go before a request's K/V does
                victim = self.running[-1]
                unschedule(victim)
                self.preempt(victim)
                preempted = True
                if victim is req:
                    if not self.running:
                        self.unschedulable.append(req)
                    return False
            return True

        # 1. decodes, oldest first
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1][:budget]
        for r in decodes:
            seq[r.slot] = r.num_tokens
        if not kv.can_grow(seq):  # rare: some decode must cross into pages that are not there
            seq[:] = 0
            kept = []
            for r in decodes:
                if r.status is not RequestStatus.RUNNING:
                    continue  # preempted as a victim meanwhile
                seq[r.slot] = r.num_tokens
                if make_room(r):
                    kept.append(r)
            decodes = [r for r in kept if r.status is RequestStatus.RUNNING]
        for r in decodes:
            sched[id(r)] = (r, 1)
        budget -= len(decodes)

        # 2. prefill chunks of running requests, oldest first
        for r in [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]:
            if budget <= 0:
                break
            if r.status is not RequestStatus.RUNNING:
                continue
            n = min(r.num_tokens - r.num_computed_tokens, budget)
            seq[r.slot] = r.num_computed_tokens + n
            if make_room(r):
                sched[id(r)] = (r, n)
                budget -= n

        # 3. admit waiting requests, in order (none after a preemption this iteration)
        memory_bound = preempted
        if not preempted and self.waiting and budget > 0:
            planned = kv.need_pages_total(seq)
            free = kv.available_pages() - planned
            # Slots promised to the completions of n > 1 requests still prefilling.
            promised = sum(r.fanout - 1 for r in self.running)
            # Prompt blocks this step computes: a request whose next block is one of them waits a step
            # and then finds it cached, instead of computing it again alongside.
            pending = kv.pending_keys(sched.values())
            while self.waiting and budget > 0:
                r = self.waiting[0]
                if len(self.running) + promised + r.fanout > self.max_batch_size or kv.num_free_slots < r.fanout:
                    break
                src, hit = kv.match(r)  # a cached prefix: fork its slot, prefill the rest
                nxt = hit // kv.block_tokens
                if pending and nxt < len(r.block_keys) and r.block_keys[nxt] in pending:
                    break
                n = min(r.num_tokens - hit, budget)
                # An n > 1 request's completions will each fork (and may copy) one page group. Not
                # asked of a request alone: that may exceed a budget its one sequence fits (which
                # add_request promises to serve); forks that find no page wait in the queue instead.
                forks = (r.fanout - 1) * kv.pages_for(1) if self.running else 0
                need = kv.need_pages(None, hit + n) - kv.shared_pages(hit) + forks
                reserve = self.watermark_pages if self.running else 0
                if need + reserve > free:
                    memory_bound = True
                    break  # first come, first served: nobody overtakes the head of the queue
                try:
                    slot = kv.fork(src, hit) if hit else kv.alloc(n)
                except KVCacheCapacityError:  # the partial page of the fork: not expected
                    break
                kv.fit(slot, r.max_num_tokens)
                seq[slot] = hit + n
                # The estimate counts the pages each request's step needs, and as available those that warm
                # slots (virtual) hold past their requests' tokens: a slot taken keeps them, so they go back
                # before the admission fails. Past that, not expected (the estimates are upper bounds).
                if not kv.can_grow(seq) and not (
                    self._give_back_spare() + kv.give_back_spare(slot, r.num_tokens) and kv.can_grow(seq)
                ):
                    seq[slot] = 0
                    kv.free(slot)
                    break
                self.waiting.popleft()
                r.slot, r.status, r.num_computed_tokens = slot, RequestStatus.RUNNING, hit
                if kv.prefix is not None:
                    kv.prefix.record(r.num_tokens, hit)
                    pending |= kv.pending_keys([(r, n)])
                self._admissions += 1
                r.admitted_at = self._admissions
                if r.first_scheduled_time is None:
                    r.first_scheduled_time = now
                self.running.append(r)
                sched[id(r)] = (r, n)
                budget -= n
                free -= need
                promised += r.fanout - 1

        kv.memory_bound = memory_bound  # eager allocation and KVManager.fit follow it
        batch = ScheduledBatch(seq_lens=seq)
        for r, n in sched.values():
            batch.requests.append(r)
            batch.num_new_tokens.append(n)
            batch.num_tokens += n
            if n != 1 or r.num_tokens - r.num_computed_tokens != 1:
                batch.decode_only = False
        return batch
