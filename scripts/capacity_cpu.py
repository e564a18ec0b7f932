"""The ``capacity`` workload's memory geometry on a CPU (a diagnostic: scheduling, not speed).

    python scripts/capacity_cpu.py [CONFIG ...] [--requests 64] [--no-prewarm]

``bench serve --workload capacity`` on an H200 runs Llama-3-8B with a 4 GiB KV
budget: 2048 pages of 2 MiB, 16 tokens a page in the interleaved layout, as a
paged block of 16. Here the tiny model (2 layers, 2 KV heads, head_dim 16,
float32: 512 bytes a token) on 8 KiB host pages keeps those numbers: 16 tokens a
page, 2048 pages, the same ``arxiv_summarization`` requests, all at t=0. Prints
per configuration (default ``virtual-interleaved paged-16``) the peak number of
running requests, the mean while requests wait and the preemptions: what
admission and reclamation decide, which do not depend on the device.
"""

import argparse
import math

import torch

from torch_vkv.bench.models import build_model
from torch_vkv.bench.serve_engine import parse_config, random_prompts, run_engine
from torch_vkv.bench.workloads import make_requests, workload_lengths

PAGE = 8192


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", default=["virtual-interleaved", "paged-16"])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--no-prewarm", action="store_true", help="eager allocation off (virtual)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.no_prewarm:
        from torch_vkv.serving.prewarm import Prewarmer

        Prewarmer.after_launch = lambda self, batch: 0
    model = build_model("tiny", device="cpu", dtype=torch.float32)
    specs = make_requests(workload_lengths("arxiv_summarization", args.requests), request_rate=math.inf)
    prompts = random_prompts(specs, model.config.vocab_size)
    for name in args.configs:
        res = run_engine(model, parse_config(name), specs, prompts, max_batch_size=256, max_seq_len=8192,
                         chunk_size=4096, memory_budget=2048 * PAGE, page_size=PAGE, cuda_graphs=False,
                         warmup=False)  # fmt: skip
        running = [m["num_running"] for m in res.memory]
        queued = [m["num_running"] for m in res.memory if m["num_waiting"] > 0]
        print(f"{name}: peak running {max(running)}, mean while requests wait {sum(queued) / max(1, len(queued)):.2f}, "
              f"preemptions {res.stats['num_preemptions']}, iterations {len(res.iterations)}")


if __name__ == "__main__":
    main()
