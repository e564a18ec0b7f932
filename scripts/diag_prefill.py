"""FlashInfer's prefill through our backend vs the same kernel called directly: where the time goes
(a diagnostic, on a GPU with FlashInfer importable; not a benchmark).

    python scripts/diag_prefill.py [--points 1x8192x8192,1x32768x32768,4x16384x4096] [--rep-ms 200]

A point ``RxSxN``: ``R`` requests with ``S`` keys each, the last ``N`` of them new (queries), on a
``KVCache`` (per_layer, Llama-3-8B heads, bf16). Rows, each timed eagerly with ``do_bench`` (L2
cleared before each call, as ``bench kernels``):

- ``direct``: FlashInfer's ragged wrapper (FA3 on Hopper) planned once on the flattened cache rows,
  ``run()`` alone: the kernel's own time, the standalone scripts' number;
- ``backend_sync``: ``attention(..., backend="flashinfer")`` with plain metadata tensors: the
  lengths are read back, one sync per call;
- ``backend_host``: the same with ``metadata_tensor`` tensors (host copies attached: no sync);
- ``paged``: FlashInfer's paged prefill at block 16, pages scattered (``bench kernels``' anchor,
  for ``R`` requests; planned once);
- ``triton``: our Triton prefill.

It also takes each call's host time (``time.perf_counter`` around 50 calls without a sync, the
queueing cost), the same for each piece of the backend's call (``host:*`` rows), and a
``torch.profiler`` table of ten ``backend_sync`` and ten ``backend_host``
calls. Writes ``$OUT/diag_prefill.json`` and ``$OUT/diag_prefill_profile.txt``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch


def _points(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in p.split("x")) for p in text.split(",")]  # type: ignore[misc]


def _point(dev, R: int, S: int, N: int, rep_ms: float, rows: list, profile_text: list) -> None:
    """One ``RxSxN`` point: its rows appended to ``rows``, its profiles to ``profile_text``."""
    from torch.profiler import ProfilerActivity, profile

    from torch_vkv import KVCache
    from torch_vkv.attention import attention, deps, metadata_tensor
    from torch_vkv.attention import flashinfer_backend as fib
    from torch_vkv.attention.append import zero_tail_op
    from torch_vkv.bench import flashinfer_paged
    from torch_vkv.bench.timing import host_us, time_us

    fi = deps.flashinfer_module()
    H, H_kv, D = 32, 8, 128
    # FA3_TILE committed rows past the keys (KVCache(margin_tokens=FA3_TILE)): without them the backend
    # takes FlashInfer's FA2 (FA3's tiles read past a length; twenty-ninth session).
    cache = KVCache(1, H_kv, D, max_batch_size=R, max_seq_len=S + fib.FA3_TILE, dtype=torch.bfloat16, device=dev,
                    margin_tokens=fib.FA3_TILE)  # fmt: skip
    for _ in range(R):
        cache.reserve(cache.alloc(), S)
    k, v = cache.key(0), cache.value(0)
    k.as_subclass(torch.Tensor).normal_()
    v.as_subclass(torch.Tensor).normal_()
    q = torch.randn(R * N, H, D, dtype=torch.bfloat16, device=dev)
    lens, cu, slots = [S] * R, [i * N for i in range(R + 1)], list(range(R))
    plain = (torch.tensor(lens, dtype=torch.int32, device=dev), torch.tensor(cu, dtype=torch.int32, device=dev),
             torch.tensor(slots, dtype=torch.int32, device=dev))  # fmt: skip
    known = tuple(metadata_tensor(x, dev) for x in (lens, cu, slots))
    # causal FLOPs: each query i of a request sees S - N + i + 1 keys
    flops = 4 * H * D * R * sum(S - N + i + 1 for i in range(N))
    base = dict(requests=R, keys=S, new=N)
    n_host = 50 if flops < 5e12 else 5  # calls per host-time row (a 128K prefill takes ~0.2 s)

    def backend(meta):
        return lambda: attention(q, k, v, meta[0], cu_seqlens_q=meta[1], slots=meta[2], max_seqlen_q=N,
                                 backend="flashinfer")  # fmt: skip

    s_pad = fib.flat_rows(k)
    qo_h, kv_h, _, _ = fib.ragged_layout(lens, cu, slots, s_pad, R, S)
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)  # its own (the backend has one)
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=fib._prefill_backend(dev))
    w.plan(torch.tensor(qo_h, dtype=torch.int32), torch.tensor(kv_h, dtype=torch.int32), H, H_kv, D, causal=True,
           q_data_type=q.dtype, kv_data_type=k.dtype)  # fmt: skip
    kf, vf = fib.flatten(k.as_subclass(torch.Tensor), s_pad), fib.flatten(v.as_subclass(torch.Tensor), s_pad)
    fns = {
        "direct": lambda: w.run(q, kf, vf),
        "backend_sync": backend(plain),
        "backend_host": backend(known),
        "triton": lambda: attention(q, k, v, plain[0], cu_seqlens_q=plain[1], slots=plain[2], max_seqlen_q=N,
                                    backend="triton"),
    }  # fmt: skip
    def record(name, memory, block, fn):
        fns["paged"] = fn

    flashinfer_paged.anchor(record, "prefill", q, R, S, H_kv, D)  # R requests, the last N keys of each new
    ref = fns["direct"]().float()
    for name, fn in fns.items():
        row = dict(base, row=name)
        try:
            out = fn()
            if name.startswith("backend") or name == "triton":
                row["max_abs_diff_vs_direct"] = (out.float() - ref).abs().max().item()
            us = time_us(fn, dev, rep_ms=rep_ms, warmup_ms=50)
            row.update(us=us, tflop_s=flops / (us * 1e-6) / 1e12, host_us=host_us(fn, dev, n_host))
        except Exception as e:  # reported, the run goes on
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    # Host time of each piece of the backend's call (50 calls queued without a sync): which one blocks.
    fns["backend_host"]()
    lens_i32, rows_i32 = known[0], known[2]
    # One wrapper per kind of layer (device, FlashInfer backend, shapes, options): the one this call used.
    wrapper = [h[0] for kind, h in fib._RAGGED.items() if kind[0] == q.device][-1]
    kf_v, vf_v = fib.flatten(k, s_pad), fib.flatten(v, s_pad)
    pieces = {
        "op_direct": lambda: fib.flashinfer_attention(q, k, v, known[0], known[1], known[2], None, True,
                                                      D ** -0.5, N, 0, -1, 0.0),
        "op_impl": lambda: fib.flashinfer_attention_impl(q, k, v, known[0], known[1], known[2], None, True,
                                                         D ** -0.5, N, 0, -1, 0.0),
        "zero_tail_op": lambda: zero_tail_op(k, v, lens_i32, rows_i32, None, fib.FA3_TILE, k.shape[1]),
        "zero_tail_launcher": lambda: deps.triton_kernels().zero_tail(k, v, lens_i32, multiple=fib.FA3_TILE,
                                                                      limit=k.shape[1], slots=rows_i32),
        "wrapper_run": lambda: wrapper.run(q, kf_v, vf_v),
        "fa3_tail_fits": lambda: fib.fa3_tail_fits(k, lens, slots, [True] * R),
        "metadata_on_host": lambda: fib.metadata_on_host(list(known)),
    }  # fmt: skip
    for name, fn in pieces.items():
        try:
            row = dict(base, row=f"host:{name}", host_us=host_us(fn, dev, n_host))
        except Exception as e:
            row = dict(base, row=f"host:{name}", error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    # The op's host time, each piece taken out in turn (results are wrong there: host time only).
    import types

    real_tk, real_fits, real_layout = deps.triton_kernels, fib.fa3_tail_fits, fib.ragged_layout
    no_zero = types.SimpleNamespace(zero_tail=lambda *a, **k: None)
    layout = fib.ragged_layout(lens, cu, slots, fib.flat_rows(k), R, S)
    ablations = {
        "without_zero_tail": lambda: setattr(deps, "triton_kernels", lambda: no_zero),
        "without_tail_check": lambda: setattr(fib, "fa3_tail_fits", lambda *a: True),
        "without_layout": lambda: setattr(fib, "ragged_layout", lambda *a: layout),
    }
    op_impl = pieces["op_impl"]
    for name, patch in ablations.items():
        patch()
        try:
            row = dict(base, row=f"host:op_impl_{name}", host_us=host_us(op_impl, dev, n_host))
        except Exception as e:
            row = dict(base, row=f"host:op_impl_{name}", error=f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            deps.triton_kernels, fib.fa3_tail_fits, fib.ragged_layout = real_tk, real_fits, real_layout
        rows.append(row)
        print(json.dumps(row), flush=True)
    # The wrapper after a zero-tail launch, as the op runs them, without the op around them.
    two = lambda: (pieces["zero_tail_launcher"](), pieces["wrapper_run"]())  # noqa: E731
    rows.append(dict(base, row="host:zero_tail_then_wrapper_run", host_us=host_us(two, dev, n_host)))
    print(json.dumps(rows[-1]), flush=True)
    import cProfile
    import io
    import pstats

    prof_py = cProfile.Profile()
    torch.cuda.synchronize()
    prof_py.enable()
    for _ in range(min(20, n_host)):
        fns["backend_host"]()
    prof_py.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof_py, stream=text).sort_stats("tottime").print_stats(25)
    profile_text.append(f"== {R}x{S}x{N} backend_host, cProfile of 20 calls by own time\n{text.getvalue()}\n")
    print(profile_text[-1], flush=True)
    for name in ("backend_sync", "backend_host"):
        fn = fns[name]
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(min(10, n_host)):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
        profile_text.append(f"== {R}x{S}x{N} {name} (10 calls)\n{table}\n")
        print(profile_text[-1], flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="1x8192x8192,1x32768x32768,4x16384x4096")
    p.add_argument("--rep-ms", type=float, default=200.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("diag_prefill.py: expected a CUDA GPU, found none")
    dev = torch.device("cuda")
    from torch_vkv.attention import available_backends

    if "flashinfer" not in available_backends(dev):
        raise SystemExit("diag_prefill.py: expected flashinfer importable (carry .whl), it is not")
    rows, profile_text, out_dir = [], [], os.environ.get("OUT", ".")
    for R, S, N in _points(args.points):
        _point(dev, R, S, N, args.rep_ms, rows, profile_text)
        gc.collect()  # the point's cache and wrapper
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "diag_prefill.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "diag_prefill_profile.txt"), "w") as f:
        f.write("\n".join(profile_text))


if __name__ == "__main__":
    main()
