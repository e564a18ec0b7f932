"""Where the engine's host time goes, per configuration (a diagnostic, not a benchmark).

    python scripts/diag_host.py [--configs virtual-per_layer,paged-256] [--requests 256]
        [--max-batch-size 128] [--model llama3-8b] [--compile]
    python scripts/diag_host.py --model tiny --requests 32 --max-batch-size 16   # a CPU smoke run

The offline workload of ``bench serve`` (prompt and output lengths uniform in
[100, 1024], all queued at t=0; ``--model tiny`` clips them to 64) on one engine
per configuration, in turn, under ``cProfile``. Prints, and writes to
``$OUT/diag_host.json``, per configuration: iterations, mean ``step()`` wall, the
engine's host time (``Engine.host_seconds``) and its KV parts (``kv_grow_seconds``,
``kv_prewarm_seconds``) per iteration, and the functions of ``torch_vkv`` with the
most own time per iteration (the sampler's device-to-host copy, where the host
waits for the GPU, shows as ``tolist``). Comparing two configurations' lists
says which host work one does that the other does not.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import time

import torch

from torch_vkv.bench.models import build_model
from torch_vkv.bench.serve_engine import parse_config, warm_up
from torch_vkv.serving import Engine, SamplingParams


def run(model, spec: str, args, prompts, outputs) -> dict:
    cfg = parse_config(spec)
    engine = Engine(model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, kv=cfg.kv,
                    layout=cfg.layout, block_size=cfg.block_size, chunk_size=args.chunk_size,
                    memory_budget=args.memory_budget, compile=args.compile)  # fmt: skip
    try:
        warm_up(engine, chunk_size=args.chunk_size, max_seq_len=args.max_seq_len)  # as bench serve does
        host0, stats0 = engine.host_seconds, engine.stats()
        for p, n in zip(prompts, outputs):
            engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        prof, iters = cProfile.Profile(), 0
        t0 = time.perf_counter()
        prof.enable()
        while engine.has_unfinished_requests():
            engine.step()
            iters += 1
        prof.disable()
        wall = time.perf_counter() - t0
        stats = engine.stats()
    finally:
        engine.close()
    per_iter = lambda s: 1e3 * s / max(iters, 1)  # noqa: E731
    funcs = []
    for (path, line, name), (_cc, ncalls, tottime, cumtime, _callers) in pstats.Stats(prof).stats.items():
        if "torch_vkv" in path or name in ("tolist", "<method 'tolist' of 'torch._C.TensorBase' objects>"):
            funcs.append(dict(function=f"{os.path.relpath(path) if os.path.exists(path) else path}:{line}({name})",
                              calls_per_iter=ncalls / max(iters, 1), own_ms_per_iter=per_iter(tottime),
                              cum_ms_per_iter=per_iter(cumtime)))  # fmt: skip
    funcs.sort(key=lambda f: -f["own_ms_per_iter"])
    return dict(
        iterations=iters, step_wall_ms=per_iter(wall), host_ms_per_iter=per_iter(engine.host_seconds - host0),
        kv_grow_ms_per_iter=per_iter(stats["kv_grow_seconds"] - stats0["kv_grow_seconds"]),
        kv_prewarm_ms_per_iter=per_iter(stats["kv_prewarm_seconds"] - stats0["kv_prewarm_seconds"]),
        top=funcs[: args.top],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="virtual-per_layer,virtual-interleaved,paged-16,paged-256")
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2049)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--memory-budget", type=int, default=None, help="bytes (default: 40 GiB on CUDA, 256 MiB on a CPU)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_budget is None:
        args.memory_budget = (40 << 30) if device.type == "cuda" else (256 << 20)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.model, device=device, dtype=dtype)
    rng = random.Random(0)
    hi = 1024 if args.model != "tiny" else 64
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(min(100, hi // 2), hi))] for _ in range(args.requests)]
    outputs = [rng.randint(min(100, hi // 2), hi) for _ in range(args.requests)]
    results = {}
    for spec in args.configs.split(","):
        results[spec] = r = run(model, spec, args, prompts, outputs)
        print(f"{spec}: {r['iterations']} iterations, step {r['step_wall_ms']:.3f} ms, host {r['host_ms_per_iter']:.3f} "
              f"ms (kv grow {r['kv_grow_ms_per_iter']:.3f}, prewarm {r['kv_prewarm_ms_per_iter']:.3f}) an iteration")
        for f in r["top"]:
            print(f"    {f['own_ms_per_iter']:8.3f} own {f['cum_ms_per_iter']:8.3f} cum ms/iter "
                  f"{f['calls_per_iter']:7.2f} calls/iter  {f['function']}")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "diag_host.json"), "w") as fh:
        json.dump(dict(device=str(device), torch=torch.__version__, args=vars(args), results=results), fh, indent=1)


if __name__ == "__main__":
    main()
