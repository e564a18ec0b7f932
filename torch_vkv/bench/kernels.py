"""``python -m torch_vkv bench kernels``: attention kernels on virtual KV vs paged KV.

One run, one report (``kernels.json`` / ``kernels.md``, plots if matplotlib is
importable), sections side by side (``section`` column), bf16, head shapes of
Llama-3-8B (32 query heads, 8 KV heads, head_dim 128) and Yi-34B (56/8/128):

* ``copy``: copy bandwidth of this GPU measured in the same run
  (``dst.copy_(src)`` of 1 GiB, read + write bytes counted), the yardstick
  for decode.
* ``decode``: batch x context, one query per request, every request at the
  full context. Every backend of :func:`torch_vkv.attention.attention` on the
  virtual cache (a :class:`torch_vkv.KVCache`, ``per_layer``; plain
  ``cudaMalloc`` memory if KVCache is unavailable, said in the ``memory``
  column), then the paged twins: our Triton kernels through a block table
  (block 16 and 256), FlexAttention over the block pool, and flash-attn's
  paged kernel (block 256) when installed; FlashInfer's paged anchor when importable
  (:mod:`torch_vkv.bench.flashinfer_paged`). Reported: us, TB/s of K+V read, % of copy BW, and
  ``x_flashinfer_paged``: the anchor's time over the row's (prefill rows too), where both were timed alike.
  The first shape is timed again at the end (an out-of-line first timing is replaced, with a note).
* ``decode_host``: at the first shape, the host's time per call of each backend (calls launched
  back to back, no sync inside): beside ``decode``, whether a small-batch time is the host's floor.
* ``prefill``: batch 1, causal, context c (c queries over c keys): TFLOP/s
  (4 * H * D * c^2 / 2 FLOPs).
* ``vm_vs_malloc``: the same kernel on ``cudaMalloc`` memory and on the
  virtual cache, measurements interleaved; the ratio should be 1.00.
* ``step``: decode per layer of a CUDA-graph step over an ``L``-layer KVCache (one graph of ``L``
  calls, the launch shared, as the serving engine's decode steps run), at small batches and long
  contexts, with FlashInfer's paged anchor (:mod:`torch_vkv.bench.kernels_step`).
* ``decode_tune`` / ``prefill_tune``: our Triton kernels over their launch
  parameters (:mod:`torch_vkv.bench.kernels_tune`), to check the defaults.

Timing: ``triton.testing.do_bench`` (``torch_vkv.bench.timing.time_us``): CUDA
events around each call, the L2 cleared before each call (which also keeps the
GPU busy while the host enqueues the call, so host launch overhead is mostly
hidden); the median over the calls that fit the section's time budget. Decode
rows are timed twice: ``us`` replays the call from a CUDA graph
(``time_us_graph``: the kernels alone, as a CUDA-graph decode step runs them;
a backend that cannot be captured keeps its eager time, said in ``timer`` and
the note) and ``us_eager`` times the eager call, where a small batch shows
the host's cost per call. On the CPU (``--smoke``) a ``perf_counter`` loop.
``--l2-flush read`` empties the L2 before each call by reading 256 MB instead of
``do_bench``'s writing them, whose dirty lines each timed call otherwise writes back
(see :mod:`torch_vkv.bench.timing`; it weighs on a small batch's decode).

Examples::

    python -m torch_vkv bench kernels --quick            # < 2 min on an H100
    python -m torch_vkv bench kernels --out bench_out    # full grid
    python -m torch_vkv bench kernels --smoke            # tiny, CPU ok (plumbing check)
    python -m torch_vkv bench kernels --quick --window 0      # without the 4K-window decode section
    python -m torch_vkv bench kernels --quick --sections decode,prefill
    python -m torch_vkv bench kernels --quick --sections decode --batches 8,16 --contexts 4096,32768
    python -m torch_vkv bench kernels --quick --sections decode --batches 1,2,4 --l2-flush read
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from torch_vkv._checks import device_arg, int_arg, int_list_arg, out_dir_arg
from torch_vkv.bench.kernels_decode import decode_rows, decode_summary
from torch_vkv.bench.kernels_step import step_rows, step_summary
from torch_vkv.bench.kernels_tune import decode_tune_rows, prefill_tune_rows, prefill_tune_summary
from torch_vkv.bench.kernels_window import window_rows, window_summary
from torch_vkv.bench import flashinfer_paged
from torch_vkv.bench.report import plot_kernels, write_report
from torch_vkv.bench.timing import L2_FLUSHES, time_us

__all__ = ["main"]

MODELS = {"llama3-8b": (32, 8, 128), "yi-34b": (56, 8, 128)}
DECODE_BACKENDS = ("flashinfer", "triton", "torch_fa2", "flash_attn", "flex", "sdpa")
PREFILL_BACKENDS = ("flashinfer", "torch_fa2", "triton", "flash_attn", "flex", "sdpa")
#: ``--sections``: decode (with decode_host), prefill, vm_vs_malloc, the two tune sections, layout, window,
#: step (decode per layer of a CUDA-graph step, :mod:`torch_vkv.bench.kernels_step`).
SECTIONS = ("decode", "prefill", "vm", "tune", "layout", "window", "step")
COLUMNS = (
    "section", "model", "backend", "memory", "block", "batch", "context", "us", "us_eager", "tb_s", "pct_copy",
    "x_flashinfer_paged", "tflop_s", "ratio_vm_malloc", "bytes_read", "note",
)  # fmt: skip


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    models: list
    batches: list
    contexts: list
    prefill_contexts: list
    decode_rep_ms: float  # do_bench budgets (ms): timed calls, and warm-up before them
    prefill_rep_ms: float
    warmup_ms: float
    flex_decode: set = field(default_factory=set)  # (batch, context) where flex runs; None = everywhere
    flex_prefill: set = field(default_factory=set)
    vm_decode: list = field(default_factory=list)
    vm_prefill: list = field(default_factory=list)
    tune: list = field(default_factory=list)  # (batch, context) where Triton decode parameters are swept
    tune_full: bool = True
    prefill_tune: list = field(default_factory=list)  # contexts where Triton prefill parameters are swept
    layout_cases: list = field(default_factory=list)  # (batch, context): per_layer vs interleaved decode
    layout_layers: int = 32
    step_cases: list = field(default_factory=list)  # (batch, context): decode per layer of a step graph
    step_layers: int = 32
    step_mem_gib: float = 16.0  # K+V bytes of one step graph at most (fewer layers past it)
    mem_fraction: float = 0.6
    sdpa_max_bytes: int = 2 << 30
    paged_blocks: tuple = (16, 256)
    flex_paged_blocks: tuple = (16, 256)  # flex compiles once per shape and block size: fewer in --quick
    plots: bool = True
    use_vm: bool = True
    l2_flush: str = "write"  # torch_vkv.bench.timing's: how the L2 is emptied before each timed call


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torch_vkv bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (< 2 min on an H100)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the plumbing only")
    p.add_argument("--out", default=None, type=out_dir_arg,
                   help="output folder (default $TORCH_VKV_BENCH_DIR or ./bench_out)")
    p.add_argument("--device", default=None, type=device_arg, help="default cuda if available")
    p.add_argument("--models", default=None, help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--no-vm", action="store_true", help="do not use torch_vkv.KVCache (cudaMalloc only)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--flex-everywhere", action="store_true", help="run flex at every shape (compiles per shape: slow)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of sections to run, from "
                   f"{','.join(SECTIONS)} (default: all; the copy bandwidth is always measured)")  # fmt: skip
    p.add_argument("--batches", type=int_list_arg(1), default=None,
                   help="comma list: the decode section's batch sizes instead of the run size's (e.g. 8,16,32)")
    p.add_argument("--contexts", type=int_list_arg(1), default=None,
                   help="comma list: the decode section's context lengths instead of the run size's (e.g. 4096,16384)")
    p.add_argument("--prefill-contexts", type=int_list_arg(1), default=None,
                   help="comma list: the prefill section's prompt lengths instead of the run size's (e.g. 8192,131072)")
    p.add_argument("--l2-flush", choices=L2_FLUSHES, default="write",
                   help="empty the L2 before each timed call by writing 256 MB (do_bench's way, the default: "
                   "the call then writes back dirty lines) or by reading them")  # fmt: skip
    p.add_argument("--window", type=int_arg(0), default=4096, help="the sliding-window decode section: window_left=N "
                   "at 32K and 128K context vs full attention, time and bytes read (default 4096; 0: off)")  # fmt: skip
    return p


def _config(args) -> Config:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = args.models.split(",") if args.models else (["llama3-8b"] if args.quick else list(MODELS))
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: expected names from {sorted(MODELS)}, got {m!r}")
    if args.smoke:
        return Config(
            device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
            models=["tiny"], batches=[1, 4], contexts=[64, 256], prefill_contexts=[128], decode_rep_ms=2,
            prefill_rep_ms=2, warmup_ms=1, flex_decode={(4, 256)}, flex_prefill={128}, vm_decode=[(4, 256)],
            vm_prefill=[128], tune=[(4, 256)], tune_full=False, prefill_tune=[64], paged_blocks=(16,), plots=not args.no_plots, use_vm=not args.no_vm,
            layout_cases=[(4, 256)], layout_layers=2, step_cases=[(1, 256), (4, 256)], step_layers=2,
        )  # fmt: skip
    if args.quick:
        cfg = Config(
            device=dev, dtype=torch.bfloat16, models=models, batches=[1, 32, 128], contexts=[4096, 16384],
            prefill_contexts=[2048, 8192, 32768], decode_rep_ms=25, prefill_rep_ms=50, warmup_ms=10,
            flex_decode={(32, 4096)}, flex_prefill=set(), vm_decode=[(32, 4096)], vm_prefill=[32768],
            tune=[(32, 4096)], tune_full=False, prefill_tune=[8192], flex_paged_blocks=(16,), layout_cases=[(8, 4096), (32, 4096)],
            step_cases=[(1, 16384), (2, 16384), (4, 16384), (1, 32768)],
        )  # fmt: skip
    else:
        cfg = Config(
            device=dev, dtype=torch.bfloat16, models=models, batches=[1, 8, 32, 64, 128, 256],
            contexts=[1024, 4096, 16384, 32768], prefill_contexts=[2048, 8192, 32768, 65536, 131072],
            decode_rep_ms=50, prefill_rep_ms=100, warmup_ms=25,
            flex_decode={(b, c) for b in (1, 32, 128) for c in (4096, 16384)}, flex_prefill={8192, 32768},
            vm_decode=[(32, 4096), (64, 16384), (128, 4096)], vm_prefill=[8192, 32768],
            tune=[(8, 16384), (32, 4096), (128, 16384)], prefill_tune=[8192, 32768], layout_cases=[(8, 4096), (32, 4096), (8, 16384)],
            step_cases=[(1, 16384), (2, 16384), (4, 16384), (1, 32768), (4, 32768), (8, 16384), (32, 4096)],
        )  # fmt: skip
    cfg.batches = args.batches or cfg.batches
    cfg.contexts = args.contexts or cfg.contexts
    cfg.prefill_contexts = args.prefill_contexts or cfg.prefill_contexts
    if args.flex_everywhere:
        cfg.flex_decode = None
        cfg.flex_prefill = None
    cfg.plots = not args.no_plots
    cfg.use_vm = not args.no_vm
    cfg.l2_flush = args.l2_flush
    return cfg


# ----------------------------------------------------------------------------- timing


def _time(cfg: Config, fn: Callable[[], Any], rep_ms: float) -> float:
    """Median microseconds of ``fn()`` (do_bench on CUDA), after ``cfg.warmup_ms`` of warm-up."""
    return time_us(fn, cfg.device, rep_ms=rep_ms, warmup_ms=cfg.warmup_ms, l2_flush=cfg.l2_flush)


def copy_bandwidth(cfg: Config, nbytes: int = 1 << 30) -> float:
    """TB/s of ``dst.copy_(src)``, read + write bytes counted."""
    if cfg.device.type != "cuda":
        nbytes = 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=cfg.device)
    dst = torch.empty_like(src)
    us = _time(cfg, lambda: dst.copy_(src), cfg.decode_rep_ms)
    return 2 * nbytes / (us * 1e-6) / 1e12


# ----------------------------------------------------------------------------- caches


class Caches:
    """Builds the same-shaped cache in cudaMalloc memory, in a KVCache, or in a paged pool."""

    def __init__(self, cfg: Config, log) -> None:
        self.cfg = cfg
        self.log = log
        self.vm_error = None
        self.KVCache = None
        if cfg.use_vm:
            try:
                from torch_vkv import KVCache

                self.KVCache = KVCache
            except Exception as e:  # the core is optional for this benchmark
                self.vm_error = f"torch_vkv.KVCache not importable ({type(e).__name__}: {e}); using cudaMalloc"
        else:
            self.vm_error = "--no-vm: using cudaMalloc"

    def contiguous(self, memory: str, B: int, S: int, H_kv: int, D: int, margin: int = 0):
        """(k, v, keepalive) ``[B, S + margin, H_kv, D]`` filled with random data; memory 'vm' or 'malloc'.
        ``margin``: rows past the ``S`` keys, committed (``KVCache(margin_tokens=...)``), as a server's
        cache has them: FlashInfer's FA3 reads whole tiles past a length and is only used where they are."""
        cfg = self.cfg
        if memory == "vm":
            if self.KVCache is None:
                raise RuntimeError(self.vm_error)
            cache = self.KVCache(1, H_kv, D, max_batch_size=B, max_seq_len=S + margin, dtype=cfg.dtype,
                                 device=cfg.device, layout="per_layer", margin_tokens=margin)  # fmt: skip
            for _ in range(B):
                cache.reserve(cache.alloc(), S)
            # Plain-tensor views of the same memory: kernels see ordinary strided tensors.
            k = cache.key(0).as_subclass(torch.Tensor)
            v = cache.value(0).as_subclass(torch.Tensor)
            k.normal_()
            v.normal_()
            return k, v, cache
        buf = torch.empty((2, B, S + margin, H_kv, D), dtype=cfg.dtype, device=cfg.device)
        buf.normal_()
        return buf[0], buf[1], buf

    def paged(self, block: int, B: int, S: int, H_kv: int, D: int):
        from torch_vkv.paged import PagedKVCache

        cache = PagedKVCache(1, H_kv, D, num_blocks=B * math.ceil(S / block), max_requests=B, max_seq_len=S,
                             block_size=block, dtype=self.cfg.dtype, device=self.cfg.device)  # fmt: skip
        for s in range(B):
            cache.reserve(s, S)
        cache.kv.normal_()
        return cache


def _close(keep) -> None:
    getattr(keep, "close", lambda: None)()


def _available(backend: str, device: torch.device) -> bool:
    from torch_vkv.attention import available_backends

    return backend in available_backends(device)


# ----------------------------------------------------------------------------- sections


def _paged_backends(cfg: Config, block: int, flex_here: bool) -> list:
    """Backends with a paged path that run at this block size (flash-attn needs multiples of 256)."""
    return [
        b for b in ("triton", "flex", "flash_attn")
        if _available(b, cfg.device)
        and not (b == "flex" and (not flex_here or block not in cfg.flex_paged_blocks))
        and not (b == "flash_attn" and block % 256)
    ]  # fmt: skip


def _prefill_rows(cfg: Config, caches: Caches, log) -> list:
    from torch_vkv.attention import attention, metadata_tensor
    from torch_vkv.attention.flashinfer_backend import FA3_TILE

    rows = []
    dev = cfg.device
    for model in cfg.models:
        H, H_kv, D = MODELS.get(model, (8, 2, 64))
        for S in cfg.prefill_contexts:
            q = torch.randn((S, H, D), dtype=cfg.dtype, device=dev)
            # Host copies attached, as the serving engine does: a backend that plans on the host
            # (flashinfer) reads them instead of syncing; the others never read metadata on the host.
            lens, cu = metadata_tensor([S], dev), metadata_tensor([0, S], dev)
            flops = 4 * H * D * S * S / 2
            base = dict(section="prefill", model=model, batch=1, context=S)

            def record(backend, memory, block, fn):
                row = dict(base, backend=backend, memory=memory, block=block)
                try:
                    us = _time(cfg, fn, cfg.prefill_rep_ms)
                except Exception as e:
                    row["note"] = f"error: {type(e).__name__}: {str(e)[:120]}"
                    log(f"  prefill {model} S={S} {backend}/{memory}: {row['note']}")
                else:
                    row.update(us=us, tflop_s=flops / (us * 1e-6) / 1e12)
                    log(f"  prefill {model} S={S:6d} {backend:12s} {memory:7s} {block or '':>4} {us / 1e3:9.2f} ms "
                        f"{row['tflop_s']:6.1f} TFLOP/s")  # fmt: skip
                rows.append(row)

            flex_here = cfg.flex_prefill is None or S in cfg.flex_prefill
            memory = "vm" if caches.KVCache is not None else "malloc"
            # Keys in rows [0, S) of a cache with FA3_TILE rows more, committed: the flashinfer backend may
            # then take FA3 (its tiles read past the length), as on a KVCache(margin_tokens=FA3_TILE).
            k, v, keep = caches.contiguous(memory, 1, S, H_kv, D, margin=FA3_TILE)
            for backend in PREFILL_BACKENDS:
                if not _available(backend, dev) or (backend == "flex" and not flex_here):
                    continue
                if backend == "sdpa" and S > 8192:
                    continue  # dense S x S mask
                record(backend, memory, None, lambda b=backend: attention(
                    q, k, v, lens, cu_seqlens_q=cu, max_seqlen_q=S, backend=b))  # fmt: skip
            tk = _triton_kernels_if_gluon(q, k, v, S)
            if tk is not None:  # the triton backend ran the Gluon kernel: the Triton one beside it
                record("triton:kernel=triton", memory, None, lambda: tk.prefill_attention(
                    q, k, v, lens, cu, S, kernel="triton"))  # fmt: skip
            del k, v
            _close(keep)
            del keep
            for block in cfg.paged_blocks:
                pc = caches.paged(block, 1, S, H_kv, D)
                for backend in _paged_backends(cfg, block, flex_here):
                    record(f"{backend}_paged", "paged", block, lambda b=backend: pc.attention(
                        0, q, lens, cu_seqlens_q=cu, max_seqlen_q=S, backend=b))  # fmt: skip
                del pc
            flashinfer_paged.anchor(record, "prefill", q, 1, S, H_kv, D)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _triton_kernels_if_gluon(q, k, v, S: int):
    """``torch_vkv.triton_kernels`` when the ``triton`` backend's prefill of this shape runs the Gluon
    kernel (Hopper, bf16, head_dim 128), else None."""
    if not _available("triton", q.device):
        return None
    from torch_vkv.attention import deps

    tk = deps.triton_kernels()
    return tk if tk.default_kernel(q, k, v, None, None, None, max_keys=S) == "gluon" else None


def _vm_rows(cfg: Config, caches: Caches, log) -> list:
    """Same kernel, same shapes: cudaMalloc vs virtual memory, measurements interleaved."""
    from torch_vkv.attention import attention

    if caches.KVCache is None:
        return [dict(section="vm_vs_malloc", note=caches.vm_error)]
    rows = []
    dev = cfg.device
    model = cfg.models[0]
    H, H_kv, D = MODELS.get(model, (8, 2, 64))
    cases = [("decode", B, S) for B, S in cfg.vm_decode] + [("prefill", 1, S) for S in cfg.vm_prefill]
    for kind, B, S in cases:
        T = B if kind == "decode" else S
        q = torch.randn((T, H, D), dtype=cfg.dtype, device=dev)
        lens = torch.full((B,), S, dtype=torch.int32, device=dev)
        cu = None if kind == "decode" else torch.tensor([0, S], dtype=torch.int32, device=dev)
        try:
            km, vm_, keep_m = caches.contiguous("malloc", B, S, H_kv, D)
            kv, vv, keep_v = caches.contiguous("vm", B, S, H_kv, D)
            kv.copy_(km)
            vv.copy_(vm_)
        except Exception as e:
            rows.append(dict(section="vm_vs_malloc", model=model, batch=B, context=S,
                             note=f"error: {type(e).__name__}: {str(e)[:120]}"))  # fmt: skip
            continue
        fast = [b for b in ("triton", "torch_fa2", "flash_attn") if _available(b, dev)]
        for backend in fast or ["sdpa"]:
            fm = lambda b=backend: attention(q, km, vm_, lens, cu_seqlens_q=cu, max_seqlen_q=S, backend=b)  # noqa: E731
            fv = lambda b=backend: attention(q, kv, vv, lens, cu_seqlens_q=cu, max_seqlen_q=S, backend=b)  # noqa: E731
            row = dict(section="vm_vs_malloc", model=model, backend=f"{backend} {kind}", batch=B, context=S)
            try:
                same = torch.equal(fm(), fv())
                tm, tv = [], []
                rep_ms = cfg.decode_rep_ms if kind == "decode" else cfg.prefill_rep_ms
                for _ in range(3):  # interleave to cancel drift (clocks, temperature)
                    tm.append(_time(cfg, fm, rep_ms))
                    tv.append(_time(cfg, fv, rep_ms))
                us_m, us_v = statistics.median(tm), statistics.median(tv)
                row.update(memory="vm/malloc", us=us_v, ratio_vm_malloc=us_v / us_m,
                           note=f"malloc {us_m:.1f} us; outputs {'bitwise equal' if same else 'DIFFER'}")  # fmt: skip
                log(f"  vm_vs_malloc {backend} {kind} B={B} S={S}: malloc {us_m:.1f} us, vm {us_v:.1f} us, "
                    f"ratio {us_v / us_m:.3f}, {'bitwise equal' if same else 'outputs differ'}")  # fmt: skip
            except Exception as e:
                row["note"] = f"error: {type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
        del km, vm_, kv, vv
        _close(keep_v)
        del keep_m, keep_v
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _layout_rows(cfg: Config, caches: Caches, copy_bw: float, log) -> list:
    """Decode on layer 0 of a ``layout_layers``-layer KVCache, per_layer vs interleaved.

    The kernels are the same; only the row stride differs: ``H_kv * D`` elements
    (per_layer) against ``layers * 2 * H_kv * D`` (interleaved), so one page holds
    1024 rows of a layer in the first and 16 (all layers) in the second.
    """
    from torch_vkv.attention import attention

    if caches.KVCache is None:
        return []
    rows = []
    dev = cfg.device
    model = cfg.models[0]
    H, H_kv, D = MODELS.get(model, (8, 2, 64))
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    for B, S in cfg.layout_cases:
        q = torch.randn((B, H, D), dtype=cfg.dtype, device=dev)
        lens = torch.full((B,), S, dtype=torch.int32, device=dev)
        kv_bytes = 2 * B * S * H_kv * D * itemsize
        for layout in ("per_layer", "interleaved"):
            cache = None
            try:
                cache = caches.KVCache(cfg.layout_layers, H_kv, D, max_batch_size=B, max_seq_len=S, dtype=cfg.dtype,
                                       device=dev, layout=layout)  # fmt: skip
                for _ in range(B):
                    cache.reserve(cache.alloc(), S)
                k, v = cache.key(0), cache.value(0)
                k.normal_()
                v.normal_()
                for backend in [b for b in ("triton", "torch_fa2") if _available(b, dev)] or ["sdpa"]:
                    row = dict(section="layout", model=model, backend=backend, memory=layout, batch=B, context=S,
                               note=f"row stride {k.stride(1)} elements, {cache.tokens_per_page} tokens/page")  # fmt: skip
                    us = _time(cfg, lambda b=backend: attention(q, k, v, lens, backend=b), cfg.decode_rep_ms)
                    tb = kv_bytes / (us * 1e-6) / 1e12
                    row.update(us=us, tb_s=tb, pct_copy=100 * tb / copy_bw)
                    log(f"  layout {layout} {backend} B={B} S={S}: {us:.1f} us ({row['pct_copy']:.0f}% of copy)")
                    rows.append(row)
            except Exception as e:
                rows.append(dict(section="layout", model=model, memory=layout, batch=B, context=S,
                                 note=f"error: {type(e).__name__}: {str(e)[:120]}"))  # fmt: skip
            finally:
                if cache is not None:
                    cache.close()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- summary


def _summary(rows: list, copy_bw: float, caches: Caches, seconds: float) -> str:
    lines = [f"Copy bandwidth (read + write) measured in this run: **{copy_bw:.2f} TB/s**. {seconds:.0f} s in all."]
    if caches.vm_error:
        lines.append(f"Virtual memory: {caches.vm_error}.")
    dec = [r for r in rows if r["section"] == "decode" and r.get("us")]
    host = [r for r in rows if r["section"] == "decode_host" and r.get("us")]
    if host:
        timed = {(r["backend"], r["batch"], r["context"]): r["us"] for r in dec}
        parts = []
        for r in host:
            t = timed.get((r["backend"], r["batch"], r["context"]))
            parts.append(f"{r['backend']} {r['us']:.1f} us" + (f" (timed {t:.1f} us)" if t is not None else ""))
        lines.append(f"- Host time per decode call, batch {host[0]['batch']}, context {host[0]['context']}: "
                     + ", ".join(parts) + ". Where it is close to the timed one, that row measures the host.")
    big = [r for r in dec if r["batch"] >= 32 and r["context"] >= 4096]
    ours = [r for r in big if r["backend"] == "triton"]
    if ours:
        worst = min(ours, key=lambda r: r["pct_copy"])
        lines.append(f"- Triton split-KV decode on {worst['memory']} memory, batch >= 32, context >= 4K: "
                     f"{min(r['pct_copy'] for r in ours):.0f}% - {max(r['pct_copy'] for r in ours):.0f}% of copy "
                     f"bandwidth (target >= 80%): {'met' if worst['pct_copy'] >= 80 else 'NOT met'}.")  # fmt: skip
        fa2 = [r for r in big if r["backend"] == "torch_fa2"]
        if fa2:
            lines.append(f"- torch_fa2 (FA2 varlen) at the same shapes: {statistics.median(r['pct_copy'] for r in fa2):.0f}% "
                         f"median.")  # fmt: skip
        losses = []
        for r in ours:
            for p in dec:
                if p["memory"] == "paged" and (p["model"], p["batch"], p["context"]) == (r["model"], r["batch"], r["context"]):
                    if p["us"] < r["us"]:
                        losses.append(f"{p['backend']}/{p['block']} at {p['model']} B={p['batch']} S={p['context']}")
        lines.append("- Ahead of every paged variant at those shapes: " + ("yes." if not losses else "NO: " + "; ".join(losses)))
    lines += decode_summary(rows) + step_summary(rows)
    vm = [r for r in rows if r["section"] == "vm_vs_malloc" and r.get("ratio_vm_malloc")]
    if vm:
        lines.append("- Same kernel, virtual / cudaMalloc time: " + ", ".join(
            f"{r['backend']} B={r['batch']} S={r['context']}: {r['ratio_vm_malloc']:.3f}" for r in vm) + " (target 1.00; prefill within 2%).")  # fmt: skip
    lines += prefill_tune_summary(rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = (parser := _parser()).parse_args(argv)
    try:  # a bad value that _config finds is a usage error (exit status 2), as argparse's own are
        cfg = _config(args)
    except SystemExit as e:
        parser.error(str(e.code))
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections: expected names from {','.join(SECTIONS)}, got {args.sections!r}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if cfg.device.type != "cuda" and not args.smoke:
        log("bench kernels: expected a CUDA device, got none (use --smoke for a CPU plumbing check)")
        return 2
    if cfg.device.type == "cuda":
        if cfg.device.index is None:  # "cuda" means the current device
            cfg.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(cfg.device)
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.smoke:
        MODELS.setdefault("tiny", (8, 2, 64))
    t0 = time.perf_counter()
    caches = Caches(cfg, log)
    if caches.vm_error:
        log(f"bench kernels: {caches.vm_error}")
    with torch.inference_mode():
        bw = copy_bandwidth(cfg)
        log(f"bench kernels on {cfg.device}: copy bandwidth {bw:.2f} TB/s (read + write); the L2 emptied by "
            f"{cfg.l2_flush}s before each timed call")  # fmt: skip
        rows = [dict(section="copy", backend="copy_", memory="malloc", tb_s=bw, pct_copy=100.0,
                     note=f"dst.copy_(src), 1 GiB, read + write bytes; l2_flush={cfg.l2_flush}")]  # fmt: skip
        rows += flashinfer_paged.skipped_rows(_available("flashinfer", cfg.device))
        run = lambda name: name in sections  # noqa: E731
        rows += decode_rows(cfg, caches, bw, log) if run("decode") else []
        rows += _prefill_rows(cfg, caches, log) if run("prefill") else []
        rows += _vm_rows(cfg, caches, log) if run("vm") else []
        if run("tune"):
            rows += decode_tune_rows(cfg, caches, bw, log) + prefill_tune_rows(cfg, caches, log)
        rows += _layout_rows(cfg, caches, bw, log) if run("layout") else []
        rows += step_rows(cfg, caches, bw, log) if run("step") else []
        if args.window > 0 and run("window"):
            rows += window_rows(cfg, caches, bw, log, args.window, smoke=args.smoke)
    flashinfer_paged.annotate(rows)
    summary = _summary(rows, bw, caches, time.perf_counter() - t0) + window_summary(rows)
    command = "python -m torch_vkv bench kernels " + shlex.join(argv)
    write_report("kernels", rows, args.out, command=command.strip(), columns=COLUMNS, summary=summary)
    if cfg.plots:
        plot_kernels(rows, args.out, log)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
