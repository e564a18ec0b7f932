"""Drive one ``Engine`` configuration through a workload, in process.

:func:`run_engine` builds ``Engine(model, kv=..., layout=..., block_size=...,
attention_backend=...)`` on a shared model, replays the workload's arrival
times (requests are added at the first iteration boundary after their arrival;
latencies count from the arrival itself), steps until every request finished,
and records per request the engine's own timings (:class:`RequestResult`, the
load client's schema), per iteration the wall time, the engine's host time and
the work the roofline counts (:class:`IterationRecord`), and the committed KV
memory after every iteration. :func:`run_generate_batch` runs transformers'
own continuous batching (``generate_batch``, paged) as the outside peer.
"""

from __future__ import annotations

import gc
import inspect
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch

from torch_vkv._checks import check_int, fail
from torch_vkv.bench.roofline import IterationRecord
from torch_vkv.bench.serve_client import RequestResult
from torch_vkv.bench.workloads import RequestSpec

__all__ = ["CONFIGS", "EngineConfig", "RunResult", "parse_config", "peer_configs", "random_prompts", "run_engine",
           "run_generate_batch"]  # fmt: skip

#: Engine configurations every machine runs (``NAME[:BACKEND]`` picks an attention backend).
CONFIGS = ("virtual-per_layer", "virtual-interleaved", "paged-16", "paged-256")


def peer_configs(device: torch.device) -> tuple[list[str], list[dict[str, str]]]:
    """Configurations beyond :data:`CONFIGS` this machine can run, and the
    ones it cannot, each with the reason."""
    runnable, skipped = [], []
    try:
        import flashinfer  # noqa: F401

        # FlashInfer's kernels on both memories: ragged/contiguous on the virtual cache, its own paged
        # kernels over a block pool of 16 (the strongest paged decode measured on the H200).
        runnable += ["virtual-per_layer:flashinfer", "paged-16:flashinfer"]
    except Exception as exc:
        skipped.append({"config": "flashinfer", "reason": f"import flashinfer failed ({type(exc).__name__}: {exc})"})
    from transformers import GenerationMixin

    if hasattr(GenerationMixin, "generate_batch"):
        runnable.append("hf-generate_batch")
    else:
        skipped.append({"config": "hf-generate_batch", "reason": "this transformers has no generate_batch"})
    return runnable, skipped


@dataclass(frozen=True)
class EngineConfig:
    """One engine configuration: ``kv``, ``layout`` (virtual), ``block_size``
    (paged), ``attention_backend``; ``sync`` replaces ``KVCache.step_async``
    by the synchronous ``KVCache.step`` (the sync-vs-async workload);
    ``prefix_caching``: the engine's (on by default; the prefix and parallel
    workloads run each configuration with and without it)."""

    name: str
    kv: str
    layout: str = "per_layer"
    block_size: int = 16
    attention_backend: str = "auto"
    sync: bool = False
    prefix_caching: bool = True

    def with_sync(self, sync: bool) -> "EngineConfig":
        return replace(self, name=f"{self.name}+{'sync' if sync else 'async'}", sync=sync)

    def with_caching(self, on: bool) -> "EngineConfig":
        return replace(self, name=f"{self.name}+{'cache' if on else 'nocache'}", prefix_caching=on)


def parse_config(spec: str) -> EngineConfig:
    """``virtual-per_layer``, ``virtual-interleaved``, ``paged-N`` (blocks of
    N tokens), each optionally ``:BACKEND`` (``torch_vkv.attention``'s)."""
    from torch_vkv.attention import BACKENDS

    name, _, backend = spec.partition(":")
    backend = backend or "auto"
    if backend not in BACKENDS:
        fail("configuration backend", f"one of {BACKENDS}", backend)
    kind, _, arg = name.partition("-")
    if kind == "virtual" and arg in ("per_layer", "interleaved"):
        return EngineConfig(spec, "virtual", layout=arg, attention_backend=backend)
    if kind == "paged" and arg.isdigit() and int(arg) > 0:
        return EngineConfig(spec, "paged", block_size=int(arg), attention_backend=backend)
    fail("configuration", "virtual-per_layer, virtual-interleaved or paged-N, optionally :BACKEND", spec)
    raise AssertionError  # unreachable


@dataclass
class RunResult:
    """What one configuration measured over one workload."""

    config: str
    results: list[RequestResult]
    duration_s: float
    iterations: list[IterationRecord] = field(default_factory=list)
    memory: list[dict[str, float]] = field(default_factory=list)  # after every iteration
    stats: dict[str, Any] = field(default_factory=dict)  # the engine's last stats()
    profile: Optional[dict[str, Any]] = None  # serve_profile.summarize_profile, with --profile

    # Engine stats that add up over rounds; the others (rates, gauges) are the last round's.
    SUMMED_STATS = ("num_preemptions", "kv_grow_seconds", "kv_prewarm_seconds", "prefix_hit_tokens",
                    "num_computed_tokens")  # fmt: skip

    @classmethod
    def pool(cls, runs: Sequence["RunResult"]) -> "RunResult":
        """Runs of one configuration over several rounds (``bench serve --repeats``) as one: every
        request and iteration, the summed duration (throughput: tokens over the time spent on them),
        the first round's memory trace and profile."""
        if len(runs) == 1:
            return runs[0]
        stats = dict(runs[-1].stats)
        for key in cls.SUMMED_STATS:
            values = [r.stats.get(key) for r in runs]
            if all(isinstance(v, (int, float)) for v in values):
                stats[key] = sum(values)
        return cls(runs[0].config, [x for r in runs for x in r.results], sum(r.duration_s for r in runs),
                   [i for r in runs for i in r.iterations], runs[0].memory, stats, runs[0].profile)  # fmt: skip


def random_prompts(specs: Sequence[RequestSpec], vocab_size: int, seed: int = 0,
                   shared_prefix_tokens: int = 0) -> list[list[int]]:  # fmt: skip
    """Random token ids of each request's prompt length (the same for every
    configuration); the first ``shared_prefix_tokens`` are the same in every
    prompt (a system prompt)."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab_size) for _ in range(shared_prefix_tokens)]
    return [shared[: s.prompt_tokens] + [rng.randrange(vocab_size) for _ in range(s.prompt_tokens - len(shared))]
            for s in specs]  # fmt: skip


def _result(spec: RequestSpec, out: Any, arrival: float, t0: float) -> RequestResult:
    """The request's timings. With ``n`` completions: ``output_tokens`` counts
    them all, TTFT and ITL are completion 0's (all sample their first token
    together), e2e ends when the last one finished."""
    m = out.metrics
    times = m.token_times
    n = len(out.outputs)
    res = RequestResult(spec.index, spec.prompt_tokens, n * spec.output_tokens, start_s=arrival - t0)
    res.output_tokens = sum(len(c.token_ids) for c in out.outputs)
    res.finish_reason = out.finish_reason
    res.ok = all(c.finish_reason == "length" for c in out.outputs) and bool(times)
    if not res.ok:
        res.error = f"finish_reason {out.finish_reason!r} after {res.output_tokens} tokens"
        return res
    res.ttft_s = times[0] - arrival
    if m.first_scheduled_time is not None:
        res.queue_s = max(0.0, m.first_scheduled_time - arrival)
    res.e2e_s = m.finished_time - arrival
    res.itl_s = [b - a for a, b in zip(times, times[1:])]
    return res


#: Seconds between two reads of the pool's committed-memory counter in the timed loop.
MEMORY_SAMPLE_S = 0.02


def _memory_sample(engine: Any, t_s: float, last: Optional[dict[str, float]]) -> dict[str, float]:
    """One iteration's memory and queue sizes. ``engine.stats()`` is not used:
    its exact memory counts wait for the engine's background page commits,
    and calling it every iteration would serialise the commits that
    ``step_async`` overlaps with the next step and add that wait to every
    request's latency (the makespan), for virtual only. The committed bytes
    come from the pool's counter (``KVManager.mapped_bytes``), read at most
    every :data:`MEMORY_SAMPLE_S` (its lock is held while a commit maps
    pages); between reads an iteration repeats the last value. Queue sizes
    and ``used_bytes`` are read every iteration."""
    sched = engine.scheduler
    fresh = last is None or t_s - last["read_t_s"] >= MEMORY_SAMPLE_S
    return {"t_s": t_s, "committed_bytes": engine.kv.mapped_bytes() if fresh else last["committed_bytes"],
            "read_t_s": t_s if fresh else last["read_t_s"],
            "used_bytes": engine.used_bytes,
            "num_running": len(sched.running), "num_waiting": len(sched.waiting)}  # fmt: skip


def _hook_execute(engine: Any, pending: dict) -> None:
    """Wraps ``engine.runner.execute`` to record the roofline's work of each
    batch (the engine exposes no such hook; the batch is read, never changed)."""
    execute = engine.runner.execute

    def recording_execute(batch: Any):
        decode = prefill = kv_read = pairs = 0
        for r, n in zip(batch.requests, batch.num_new_tokens):
            start = r.num_computed_tokens
            kv_read += start + n
            if n == 1 and r.output_token_ids and start == len(r.token_ids) - 1:
                decode += 1
            else:
                prefill += n
                pairs += n * start + n * (n + 1) // 2
        pending.update(num_decode=decode, num_prefill_tokens=prefill, kv_tokens_read=kv_read,
                       prefill_attn_pairs=pairs, num_tokens=batch.num_tokens)  # fmt: skip
        return execute(batch)

    engine.runner.execute = recording_execute


def _use_sync_step(engine: Any) -> None:
    """Makes the engine's per-iteration ``step_async`` a synchronous ``step``."""
    cache = engine.kv.cache

    def step_sync(seq_lens: Any, *, lookahead_tokens: int = 1) -> None:
        cache.step(seq_lens)

    cache.step_async = step_sync


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def warm_up(engine: Any, *, chunk_size: int, max_seq_len: int) -> None:
    """A prompt of a chunk and a sixteenth more, and two short ones, 3 tokens each: prefill,
    chunked prefill mixed with decodes, and decode batches all run once (kernels compile on first
    use, seconds each). The long prompt's second chunk, a few hundred rows over a chunk of history,
    is what the last chunk of a long prompt runs (``auto`` takes ``triton`` there, reading through
    tensor descriptors: a kernel variant of its own), compiled here rather than inside the timed run."""
    from torch_vkv.serving import SamplingParams

    long = max(1, min(chunk_size + max(1, chunk_size // 16), max_seq_len - 4) - 3)
    warm = [[1] * long, [2] * min(21, max_seq_len - 4), [3] * min(5, max_seq_len - 4)]
    engine.generate(warm, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)


def run_engine(
    model: Any,
    cfg: EngineConfig,
    specs: Sequence[RequestSpec],
    prompts: Sequence[Sequence[int]],
    *,
    max_batch_size: int,
    max_seq_len: int,
    chunk_size: int,
    memory_budget: Optional[int],
    page_size: Optional[int] = None,
    cuda_graphs: bool = True,
    warmup: bool = True,
    n: int = 1,
    profile: bool = False,
    compile: bool = False,
) -> RunResult:
    """Serves ``specs`` (with ``prompts``) on a fresh engine of ``cfg``; closes
    it (the model's attention implementation is restored) before returning.
    ``n > 1``: parallel sampling, ``n`` completions a request (temperature 1,
    seeded by the request's index); else greedy. The stats' prefix-cache and
    token counters count the timed run only (not the warm-up). ``profile``:
    ``torch.profiler`` over a window of the timed loop
    (:class:`~torch_vkv.bench.serve_profile.ProfileWindow`; ``RunResult.profile``);
    it slows the host side. ``compile``: ``Engine(compile=True)`` (compiled
    before the warm-up, outside the timed run)."""
    from torch_vkv.serving import Engine, SamplingParams

    engine = Engine(
        model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, kv=cfg.kv, layout=cfg.layout,
        memory_budget=memory_budget, page_size=page_size if cfg.kv == "virtual" else None,
        block_size=cfg.block_size, chunk_size=chunk_size, attention_backend=cfg.attention_backend,
        cuda_graphs=cuda_graphs, prefix_caching=cfg.prefix_caching, compile=compile,
    )  # fmt: skip
    device = engine.device
    prof = None
    try:
        if cfg.sync:
            if cfg.kv != "virtual":
                fail("sync", "a virtual configuration (paged has no step_async)", cfg.name)
            _use_sync_step(engine)
        if warmup:  # compile kernels and capture graphs outside the timed run
            warm_up(engine, chunk_size=chunk_size, max_seq_len=max_seq_len)
        pending: dict = {}
        _hook_execute(engine, pending)
        order = sorted(range(len(specs)), key=lambda i: specs[i].arrival_s)
        by_id: dict[str, int] = {}
        results: list[Optional[RequestResult]] = [None] * len(specs)
        iterations: list[IterationRecord] = []
        memory: list[dict[str, float]] = []
        before = engine.stats()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if profile:
            from torch_vkv.bench.serve_profile import ProfileWindow

            prof = ProfileWindow(device)
        t0, mono0 = time.perf_counter(), time.monotonic()
        nxt = 0
        while nxt < len(order) or engine.has_unfinished_requests():
            now = time.perf_counter() - t0
            while nxt < len(order) and specs[order[nxt]].arrival_s <= now:
                i = order[nxt]
                params = SamplingParams(max_tokens=specs[i].output_tokens, temperature=0.0 if n == 1 else 1.0,
                                        ignore_eos=True, n=n, seed=i)  # fmt: skip
                by_id[engine.add_request(prompts[i], params)] = i
                nxt += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, specs[order[nxt]].arrival_s - (time.perf_counter() - t0)))
                continue
            if prof is not None:
                prof.before_step(len(iterations), bool(engine.scheduler.waiting))
            host0 = engine.host_seconds
            pending.clear()
            ts = time.perf_counter()
            outputs = engine.step()
            te = time.perf_counter()
            if pending:
                iterations.append(IterationRecord(t_s=te - t0, wall_s=te - ts, host_s=engine.host_seconds - host0,
                                                  **pending))  # fmt: skip
            if prof is not None:
                prof.after_step(iterations)
            memory.append(_memory_sample(engine, te - t0, memory[-1] if memory else None))
            for out in outputs:
                i = by_id.get(out.request_id)
                if i is not None and out.finished:
                    results[i] = _result(specs[i], out, mono0 + specs[i].arrival_s, mono0)
        duration = time.perf_counter() - t0
        summary = None
        if prof is not None:
            prof.finish(iterations)
            summary, prof = prof.summary, None
        stats = engine.stats()
        for k in ("prefix_hit_tokens", "prefix_query_tokens", "num_computed_tokens", "num_generated_tokens",
                  "kv_grow_seconds", "kv_prewarm_seconds"):
            stats[k] -= before[k]
        stats["prefix_hit_rate"] = stats["prefix_hit_tokens"] / max(1, stats["prefix_query_tokens"])
    finally:
        if prof is not None:  # the loop failed: stop the profiler before the error propagates
            prof.stop()
        engine.close()
        del engine
        _release(device)
    assert all(r is not None for r in results)
    return RunResult(cfg.name, results, duration, iterations, memory, stats, summary)  # type: ignore[arg-type]


def run_generate_batch(model: Any, specs: Sequence[RequestSpec], prompts: Sequence[Sequence[int]],
                       max_new_tokens: int, *, num_blocks: Optional[int] = None,
                       max_batch_tokens: Optional[int] = None) -> RunResult:  # fmt: skip
    """transformers' ``generate_batch`` (continuous batching, paged cache),
    greedy, ``max_new_tokens`` for every request (it takes one generation
    config for the batch). Called outside ``torch.inference_mode()``: its
    background thread fails on inference tensors otherwise. Only throughput is
    comparable (per-request latencies are not reported by every version).
    ``num_blocks``, ``max_batch_tokens``: the size of its paged cache in blocks
    and the tokens of one forward pass; ``None``: what it infers from a share
    (60-90%) of the GPU memory free at the start (with one of them given, the
    other), which starves other processes on the GPU: 75 GB reserved for a tiny
    model on the H100 (transformers 5.17), tests running beside it out of memory."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        raise RuntimeError("this transformers has no generate_batch")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    sizes = {name: check_int(name, value, low=1) for name, value in
             (("num_blocks", num_blocks), ("max_batch_tokens", max_batch_tokens)) if value is not None}  # fmt: skip
    options: dict = {}
    if sizes:
        for name, value in sizes.items():  # where earlier versions read them
            setattr(cfg, name, value)
        try:  # 5.1x and later: a config of its own, an argument of generate_batch
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError:
            pass
        else:
            if "continuous_batching_config" in inspect.signature(model.generate_batch).parameters:
                options["continuous_batching_config"] = ContinuousBatchingConfig(**sizes)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    inputs = [list(p) for p in prompts]
    try:
        outs = model.generate_batch(inputs, generation_config=cfg, **options)
    except Exception:
        # Versions that do not pick a paged attention themselves: the one the
        # measurements in docs/benchmarks.md used, then the model's own back.
        orig = model.config._attn_implementation
        model.set_attn_implementation("paged|sdpa")
        try:
            t0 = time.perf_counter()
            outs = model.generate_batch(inputs, generation_config=cfg, **options)
        finally:
            model.set_attn_implementation(orig)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    duration = time.perf_counter() - t0
    generated = [list(getattr(o, "generated_tokens", []) or []) for o in outs.values()]
    results = []
    for s, toks in zip(specs, generated):
        r = RequestResult(s.index, s.prompt_tokens, max_new_tokens, ok=bool(toks), output_tokens=len(toks))
        r.e2e_s = duration if toks else None
        r.error = None if toks else "no output"
        results.append(r)
    _release(device)
    return RunResult("hf-generate_batch", results, duration)
