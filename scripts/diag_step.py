"""Where a decode-only engine iteration's time goes, on a GPU (a diagnostic, not a benchmark).

    python scripts/diag_step.py [NUM_REQUESTS]            # eager decode steps
    COMPILE=1 python scripts/diag_step.py [NUM_REQUESTS]  # Engine(compile=True)

Llama-3-8B with random bf16 weights; for ``virtual`` per_layer and ``paged``
(block 16) engines in turn: NUM_REQUESTS (default 64) requests of 600 prompt
tokens, 40 iterations to reach steady decoding, then 30 timed ``step()`` calls.
Prints and writes to ``$OUT/diag.json`` per engine: ``build_s`` (construction:
compile and graph capture), ``step_wall_ms`` (host wall time of ``step()``),
``graph_gpu_ms`` (CUDA events around the graph replay, H2D copies included),
``back_to_back_replay_ms`` (the same graph replayed 20 times with no host work
between), ``replay_cpu_ms`` (host cost of one ``replay()`` call); and a chrome
trace of three steps to ``$OUT/trace_{kv}.json`` (kernels per step, gaps).
"""
import json
import os
import sys
import time

import torch
from torch_vkv.bench.models import build_model
from torch_vkv.serving import Engine, SamplingParams

out = os.environ.get("OUT", ".")
dev = torch.device("cuda")
model = build_model("llama3-8b", device=dev, dtype=torch.bfloat16)
res = {}
for kv, layout in (("virtual", "per_layer"), ("paged", "per_layer")):
    tc = time.perf_counter()
    eng = Engine(model, max_batch_size=64, max_seq_len=2048, kv=kv, layout=layout, memory_budget=40 << 30,
                 chunk_size=4096, cuda_graphs=True, compile=os.environ.get("COMPILE") == "1")
    build_s = time.perf_counter() - tc
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 64):
        eng.add_request([(i * 7 + j) % 1000 + 1 for j in range(600)], params)
    for _ in range(40):
        eng.step()
    torch.cuda.synchronize()
    runner = eng.runner
    ev = []
    orig_replay = runner._replay
    def timed_replay(batch, bs, t0):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); o = orig_replay(batch, bs, t0); b.record()
        ev.append((a, b, time.perf_counter()))
        return o
    runner._replay = timed_replay
    walls = []
    for _ in range(30):
        t = time.perf_counter(); eng.step(); walls.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    gpu = [a.elapsed_time(b) for a, b, _ in ev]
    walls_ms = [1e3 * w for w in walls]
    # graph replay alone, back to back (no host work between): the GPU's own time per iteration
    graph, _o = runner._graphs[next(iter(b for b in runner._graphs if b >= 64))]
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize(); back = (time.perf_counter() - t) / 20 * 1e3
    t = time.perf_counter()
    for _ in range(20):
        graph.replay()
    cpu_launch = (time.perf_counter() - t) / 20 * 1e3
    torch.cuda.synchronize()
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            eng.step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(f"{out}/trace_{kv}.json")
    name = f"{kv}-{layout}"
    res[name] = dict(build_s=build_s, step_wall_ms=sum(walls_ms) / len(walls_ms), graph_gpu_ms=sum(gpu) / len(gpu),
                     back_to_back_replay_ms=back, replay_cpu_ms=cpu_launch,
                     batch=len(eng.scheduler.running) if hasattr(eng.scheduler, "running") else None)
    print(name, res[name], flush=True)
    
    eng.close()
json.dump(res, open(f"{out}/diag.json", "w"), indent=1)
