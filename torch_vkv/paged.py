"""Block-table (paged) KV cache: the PagedAttention baseline that virtual KV must beat.

Each layer's K and V live in block pools ``[num_blocks, block_size,
num_kv_heads, head_dim]``; a request owns a list of blocks, recorded in an
int32 block table ``[max_requests, max_blocks_per_request]`` on the device::

    logical (request 3):  tokens 0..15 | 16..31 | 32..47 | 48..52
    block_table[3]:            7       |   2    |   11   |   4      (then unused entries)
    pool:  [blk0][blk1][blk2][blk3][blk4]...[blk7]...[blk11]...

The kernels translate a position ``p`` to ``block_table[slot, p // block_size]``
and row ``p % block_size``: the same Triton kernels as for the contiguous cache
compiled with ``PAGED=True`` (``torch_vkv.triton_kernels``), so benchmarks
measure the cost of paging with everything else equal.

Made fair, not a straw man: block size 16 by default (vLLM's); one contiguous
allocation per layer (K and V pools side by side, as vLLM's FlashAttention
backend); int32 block table resident on the device and updated only for the
entries that change; blocks handed out lowest id first, so a fresh cache is
as contiguous as a paged cache can be (``BlockPool(shuffle=True)`` models a
fragmented, long-running server instead).
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch

from ._checks import check_int, fail
from .errors import OutOfPagesError

__all__ = ["BlockPool", "PagedKVCache", "paged_from_dense"]


class BlockPool:
    """Free list of ``num_blocks`` fixed-size KV blocks (ids ``0 .. num_blocks - 1``).

    :meth:`can_allocate` / :meth:`allocate` form a check/act pair;
    :meth:`allocate` raises :class:`~torch_vkv.errors.OutOfPagesError` and
    changes nothing when fewer blocks are free than asked.
    """

    def __init__(self, num_blocks: int, *, shuffle: bool = False, seed: int = 0) -> None:
        self.num_blocks = check_int("num_blocks", num_blocks, low=1)
        ids = list(range(self.num_blocks))
        if shuffle:
            random.Random(seed).shuffle(ids)
        self._free = ids[::-1]  # pop() from the end: lowest id (or first shuffled) first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        n = check_int("n", n, low=0)
        if n > len(self._free):
            err = OutOfPagesError(f"allocate: expected at most {len(self._free)} free blocks, got a request for {n}")
            err.requested_pages, err.available_pages = n, len(self._free)
            raise err
        out = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return out

    def free(self, blocks: Sequence[int]) -> None:
        self._free.extend(reversed(list(blocks)))


class PagedKVCache:
    """Paged KV cache for ``num_layers`` layers, ``max_requests`` slots.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : model shape.
    num_blocks : blocks in the pool (shared by all slots; each layer has its own copy of the pool).
    max_requests : rows of the block table (slots).
    max_seq_len : longest request, sizes the block table's second dimension.
    block_size : tokens per block (16 by default, as vLLM).

    Attributes
    ----------
    kv : shape ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.
    block_table : int32, shape ``[max_requests, ceil(max_seq_len / block_size)]``, on ``device``.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        max_requests: int,
        max_seq_len: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cuda",
        shuffle: bool = False,
    ) -> None:
        self.num_layers = check_int("num_layers", num_layers, low=1)
        self.num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
        self.head_dim = check_int("head_dim", head_dim, low=1)
        self.block_size = check_int("block_size", block_size, low=1)
        self.max_requests = check_int("max_requests", max_requests, low=1)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, low=1)
        self.pool = BlockPool(num_blocks, shuffle=shuffle)
        self.max_blocks = math.ceil(self.max_seq_len / self.block_size)
        self.kv = torch.empty(
            (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim), dtype=dtype, device=device
        )
        self.block_table = torch.zeros((self.max_requests, self.max_blocks), dtype=torch.int32, device=device)
        self._blocks: list[list[int]] = [[] for _ in range(self.max_requests)]

    # -- capacity ---------------------------------------------------------

    def _check_slot(self, slot: int) -> int:
        return check_int("slot", slot, low=0, high=self.max_requests - 1)

    def capacity(self, slot: int) -> int:
        """Tokens that slot ``slot`` can hold without allocating."""
        return len(self._blocks[self._check_slot(slot)]) * self.block_size

    def can_reserve(self, slot: int, num_tokens: int) -> bool:
        need = math.ceil(num_tokens / self.block_size) - len(self._blocks[self._check_slot(slot)])
        return num_tokens <= self.max_seq_len and self.pool.can_allocate(max(0, need))

    def reserve(self, slot: int, num_tokens: int) -> None:
        """Grow slot ``slot`` to hold ``num_tokens`` tokens (allocates blocks, updates the block table)."""
        slot = self._check_slot(slot)
        num_tokens = check_int("num_tokens", num_tokens, low=0)
        if num_tokens > self.max_seq_len:
            fail("num_tokens", f"at most max_seq_len = {self.max_seq_len}", num_tokens)
        have = self._blocks[slot]
        need = math.ceil(num_tokens / self.block_size) - len(have)
        if need <= 0:
            return
        new = self.pool.allocate(need)
        start = len(have)
        have.extend(new)
        # One small host-to-device copy of the changed entries only.
        self.block_table[slot, start : start + need] = torch.tensor(new, dtype=torch.int32).to(
            self.block_table.device, non_blocking=True
        )

    def release(self, slot: int) -> None:
        """Return slot ``slot``'s blocks to the pool."""
        slot = self._check_slot(slot)
        self.pool.free(self._blocks[slot])
        self._blocks[slot] = []

    # -- data -------------------------------------------------------------

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_pool, v_pool) of ``layer``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        layer = check_int("layer", layer, low=0, high=self.num_layers - 1)
        return self.kv[layer, 0], self.kv[layer, 1]

    def append(self, layer, k_new, v_new, cache_seqlens, *, cu_seqlens_q=None, slots=None) -> None:
        """Write new tokens' K/V (``[total_q, num_kv_heads, head_dim]``) at their positions; see :func:`torch_vkv.attention.append_kv`."""
        from .attention import append_kv

        k, v = self.layer(layer)
        append_kv(k, v, k_new, v_new, cache_seqlens, cu_seqlens_q=cu_seqlens_q, slots=slots, block_table=self.block_table)

    def attention(self, layer, q, cache_seqlens, *, cu_seqlens_q=None, slots=None, causal=True, scale=None,
                  backend="auto", **kwargs) -> torch.Tensor:  # fmt: skip
        """Paged attention for ``layer``; same contract as :func:`torch_vkv.attention.attention`."""
        from .attention import attention

        k, v = self.layer(layer)
        return attention(q, k, v, cache_seqlens, cu_seqlens_q=cu_seqlens_q, slots=slots, causal=causal, scale=scale,
                         backend=backend, block_table=self.block_table, **kwargs)  # fmt: skip

    def load_dense(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                   slots: Optional[Sequence[int]] = None) -> None:  # fmt: skip
        """Copy rows ``0 .. lengths[i]`` of ``k[i]``/``v[i]`` (``[B, S, H_kv, D]``) into slot ``slots[i]``, reserving blocks.

        For tests and benchmarks: the same data in a contiguous cache and in this paged one.
        """
        kp, vp = self.layer(layer)
        slots = list(range(len(lengths))) if slots is None else list(slots)
        for i, (n, s) in enumerate(zip(lengths, slots)):
            self.reserve(s, n)
            blocks = self._blocks[s]
            nb = math.ceil(n / self.block_size)
            if nb == 0:
                continue
            pad = nb * self.block_size
            src_k = k.new_zeros((pad,) + tuple(k.shape[2:]))
            src_v = v.new_zeros((pad,) + tuple(v.shape[2:]))
            src_k[:n] = k[i, :n]
            src_v[:n] = v[i, :n]
            idx = torch.tensor(blocks[:nb], device=kp.device, dtype=torch.long)
            kp[idx] = src_k.view(nb, self.block_size, *k.shape[2:]).to(kp.dtype)
            vp[idx] = src_v.view(nb, self.block_size, *v.shape[2:]).to(vp.dtype)


def paged_from_dense(
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: Sequence[int],
    *,
    block_size: int = 16,
    extra_blocks: int = 0,
    shuffle: bool = False,
) -> PagedKVCache:
    """A one-layer :class:`PagedKVCache` holding the first ``lengths[i]`` rows of ``k[i]``/``v[i]``.

    ``k``, ``v``: shape ``[B, S_max, num_kv_heads, head_dim]``. Slot ``i`` holds request ``i``.
    """
    B, S, H, D = k.shape
    nb = sum(math.ceil(n / block_size) for n in lengths) + extra_blocks
    cache = PagedKVCache(
        1, H, D, num_blocks=max(1, nb), max_requests=B, max_seq_len=S, block_size=block_size,
        dtype=k.dtype, device=k.device, shuffle=shuffle,
    )  # fmt: skip
    cache.load_dense(0, k, v, lengths)
    return cache
