"""``bench kernels``' ``decode`` section (and ``decode_host``): every decode backend over each
(model, context, batch), on the contiguous (virtual) cache, its paged twins and FlashInfer's paged
anchor; the first shape timed again at the end, and the host's time per call there.

Shared pieces (``Config``, ``MODELS``, the timer) come from :mod:`torch_vkv.bench.kernels` at call
time, as in :mod:`torch_vkv.bench.kernels_tune`: that module imports this one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from torch_vkv.bench import flashinfer_paged
from torch_vkv.bench.timing import host_us, time_us_graph

__all__ = ["decode_rows", "decode_summary"]


def _k():
    """The ``bench kernels`` module (imported at call time: it imports this one)."""
    from torch_vkv.bench import kernels

    return kernels


def decode_rows(cfg: Any, caches: Any, copy_bw: float, log: Callable[[str], None]) -> list:
    """Decode over every (model, context, batch) of ``cfg``: each backend on the contiguous cache, the paged
    twins, FlashInfer's paged anchor. The first shape's contiguous rows are timed again at the end
    (:func:`_recheck_first`), with their host time per call: on the H200 the batch-1 rows timed first
    came out 5-14x slower than in the 2026-11-21 table in two runs."""
    rows: list = []
    first = None
    dev = cfg.device
    total_mem = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 8 << 30
    for model in cfg.models:
        H, H_kv, D = _k().MODELS.get(model, (8, 2, 64))
        for S in cfg.contexts:
            for B in cfg.batches:
                kv_bytes = 2 * B * S * H_kv * D * torch.empty((), dtype=cfg.dtype).element_size()
                base = dict(section="decode", model=model, batch=B, context=S)
                if kv_bytes > cfg.mem_fraction * total_mem:
                    rows.append(dict(base, note=f"skipped: K+V {kv_bytes / 2**30:.0f} GiB > memory limit"))
                    continue
                q = torch.randn((B, H, D), dtype=cfg.dtype, device=dev)
                lens = torch.full((B,), S, dtype=torch.int32, device=dev)
                record = _decode_recorder(cfg, rows, base, kv_bytes, copy_bw, log)
                flex_here = cfg.flex_decode is None or (B, S) in cfg.flex_decode
                _contiguous_decode(cfg, caches, record, q, lens, B, S, H_kv, D, flex_here)
                first = first or (base, q, lens, kv_bytes, H_kv, D, flex_here)
                for block in cfg.paged_blocks:
                    pc = caches.paged(block, B, S, H_kv, D)
                    for backend in _k()._paged_backends(cfg, block, flex_here):
                        record(f"{backend}_paged", "paged", block,
                               lambda b=backend: pc.attention(0, q, lens, backend=b))  # fmt: skip
                    del pc
                flashinfer_paged.anchor(record, "decode", q, B, S, H_kv, D)  # its own pool, block 16
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    if first is not None and len(rows) > 1:
        rows += _recheck_first(cfg, caches, rows, first, copy_bw, log)
    return rows


def _host_row(cfg: Any, base: dict, backend: str, memory: str, block, fn: Callable[[], Any], log) -> dict:
    """A ``decode_host`` row: the host's time per call of ``fn``, calls launched back to back with no
    sync inside the loop, so where the device keeps up this is the host's cost of one call (checks,
    dispatch, launches). Beside the ``decode`` rows it says whether a small-batch time is the host's
    floor or the kernel's."""
    row = dict(base, section="decode_host", backend=backend, memory=memory, block=block)
    calls = 100 if cfg.device.type == "cuda" else 3
    try:
        fn()
        us = host_us(fn, cfg.device, calls)
    except Exception as e:  # one backend failing must not stop the run
        row["note"] = f"error: {type(e).__name__}: {str(e)[:120]}"
    else:
        row.update(us=us, note=f"host time per call, {calls} calls launched back to back")
        log(f"  decode_host {backend}: {us:.1f} us per call on the host")
    return row


def _decode_recorder(cfg: Any, rows: list, base: dict, kv_bytes: int, copy_bw: float, log):
    """``record(backend, memory, block, fn)``: times ``fn`` into a row of ``rows`` (an error becomes a note).

    On CUDA the row's ``us`` is the call replayed from a CUDA graph (:func:`time_us_graph`: the
    kernels' time, as in a CUDA-graph decode step, the same for every backend) and ``us_eager`` the
    eager call (host work included where the device waits for it); a backend that cannot be
    captured keeps its eager time, ``timer`` says which. Off CUDA both are the host loop's.
    """

    def record(backend, memory, block, fn):
        row = dict(base, backend=backend, memory=memory, block=block)
        try:
            us_eager = _k()._time(cfg, fn, cfg.decode_rep_ms)
        except Exception as e:  # one backend failing must not stop the run
            row["note"] = f"error: {type(e).__name__}: {str(e)[:120]}"
            log(f"  decode {base['model']} B={base['batch']} S={base['context']} {backend}/{memory}: {row['note']}")
            rows.append(row)
            return
        us, timer = us_eager, "host loop"
        if cfg.device.type == "cuda":
            try:
                us, timer = time_us_graph(fn, cfg.device, rep_ms=cfg.decode_rep_ms, warmup_ms=cfg.warmup_ms,
                                           l2_flush=cfg.l2_flush), "cuda graph"
            except Exception as e:  # not capturable: the eager time stands, said in the row
                timer = f"eager (capture failed: {type(e).__name__}: {str(e)[:80]})"
        tb = kv_bytes / (us * 1e-6) / 1e12
        row.update(us=us, us_eager=us_eager, timer=timer, tb_s=tb, pct_copy=100 * tb / copy_bw)
        if timer.startswith("eager"):
            row["note"] = timer
        log(f"  decode {base['model']} B={base['batch']:4d} S={base['context']:6d} {backend:10s} {memory:7s} "
            f"{block or '':>4} {us:9.1f} us (eager {us_eager:7.1f}) {tb:5.2f} TB/s {100 * tb / copy_bw:5.1f}%")  # fmt: skip
        rows.append(row)

    return record


def _contiguous_decode(cfg: Any, caches: Any, record, q, lens, B: int, S: int, H_kv: int, D: int,
                       flex_here: bool) -> None:  # fmt: skip
    """Every decode backend of ``DECODE_BACKENDS`` over one contiguous cache (virtual when available)."""
    from torch_vkv.attention import attention

    memory = "vm" if caches.KVCache is not None else "malloc"
    k, v, keep = caches.contiguous(memory, B, S, H_kv, D)
    for backend in _k().DECODE_BACKENDS:
        if not _k()._available(backend, cfg.device) or (backend == "flex" and not flex_here):
            continue
        if backend == "sdpa" and 2 * B * S * H_kv * D * q.element_size() > cfg.sdpa_max_bytes:
            continue
        record(backend, memory, None, lambda b=backend: attention(q, k, v, lens, backend=b))
    del k, v
    _k()._close(keep)


def _recheck_first(cfg: Any, caches: Any, rows: list, first: tuple, copy_bw: float, log) -> list:
    """One more pass over the first shape's contiguous backends, now that everything has run once:
    each is timed again and its host time per call measured (the ``decode_host`` rows, returned).
    Where the first timing in ``rows`` is more than 20% slower than the new one, that row is
    marked (note) and takes the new timing (the first kept as ``us_first``): the later timing is
    the steady state."""
    base, q, lens, kv_bytes, H_kv, D, flex_here = first
    again: list = []
    host: list = []
    timed = _decode_recorder(cfg, again, base, kv_bytes, copy_bw, log)

    def record(backend, memory, block, fn):
        timed(backend, memory, block, fn)
        host.append(_host_row(cfg, base, backend, memory, block, fn, log))

    _contiguous_decode(cfg, caches, record, q, lens, base["batch"], base["context"], H_kv, D, flex_here)
    by_backend = {r["backend"]: r for r in again if r.get("us")}
    for row in rows:
        later = by_backend.get(row.get("backend"))
        if later is None or not row.get("us") or row["model"] != base["model"] or \
                (row["batch"], row["context"]) != (base["batch"], base["context"]):  # fmt: skip
            continue
        if row["us"] > 1.2 * later["us"]:
            log(f"  decode {row['backend']} B={row['batch']} S={row['context']}: first timing {row['us']:.1f} us, "
                f"{later['us']:.1f} us at the end of the section: the later one is kept")  # fmt: skip
            row.update(us_first=row["us"], us=later["us"], us_eager=later["us_eager"], tb_s=later["tb_s"],
                       pct_copy=later["pct_copy"],
                       note=f"timed again at the end of the section: the first timing, {row['us']:.1f} us, was "
                            f"out of line")  # fmt: skip
    return host


def decode_summary(rows: list) -> list:
    """Summary lines of the decode targets: each virtual-memory backend against FlashInfer's paged
    anchor (block 16) at batch >= 8 and context >= 4K (speed-up, target >= 1.02), and the best
    one's share of copy bandwidth at batch 1-4 and context >= 16K (target >= 70%). Rows compared
    only when both were timed the same way (``timer``)."""
    dec = [r for r in rows if r.get("section") == "decode" and r.get("us")]
    shape = lambda r: (r["model"], r["batch"], r["context"])  # noqa: E731
    anchor = {shape(r): r for r in dec if r["backend"] == "flashinfer_paged"}
    ours = [r for r in dec if r["memory"] in ("vm", "malloc")]
    lines = []
    for backend in sorted({r["backend"] for r in ours}):
        pairs = [(anchor[shape(r)]["us"] / r["us"], r) for r in ours if r["backend"] == backend
                 and r["batch"] >= 8 and r["context"] >= 4096 and shape(r) in anchor
                 and anchor[shape(r)].get("timer") == r.get("timer")]  # fmt: skip
        if pairs:
            worst = min(pairs, key=lambda p: p[0])
            lines.append(f"- {backend} on {worst[1]['memory']} memory against flashinfer_paged/16, batch >= 8, "
                         f"context >= 4K: {worst[0]:.3f}x - {max(p[0] for p in pairs):.3f}x the speed (target >= 1.02x: "
                         f"{'met' if worst[0] >= 1.02 else 'NOT met'}; worst at B={worst[1]['batch']} "
                         f"S={worst[1]['context']}).")  # fmt: skip
    small = {}
    for r in ours:
        if r["batch"] <= 4 and r["context"] >= 16384 and r["pct_copy"] > small.get(shape(r), (0, None))[0]:
            small[shape(r)] = (r["pct_copy"], r)
    if small:
        pct = [p for p, _ in small.values()]
        lines.append("- Fastest virtual-memory decode at batch 1-4, context >= 16K: " + ", ".join(
            f"{r['backend']} {p:.0f}% at B={r['batch']} S={r['context']}" for p, r in small.values())
            + f" of copy bandwidth (target >= 70%: {'met' if min(pct) >= 70 else 'NOT met'}).")  # fmt: skip
    return lines
