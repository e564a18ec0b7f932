"""Do page maps on the host slow the GPU's work? (a diagnostic, not a benchmark)

    python scripts/diag_maps.py [--batch 8] [--context 4096] [--layers 32] [--pages 64] [--replays 200]

Eager allocation (``KVManager.prewarm``) and the background committer map pages
while a step runs on the GPU, on the assumption that ``cuMemMap`` /
``cuMemSetAccess`` / ``cuMemUnmap`` cost only host time. If the driver instead
stalls the kernels in flight (page-table updates, TLB invalidations) or the
host's next launch, per_layer (64 pages a slot for each 1024 tokens of
Llama-3-8B) would pay more of it than interleaved: one candidate for its
slower decode steps at the summarization rates of ``bench serve --workload
long-online``.

A "step" here is ``--layers`` decode attentions (Llama-3-8B heads: 32 query,
8 KV heads of 128, bf16, our Triton kernel) over a ``--batch`` x ``--context``
per-layer cache, captured in one CUDA graph. The graph is replayed
``--replays`` times back to back, timed by CUDA events, in three modes:

* ``idle``: nothing else runs;
* ``maps_thread``: a second thread commits ``--pages`` pages of another cache's
  free slot and decommits them again, in a loop, for as long as the replays run
  (the background committer's and eager allocation's pattern);
* ``maps_between``: the launching thread itself commits and decommits those
  pages after every replay's launch (eager allocation after a step's launch).

Prints ms per replay and the maps per second each mode achieved, and writes
them to ``$OUT/diag_maps.json``. ``maps_*`` within noise of ``idle`` means page
maps cost the GPU nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from torch_vkv import KVCache, attention

H, H_KV, D = 32, 8, 128


def _churn_once(cache: KVCache, slot: int, num_tokens: int, stream: torch.cuda.Stream) -> int:
    """Commits ``num_tokens`` rows of ``slot``, then decommits them; returns the pages mapped (every buffer).
    The decommit fences on ``stream``, which runs nothing: the pages are free again at once, not after
    the replays queued on the launching stream."""
    cache.step({slot: num_tokens})
    return cache.decommit(slot, 0, stream=stream) * 2  # K and V


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--pages", type=int, default=64, help="pages committed and decommitted per churn cycle")
    p.add_argument("--replays", type=int, default=200)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("diag_maps.py: expected a CUDA GPU (driver page maps beside running kernels), found none")
    dev = torch.device("cuda")
    B, S, L = args.batch, args.context, args.layers
    cache = KVCache(L, H_KV, D, max_batch_size=B, max_seq_len=S, dtype=torch.bfloat16, device=dev)
    for _ in range(B):
        cache.alloc()
    cache.step([S] * B)
    for layer in range(L):  # random, finite K/V (fresh pages hold zeros)
        cache.key(layer).normal_()
        cache.value(layer).normal_()
    # The churn cache: one layer, K and V, so --pages pages are --pages / 2 pages of rows in each buffer.
    churn = KVCache(1, H_KV, D, max_batch_size=1, max_seq_len=max(S, (args.pages + 2) * 2048), dtype=torch.bfloat16,
                    device=dev)  # fmt: skip
    churn_slot = churn.alloc()
    churn_tokens = churn.tokens_for_pages(max(1, args.pages // 2))
    churn_stream = torch.cuda.Stream(dev)

    q = torch.randn((B, H, D), dtype=torch.bfloat16, device=dev)
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)

    def step() -> None:
        for layer in range(L):
            attention(q, cache.key(layer), cache.value(layer), lens, backend="triton")

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def timed(mode: str) -> dict:
        stop, pages = threading.Event(), [0]

        def churn_loop() -> None:
            while not stop.is_set():
                pages[0] += _churn_once(churn, churn_slot, churn_tokens, churn_stream)

        worker = threading.Thread(target=churn_loop) if mode == "maps_thread" else None
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize(dev)
        if worker is not None:
            worker.start()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(args.replays):
            graph.replay()
            if mode == "maps_between":
                pages[0] += _churn_once(churn, churn_slot, churn_tokens, churn_stream)
        end.record()
        end.synchronize()
        wall = time.perf_counter() - t0
        stop.set()
        if worker is not None:
            worker.join()
        return {"mode": mode, "ms_per_replay": start.elapsed_time(end) / args.replays,
                "pages_mapped": pages[0], "maps_per_s": pages[0] / wall}  # fmt: skip

    rows = [timed(m) for m in ("idle", "maps_thread", "maps_between", "idle")]
    base = min(r["ms_per_replay"] for r in rows if r["mode"] == "idle")
    for r in rows:
        r["x_idle"] = r["ms_per_replay"] / base
        print(f"{r['mode']:>13}: {r['ms_per_replay']:.3f} ms a replay ({r['x_idle']:.3f}x idle), "
              f"{r['pages_mapped']} pages mapped, {r['maps_per_s']:.0f} a second")  # fmt: skip
    report = {"batch": B, "context": S, "layers": L, "pages_per_cycle": args.pages, "replays": args.replays,
              "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": rows}  # fmt: skip
    path = os.path.join(os.environ.get("OUT", "."), "diag_maps.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    graph.reset()
    churn.close()
    cache.close()


if __name__ == "__main__":
    main()
