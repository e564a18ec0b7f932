"""Prometheus metrics of the server (``GET /metrics``): engine gauges read from the
loop's stats snapshot, per-request histograms and counters fed at finish."""

from __future__ import annotations

import time
from typing import Any, Callable

from torch_vkv.serving.outputs import RequestOutput
from torch_vkv.serving.server.loop import EngineLoop

__all__ = ["make_registry"]


def make_registry(loop: EngineLoop, model_name: str) -> tuple[Any, Callable[[RequestOutput, str, int], None]]:
    """A ``prometheus_client`` registry over ``loop``'s stats, and the callback
    the loop calls with every finished request (output, finish reason, prompt tokens)."""
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
        # A request ended by a stop string ends in the server before the engine sets finished_time: now.
        end = m.finished_time if m.finished_time is not None else time.monotonic()
        if m.first_token_time is not None:
            ttft.observe(m.first_token_time - m.arrival_time)
            if n > 1:
                tpot.observe((end - m.first_token_time) / (n - 1))
        e2e.observe(end - m.arrival_time)
        prompt_tokens.inc(num_prompt)
        gen_tokens.inc(n)
        success.labels(finished_reason=reason, **labels).inc()

    return reg, on_finish
