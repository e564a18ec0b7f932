"""Our Triton kernels against an earlier copy of them, side by side in one run on a GPU (a diagnostic,
not a benchmark: ``bench kernels`` gives the tables).

    mkdir -p .ab && git archive <commit> triton_kernels | tar x -C .ab   # the baseline (carry .ab)
    python scripts/diag_ab.py --baseline .ab/triton_kernels [--decode 1x16384,32x4096] [--prefill 8192,32768]

Llama-3-8B heads (32 query, 8 KV heads of 128), bf16, contiguous caches (``torch.empty``: the kernels
run the same on virtual memory, ``bench kernels``' vm section). Rows:

- decode, for the baseline, the current kernel (its defaults), the current one with ``tma`` off and on (and
  on with 64-key tiles), and fused with its merge (``fuse_merge``, opt-in, with counters given):
  ``graph``: one call replayed from a CUDA graph (as ``bench kernels``; the replay's own launch and
  timing floor included); ``step``: per call in one graph of ``L`` calls over ``L`` distinct caches
  (the attention of the ``L`` layers of a CUDA-graph decode step, the graph's launch shared), where
  ``L`` = ``--layers`` or fewer when memory runs short. FlashInfer's paged decode (block 16, its
  ``bench kernels`` anchor) in both modes when it is importable. Bandwidth against a 1 GiB copy (read
  and write bytes, as ``bench kernels``) of the same run; ``host``: the host's time per eager call.
- prefill, batch 1, causal: the baseline and the current kernel, each eagerly (``do_bench``, as
  ``bench kernels``) in ``--rounds`` interleaved rounds, the median; TFLOP/s of the causal half;
  outputs against the baseline's (max |diff|); ``host``: the host's time per call (what ``do_bench``'s
  L2 flush, ~85 us, does not hide shows in the time).

``--flashinfer-rows 16,64``: also the ``flashinfer`` backend of :func:`torch_vkv.attention.attention` on the
same caches with its decode page table in pages of each of these row counts (its default picks
``DECODE_PAGE_ROWS``, see ``flashinfer_backend.decode_page_rows``).

``--prefill-launch '256,64,16,2,1;...'``: also the current prefill kernel with these launch parameters
(``block_m, block_n, num_warps, num_stages, tma``), in the same interleaved rounds.

``--profile``: also, per layer of each step graph, every kernel's device time and the idle time between
kernels (the profiler's kernel records over 5 replays).

Writes ``$OUT/diag_ab.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
from pathlib import Path

import torch

from torch_vkv._checks import point_list_arg
from torch_vkv.bench.timing import host_us, time_us, time_us_graph

H, H_KV, D = 32, 8, 128


def _load_baseline(path: str):
    """The package at ``path`` (an earlier ``triton_kernels/``) under the name ``tk_baseline``."""
    root = Path(path)
    spec = importlib.util.spec_from_file_location("tk_baseline", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])  # fmt: skip
    if spec is None or spec.loader is None:
        raise SystemExit(f"diag_ab.py: expected a triton_kernels folder at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tk_baseline"] = module
    spec.loader.exec_module(module)
    return module


def _launches(text: str) -> list[tuple[int, int, int, int, bool]]:
    """``--prefill-launch``'s (block_m, block_n, num_warps, num_stages, tma) tuples."""
    out = []
    for item in (t for t in text.split(";") if t.strip()):
        try:
            parts = [int(x) for x in item.split(",")]
        except ValueError:
            parts = []
        if len(parts) != 5:
            raise SystemExit(f"--prefill-launch: expected BLOCK_M,BLOCK_N,WARPS,STAGES,TMA, got {item!r}")
        out.append((*parts[:4], bool(parts[4])))
    return out  # type: ignore[return-value]


def _profile_step(fns: list) -> dict:
    """Per-layer device time of each kernel in a step graph of ``fns`` and the idle time between
    kernels, from the profiler's kernel records over 5 replays (one graph launch per replay)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)  # fmt: skip
    per = 5 * len(fns)
    out: dict = {}
    for e in kernels:
        out[e.name[:40]] = out.get(e.name[:40], 0.0) + e.time_range.elapsed_us() / per
    gaps = [max(0.0, b.time_range.start - a.time_range.end) for a, b in zip(kernels, kernels[1:])]
    # Gaps inside a replay only: the largest 4 are the host's time between replays.
    out["idle between kernels"] = sum(sorted(gaps)[: max(0, len(gaps) - 4)]) / per
    return out


def _decode_point(B: int, S: int, kernels: dict, args, copy_tb: float, rows: list) -> None:
    from torch_vkv.bench import flashinfer_paged

    dev = torch.device("cuda")
    layer_bytes = 2 * B * S * H_KV * D * 2
    L = max(1, min(args.layers, int(args.mem_gib * 2**30 // layer_bytes)))
    q = torch.randn((B, H, D), dtype=torch.bfloat16, device=dev)
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    caches = [(torch.randn((B, S, H_KV, D), dtype=torch.bfloat16, device=dev),
               torch.randn((B, S, H_KV, D), dtype=torch.bfloat16, device=dev)) for _ in range(L)]  # fmt: skip
    calls = {name: [lambda k=k, v=v, f=f: f(q, k, v, lens) for k, v in caches] for name, f in kernels.items()}
    fi = flashinfer_paged.anchor_layers("decode", q, B, S, H_KV, D, L)
    if fi:
        calls["flashinfer_paged/16"] = fi
    ref = None
    for name, fns in calls.items():
        try:
            out = fns[0]()
            torch.cuda.synchronize()
            one = time_us_graph(fns[0], dev, rep_ms=args.rep_ms, warmup_ms=10)
            step = time_us_graph(lambda fns=fns: [f() for f in fns], dev, rep_ms=args.rep_ms, warmup_ms=10) / L
        except Exception as e:  # one kernel failing must not stop the run
            rows.append(dict(kind="decode", batch=B, context=S, kernel=name, error=f"{type(e).__name__}: {e}"[:200]))
            print(f"decode B={B} S={S} {name}: {rows[-1]['error']}", flush=True)
            continue
        if args.profile:
            try:
                prof = _profile_step(fns)
                rows.append(dict(kind="decode_profile", batch=B, context=S, kernel=name, layers=L, us_per_layer=prof))
                print(f"profile B={B} S={S} {name} per layer: " + ", ".join(f"{k} {v:.2f} us" for k, v in prof.items()), flush=True)
            except Exception as e:  # the profiler is a diagnostic of the diagnostic
                print(f"  profile failed: {type(e).__name__}: {e}"[:200], flush=True)
        ref = out if ref is None else ref
        diff = (out.float() - ref.float()).abs().max().item()
        pct = [100 * layer_bytes / us / 1e6 / copy_tb for us in (one, step)]
        host = host_us(fns[0], dev)
        rows.append(dict(kind="decode", batch=B, context=S, kernel=name, layers=L, graph_us=one, step_us=step,
                         graph_pct_copy=pct[0], step_pct_copy=pct[1], host_us=host, max_diff_vs_first=diff))  # fmt: skip
        print(f"decode B={B:4d} S={S:6d} {name:20s} graph {one:8.1f} us ({pct[0]:5.1f}%)  step/{L} {step:8.1f} us "
              f"({pct[1]:5.1f}%)  host {host:5.1f} us  |diff| {diff:.1e}", flush=True)  # fmt: skip
    del caches, fi, calls
    torch.cuda.empty_cache()


def _prefill_point(S: int, kernels: dict, args, rows: list) -> None:
    """Each kernel timed in ``args.rounds`` interleaved rounds (the order rotating each round), the
    median kept: single timings of the same kernel moved by up to 10% with their place in a run."""
    dev = torch.device("cuda")
    q = torch.randn((S, H, D), dtype=torch.bfloat16, device=dev)
    k = torch.randn((1, S, H_KV, D), dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    lens = torch.tensor([S], dtype=torch.int32, device=dev)
    cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
    flops = 4 * S * S * H * D / 2  # QK^T and PV over the causal half
    names, times, diffs, ref = [], {}, {}, None
    for name, f in kernels.items():
        try:
            out = f(q, k, v, lens, cu, S)
        except Exception as e:  # one kernel failing must not stop the run
            rows.append(dict(kind="prefill", context=S, kernel=name, error=f"{type(e).__name__}: {e}"[:200]))
            print(f"prefill S={S} {name}: {rows[-1]['error']}", flush=True)
            continue
        ref = out if ref is None else ref
        diffs[name] = (out.float() - ref.float()).abs().max().item()
        names.append(name)
        times[name] = []
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            f = kernels[name]
            times[name].append(time_us(lambda: f(q, k, v, lens, cu, S), dev, rep_ms=args.rep_ms * 3, warmup_ms=20))
    for name in names:
        us = statistics.median(times[name])
        tflops = flops / us / 1e6
        # The host's time a call (launch work queued back to back): do_bench hides it only up to its L2
        # flush (~85 us on an H100), so a wrapper's host path longer than that shows in `us`.
        f = kernels[name]
        host = host_us(lambda: f(q, k, v, lens, cu, S), dev, calls=20)
        rows.append(dict(kind="prefill", batch=1, context=S, kernel=name, us=us, tflop_s=tflops, rounds_us=times[name],
                         host_us=host, max_diff_vs_first=diffs[name]))  # fmt: skip
        spread = (max(times[name]) - min(times[name])) / us * 100
        print(f"prefill S={S:6d} {name:20s} {us:9.1f} us {tflops:6.1f} TFLOP/s (median of {len(times[name])}, "
              f"spread {spread:4.1f}%)  host {host:6.1f} us  |diff| {diffs[name]:.1e}", flush=True)  # fmt: skip


def _flashinfer_pages(rows_per_page: int):
    """The ``flashinfer`` backend's decode with its page table in pages of ``rows_per_page`` rows (the
    module's largest page size set for the call; the plan is keyed by it, so each size plans once)."""
    from torch_vkv.attention import attention, flashinfer_backend

    def call(q, k, v, lens):
        default = flashinfer_backend.DECODE_PAGE_ROWS
        flashinfer_backend.DECODE_PAGE_ROWS = rows_per_page
        try:
            return attention(q, k, v, lens, backend="flashinfer")
        finally:
            flashinfer_backend.DECODE_PAGE_ROWS = default

    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default=".ab/triton_kernels", help="an earlier triton_kernels/ folder")
    p.add_argument("--decode", type=point_list_arg(allow_empty=True),
                   default="1x16384,2x16384,4x16384,1x32768,8x4096,32x4096,32x16384,128x4096,128x16384")
    p.add_argument("--prefill", default="8192,32768")
    p.add_argument("--gluon", default="2,3,pp3,P3", help="the Gluon prefill's variants timed beside: ring buffers "
                   "(the digit), pp: ping-pong, P: persistent, h: heads one after another (group_order=False)")
    p.add_argument("--layers", type=int, default=32, help="calls (distinct caches) in a step graph")
    p.add_argument("--mem-gib", type=float, default=40.0, help="K+V bytes of a step graph at most")
    p.add_argument("--rep-ms", type=float, default=40.0)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the prefill timings")
    p.add_argument("--flashinfer-rows", default="", help="comma list: the flashinfer backend's decode with pages of N rows")
    p.add_argument("--prefill-launch", default="", help="also the current prefill with these launch parameters: "
                   "';'-separated BLOCK_M,BLOCK_N,WARPS,STAGES,TMA (TMA 0/1), e.g. '256,64,16,2,1;128,128,8,3,1'")
    p.add_argument("--profile", action="store_true", help="also each decode step graph's kernels and idle time per layer")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("diag_ab.py: expected a CUDA GPU (the times are CUDA-graph replays), found none")
    from torch_vkv import triton_kernels as new

    old = _load_baseline(args.baseline)
    dev = torch.device("cuda")
    big = torch.empty(1 << 29, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(big)
    copy_tb = 2 * big.numel() * 2 / time_us(lambda: dst.copy_(big), dev, rep_ms=200, warmup_ms=20) / 1e6
    del big, dst
    print(f"copy bandwidth (1 GiB, read + write): {copy_tb:.2f} TB/s", flush=True)
    rows: list = [dict(kind="copy", tb_s=copy_tb)]
    counters = torch.zeros(1 << 16, dtype=torch.int32, device=dev)  # the fused merge's, for every batch here
    decode = {
        "baseline": lambda q, k, v, lens: old.decode_attention(q, k, v, lens),
        "current": lambda q, k, v, lens: new.decode_attention(q, k, v, lens),
        "current, tma=False": lambda q, k, v, lens: new.decode_attention(q, k, v, lens, tma=False),
        "current, tma=True": lambda q, k, v, lens: new.decode_attention(q, k, v, lens, tma=True),
        "current, tma=True, block_n=64": lambda q, k, v, lens: new.decode_attention(q, k, v, lens, tma=True, block_n=64),
        # The merge inside the split kernel (opt-in), with one buffer of counters made here and given: a
        # captured call fuses only so.
        "current, fuse_merge, counters given": lambda q, k, v, lens: new.decode_attention(
            q, k, v, lens, fuse_merge=True, merge_counters=counters),
    }
    for rows_per_page in [int(x) for x in args.flashinfer_rows.split(",") if x]:
        decode[f"flashinfer, pages of {rows_per_page}"] = _flashinfer_pages(rows_per_page)
    for B, S in args.decode:
        _decode_point(B, S, decode, args, copy_tb, rows)
    prefill = {
        "baseline": lambda q, k, v, lens, cu, n: old.prefill_attention(q, k, v, lens, cu, n),
        "baseline, kernel=triton": lambda q, k, v, lens, cu, n: old.prefill_attention(q, k, v, lens, cu, n, kernel="triton"),
        "current": lambda q, k, v, lens, cu, n: new.prefill_attention(q, k, v, lens, cu, n),
        "current, kernel=triton": lambda q, k, v, lens, cu, n: new.prefill_attention(q, k, v, lens, cu, n, kernel="triton"),
    }
    from torch_vkv.triton_kernels import prefill_hopper

    if prefill_hopper.hopper_problem(torch.empty(1, 1, D, dtype=torch.bfloat16, device="cuda"),
                                     torch.empty(1, 1, 1, D, dtype=torch.bfloat16, device="cuda"), None, None, None) is None:  # fmt: skip
        # The Gluon kernel (prefill_hopper.py), with two or three ring buffers, with or without ping-pong,
        # persistent or not: --gluon's variants
        from torch_vkv.triton_kernels import prefill_hopper_persistent

        for variant in [x for x in args.gluon.split(",") if x]:
            variant, _, programs = variant.partition("@")  # P3@N: the persistent kernel on N programs (0: one an item)
            pingpong, persistent, stages = variant.startswith("pp"), variant.startswith("P"), int(variant[-1])
            headed = variant.startswith("h")  # one head after another (group_order=False), the former order
            form = " pingpong" if pingpong else " persistent" if persistent else " head order" if headed else ""
            if programs:  # P3@N: on N programs (0: one an item); h: head-major; d: dynamic (head-major unless
                # gK: K heads at a time, heaviest first over them, e.g. P3@132dg8)
                parsed = re.fullmatch(r"(\d*)([hd]*)(?:g(\d+))?", programs)
                if parsed is None:
                    raise SystemExit(f"--gluon: expected P<stages>@<programs>[h][d][g<heads>], got {variant}@{programs}")
                dyn = "d" in parsed.group(2)
                order = int(parsed.group(3)) if parsed.group(3) else int("h" in parsed.group(2) or dyn)
                g = int(parsed.group(1) or 132)
                prefill[f"gluon persistent, stages {stages}, {programs} programs"] = (
                    lambda q, k, v, lens, cu, n, st=stages, g=g, o=order, d=dyn: prefill_hopper_persistent.prefill_hopper_persistent(
                        q, k, v, lens, cu, n, slots=None, causal=True, scale=D**-0.5, out=torch.empty_like(q), stages=st,
                        num_programs=g or 1 << 30, _order=o, _dynamic=d))  # fmt: skip
                continue
            prefill[f"gluon{form}, stages {stages}"] = (
                lambda q, k, v, lens, cu, n, st=stages, pp=pingpong, ps=persistent, go=False if headed else None: prefill_hopper.prefill_hopper(
                    q, k, v, lens, cu, n, slots=None, causal=True, scale=D**-0.5, out=torch.empty_like(q), stages=st,
                    pingpong=pp, persistent=ps, group_order=go))  # fmt: skip
    for launch in _launches(args.prefill_launch):
        bm, bn, warps, stages, tma = launch
        prefill[f"current {bm}x{bn} w{warps} s{stages}" + (" tma" if tma else "")] = (
            lambda q, k, v, lens, cu, n, bm=bm, bn=bn, w=warps, st=stages, t=tma: new.prefill_attention(
                q, k, v, lens, cu, n, block_m=bm, block_n=bn, num_warps=w, num_stages=st, tma=t))  # fmt: skip
    for S in [int(x) for x in args.prefill.split(",") if x]:
        _prefill_point(S, prefill, args, rows)
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "diag_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
