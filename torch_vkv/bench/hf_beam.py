"""``python -m torch_vkv bench hf --beam``: beam search, pages remapped vs rows copied vs ``DynamicCache``.

Beam search reorders the KV cache every step (``reorder_cache(beam_idx)``).
Three variants generate the same beams (greedy beam search, sdpa attention,
eager steps; every variant must give the same sequences):

============  ================================================================
``dynamic``   ``DynamicCache`` (``index_select`` of every row, every layer)
``copy``      ``VirtualKVCache`` with the old batch operations: rows copied
``remap``     ``VirtualKVCache`` (:mod:`torch_vkv.hf.batch_ops`): full pages
              remapped, at most the partial last page copied per row
============  ================================================================

Per row: new tokens/s, seconds, committed KV bytes at the end (for
``DynamicCache``: its tensors' bytes), bytes the reorders copied
(``batch_copied_bytes``), pages shared between beams.

Default (GPU): Llama-3-8B config, batch 1, ``num_beams`` 4, prompt 2048,
256 new tokens. ``--quick --tiny``: a tiny config, prompt 64, 8 new tokens,
on the CPU in seconds (the smoke test).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from torch_vkv.bench.report import write_report

__all__ = ["run_beam"]

VARIANTS = ("dynamic", "copy", "remap")


def _cache(variant: str, model, rows: int, max_len: int, device: torch.device, page_size: int | None):
    from transformers import DynamicCache

    from torch_vkv.hf import VirtualKVCache

    if variant == "dynamic":
        return DynamicCache(config=model.config)
    cache = VirtualKVCache(model.config, rows, max_len, device=device, page_size=page_size)
    cache._copy_batch_ops = variant == "copy"
    return cache


def _kv_stats(cache: Any) -> dict[str, Any]:
    from torch_vkv.hf import VirtualKVCache

    if isinstance(cache, VirtualKVCache):
        s = cache.memory_stats()
        return {"kv_bytes": int(s["committed_bytes"]), "copied_bytes": int(s["batch_copied_bytes"]),
                "shared_pages": int(s["shared_pages"])}  # fmt: skip
    total = sum(t.numel() * t.element_size() for layer in cache.layers
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))  # fmt: skip
    return {"kv_bytes": total, "copied_bytes": None, "shared_pages": None}


def run_beam(args: argparse.Namespace, model, device: torch.device, command: str) -> int:
    """Runs the beam-search comparison for ``bench hf --beam`` and writes its report."""
    from torch_vkv.bench.timing import sync
    from torch_vkv.hf import generate_kwargs

    beams, batch = args.num_beams, (args.batch or [1])[0]
    prompt = (args.prompt or [64 if args.tiny else 2048])[0]
    new = (args.new_tokens or [8 if args.tiny else 256])[0]
    page_size = 4096 if device.type == "cpu" else None  # small host pages: the smoke run crosses pages
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=g).to(device)
    model.set_attn_implementation("sdpa")
    rows, outs = [], {}
    for variant in VARIANTS:
        cache = _cache(variant, model, batch * beams, prompt + new, device, page_size)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **generate_kwargs(cache),
                                 max_new_tokens=new, min_new_tokens=new, num_beams=beams,
                                 num_return_sequences=beams, do_sample=False)  # fmt: skip
        sync(device)
        seconds = time.perf_counter() - t0
        outs[variant] = out
        row = {"variant": variant, "batch": batch, "num_beams": beams, "prompt": prompt, "new_tokens": new,
               "seconds": seconds, "tok_s": batch * new / seconds, **_kv_stats(cache)}  # fmt: skip
        row["same_sequences_as_dynamic"] = bool(torch.equal(out, outs["dynamic"]))
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
        rows.append(row)
        if hasattr(cache, "close"):
            cache.close()
        del cache
    summary = ("tok_s: new tokens per second per prompt (beams not counted), end to end (prefill included). "
               "kv_bytes: committed KV at the end (DynamicCache: its tensors). copied_bytes: what the cache "
               "reorders copied in all (VirtualKVCache only). shared_pages: pages several beams map.")  # fmt: skip
    write_report(args.name if args.name != "hf" else "hf_beam", rows, args.out_dir, command=command, summary=summary,
                 columns=list(rows[0]))  # fmt: skip
    return 0 if all(r["same_sequences_as_dynamic"] for r in rows) else 1
