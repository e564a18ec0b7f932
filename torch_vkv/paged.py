"""Block-table (paged) KV cache: the PagedAttention baseline that virtual KV must beat.

Each layer's K and V live in block pools ``[num_blocks, page_size,
num_kv_heads, head_dim]``; a request owns a list of blocks, recorded in an
int32 block table ``[max_batch_size, max_blocks_per_request]`` on the device::

    logical (request 3):  tokens 0..15 | 16..31 | 32..47 | 48..52
    block_table[3]:            7       |   2    |   11   |   4      (then unused entries)
    pool:  [blk0][blk1][blk2][blk3][blk4]...[blk7]...[blk11]...

The kernels translate a position ``p`` to ``block_table[slot, p // page_size]``
and row ``p % page_size``: the same Triton kernels as for the contiguous cache
compiled with ``PAGED=True`` (``torch_vkv.triton_kernels``), so benchmarks
measure the cost of paging with everything else equal.

Made fair, not a straw man: block size 16 by default (vLLM's); one contiguous
allocation per layer (K and V pools side by side, as vLLM's FlashAttention
backend); int32 block table resident on the device and updated only for the
entries that change; blocks handed out lowest id first, so a fresh cache is
as contiguous as a paged cache can be (``BlockPool(shuffle=True)`` models a
fragmented, long-running server instead).

Threads: the bookkeeping methods of :class:`BlockPool` and
:class:`PagedKVCache` (alloc / free / commit / capacity / memory_stats) hold a
lock; as with :class:`~torch_vkv.KVCache`, which thread writes which rows is
the caller's job (never a slot that another thread frees). Both are plain
PyTorch memory: ``copy.deepcopy`` and pickling make an independent copy (the
lock is not copied), ``copy.copy`` is refused because the copy would share the
block table and the free list with the original. After ``fork()`` a CPU cache
is the child's own copy-on-write copy, as any tensor.
"""

from __future__ import annotations

import collections
import math
import random
import threading
from typing import Any, NoReturn, Optional, Sequence

import torch

from ._checks import Described, check_int, fail
from ._lifetime import repr_before_init
from .errors import OutOfPagesError, OutOfSlotsError
from .pool import resolve_device

__all__ = ["BlockPool", "PagedKVCache", "paged_from_dense"]


class _Locked:
    """A ``_lock`` (an ``RLock``) that copies and pickles leave out: each copy gets its own."""

    _lock: Any

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __copy__(self) -> NoReturn:
        raise TypeError(
            f"copy.copy: expected copy.deepcopy for a {type(self).__name__}, got a shallow copy, which would "
            "share the block table and the free list with the original"
        )


class BlockPool(_Locked):
    """Free list of ``num_blocks`` fixed-size KV blocks (ids ``0 .. num_blocks - 1``).

    :meth:`can_allocate` / :meth:`allocate` form a check/act pair;
    :meth:`allocate` raises :class:`~torch_vkv.errors.OutOfPagesError` and
    changes nothing when fewer blocks are free than asked. Blocks are
    reference counted: :meth:`share` adds a holder (a fork), :meth:`free`
    drops one, and a block is free again when its last holder frees it.

    Parameters
    ----------
    num_blocks : int
        Blocks in the pool.
    shuffle : bool
        Hand blocks out in a shuffled order (a fragmented, long-running server).
    seed : int
        Seed of the shuffle.
    """

    def __init__(self, num_blocks: int, *, shuffle: bool = False, seed: int = 0) -> None:
        self.num_blocks = check_int("num_blocks", num_blocks, low=1)
        ids = list(range(self.num_blocks))
        if shuffle:
            random.Random(seed).shuffle(ids)
        self._free = ids[::-1]  # pop() from the end: lowest id (or first shuffled) first
        self._allocated = bytearray(self.num_blocks)  # 1: held (a double free would hand a block out twice)
        self._extra_refs: dict[int, int] = {}  # block -> holders past the first (shared blocks only)
        self._lock = threading.RLock()

    @property
    def num_free(self) -> int:
        """Blocks free now."""
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        """Whether :meth:`allocate` of ``n`` blocks would succeed now."""
        return 0 <= check_int("n", n) <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Takes ``n`` free blocks and returns their ids; all or nothing."""
        n = check_int("n", n, low=0)
        with self._lock:
            if n > len(self._free):
                raise OutOfPagesError(
                    f"allocate: expected at most {len(self._free)} free blocks, got a request for {n}",
                    requested_pages=n,
                    available_pages=len(self._free),
                )
            out = self._free[len(self._free) - n :][::-1]
            del self._free[len(self._free) - n :]
            for b in out:
                self._allocated[b] = 1
            return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drops one holder of each of ``blocks`` (ids from :meth:`allocate`); a block
        goes back to the pool when its last holder frees it. All or nothing: freeing a block
        more often than it has holders (a double free, or a block never allocated) is a
        ``ValueError`` that frees none of ``blocks``."""
        blocks = [check_int("block", b, low=0, high=self.num_blocks - 1) for b in blocks]
        with self._lock:
            for b, times in collections.Counter(blocks).items():
                holders = self._allocated[b] and 1 + self._extra_refs.get(b, 0)
                if times > holders:
                    fail("blocks", f"blocks held now (block {b} has {holders} holder(s): allocated, plus one per "
                         f"share)", Described(f"block {b} freed {times} time(s)"))  # fmt: skip
            for b in reversed(blocks):
                extra = self._extra_refs.get(b, 0)
                if extra > 1:
                    self._extra_refs[b] = extra - 1
                elif extra == 1:
                    del self._extra_refs[b]
                else:
                    self._allocated[b] = 0
                    self._free.append(b)

    def share(self, blocks: Sequence[int]) -> None:
        """Adds a holder to each of ``blocks`` (allocated blocks): each then needs one more :meth:`free`."""
        blocks = [check_int("block", b, low=0, high=self.num_blocks - 1) for b in blocks]
        with self._lock:
            free = next((b for b in blocks if not self._allocated[b]), None)
            if free is not None:
                fail("blocks", "allocated blocks", Described(f"block {free}, which is free"))
            for b in blocks:
                self._extra_refs[b] = self._extra_refs.get(b, 0) + 1

    @property
    def num_shared(self) -> int:
        """Blocks held by more than one holder now."""
        return len(self._extra_refs)


def _one_of(name: str, value, old_name: str, old_value, default):
    """``value``, or the same argument under its old name; not both."""
    if value is not None and old_value is not None:
        fail(f"{name}/{old_name}", f"one of them ({old_name} is the old name of {name})", (value, old_value))
    if value is None and old_value is None and default is None:
        fail(name, "an int", None, TypeError)
    return value if value is not None else old_value if old_value is not None else default


class PagedKVCache(_Locked):
    """Paged KV cache for ``num_layers`` layers and ``max_batch_size`` slots.

    It speaks :class:`~torch_vkv.KVCache`'s vocabulary, so an engine can hold
    either: ``alloc`` / ``free`` slots, ``commit`` / ``can_commit`` tokens of a
    slot (``reserve`` / ``can_reserve`` / ``release`` are aliases), ``key`` /
    ``value`` per layer, ``memory_stats``. A *page* here is a block of
    ``page_size`` tokens (vLLM's block).

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        Model shape.
    num_blocks : int
        Blocks in the pool (shared by all slots; each layer has its own copy of the pool).
    max_batch_size : int
        Rows of the block table (slots). ``max_requests`` is its old name.
    max_seq_len : int
        Longest request; sizes the block table's second dimension.
    page_size : int
        Tokens per block (16 by default, as vLLM). ``block_size`` is its old name.
    dtype : torch.dtype
        Element type of the pools.
    device : str or torch.device, optional
        Device of the pools; default: the current CUDA device, else the CPU
        (as :class:`~torch_vkv.KVCache`).
    shuffle : bool
        Hand blocks out in a shuffled order (a fragmented, long-running server).

    Attributes
    ----------
    kv : torch.Tensor
        shape ``[num_layers, 2, num_blocks, page_size, num_kv_heads, head_dim]``.
    block_table : torch.Tensor
        int32, shape ``[max_batch_size, ceil(max_seq_len / page_size)]``, on ``device``.

    Both are allocated in the constructor; when the device cannot hold them it
    raises :class:`~torch_vkv.OutOfPagesError` naming their sizes.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        max_batch_size: Optional[int] = None,
        max_seq_len: int,
        page_size: Optional[int] = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        shuffle: bool = False,
        max_requests: Optional[int] = None,
        block_size: Optional[int] = None,
    ) -> None:
        self.num_layers = check_int("num_layers", num_layers, low=1)
        self.num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
        self.head_dim = check_int("head_dim", head_dim, low=1)
        self.page_size = check_int("page_size", _one_of("page_size", page_size, "block_size", block_size, 16), low=1)
        self.max_batch_size = check_int(
            "max_batch_size", _one_of("max_batch_size", max_batch_size, "max_requests", max_requests, None), low=1
        )
        self.max_seq_len = check_int("max_seq_len", max_seq_len, low=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            fail("dtype", "a floating-point torch.dtype", dtype, TypeError)
        self.dtype = dtype
        device = resolve_device(device)
        self._lock = threading.RLock()
        self.max_blocks = math.ceil(self.max_seq_len / self.page_size)
        num_blocks = check_int("num_blocks", num_blocks, low=1)
        # Everything is allocated up front (the baseline's design): a size the device cannot hold is a
        # capacity error naming the sizes, before the block list (one Python int a block) is built.
        shape = (self.num_layers, 2, num_blocks, self.page_size, self.num_kv_heads, self.head_dim)
        try:
            # Zeros on CUDA: kernels that load whole tiles and mask only the scores (FlashInfer's FA3) must
            # not meet NaN bit patterns past a request's rows (0 * NaN). On the CPU, empty: never-touched pages
            # of a large pool stay unallocated.
            self.kv = (torch.zeros if device.type == "cuda" else torch.empty)(shape, dtype=dtype, device=device)
            self.block_table = torch.zeros((self.max_batch_size, self.max_blocks), dtype=torch.int32, device=device)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError) and (
                    "allocate" not in str(exc)):  # fmt: skip
                raise
            pool_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            table_bytes = 4 * self.max_batch_size * self.max_blocks
            raise OutOfPagesError(
                f"PagedKVCache: could not allocate its memory up front on {device}: {num_blocks} blocks "
                f"({pool_bytes / 2**30:.3g} GiB) and a block table of {self.max_batch_size} x {self.max_blocks} "
                f"entries ({table_bytes / 2**30:.3g} GiB, max_seq_len={self.max_seq_len}); pass fewer num_blocks "
                f"(the Engine: a smaller memory_budget) or a smaller max_seq_len ({str(exc).splitlines()[0][:200]})",
                num_blocks, 0,
            ) from None
        self.device = self.kv.device
        self.pool = BlockPool(num_blocks, shuffle=shuffle)
        self._blocks: list[list[int]] = [[] for _ in range(self.max_batch_size)]
        self._free_slots: list[int] = list(range(self.max_batch_size))
        self._active: set[int] = set()
        itemsize = self.kv.element_size()
        #: Bytes of one block in all layers, K and V.
        self.bytes_per_page = 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * itemsize

    @repr_before_init
    def __repr__(self) -> str:
        """Shape, pool use and, per allocated slot or slot holding blocks, their number (bookkeeping
        only: no K/V is read)."""
        shown = sorted(set(self._active) | {s for s, blocks in enumerate(self._blocks) if blocks})
        slots = ", ".join(f"{s}: {len(self._blocks[s])} blocks" for s in shown)
        return (
            f"{type(self).__name__}(num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, num_blocks={self.pool.num_blocks}, page_size={self.page_size}, "
            f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, dtype={self.dtype}, "
            f"device={str(self.device)!r}; {self.pool.num_free} blocks free; slots {{{slots}}})"
        )

    @property
    def block_size(self) -> int:
        """Old name of :attr:`page_size` (tokens per block)."""
        return self.page_size

    @property
    def max_requests(self) -> int:
        """Old name of :attr:`max_batch_size`."""
        return self.max_batch_size

    # -- slots ------------------------------------------------------------

    def alloc(self) -> int:
        """Takes a free slot (block-table row) and returns it; raises
        :class:`~torch_vkv.errors.OutOfSlotsError` when every slot is in use."""
        with self._lock:
            if not self._free_slots:
                raise OutOfSlotsError(f"all {self.max_batch_size} slots of the paged KV cache are in use")
            slot = self._free_slots.pop(0)
            self._active.add(slot)
            return slot

    def free(self, slot: int) -> None:
        """Returns the blocks of ``slot`` to the pool and, if it came from
        :meth:`alloc`, the slot to the free list."""
        slot = self._check_slot(slot)
        with self._lock:
            self.pool.free(self._blocks[slot])
            self._blocks[slot] = []
            if slot in self._active:
                self._active.discard(slot)
                self._free_slots.append(slot)

    def release(self, slot: int) -> None:
        """Alias of :meth:`free`."""
        self.free(slot)

    @property
    def num_free_slots(self) -> int:
        """Slots :meth:`alloc` can still hand out."""
        return len(self._free_slots)

    # -- capacity ---------------------------------------------------------

    def _check_slot(self, slot: int) -> int:
        return check_int("slot", slot, low=0, high=self.max_batch_size - 1)

    def capacity(self, slot: int) -> int:
        """Tokens that slot ``slot`` can hold without allocating."""
        slot = self._check_slot(slot)
        with self._lock:
            return len(self._blocks[slot]) * self.page_size

    def committed_tokens(self, slot: int) -> int:
        """Same as :meth:`capacity` (``KVCache``'s name)."""
        return min(self.max_seq_len, self.capacity(slot))

    def pages_for_tokens(self, num_tokens: int) -> int:
        """Blocks that hold tokens ``[0, num_tokens)`` of a slot."""
        return max(0, -(-check_int("num_tokens", num_tokens) // self.page_size))

    def can_commit(self, slot: int, num_tokens: int) -> bool:
        """Whether :meth:`commit` would succeed now (no change)."""
        slot = self._check_slot(slot)
        num_tokens = check_int("num_tokens", num_tokens, low=0)
        with self._lock:
            need = self.pages_for_tokens(num_tokens) - len(self._blocks[slot])
            return num_tokens <= self.max_seq_len and self.pool.can_allocate(max(0, need))

    def commit(self, slot: int, num_tokens: int) -> None:
        """Grows ``slot`` to hold ``num_tokens`` tokens (allocates blocks,
        updates the block table). All or nothing: raises
        :class:`~torch_vkv.errors.OutOfPagesError` with nothing changed."""
        self.commit_many([slot], [num_tokens])

    def commit_many(self, slots: Sequence[int], num_tokens: Sequence[int]) -> None:
        """:meth:`commit` of ``slots[i]`` to ``num_tokens[i]`` tokens for every
        ``i``, with one host-to-device copy of the changed block-table entries
        for all of them (a serving step's decodes cross into new blocks in
        several slots at once). All or nothing: raises
        :class:`~torch_vkv.errors.OutOfPagesError` with nothing changed."""
        if len(slots) != len(num_tokens):
            fail("num_tokens", f"one count per slot ({len(slots)})", Described(f"{len(num_tokens)} counts"))
        wanted = [(self._check_slot(s), check_int("num_tokens", n, low=0, high=self.max_seq_len))
                  for s, n in zip(slots, num_tokens)]  # fmt: skip
        if len({s for s, _ in wanted}) != len(wanted):
            fail("slots", "distinct slots", list(slots))
        with self._lock:
            needs = [(s, self.pages_for_tokens(n) - len(self._blocks[s])) for s, n in wanted]
            needs = [(s, k) for s, k in needs if k > 0]
            if not needs:
                return
            new = self.pool.allocate(sum(k for _, k in needs))  # raises before anything changes
            entries, i = [], 0  # (row, column, block) of every new block-table entry
            for s, k in needs:
                start = len(self._blocks[s])
                self._blocks[s].extend(new[i : i + k])
                entries += [(s, start + j, b) for j, b in enumerate(new[i : i + k])]
                i += k
            idx = torch.tensor(entries, dtype=torch.int64).T.to(self.block_table.device, non_blocking=True)
            self.block_table[idx[0], idx[1]] = idx[2].to(torch.int32)

    def fork(self, slot: int, num_tokens: int) -> int:
        """Takes a free slot whose first ``num_tokens`` tokens are those of ``slot``
        and returns it: :meth:`KVCache.fork <torch_vkv.KVCache.fork>` over blocks.

        The full blocks below ``num_tokens`` are shared (the block table of the
        new slot points at them; :meth:`BlockPool.share`), the partly filled
        last block is allocated fresh and its rows copied in every layer, K and
        V. Shared blocks are read-only by contract: appends go past the shared
        prefix. A block returns to the pool when no slot holds it. Raises
        :class:`~torch_vkv.errors.OutOfSlotsError` /
        :class:`~torch_vkv.errors.OutOfPagesError` with nothing changed, and
        ``ValueError`` when ``num_tokens`` exceeds what ``slot`` holds.
        """
        slot = self._check_slot(slot)
        num_tokens = check_int("num_tokens", num_tokens, low=0)
        with self._lock:
            src = self._blocks[slot]
            if num_tokens > len(src) * self.page_size:
                fail("num_tokens", f"an int <= {len(src) * self.page_size} (the tokens slot {slot} holds)", num_tokens)
            if not self._free_slots:
                raise OutOfSlotsError(f"all {self.max_batch_size} slots of the paged KV cache are in use")
            full, rows = divmod(num_tokens, self.page_size)
            new = self._free_slots[0]
            if self._blocks[new]:  # a slot committed without alloc(): keep its blocks to itself
                fail("fork", f"a free slot without blocks (slot {new} holds some: free() it first)", new)
            fresh = self.pool.allocate(1 if rows else 0)  # OutOfPagesError: nothing changed
            self._free_slots.pop(0)
            self._active.add(new)
            self.pool.share(src[:full])
            blocks = src[:full] + fresh
            self._blocks[new] = blocks
            if fresh:
                self.kv[:, :, fresh[0], :rows] = self.kv[:, :, src[full], :rows]
            if blocks:
                self.block_table[new, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32).to(
                    self.block_table.device, non_blocking=True
                )
            return new

    def freeable_pages(self, slots: Sequence[int]) -> int:
        """Blocks that freeing every slot of ``slots`` would return to the pool:
        those they hold that no other slot holds (a block several of them share
        counts once). :meth:`KVCache.freeable_pages <torch_vkv.KVCache.freeable_pages>` over blocks."""
        chosen = {self._check_slot(s) for s in slots}
        with self._lock:
            holds = collections.Counter(b for s in chosen for b in self._blocks[s])
            extra = self.pool._extra_refs
            return sum(1 for b, n in holds.items() if 1 + extra.get(b, 0) == n)

    def decommit(self, slot: int, keep_tokens: int = 0) -> int:
        """Drops ``slot``'s blocks past those holding tokens ``[0, keep_tokens)``
        (``KVCache.decommit``'s name): each goes back to the pool unless another
        slot still holds it (a fork). Returns the blocks dropped."""
        slot = self._check_slot(slot)
        keep = self.pages_for_tokens(check_int("keep_tokens", keep_tokens, low=0, high=self.max_seq_len))
        with self._lock:
            blocks = self._blocks[slot]
            drop = blocks[keep:]
            self.pool.free(drop)
            del blocks[keep:]
            return len(drop)

    def can_reserve(self, slot: int, num_tokens: int) -> bool:
        """Alias of :meth:`can_commit`."""
        return self.can_commit(slot, num_tokens)

    def reserve(self, slot: int, num_tokens: int) -> None:
        """Alias of :meth:`commit`."""
        self.commit(slot, num_tokens)

    def memory_stats(self) -> dict:
        """``reserved_bytes`` (the whole pool, allocated up front),
        ``committed_bytes`` (blocks held by slots, a shared block once),
        ``shared_pages`` (blocks that several slots hold after :meth:`fork`),
        ``free_pages``, ``max_pages``, ``page_size`` (tokens per block), ``active_slots``."""
        with self._lock:
            free = self.pool.num_free
            return {
                "reserved_bytes": self.pool.num_blocks * self.bytes_per_page,
                "committed_bytes": (self.pool.num_blocks - free) * self.bytes_per_page,
                "shared_pages": self.pool.num_shared,
                "free_pages": free,
                "max_pages": self.pool.num_blocks,
                "page_size": self.page_size,
                "active_slots": len(self._active),
            }

    # -- data -------------------------------------------------------------

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_pool, v_pool) of ``layer``, each ``[num_blocks, page_size, num_kv_heads, head_dim]``."""
        layer = check_int("layer", layer, low=0, high=self.num_layers - 1)
        return self.kv[layer, 0], self.kv[layer, 1]

    def key(self, layer: int) -> torch.Tensor:
        """Key block pool of ``layer``: ``[num_blocks, page_size, num_kv_heads, head_dim]``."""
        return self.layer(layer)[0]

    def value(self, layer: int) -> torch.Tensor:
        """Value block pool of ``layer``, shaped like :meth:`key`."""
        return self.layer(layer)[1]

    def append(self, layer, k_new, v_new, cache_seqlens, *, cu_seqlens_q=None, slots=None) -> None:
        """Writes new tokens' K and V at their positions through the block table.

        Parameters
        ----------
        layer : int
            Layer to write.
        k_new, v_new : torch.Tensor
            shape ``[total_q, num_kv_heads, head_dim]`` (or ``[batch, q_len,
            num_kv_heads, head_dim]`` without ``cu_seqlens_q``).
        cache_seqlens : torch.Tensor
            int32, shape ``[batch]``: each sequence's length after the append,
            the new tokens included.
        cu_seqlens_q : torch.Tensor, optional
            int32, shape ``[batch + 1]``: offsets of each sequence's new tokens in ``k_new``.
        slots : torch.Tensor, optional
            int32, shape ``[batch]``: block-table row of each sequence (default ``0 .. batch - 1``).

        Same contract as :func:`torch_vkv.attention.append_kv`; the blocks must
        be committed first (:meth:`commit`).
        """
        from .attention import append_kv

        k, v = self.layer(layer)
        append_kv(k, v, k_new, v_new, cache_seqlens, cu_seqlens_q=cu_seqlens_q, slots=slots, block_table=self.block_table)

    def attention(self, layer, q, cache_seqlens, *, cu_seqlens_q=None, slots=None, causal=True, scale=None,
                  backend="auto", **kwargs) -> torch.Tensor:  # fmt: skip
        """Paged attention over ``layer``'s blocks.

        ``q``: shape ``[total_q, num_heads, head_dim]`` (or ``[batch, q_len,
        num_heads, head_dim]``); ``cache_seqlens``: int32 ``[batch]``; returns a
        tensor shaped like ``q``. Same contract as :func:`torch_vkv.attention.attention`.
        """
        from .attention import attention

        k, v = self.layer(layer)
        return attention(q, k, v, cache_seqlens, cu_seqlens_q=cu_seqlens_q, slots=slots, causal=causal, scale=scale,
                         backend=backend, block_table=self.block_table, **kwargs)  # fmt: skip

    def load_dense(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                   slots: Optional[Sequence[int]] = None) -> None:  # fmt: skip
        """Copies rows ``[0, lengths[i])`` of ``k[i]`` / ``v[i]`` into slot ``slots[i]``, committing blocks.

        ``k``, ``v``: shape ``[B, S, num_kv_heads, head_dim]``; ``lengths``, ``slots``: ``B`` ints.
        For tests and benchmarks: the same data in a contiguous cache and in this paged one.
        """
        if not isinstance(lengths, Sequence) or (slots is not None and not isinstance(slots, Sequence)):
            fail("lengths/slots", "sequences of ints, one per row of k", (type(lengths).__name__, type(slots).__name__))
        kp, vp = self.layer(layer)
        _check_dense(k, v, kp.shape[2:])
        slots = list(range(len(lengths))) if slots is None else list(slots)
        if len(lengths) != k.shape[0] or len(slots) != k.shape[0]:
            fail("lengths/slots", f"one per row of k ({k.shape[0]})", Described(f"{len(lengths)} and {len(slots)}"))
        lengths = [check_int(f"lengths[{i}]", n, low=0, high=k.shape[1]) for i, n in enumerate(lengths)]
        for i, (n, s) in enumerate(zip(lengths, slots)):
            self.commit(s, n)
            blocks = self._blocks[s]
            nb = math.ceil(n / self.page_size)
            if nb == 0:
                continue
            pad = nb * self.page_size
            src_k = k.new_zeros((pad,) + tuple(k.shape[2:]))
            src_v = v.new_zeros((pad,) + tuple(v.shape[2:]))
            src_k[:n] = k[i, :n]
            src_v[:n] = v[i, :n]
            idx = torch.tensor(blocks[:nb], device=kp.device, dtype=torch.long)
            kp[idx] = src_k.view(nb, self.page_size, *k.shape[2:]).to(kp.dtype)
            vp[idx] = src_v.view(nb, self.page_size, *v.shape[2:]).to(vp.dtype)


def _check_dense(k: Any, v: Any, heads_dims: Sequence[int] | None = None) -> None:
    """``k``, ``v``: tensors of one shape ``[B, S, num_kv_heads, head_dim]`` (``heads_dims``, when given)."""
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4 or v.shape != k.shape:
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (k, v)]
        fail("k/v", "two tensors of one shape [B, S, num_kv_heads, head_dim]", Described(f"{got[0]} and {got[1]}"))
    if heads_dims is not None and tuple(k.shape[2:]) != tuple(heads_dims):
        fail("k/v", f"[B, S, num_kv_heads, head_dim] with heads and head_dim {tuple(heads_dims)}", tuple(k.shape))


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
    ``lengths``: ``B`` token counts, each at most ``S_max``. ``block_size``: tokens per block.
    ``extra_blocks``: free blocks beyond the ``sum(ceil(lengths[i] / block_size))`` that hold the rows
    (room to grow). ``shuffle``: hand the blocks out in a shuffled order (fragmentation). The pools are
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` of ``k``'s dtype on ``k``'s device (the paged
    twin of a contiguous test case: pass ``cache.block_table`` to ``attention``).
    """
    _check_dense(k, v)
    B, S, H, D = k.shape
    block_size = check_int("block_size", block_size, low=1)
    nb = sum(math.ceil(n / block_size) for n in lengths) + check_int("extra_blocks", extra_blocks, low=0)
    cache = PagedKVCache(
        1, H, D, num_blocks=max(1, nb), max_batch_size=B, max_seq_len=S, page_size=block_size,
        dtype=k.dtype, device=k.device, shuffle=shuffle,
    )  # fmt: skip
    cache.load_dense(0, k, v, lengths)
    return cache
