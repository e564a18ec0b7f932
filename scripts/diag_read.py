"""How fast can a kernel read a KV cache on this GPU? The read ceiling beside the copy bandwidth
(a diagnostic, not a benchmark).

    python scripts/diag_read.py [--points 256x4096,64x16384] [--rep-ms 20] [--l2-flush write|read]

``bench kernels`` reports decode against a ``copy_``'s bandwidth (read + write bytes); a kernel that
only reads may go past it, and a decode kernel cannot go past what a kernel that does nothing but read
reaches. For each (batch, context) point, K and V of Llama-3-8B's heads (8 KV heads of 128, bf16,
``[batch, context, 8, 128]`` each: the decode's bytes) are read by

- ``copy``: ``bench kernels``' copy bandwidth, a ``copy_`` of 1 GiB (bytes read + written), the reference
  of every ``pct_copy``; ``copy_caches``: ``copy_`` of K and of V;
- ``torch_sum``: ``torch.sum`` of each (a reduction that reads every byte once);
- ``flat``: a Triton kernel whose programs stride over tiles of ``[rows, 128]`` of the flat cache
  (grid: ``programs_per_sm`` x the SMs), pointer loads or tensor descriptors (``tma``);
- ``heads``: one program per (request, KV head) reading its head's rows, 256 bytes every 2 KiB, as the
  split-KV decode does with one split (pointer loads or tensor descriptors);

each over a sweep of tile rows x warps x stages, every time replayed from a CUDA graph with the L2
cleared (``time_us_graph``). Every Triton read's sum is checked against a float64 sum of the cache, so
a kernel that skipped bytes would be refused, not timed. Prints the best rows of each kind as TB/s of
bytes read and % of the copy bandwidth, and writes every row to ``$OUT/diag_read.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import triton
import triton.language as tl

from torch_vkv._checks import int_list_arg, point_list_arg
from torch_vkv.bench.timing import L2_FLUSHES, time_us, time_us_graph

NUM_KV_HEADS, HEAD_DIM = 8, 128


@triton.jit
def _read_flat_kernel(x_ptr, x_desc, out_ptr, n_tiles, ROWS: tl.constexpr, COLS: tl.constexpr,
                      STAGES: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """Programs stride over the tiles of a ``[n_tiles * ROWS, COLS]`` matrix; each stores its partial sum."""
    pid = tl.program_id(0)
    acc = tl.zeros([COLS], dtype=tl.float32)
    offs = tl.arange(0, ROWS)[:, None].to(tl.int64) * COLS + tl.arange(0, COLS)[None, :]
    for t in tl.range(pid, n_tiles, tl.num_programs(0), num_stages=STAGES):
        if USE_TMA:
            x = x_desc.load([t * ROWS, 0])
        else:
            x = tl.load(x_ptr + tl.cast(t, tl.int64) * (ROWS * COLS) + offs)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _read_heads_kernel(x_ptr, x_desc, out_ptr, context, num_kv_heads, ROWS: tl.constexpr, HEAD: tl.constexpr,
                       STAGES: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """Program ``(r, h)`` reads rows ``[r * context, (r + 1) * context)`` of column block ``h`` of a
    ``[batch * context, num_kv_heads * HEAD]`` matrix: one KV head of one request, as decode reads it."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    row_stride = num_kv_heads * HEAD
    acc = tl.zeros([HEAD], dtype=tl.float32)
    offs = tl.arange(0, ROWS)[:, None].to(tl.int64) * row_stride + tl.arange(0, HEAD)[None, :]
    base = r.to(tl.int64) * context
    for s in tl.range(0, context, ROWS, num_stages=STAGES):
        if USE_TMA:
            x = x_desc.load([(base + s).to(tl.int32), h * HEAD])
        else:
            x = tl.load(x_ptr + (base + s) * row_stride + h * HEAD + offs)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(out_ptr + r * tl.num_programs(1) + h, tl.sum(acc))


def _descriptor(x2d: torch.Tensor, rows: int, cols: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x2d, list(x2d.shape), list(x2d.stride()), [rows, cols])


def _exact_sum(x: torch.Tensor) -> float:
    return sum(float(c.double().sum()) for c in x.reshape(-1).split(1 << 26))


def _triton_row(kind: str, tma: bool, caches, sums, launch: tuple, rep_ms: float, l2_flush: str = "write") -> dict:
    """Time one read kernel over every cache in ``caches`` (K, then V) in one graph; the sum checked first.
    ``launch``: ``(tile rows, warps, stages, programs an SM)`` (the last for ``flat`` only)."""
    rows_per_tile, warps, stages, per_sm = launch
    bufs, launches = [], []
    for x in caches:
        B, S = x.shape[:2]
        if kind == "flat":
            flat = x.view(-1, HEAD_DIM)
            n_tiles = flat.shape[0] // rows_per_tile
            grid = (per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count,)
            out = torch.zeros(grid[0], dtype=torch.float32, device=x.device)
            desc = _descriptor(flat, rows_per_tile, HEAD_DIM) if tma else flat
            launches.append(lambda flat=flat, desc=desc, out=out, n=n_tiles, g=grid: _read_flat_kernel[g](
                flat, desc, out, n, ROWS=rows_per_tile, COLS=HEAD_DIM, STAGES=stages, USE_TMA=tma, num_warps=warps))
        else:
            x2d = x.view(B * S, NUM_KV_HEADS * HEAD_DIM)
            grid = (B, NUM_KV_HEADS)
            out = torch.zeros(B * NUM_KV_HEADS, dtype=torch.float32, device=x.device)
            desc = _descriptor(x2d, rows_per_tile, HEAD_DIM) if tma else x2d
            launches.append(lambda x2d=x2d, desc=desc, out=out, S=S, g=grid: _read_heads_kernel[g](
                x2d, desc, out, S, NUM_KV_HEADS, ROWS=rows_per_tile, HEAD=HEAD_DIM, STAGES=stages, USE_TMA=tma,
                num_warps=warps))  # fmt: skip
        bufs.append(out)
    row = dict(kind=kind, tma=tma, rows=rows_per_tile, warps=warps, stages=stages, programs_per_sm=per_sm)
    try:
        for launch, out, want in zip(launches, bufs, sums):
            launch()
            got = float(out.double().sum())
            if abs(got - want) > 1e-3 * abs(want):
                raise AssertionError(f"sum {got} against the float64 sum {want}")
        row["us"] = time_us_graph(lambda: [f() for f in launches], caches[0].device, rep_ms=rep_ms, warmup_ms=5,
                                  l2_flush=l2_flush)  # fmt: skip
    except Exception as e:  # a configuration that does not fit (shared memory, registers), or a wrong sum
        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return row


def main() -> None:
    ints = int_list_arg(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=point_list_arg(), default="256x4096,64x16384", help="BATCHxCONTEXT list (K and V of each are read)")
    p.add_argument("--rows", type=ints, default=[64, 128], help="tile rows (keys) a load")
    p.add_argument("--warps", type=ints, default=[4, 8])
    p.add_argument("--stages", type=ints, default=[2, 3, 4])
    p.add_argument("--programs-per-sm", type=ints, default=[1, 2, 4],
                   help="the flat kernels' grid: this many programs an SM")
    p.add_argument("--rep-ms", type=float, default=20.0)
    p.add_argument("--l2-flush", choices=L2_FLUSHES, default="write",
                   help="how the L2 is emptied before each timed read (bench.timing); the copy reference stays "
                   "bench kernels' (eager, write flush)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("diag_read.py: expected a CUDA GPU (the times are CUDA-graph replays), found none")
    dev = torch.device("cuda")
    rows = []
    for B, S in args.points:
        # Uniform in [0, 1): every partial sum is positive, so the float64 check has no cancellation.
        caches = [torch.rand((B, S, NUM_KV_HEADS, HEAD_DIM), device=dev).to(torch.bfloat16) for _ in range(2)]
        nbytes = sum(x.numel() * x.element_size() for x in caches)
        sums = [_exact_sum(x) for x in caches]
        dsts = [torch.empty_like(x) for x in caches]
        cache_copy_us = time_us_graph(lambda: [d.copy_(x) for d, x in zip(dsts, caches)], dev, rep_ms=args.rep_ms,
                                      warmup_ms=5, l2_flush=args.l2_flush)  # fmt: skip
        del dsts
        # The reference: bench kernels' copy bandwidth (1 GiB, eager; on the H100 a copy replayed from a graph
        # ran at 2.44-2.46 TB/s from 512 MiB up, against 3.03 eager: the reads are compared with the latter).
        src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_us = time_us(lambda: dst.copy_(src), dev, rep_ms=args.rep_ms, warmup_ms=5)  # eager, as bench kernels
        copy_tb = 2 * src.numel() / copy_us / 1e6
        del src, dst
        point = [dict(kind="copy", us=copy_us, bytes_copied=1 << 30), dict(kind="copy_caches", us=cache_copy_us)]
        point.append(dict(kind="torch_sum", us=time_us_graph(
            lambda: [x.sum(dtype=torch.float32) for x in caches], dev, rep_ms=args.rep_ms, warmup_ms=5,
            l2_flush=args.l2_flush)))  # fmt: skip
        for rows_per_tile, warps, stages in itertools.product(args.rows, args.warps, args.stages):
            for tma in (False, True):
                for per_sm in args.programs_per_sm:
                    point.append(_triton_row("flat", tma, caches, sums, (rows_per_tile, warps, stages, per_sm),
                                             args.rep_ms, args.l2_flush))  # fmt: skip
                point.append(_triton_row("heads", tma, caches, sums, (rows_per_tile, warps, stages, None), args.rep_ms,
                                         args.l2_flush))  # fmt: skip
        for r in point:
            r.update(batch=B, context=S, bytes_read=r.pop("bytes_copied", nbytes), l2_flush=args.l2_flush)
            if "us" in r:
                r["tb_s"] = (2 if r["kind"].startswith("copy") else 1) * r["bytes_read"] / r["us"] / 1e6
                r["pct_copy"] = 100 * r["tb_s"] / copy_tb
        rows += point
        print(f"B={B} S={S}: K+V {nbytes / 2**30:.2f} GiB; copy bandwidth {copy_tb:.2f} TB/s (1 GiB, read + write), "
              f"of K and V {2 * nbytes / cache_copy_us / 1e6:.2f} TB/s", flush=True)  # fmt: skip
        for kind, tma in [("torch_sum", None), ("flat", False), ("flat", True), ("heads", False), ("heads", True)]:
            timed = sorted((r for r in point if r["kind"] == kind and r.get("tma") == tma and "us" in r),
                           key=lambda r: r["us"])  # fmt: skip
            for r in timed[:3]:
                launch = "" if tma is None else (f" tma={tma} rows={r['rows']} warps={r['warps']} "
                                                 f"stages={r['stages']} per_sm={r['programs_per_sm']}")  # fmt: skip
                print(f"  {kind}{launch}: {r['us']:.1f} us, {r['tb_s']:.2f} TB/s, {r['pct_copy']:.1f}% of copy",
                      flush=True)  # fmt: skip
        failed = [r for r in point if "error" in r]
        if failed:
            print(f"  {len(failed)} launches refused or wrong, e.g. {failed[0]}", flush=True)
        del caches
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "diag_read.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
