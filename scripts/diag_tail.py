"""A model of a causal prefill launch's tail: how long the SMs wait at the end for the last blocks
(a model on the CPU, not a measurement; no GPU needed).

    python scripts/diag_tail.py [--contexts 4096,8192,32768] [--heads 32 --kv-heads 8] [--sms 132]

The prefill kernels (``triton_kernels/prefill.py`` and ``prefill_hopper.py``) launch one program a
``(query block, head, request)``; the GPU starts them in launch order as SMs free up, one at a time an SM
(the Gluon kernel takes an SM's whole shared memory). Here each block costs ``block_us`` plus ``tile_us``
a key tile it reads (``tile_plan``'s ring tiles, plus the ragged one), and the blocks are dealt in each
order's launch order (``block_order`` for the grouped one) to whichever simulated SM is free first. It
prints the span, the ideal (all the work spread evenly), the tail (span over ideal) and when the first
SM runs out of work, per order, and writes the rows to ``$OUT/diag_tail.json``.

The defaults are the twenty-ninth session's per-item stamps of the Gluon kernel on the H100 at 8K
(1.64 us a key tile and SM; 3.9 us a block: its queries' wait, the output store and the gap between
blocks). With them the head-after-head order's SMs finish between 854 and 935 us at 8K, as the stamps
measured; the grouped order's gain in the model (5% at 8K) was larger than measured (2.5-3.3%, the H100
at its power cap): use it to compare orders, not to predict times.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os

from torch_vkv._checks import int_list_arg


def launch_order(num_m_blocks: int, num_heads: int, num_kv_heads: int, grouped: bool) -> list[tuple[int, int]]:
    """The ``(m_block, head)`` of each program of one request, in launch order (causal): the grid's
    first dimension fastest, as the GPU starts them. One head after another is ``block_order``'s
    group of one (grid ``(m_blocks, num_heads, requests)``)."""
    from torch_vkv.triton_kernels import block_order

    group = num_heads // num_kv_heads if grouped else 1
    return [block_order(i, g, num_m_blocks, group, True) for g in range(num_heads // group)
            for i in range(num_m_blocks * group)]  # fmt: skip


def block_tiles(seqlen: int, q_len: int, m_block: int) -> int:
    """Key tiles a causal query block reads (``tile_plan``: the ring's, and the one crossing the length)."""
    from torch_vkv.triton_kernels.prefill_hopper import tile_plan

    return tile_plan(seqlen, q_len, m_block, True)["n_tiles"]


def simulate(costs: list[float], num_sms: int) -> dict:
    """Deal ``costs`` (microseconds, in launch order) to ``num_sms`` SMs, each block to the SM free first."""
    if num_sms < 1 or not costs:
        raise ValueError(f"simulate: expected at least one SM and one block, got {num_sms} SMs, {len(costs)} blocks")
    free = [0.0] * num_sms
    for cost in costs:
        heapq.heappush(free, heapq.heappop(free) + cost)
    ideal = sum(costs) / num_sms
    span = max(free)
    return dict(span_us=span, ideal_us=ideal, tail_pct=100 * (span / ideal - 1), first_idle_us=min(free))


def model(context: int, num_heads: int, num_kv_heads: int, num_sms: int, tile_us: float, block_us: float,
          block_m: int = 128) -> list[dict]:  # fmt: skip
    """Both orders for one whole prompt of ``context`` tokens (batch 1)."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"diag_tail: expected num_heads a multiple of num_kv_heads, got {num_heads} and {num_kv_heads}")
    num_m_blocks = -(-context // block_m)
    rows = []
    for grouped in (False, True):
        order = launch_order(num_m_blocks, num_heads, num_kv_heads, grouped)
        costs = [block_us + tile_us * block_tiles(context, context, m) for m, _ in order]
        rows.append(dict(context=context, order="grouped" if grouped else "head after head", **simulate(costs, num_sms)))
    return rows


def main() -> None:
    ints = int_list_arg(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=ints, default=[4096, 8192, 32768], help="prompt lengths (batch 1, causal)")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    p.add_argument("--sms", type=int, default=132, help="SMs, one program each at a time")
    p.add_argument("--tile-us", type=float, default=1.64, help="microseconds a key tile takes an SM")
    p.add_argument("--block-us", type=float, default=3.9, help="microseconds a block costs besides its tiles")
    args = p.parse_args()
    rows = []
    for context in args.contexts:
        for row in model(context, args.heads, args.kv_heads, args.sms, args.tile_us, args.block_us):
            rows.append(row)
            print(f"{context:7d} {row['order']:16s} span {row['span_us']:9.1f} us  ideal {row['ideal_us']:9.1f} us  "
                  f"tail {row['tail_pct']:5.2f}%  first SM idle at {row['first_idle_us']:9.1f} us")  # fmt: skip
    with open(os.path.join(os.environ.get("OUT", "."), "diag_tail.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
