"""Small-batch split-KV decode: where its time goes, on a GPU (a diagnostic, not a benchmark).

    python scripts/diag_decode.py [--points 1x16384,4x16384] [--splits 16,32,64] [--stages 2,3,4]
                                  [--evict default,0,1] [--tma default,0]

Llama-3-8B heads (32 query, 8 KV heads of 128), bf16, our Triton decode on a
contiguous cache, every time replayed from a CUDA graph with the L2 cleared
before each replay (``torch_vkv.bench.timing.time_us_graph``). For each
(batch, context) point it sweeps ``num_splits x block_n x num_warps x
num_stages x evict_first x tma`` (``evict_first``: K/V read with the L2's evict-first
policy; ``default`` leaves each to the library's rule, ``default_decode_evict_first`` and
``default_decode_tma``) and also times the merge kernel alone (``_decode_reduce_kernel``
at that split count) and a ``copy_`` of K (read + write bytes, as ``bench
kernels`` counts the copy bandwidth). Prints the best rows per point and writes
every row to ``$OUT/diag_decode.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from torch_vkv._checks import point_list_arg
from torch_vkv.attention import deps
from torch_vkv.bench.timing import L2_FLUSHES, time_us_graph


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _flags(text: str) -> list[bool | None]:
    """``default,0,1`` -> ``[None, False, True]`` (``None``: the library's rule decides)."""
    return [None if t == "default" else bool(int(t)) for t in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=point_list_arg(), default="1x16384,1x32768,2x16384,4x16384", help="BATCHxCONTEXT list")
    p.add_argument("--splits", default="16,32,64,128")
    p.add_argument("--block-n", default="64,128")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4")
    p.add_argument("--evict", default="default", help="evict_first values to sweep: default (the library's rule), 0, 1")
    p.add_argument("--tma", default="default", help="tma values to sweep: default (the library's rule), 0, 1")
    p.add_argument("--rep-ms", type=float, default=20.0)
    p.add_argument("--l2-flush", choices=L2_FLUSHES, default="write",
                   help="how the L2 is emptied before each replay (torch_vkv.bench.timing)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("diag_decode.py: expected a CUDA GPU (the times are CUDA-graph replays), found none")
    dev = torch.device("cuda")
    tk = deps.triton_kernels()
    from torch_vkv.triton_kernels.decode import _decode_reduce_kernel
    from torch_vkv.triton_kernels._common import next_pow2

    H, H_kv, D = 32, 8, 128
    rows = []
    for B, S in args.points:
        q = torch.randn((B, H, D), dtype=torch.bfloat16, device=dev)
        k = torch.randn((B, S, H_kv, D), dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        lens = torch.full((B,), S, dtype=torch.int32, device=dev)
        kv_bytes = 2 * k.numel() * k.element_size()
        dst = torch.empty_like(k)
        copy_us = time_us_graph(lambda: dst.copy_(k), dev, rep_ms=args.rep_ms, warmup_ms=5, l2_flush=args.l2_flush)
        copy_tb = 2 * k.numel() * k.element_size() / copy_us / 1e6
        default = tk.default_num_splits(B, H_kv, S, dev)
        # The library's launch with pointer loads (a graph at four waves of a short cache may take descriptors)
        default_block_n = tk.default_decode_block_n(B, H_kv, D, default, dev, False, S)
        default_stages = tk.default_decode_stages(B, H_kv, D, default, dev, False, max_len=S)
        rows.append(dict(batch=B, context=S, kind="copy_k", us=copy_us, tb_s=copy_tb))
        print(f"B={B} S={S}: copy of K {copy_us:.1f} us ({copy_tb:.2f} TB/s); ideal K+V read at that rate "
              f"{kv_bytes / copy_tb / 1e6:.1f} us; default splits {default}", flush=True)
        point = []
        for splits in _ints(args.splits):
            mid_o = torch.randn((B, H, splits, D), device=dev)
            mid_lse = torch.randn((B, H, splits), device=dev)
            out = torch.empty_like(q)
            us = time_us_graph(lambda: _decode_reduce_kernel[(B, H)](
                mid_o, mid_lse, out, out.stride(0), out.stride(1), NUM_HEADS=H, HEAD_DIM=D, NUM_SPLITS=splits,
                BLOCK_S=next_pow2(splits), num_warps=4), dev, rep_ms=args.rep_ms, warmup_ms=5)  # fmt: skip
            rows.append(dict(batch=B, context=S, kind="reduce", splits=splits, us=us))
            print(f"  reduce alone, {splits} splits: {us:.1f} us", flush=True)
        for splits, block_n, warps, stages, evict, tma in itertools.product(
            _ints(args.splits), _ints(args.block_n), _ints(args.warps), _ints(args.stages), _flags(args.evict),
            _flags(args.tma),
        ):
            row = dict(batch=B, context=S, kind="decode", splits=splits, block_n=block_n, warps=warps, stages=stages,
                       evict_first=evict, tma=tma)  # fmt: skip
            try:
                row["us"] = time_us_graph(lambda: tk.decode_attention(
                    q, k, v, lens, num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages,
                    evict_first=evict, tma=tma), dev, rep_ms=args.rep_ms, warmup_ms=5, l2_flush=args.l2_flush)  # fmt: skip
                row["pct_copy"] = 100 * kv_bytes / row["us"] / 1e6 / copy_tb
            except Exception as e:  # a configuration that does not fit shared memory
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            point.append(row)
        rows += point
        for r in sorted((r for r in point if "us" in r), key=lambda r: r["us"])[:6]:
            print(f"  splits={r['splits']} block_n={r['block_n']} warps={r['warps']} stages={r['stages']} "
                  f"evict_first={r['evict_first']} tma={r['tma']}: "
                  f"{r['us']:.1f} us ({r['pct_copy']:.0f}% of copy)", flush=True)
        launch = (default, default_block_n, 4, default_stages)
        for ref in (r for r in point if (r["splits"], r["block_n"], r["warps"], r["stages"]) == launch and "us" in r):
            print(f"  default (splits={default}, {default_block_n}, 4, {default_stages}), evict_first={ref['evict_first']} "
                  f"tma={ref['tma']}: {ref['us']:.1f} us ({ref['pct_copy']:.0f}%)", flush=True)
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "diag_decode.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
