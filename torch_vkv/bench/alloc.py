"""``python -m torch_vkv bench alloc``: the cost of committing pages on demand.

Two parts, one report (``alloc.json`` / ``alloc.md``):

1. **Page latency** (``section = "latency"``), on a :class:`~torch_vkv.PagePool`
   and a raw reservation of ``torch_vkv._C``: commit and decommit one page per
   call vs one call over a contiguous run of pages (one ``cuMemSetAccess`` /
   unmap per run), an ordered decommit (fence now, unmap at the next reap),
   page creation and the first commit of fresh pages (zero-filled). These are
   host-side driver calls, synchronous on the host, so they are timed with
   ``time.perf_counter``; the median over repeats is reported, per call and per
   page, together with the pool's call counters (maps, set-access and unmap
   calls per repeat).

2. **Lazy-commit overhead in a decode loop** (``section = "decode"``), batch
   64 by default: a :class:`~torch_vkv.KVCache` whose slots start at prompt
   lengths drawn uniformly from ``[min_len, max_len]``; each step appends one
   token per slot to K and V of every layer and reads the cache back (decode
   attention over the valid rows with FlashAttention-2's varlen path and
   ``seqused_k`` on CUDA; a gather + sum over the valid rows on the CPU). Modes,
   side by side on the same cache and the same token trajectory:

   - ``precommitted``: every page the run needs is committed beforehand (a
     static allocation);
   - ``step``: ``cache.step(seq_lens)`` before each step (synchronous commit);
   - ``step_async``: ``cache.step_async(seq_lens)`` before each step (commit
     now what is missing, prefetch the next step's pages on the background
     thread), as in the paper;
   - ``step_async_after_launch``: ``cache.step(seq_lens)`` before the step
     (normally nothing left to commit) and ``cache.step_async(seq_lens)`` once
     the step's kernels are queued, so the background commits overlap the GPU
     work rather than the kernel launches;
   - ``precommitted_step_async``: everything precommitted, ``step_async``
     called anyway: the bookkeeping cost alone.

   By default the host waits for every step's result (``--sync step``), as a
   server does for the sampled tokens; ``--sync none`` lets the host run ahead
   of the GPU, which hides host-side commit costs behind queued kernels.

   Step time comes from CUDA events on the GPU (host ``perf_counter`` on the CPU) at the step boundaries,
   through ``torch_vkv.bench.timing.StepClock``: a decode trajectory is stateful (exactly ``steps`` steps
   from a prepared cache), so a call-repeating timer such as ``do_bench`` cannot drive it. Repeats interleave
   the modes and the overhead is the median over repeats of ``mean step time(mode) / mean step
   time(precommitted) - 1``. The loop passes its lengths as an int64 NumPy array updated in place, the form
   the C++ slot table reads directly.

3. **Host cost of the per-step call** (``section = "step_call"``): microseconds
   per ``step_async(lens)`` when no slot crosses a page, at batch 64 and 256
   (``torch_vkv.bench.step_call``).

Examples::

    python -m torch_vkv bench alloc --quick               # < 1 min on an H100
    python -m torch_vkv bench alloc --out bench_out       # full run
    python -m torch_vkv bench alloc --device cpu --quick  # host backend
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from torch_vkv._checks import device_arg, int_arg, out_dir_arg, page_size_arg
from torch_vkv.bench.report import write_report
from torch_vkv.bench.step_call import bench_step_call
from torch_vkv.bench.timing import StepClock, sync

__all__ = ["main"]

MODES = ("precommitted", "step", "step_async", "step_async_after_launch", "precommitted_step_async")

COLUMNS = (
    "section",
    "name",
    "layout",
    "sync_per_step",
    "pages",
    "us_per_call",
    "us_per_page",
    "map_calls",
    "set_access_calls",
    "unmap_calls",
    "batch",
    "steps",
    "tokens_per_page",
    "ms_per_step",
    "ms_per_step_median",
    "ms_per_step_max",
    "host_ms_per_step",
    "overhead_pct",
    "pages_committed_per_run",
    "read",
    "calls",
)


# --------------------------------------------------------------------- options
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torch_vkv bench alloc",
        description="Per-page commit/decommit latency and the step-time overhead of lazy commit.",
    )
    p.add_argument("--device", default=None, type=device_arg,
                   help="cuda[:N] or cpu (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="a short run (< 1 min on an H100)")
    p.add_argument("--out", default=None, type=out_dir_arg,
                   help="output directory (default: $TORCH_VKV_BENCH_DIR or ./bench_out)")
    g = p.add_argument_group("latency")
    g.add_argument("--pages", type=int, default=None, help="pages per run of the latency part")
    g.add_argument("--latency-repeats", type=int, default=None)
    g = p.add_argument_group("decode loop")
    g.add_argument("--batch", type=int, default=64, help="slots decoding at once (default 64)")
    g.add_argument("--layers", type=int, default=None)
    g.add_argument("--kv-heads", type=int, default=None)
    g.add_argument("--q-heads", type=int, default=None)
    g.add_argument("--head-dim", type=int, default=None)
    g.add_argument("--min-len", type=int, default=None, help="shortest prompt (tokens)")
    g.add_argument("--max-len", type=int, default=None, help="longest prompt (tokens)")
    g.add_argument("--steps", type=int, default=None, help="decode steps per timed run")
    g.add_argument("--warmup", type=int_arg(0), default=None, help="untimed steps per mode before timing")
    g.add_argument("--repeats", type=int, default=None, help="timed runs per mode (modes interleaved)")
    g.add_argument("--layouts", default=None, help="comma-separated KVCache layouts (default: per_layer,interleaved)")
    g.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--page-size", type=page_size_arg, default=None, help="host backend page size in bytes (CPU only)")
    g.add_argument("--sync", choices=("step", "none", "both"), default="step",
                   help="step: wait for each step's result on the host, as a server does for the sampled tokens "
                        "(the default); none: let the host run ahead of the GPU; both: one run of each")
    g.add_argument("--seed", type=int, default=0)
    return p


@dataclass
class Config:
    device: torch.device
    pages: int
    latency_repeats: int
    batch: int
    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    min_len: int
    max_len: int
    steps: int
    warmup: int
    repeats: int
    layouts: list[str]
    dtype: torch.dtype
    page_size: int | None
    seed: int
    sync: list[bool]


def _config(args: argparse.Namespace) -> Config:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench alloc: --device cuda asked for, but no CUDA GPU is available (try --device cpu)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if args.page_size is not None:
            raise SystemExit("bench alloc: --page-size is for the host backend; CUDA uses the driver's granularity")
        # GPU defaults: a Llama-3-8B-like layer shape, 8 of its 32 layers.
        d = dict(pages=64 if args.quick else 256, latency_repeats=5 if args.quick else 20, layers=8, kv_heads=8,
                 q_heads=32, head_dim=128, min_len=512 if args.quick else 1024, max_len=3072 if args.quick else 8192,
                 steps=256 if args.quick else 1024, warmup=16 if args.quick else 32, repeats=3 if args.quick else 5,
                 dtype="bfloat16", page_size=None)
    elif device.type == "cpu":
        # CPU defaults: small shapes and 16 KiB pages, so that slots cross page
        # boundaries within a short run (64 tokens per page per buffer).
        d = dict(pages=16 if args.quick else 64, latency_repeats=3 if args.quick else 10, layers=2, kv_heads=2,
                 q_heads=4, head_dim=32, min_len=32 if args.quick else 64, max_len=160 if args.quick else 512,
                 steps=24 if args.quick else 128, warmup=2 if args.quick else 8, repeats=2 if args.quick else 5,
                 dtype="float32", page_size=16 << 10)
    else:
        raise SystemExit(f"bench alloc: --device expected cpu or cuda[:N], got {args.device!r}")

    def pick(name: str) -> Any:
        v = getattr(args, name)
        return d[name] if v is None else v

    dtype_name = pick("dtype")
    dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float32": torch.float32, "fp32": torch.float32}.get(dtype_name)
    if dtype is None:
        raise SystemExit(f"bench alloc: --dtype expected bfloat16, float16 or float32, got {dtype_name!r}")
    layouts = (args.layouts or "per_layer,interleaved").split(",")
    for lay in layouts:
        if lay not in ("per_layer", "interleaved"):
            raise SystemExit(f"bench alloc: --layouts expected per_layer and/or interleaved, got {lay!r}")
    cfg = Config(device=device, pages=pick("pages"), latency_repeats=pick("latency_repeats"), batch=args.batch,
                 layers=pick("layers"), kv_heads=pick("kv_heads"), q_heads=pick("q_heads"),
                 head_dim=pick("head_dim"), min_len=pick("min_len"), max_len=pick("max_len"), steps=pick("steps"),
                 warmup=pick("warmup"), repeats=pick("repeats"), layouts=layouts, dtype=dtype,
                 page_size=pick("page_size"), seed=args.seed,
                 sync={"step": [True], "none": [False], "both": [True, False]}[args.sync])
    for name in ("pages", "latency_repeats", "batch", "layers", "kv_heads", "q_heads", "head_dim", "min_len",
                 "steps", "repeats"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"bench alloc: --{name.replace('_', '-')} expected >= 1, got {getattr(cfg, name)}")
    if cfg.max_len < cfg.min_len:  # --warmup >= 0: its argparse type
        raise SystemExit(f"bench alloc: --max-len expected >= --min-len ({cfg.min_len}), got {cfg.max_len}")
    if cfg.q_heads % cfg.kv_heads:
        raise SystemExit(f"bench alloc: --q-heads expected a multiple of --kv-heads ({cfg.kv_heads}), got {cfg.q_heads}")
    per_token = 2 * cfg.layers * cfg.kv_heads * cfg.head_dim * torch.empty((), dtype=cfg.dtype).element_size()
    mem = (torch.cuda.mem_get_info(device)[1] if device.type == "cuda"
           else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if cfg.batch * (cfg.max_len + cfg.warmup + cfg.steps + 1) * per_token > mem:  # what the decode loop commits
        raise SystemExit(f"bench alloc: --max-len expected {per_token} bytes/token x --batch {cfg.batch} to fit in "
                         f"{mem >> 20} MiB of {device.type} memory, got {cfg.max_len}")
    return cfg


# ---------------------------------------------------------------- 1. latency
def _median_us(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e6


def bench_latency(cfg: Config) -> list[dict[str, Any]]:
    """Commit / decommit latency of single pages vs contiguous runs."""
    from torch_vkv._ext import core
    from torch_vkv.pool import PagePool

    C = core()
    n = cfg.pages
    page_size = None if cfg.device.type == "cuda" else (2 << 20)  # the GPU's page size on the host too
    pool = PagePool(cfg.device, page_size=page_size)
    ps = pool.page_size
    pool.set_max_bytes(n * ps)
    raw = pool._pool  # the C++ pool: the Reservation API takes it directly
    res = C.Reservation.create(raw, n * ps)
    stream = int(torch.cuda.current_stream(cfg.device).cuda_stream) if cfg.device.type == "cuda" else None
    rows: list[dict[str, Any]] = []

    def row(name: str, per_call: list[float], pages_per_call: int, before: dict, after: dict, repeats: int) -> None:
        rows.append({
            "section": "latency", "name": name, "pages": pages_per_call,
            "us_per_call": _median_us(per_call), "us_per_page": _median_us(per_call) / pages_per_call,
            "map_calls": (after["map_calls"] - before["map_calls"]) / repeats,
            "set_access_calls": (after["set_access_calls"] - before["set_access_calls"]) / repeats,
            "unmap_calls": (after["unmap_calls"] - before["unmap_calls"]) / repeats,
        })

    # Page creation (cuMemCreate / memfd growth), then the first commit of
    # fresh pages, which also zero-fills them.
    t0 = time.perf_counter()
    pool.prefill(n * ps)
    t_create = time.perf_counter() - t0
    rows.append({"section": "latency", "name": "create_page", "pages": 1, "us_per_call": t_create / n * 1e6,
                 "us_per_page": t_create / n * 1e6, "map_calls": 0, "set_access_calls": 0, "unmap_calls": 0})
    s1 = pool.stats()
    t0 = time.perf_counter()
    res.commit(0, n)
    t_first = time.perf_counter() - t0
    s2 = pool.stats()
    row("commit_first_touch_batched (map+set_access+zero)", [t_first], n, s1, s2, 1)
    res.decommit(0, n, None)

    single_c: list[float] = []
    single_d: list[float] = []
    batch_c: list[float] = []
    batch_d: list[float] = []
    fence_d: list[float] = []
    reap: list[float] = []
    counters: dict[str, list[dict]] = {k: [] for k in ("sc", "sd", "bc", "bd", "fd")}
    for _ in range(cfg.latency_repeats):
        a = pool.stats()
        for i in range(n):
            t0 = time.perf_counter()
            res.commit(i, 1)
            single_c.append(time.perf_counter() - t0)
        b = pool.stats()
        for i in range(n):
            t0 = time.perf_counter()
            res.decommit(i, 1, None)
            single_d.append(time.perf_counter() - t0)
        c = pool.stats()
        t0 = time.perf_counter()
        res.commit(0, n)
        batch_c.append(time.perf_counter() - t0)
        d = pool.stats()
        t0 = time.perf_counter()
        res.decommit(0, n, None)
        batch_d.append(time.perf_counter() - t0)
        e = pool.stats()
        # Ordered decommit: record a fence now, unmap when it has completed.
        res.commit(0, n)
        sync(cfg.device)
        f = pool.stats()
        t0 = time.perf_counter()
        res.decommit(0, n, stream)
        t1 = time.perf_counter()
        sync(cfg.device)
        raw.reap()
        t2 = time.perf_counter()
        fence_d.append(t1 - t0)
        reap.append(t2 - t1)
        g = pool.stats()
        counters["sc"].append((a, b))
        counters["sd"].append((b, c))
        counters["bc"].append((c, d))
        counters["bd"].append((d, e))
        counters["fd"].append((f, g))
    r = cfg.latency_repeats

    def span(key: str) -> tuple[dict, dict]:
        pairs = counters[key]
        tot_before = {k: sum(p[0][k] for p in pairs) for k in ("map_calls", "set_access_calls", "unmap_calls")}
        tot_after = {k: sum(p[1][k] for p in pairs) for k in ("map_calls", "set_access_calls", "unmap_calls")}
        return tot_before, tot_after

    row("commit_single (1 page per call)", single_c, 1, *span("sc"), r)
    rows[-1]["pages"] = 1
    row("commit_batched (contiguous run)", batch_c, n, *span("bc"), r)
    row("decommit_single (1 page per call)", single_d, 1, *span("sd"), r)
    row("decommit_batched (contiguous run)", batch_d, n, *span("bd"), r)
    ordered = [x + y for x, y in zip(fence_d, reap)]
    row("decommit_ordered_batched (fence + reap)", ordered, n, *span("fd"), r)
    rows[-1]["fence_us"] = _median_us(fence_d)
    rows[-1]["reap_us"] = _median_us(reap)
    # The single-page rows' counters are per repeat of n calls: show them per call.
    for rr in rows:
        if rr["name"].startswith(("commit_single", "decommit_single")):
            for k in ("map_calls", "set_access_calls", "unmap_calls"):
                rr[k] = rr[k] / n
    del res
    pool.trim()
    return rows


# ----------------------------------------------------------- 2. decode loop
class _DecodeLoop:
    """One KVCache and a synthetic decode step over it (append + read back)."""

    def __init__(self, cfg: Config, layout: str) -> None:
        from torch_vkv import KVCache

        self.cfg = cfg
        self.dev = cfg.device
        B, L = cfg.batch, cfg.layers
        gen = torch.Generator().manual_seed(cfg.seed)
        self.prompt = torch.randint(cfg.min_len, cfg.max_len + 1, (B,), generator=gen).tolist()
        # Enough rows for the longest run; FlashAttention may read a tile past
        # the last valid row, so keep a margin committed.
        need = max(self.prompt) + cfg.warmup + cfg.steps + 1
        margin = 256 if self.dev.type == "cuda" else 0
        kw = dict(max_batch_size=B, dtype=cfg.dtype, device=self.dev, layout=layout, margin_tokens=margin,
                  page_size=cfg.page_size)
        cache = KVCache(L, cfg.kv_heads, cfg.head_dim, max_seq_len=need, **kw)
        if cache.padded_seq_len != need:
            # Rows padded to whole pages: take the padding as capacity, so each
            # layer's [B, S] flattens into one row dimension (a view).
            padded = cache.padded_seq_len
            cache.close()
            cache = KVCache(L, cfg.kv_heads, cfg.head_dim, max_seq_len=padded, **kw)
        self.cache = cache
        self.S = cache.max_seq_len
        for _ in range(B):
            cache.alloc()
        for slot, n in enumerate(self.prompt):
            cache.reserve(slot, n)

        self.keys = [cache.key(l).flatten(0, 1) for l in range(L)]  # [B*S, H_kv, D] views
        self.values = [cache.value(l).flatten(0, 1) for l in range(L)]
        gen_dev = torch.Generator(device=self.dev).manual_seed(cfg.seed)
        shape = (B, cfg.kv_heads, cfg.head_dim)
        self.k_new = torch.randn(shape, generator=gen_dev, device=self.dev).to(cfg.dtype)
        self.v_new = torch.randn(shape, generator=gen_dev, device=self.dev).to(cfg.dtype)
        self.q = torch.randn((B, cfg.q_heads, cfg.head_dim), generator=gen_dev, device=self.dev).to(cfg.dtype)
        self.slot_base = torch.arange(B, device=self.dev) * self.S  # first row of each slot
        self.cu_q = torch.arange(B + 1, device=self.dev, dtype=torch.int32)
        self.cu_k = (torch.arange(B + 1, device=self.dev, dtype=torch.int32) * self.S).to(torch.int32)
        self.pos = torch.tensor(self.prompt, device=self.dev, dtype=torch.int64)  # next row to write
        self.pos32 = self.pos.to(torch.int32)
        self.checksum = torch.zeros((), device=self.dev, dtype=torch.float32)
        self.read = "flash_attention_varlen" if self._flash_ok() else "gather_sum"

    # -- the step ------------------------------------------------------------
    def _flash(self, l: int, max_k: int, seqused: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._flash_attention_forward(
            self.q, self.keys[l], self.values[l], self.cu_q, self.cu_k, 1, max_k, 0.0, False, False,
            seqused_k=seqused,
        )
        return out[0]

    def _flash_ok(self) -> bool:
        if self.dev.type != "cuda" or self.cfg.dtype not in (torch.float16, torch.bfloat16):
            return False
        try:
            seqused = torch.tensor(self.prompt, device=self.dev, dtype=torch.int32)
            out = self._flash(0, max(self.prompt), seqused)
            torch.cuda.synchronize(self.dev)
            return bool(torch.isfinite(out).all())
        except (RuntimeError, TypeError, AttributeError):
            return False

    def step_compute(self, max_len: int, total: int) -> None:
        """Appends one token per slot in every layer, then reads the valid rows
        (``max_len``: the longest slot after the step, ``total``: all slots' tokens)."""
        rows = self.slot_base + self.pos  # [B]: the row each slot writes now
        for l in range(self.cfg.layers):
            self.keys[l].index_copy_(0, rows, self.k_new)
            self.values[l].index_copy_(0, rows, self.v_new)
        self.pos += 1
        self.pos32 += 1
        if self.read == "flash_attention_varlen":
            max_k = max_len
            for l in range(self.cfg.layers):
                self.checksum += self._flash(l, max_k, self.pos32).float().sum()
        else:
            lens = self.pos
            starts = torch.cumsum(lens, 0) - lens
            idx = torch.repeat_interleave(self.slot_base - starts, lens, output_size=total)
            idx += torch.arange(total, device=self.dev)
            for l in range(self.cfg.layers):
                self.checksum += self.keys[l].index_select(0, idx).float().sum()
                self.checksum += self.values[l].index_select(0, idx).float().sum()

    # -- one run of a mode ---------------------------------------------------
    def prepare(self, mode: str, steps: int) -> None:
        """Puts the cache back at the prompt lengths; ``precommitted`` then
        commits everything the run will need."""
        cache = self.cache
        for slot, n in enumerate(self.prompt):
            cache.decommit(slot, n)
            cache.reserve(slot, n)
        if mode.startswith("precommitted"):
            for slot, n in enumerate(self.prompt):
                cache.reserve(slot, n + steps + 1)  # + 1: step_async's lookahead
        sync(self.dev)
        cache.pool._pool.reap()  # unmap what the decommits left pending now, not inside the run
        self.pos.copy_(torch.tensor(self.prompt, dtype=torch.int64))
        self.pos32.copy_(self.pos)
        self.checksum.zero_()
        sync(self.dev)

    def run(self, mode: str, steps: int, sync_each_step: bool = True) -> dict[str, Any]:
        self.prepare(mode, steps)
        cache = self.cache
        before = cache.pool.stats()["map_calls"]
        timer = StepClock(self.dev, steps)
        lens = np.array(self.prompt, dtype=np.int64)  # updated in place: the slot table reads it as it is
        max_len, total, B = max(self.prompt), sum(self.prompt), len(self.prompt)
        t0 = time.perf_counter()
        for t in range(steps):
            timer.mark(t)
            lens += 1
            if mode == "step" or mode == "step_async_after_launch":
                cache.step(lens)
            elif mode == "step_async" or mode == "precommitted_step_async":
                cache.step_async(lens)
            self.step_compute(max_len + t + 1, total + B * (t + 1))
            if mode == "step_async_after_launch":
                cache.step_async(lens)  # nothing left to commit now: only the prefetch, behind the kernels
            if sync_each_step:
                self.checksum.item()  # the host waits for the step, as for sampled tokens
        timer.mark(steps)
        cache.synchronize()
        sync(self.dev)
        host_s = time.perf_counter() - t0
        per_step = timer.step_ms()
        return {
            "ms_per_step": sum(per_step) / steps,
            "ms_per_step_median": statistics.median(per_step),
            "ms_per_step_max": max(per_step),
            "host_ms_per_step": host_s * 1e3 / steps,
            "pages_committed": cache.pool.stats()["map_calls"] - before,
            "checksum": float(self.checksum),
        }

    def close(self) -> None:
        self.cache.close()


def bench_decode(cfg: Config, layout: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    loop = _DecodeLoop(cfg, layout)
    try:
        for mode in MODES:  # warm-up: kernels, allocator, page pool
            if cfg.warmup:
                loop.run(mode, cfg.warmup)
        rows: list[dict[str, Any]] = []
        for host_waits in cfg.sync:
            rows += _decode_runs(cfg, loop, layout, host_waits, log)
        return rows
    finally:
        loop.close()


def _decode_runs(
    cfg: Config, loop: _DecodeLoop, layout: str, sync: bool, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(cfg.repeats):
        order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]  # rotate to spread drift
        for mode in order:
            results[mode].append(loop.run(mode, cfg.steps, sync))
        log(f"  {layout} sync_per_step={sync} repeat {r + 1}/{cfg.repeats}: " + ", ".join(
            f"{m} {results[m][-1]['ms_per_step']:.3f} ms" for m in MODES))
    base = results["precommitted"]
    checksums = {m: [x["checksum"] for x in results[m]] for m in MODES}
    rows = []
    for mode in MODES:
        rs = results[mode]
        overhead = [x["ms_per_step"] / b["ms_per_step"] - 1 for x, b in zip(rs, base)]
        same = all(abs(c - b) <= 1e-3 * max(1.0, abs(b)) for c, b in zip(checksums[mode], checksums["precommitted"]))
        rows.append({
            "section": "decode", "name": mode, "layout": layout, "sync_per_step": sync, "batch": cfg.batch,
            "steps": cfg.steps,
            "tokens_per_page": loop.cache.tokens_per_page,
            "ms_per_step": statistics.median(x["ms_per_step"] for x in rs),
            "ms_per_step_median": statistics.median(x["ms_per_step_median"] for x in rs),
            "ms_per_step_max": max(x["ms_per_step_max"] for x in rs),
            "host_ms_per_step": statistics.median(x["host_ms_per_step"] for x in rs),
            "overhead_pct": 100 * statistics.median(overhead),
            "pages_committed_per_run": statistics.median(x["pages_committed"] for x in rs),
            "read": loop.read,
            "output_matches_precommitted": same,
            "layers": cfg.layers, "kv_heads": cfg.kv_heads, "q_heads": cfg.q_heads, "head_dim": cfg.head_dim,
            "dtype": str(cfg.dtype).replace("torch.", ""), "min_len": cfg.min_len, "max_len": cfg.max_len,
            "repeats": cfg.repeats,
        })
    return rows


# ------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = (parser := _parser()).parse_args(argv)
    try:  # a bad value that _config finds is a usage error (exit status 2), as argparse's own are
        cfg = _config(args)
    except SystemExit as e:
        parser.error(str(e.code).removeprefix("bench alloc: "))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if cfg.device.type == "cuda":
        torch.cuda.set_device(cfg.device)
    t_start = time.perf_counter()
    log(f"bench alloc on {cfg.device}: latency over {cfg.pages} pages x {cfg.latency_repeats} repeats")
    rows = bench_latency(cfg)
    # On the CPU, one intra-op thread: spinning OpenMP workers would otherwise
    # compete with the committer thread for the cores and drown the signal.
    threads = torch.get_num_threads()
    if cfg.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for layout in cfg.layouts:
            log(f"bench alloc: decode loop, layout {layout}, batch {cfg.batch}, {cfg.layers} layers, "
                f"{cfg.steps} steps x {cfg.repeats} repeats")
            rows += bench_decode(cfg, layout, log)
        for layout in cfg.layouts:
            rows += bench_step_call(cfg.device, layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                                    dtype=cfg.dtype, page_size=cfg.page_size, layout=layout,
                                    calls=500 if args.quick else 2000)
    finally:
        torch.set_num_threads(threads)

    lat = {r["name"].split(" ")[0]: r for r in rows if r["section"] == "latency"}
    lines = [
        f"device {cfg.device} ({'CUDA events' if cfg.device.type == 'cuda' else 'perf_counter'} for step times; "
        f"latency is host time of the driver calls), {time.perf_counter() - t_start:.1f} s in all.",
        "",
        f"- commit: {lat['commit_single']['us_per_page']:.2f} us/page one page per call vs "
        f"{lat['commit_batched']['us_per_page']:.2f} us/page batched over {cfg.pages} contiguous pages "
        f"({lat['commit_single']['us_per_page'] / max(lat['commit_batched']['us_per_page'], 1e-9):.1f}x)",
        f"- decommit: {lat['decommit_single']['us_per_page']:.2f} us/page single vs "
        f"{lat['decommit_batched']['us_per_page']:.2f} us/page batched; ordered (fence + reap) "
        f"{lat['decommit_ordered_batched']['us_per_page']:.2f} us/page",
    ]
    for layout, host_waits in ((lay, sy) for lay in cfg.layouts for sy in cfg.sync):
        d = {r["name"]: r for r in rows if r["section"] == "decode" and r["layout"] == layout
             and r["sync_per_step"] == host_waits}
        lines.append(
            f"- decode {layout}, {'host sync every step' if host_waits else 'host runs ahead'} "
            f"(batch {cfg.batch}, {d['precommitted']['tokens_per_page']} tokens/page): "
            f"precommitted {d['precommitted']['ms_per_step']:.3f} ms/step; step {d['step']['overhead_pct']:+.2f}%, "
            f"step_async {d['step_async']['overhead_pct']:+.2f}% (target <= 1%), "
            f"step_async_after_launch {d['step_async_after_launch']['overhead_pct']:+.2f}%, "
            f"bookkeeping alone {d['precommitted_step_async']['overhead_pct']:+.2f}%; "
            f"outputs match: {all(r['output_matches_precommitted'] for r in d.values())}"
        )
    calls = {(r["layout"], r["batch"]): r["us_per_call"] for r in rows if r["section"] == "step_call"}
    lines.append("- step_async host cost with unchanged lengths (no page crossed): " + ", ".join(
        f"{lay} batch {b} {us:.2f} us/call" for (lay, b), us in calls.items()) + " (target <= 3 us at batch 256)")
    summary = "\n".join(lines)
    command = "python -m torch_vkv bench alloc " + " ".join(shlex.quote(a) for a in argv)
    write_report("alloc", rows, args.out, command=command.strip(), columns=COLUMNS, summary=summary)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
