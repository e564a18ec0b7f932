"""torch_vkv.serving under random add / step / abort sequences and random KV budgets.

Invariants after every rule: committed KV memory never exceeds the budget, no
page belongs to two running requests, used <= committed. At the end every
request has finished (its final output seen exactly once), greedy ones with
the tokens of ``generate()``, and all pages are back.
"""

from __future__ import annotations

import os
import random

import pytest

pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

from test_serving import PAGE, VOCAB, assert_greedy_equal, engine_for, model_of, reference  # noqa: E402
from torch_vkv.serving import SamplingParams  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

MAX_SEQ_LEN = 48
# Pool pages of one budget unit: virtual per_layer (4 KiB page = 32 tokens of
# one of 4 buffers), interleaved (4 KiB = 8 tokens of all layers), paged (a
# block of 16 tokens of all layers = 8 KiB). A request of MAX_SEQ_LEN tokens
# needs 8, 6 and 3 units: budgets start there so every request fits alone.
UNITS = {"virtual-per_layer": (PAGE, 8), "virtual-interleaved": (PAGE, 6), "paged": (16 * 512, 3)}


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = None

    @initialize(
        kv=st.sampled_from(sorted(UNITS)),
        extra_units=st.integers(0, 24),
        chunk=st.integers(4, 64),
        max_batch=st.integers(1, 4),
    )
    def setup(self, kv, extra_units, chunk, max_batch):
        unit, least = UNITS[kv]
        self.budget = (least + extra_units) * unit
        self.model = model_of("llama")
        self.engine = engine_for(self.model, kv, memory_budget=self.budget, chunk_size=chunk,
                                 max_batch_size=max_batch, max_seq_len=MAX_SEQ_LEN)  # fmt: skip
        self.rng = random.Random(extra_units * 1000 + chunk)
        self.params: dict[str, tuple[list[int], SamplingParams]] = {}
        self.live: set[str] = set()
        self.done: dict[str, object] = {}
        self.aborted: set[str] = set()

    def _collect(self, outs) -> None:
        for out in outs:
            assert out.request_id not in self.done, "a final output was returned twice"
            if out.finished:
                self.done[out.request_id] = out
                self.live.discard(out.request_id)

    @rule(prompt_len=st.integers(1, 30), max_tokens=st.integers(1, 20), greedy=st.booleans())
    def add(self, prompt_len, max_tokens, greedy):
        prompt = [self.rng.randrange(VOCAB - 1) for _ in range(prompt_len)]
        rid = f"q{len(self.params)}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 1.0, seed=len(self.params))
        assert self.engine.add_request(prompt, params, request_id=rid) == rid
        self.params[rid] = (prompt, params)
        self.live.add(rid)

    @rule(times=st.integers(1, 4))
    def step(self, times):
        for _ in range(times):
            self._collect(self.engine.step())

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        assert self.engine.abort(rid)
        self.aborted.add(rid)
        self.live.discard(rid)

    @invariant()
    def memory_within_budget_and_pages_owned_once(self):
        if self.engine is None:
            return
        stats = self.engine.stats()
        assert stats["committed_bytes"] <= self.budget
        assert stats["used_bytes"] <= stats["committed_bytes"]
        kv = self.engine.kv
        running = self.engine.scheduler.running
        owned = [p for r in running for p in kv.slot_pages(r.slot)]
        assert len(owned) == len(set(owned)), "a page belongs to two requests"
        assert len({r.slot for r in running}) == len(running)

    def teardown(self):
        if self.engine is None:
            return
        e = self.engine
        try:
            for _ in range(5000):
                if not e.has_unfinished_requests():
                    break
                self._collect(e.step())
            assert not e.has_unfinished_requests(), "requests left unfinished"
            assert set(self.done) == set(self.params), "a request never returned its final output"
            stats = e.stats()
            assert stats["num_running"] == stats["num_waiting"] == 0 and stats["used_bytes"] == 0
            e.kv.reclaim()  # virtual: freed slots hand their cached pages back
            assert e.stats()["committed_bytes"] == 0, "pages not back after the last request"
        finally:
            e.close()  # the model is ours again: generate() can run
        checked = 0
        for rid, out in self.done.items():
            if rid in self.aborted:
                assert out.finish_reason == "abort"
                continue
            prompt, params = self.params[rid]
            want = min(params.max_tokens, MAX_SEQ_LEN - len(prompt))
            assert out.finish_reason == "length" and len(out.token_ids) == want, (rid, out, want)
            if params.temperature == 0.0 and checked < 3:  # generate() is slow: a few per example
                checked += 1
                assert_greedy_equal(self.model, prompt, out.token_ids, reference(self.model, prompt, want))


EngineMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SERVING_PROPERTY_EXAMPLES", "8")),
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEngineStateMachine = EngineMachine.TestCase
