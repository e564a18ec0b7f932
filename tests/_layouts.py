"""Build the two KVCache layouts and attention batches from plain torch tensors.

per_layer:   buf[B, S_pad, H, D]           k = buf[:, :S_max]            (one buffer for K, one for V)
interleaved: buf[B, S_pad, L, 2, H, D]     k = buf[:, :S_max, l, 0], v = buf[:, :S_max, l, 1]

Rows past each request's length are filled with NaN, as uncommitted virtual
memory may hold: kernels must mask them, not multiply them by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("per_layer", "interleaved")


def make_cache(layout, B, S_max, H_kv, D, *, dtype, device, S_pad=None, num_layers=3, layer=1, seed=0):
    """(k_cache, v_cache) views ``[B, S_max, H_kv, D]`` of one of the two layouts, random data."""
    g = torch.Generator().manual_seed(seed)
    S_pad = S_pad or -(-(S_max + 1) // 64) * 64  # padded rows, like KVCache (flex needs S_pad % 16 == 0)
    if layout == "per_layer":
        kb = torch.randn((B, S_pad, H_kv, D), generator=g).to(dtype=dtype, device=device)
        vb = torch.randn((B, S_pad, H_kv, D), generator=g).to(dtype=dtype, device=device)
        return kb[:, :S_max], vb[:, :S_max]
    if layout == "interleaved":
        buf = torch.randn((B, S_pad, num_layers, 2, H_kv, D), generator=g).to(dtype=dtype, device=device)
        return buf[:, :S_max, layer, 0], buf[:, :S_max, layer, 1]
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def poison(k_cache, v_cache, lengths, slots):
    """Write NaN into every row past the length of each used slot, and into unused slots."""
    used = dict(zip(slots, lengths))
    for s in range(k_cache.shape[0]):
        n = used.get(s, 0)
        k_cache[s, n:] = float("nan")
        v_cache[s, n:] = float("nan")


@dataclass
class Batch:
    q: torch.Tensor  # [total_q, H, D]
    k_new: torch.Tensor  # [total_q, H_kv, D]
    v_new: torch.Tensor
    cache_seqlens: torch.Tensor  # int32 [R], new tokens included
    cu_seqlens_q: torch.Tensor | None  # int32 [R + 1] or None (decode)
    slots: torch.Tensor | None
    q_lens: list
    lengths: list
    slot_list: list


KINDS = ("prefill", "decode", "mixed")


def make_batch(kind, *, H, H_kv, D, dtype, device, S_max, with_slots=False, seed=0):
    """A batch of ``kind``: prefill (whole prompts), decode (one token each), mixed (chunked prefill + decode)."""
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "prefill":
        lengths = [S_max, S_max // 2 + 3, 5]
        q_lens = list(lengths)
    elif kind == "decode":
        lengths = [S_max, 1, S_max // 2 + 7, 33]
        q_lens = [1] * len(lengths)
    elif kind == "mixed":
        # a prompt chunk in the middle of a prompt, a first chunk, decodes, a chunk ending at S_max
        lengths = [S_max // 2 + 9, 17, S_max, 40, S_max]
        q_lens = [13, 17, 1, 1, 21]
    else:
        raise ValueError(kind)
    R = len(lengths)
    slot_list = list(range(R))
    if with_slots:
        slot_list = slot_list[1:] + slot_list[:1]  # a permutation: request r uses row r+1
    total = sum(q_lens)
    q = (torch.randn((total, H, D), generator=g)).to(dtype=dtype, device=device)
    k_new = torch.randn((total, H_kv, D), generator=g).to(dtype=dtype, device=device)
    v_new = torch.randn((total, H_kv, D), generator=g).to(dtype=dtype, device=device)
    cu = None
    if kind != "decode":
        cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return Batch(
        q=q,
        k_new=k_new,
        v_new=v_new,
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=device),
        cu_seqlens_q=cu,
        slots=torch.tensor(slot_list, dtype=torch.int32, device=device) if with_slots else None,
        q_lens=q_lens,
        lengths=lengths,
        slot_list=slot_list,
    )
