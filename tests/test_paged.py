"""torch_vkv.paged: block pool, block-table cache, and the paged twins of the kernels."""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from _layouts import KINDS, make_batch, make_cache, poison  # noqa: E402
attn_mod = importlib.import_module("torch_vkv.attention")  # the module; torch_vkv.attention is the function
from torch_vkv.errors import OutOfPagesError, OutOfSlotsError  # noqa: E402
from torch_vkv.paged import BlockPool, PagedKVCache, paged_from_dense  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = dict(atol=2e-2, rtol=2e-2)


def test_block_pool_check_act_and_no_change_on_failure():
    pool = BlockPool(5)
    assert pool.allocate(2) == [0, 1]
    assert pool.can_allocate(3) and not pool.can_allocate(4)
    with pytest.raises(OutOfPagesError) as e:
        pool.allocate(4)
    assert e.value.requested_pages == 4 and e.value.available_pages == 3
    assert pool.num_free == 3
    pool.free([1, 0])
    assert sorted(pool.allocate(5)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="expected"):
        pool.allocate(-1)
    shuffled = BlockPool(64, shuffle=True).allocate(64)
    assert sorted(shuffled) == list(range(64)) and shuffled != list(range(64))


def test_paged_cache_speaks_kvcache_vocabulary():
    """alloc/free slots, commit/can_commit tokens, key/value pools, memory_stats,
    as KVCache; the old names (max_requests, block_size, reserve, release) still work."""
    c = PagedKVCache(2, 2, 16, num_blocks=8, max_batch_size=2, max_seq_len=64, page_size=16,
                     dtype=torch.float32, device="cpu")  # fmt: skip
    assert c.block_size == c.page_size == 16 and c.max_requests == c.max_batch_size == 2
    a, b = c.alloc(), c.alloc()
    assert {a, b} == {0, 1} and c.num_free_slots == 0
    with pytest.raises(OutOfSlotsError):
        c.alloc()
    assert c.can_commit(a, 33) and not c.can_commit(a, 129)
    c.commit(a, 33)
    assert c.committed_tokens(a) == 48 and c.pages_for_tokens(33) == 3
    assert repr(c) == ("PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=8, page_size=16, "
                       "max_batch_size=2, max_seq_len=64, dtype=torch.float32, device='cpu'; 5 blocks free; "
                       f"slots {{{a}: 3 blocks, {b}: 0 blocks}})")  # fmt: skip
    stats = c.memory_stats()
    assert stats["committed_bytes"] == 3 * c.bytes_per_page == 3 * 2 * 2 * 16 * 2 * 16 * 4
    assert stats["free_pages"] == 5 and stats["active_slots"] == 2
    assert c.key(1).shape == (8, 16, 2, 16) and c.key(1).data_ptr() == c.layer(1)[0].data_ptr()
    c.free(a)
    assert c.pool.num_free == 8 and c.num_free_slots == 1 and c.alloc() == a
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(1, 1, 16, num_blocks=1, max_batch_size=1, max_seq_len=16, page_size=16, block_size=16,
                     device="cpu")  # fmt: skip
    with pytest.raises(TypeError, match="max_batch_size"):
        PagedKVCache(1, 1, 16, num_blocks=1, max_seq_len=16, device="cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_commit_many_equals_commits_one_by_one_and_is_all_or_nothing(device):
    """commit_many (the serving step's one block-table update for every growing slot) gives each
    slot the blocks and table entries that commit() slot by slot would, and on a failure changes nothing."""
    def make():
        return PagedKVCache(1, 1, 8, num_blocks=12, max_batch_size=4, max_seq_len=64, page_size=16,
                            dtype=torch.float32, device=device)  # fmt: skip

    one, many = make(), make()
    for c in (one, many):
        for _ in range(4):
            c.alloc()
    steps = [([0, 2], [17, 5]), ([1, 2, 3], [16, 20, 33]), ([0, 3], [18, 40])]  # some grow, some already fit
    for slots, counts in steps:
        for s, n in zip(slots, counts):
            one.commit(s, n)
        many.commit_many(slots, counts)
        assert many.block_table.tolist() == one.block_table.tolist()
        assert [many.committed_tokens(s) for s in range(4)] == [one.committed_tokens(s) for s in range(4)]
    assert many.pool.num_free == one.pool.num_free == 4
    before = (many.block_table.clone(), [many.committed_tokens(s) for s in range(4)])
    with pytest.raises(OutOfPagesError):
        many.commit_many([0, 1, 2], [64, 64, 64])  # 2 + 3 + 2 blocks wanted, 4 free: no slot grows
    assert torch.equal(many.block_table, before[0]) and [many.committed_tokens(s) for s in range(4)] == before[1]
    assert many.pool.num_free == 4
    with pytest.raises(ValueError, match="one count per slot"):
        many.commit_many([0, 1], [8])
    with pytest.raises(ValueError, match="distinct slots"):
        many.commit_many([1, 1], [60, 60])
    with pytest.raises(ValueError, match="expected"):
        many.commit_many([0, 9], [8, 8])
    many.commit_many([], [])  # nothing to do


def test_a_pool_too_large_to_allocate_is_out_of_pages_and_names_the_sizes():
    """The pool and block table are allocated up front; past what any allocator
    gives (here past the 128 TiB address space) that is ``OutOfPagesError``
    naming the sizes, not a bare ``MemoryError`` or the allocator's message."""
    with pytest.raises(OutOfPagesError, match=r"could not allocate its memory up front on cpu: 1000000000000 blocks") as e:
        PagedKVCache(2, 2, 16, num_blocks=10**12, max_batch_size=2, max_seq_len=64, device="cpu")
    assert e.value.requested_pages == 10**12 and e.value.available_pages == 0
    with pytest.raises(OutOfPagesError, match=r"block table of 2 x 62500000000000 entries"):  # 455 TiB of int32
        PagedKVCache(2, 2, 16, num_blocks=4, max_batch_size=2, max_seq_len=10**15, device="cpu")
    with pytest.raises(ValueError, match="num_blocks: expected an int >= 1"):
        PagedKVCache(2, 2, 16, num_blocks=0, max_batch_size=2, max_seq_len=64, device="cpu")


def test_paged_cache_reserve_release():
    c = PagedKVCache(2, 2, 16, num_blocks=8, max_requests=3, max_seq_len=64, block_size=16, dtype=torch.float32,
                     device="cpu")  # fmt: skip
    assert c.kv.shape == (2, 2, 8, 16, 2, 16)
    c.reserve(1, 17)
    assert c.capacity(1) == 32 and c.block_table[1, :2].tolist() == [0, 1]
    c.reserve(1, 20)  # fits: nothing allocated
    assert c.pool.num_free == 6
    c.reserve(0, 64)
    assert c.block_table[0].tolist() == [2, 3, 4, 5]
    assert not c.can_reserve(2, 48) and c.can_reserve(2, 32)
    with pytest.raises(OutOfPagesError):
        c.reserve(2, 48)
    assert c.pool.num_free == 2 and c.capacity(2) == 0
    with pytest.raises(ValueError, match="expected"):
        c.reserve(2, 65)
    c.release(0)
    assert c.pool.num_free == 6
    k, v = c.layer(1)
    assert k.shape == (8, 16, 2, 16) and k.data_ptr() != v.data_ptr()


def _skip(backend, device):
    if backend in ("triton",) and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if backend == "triton" and not attn_mod._triton_usable(torch.device(device)):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set only where CUDA is absent)")
    if backend == "flash_attn" and (device != "cuda" or attn_mod._flash_attn_fn() is None):
        pytest.skip("flash-attn needs CUDA and the package")


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["triton", "flex", "sdpa", "flash_attn"])
@pytest.mark.parametrize("device", DEVICES)
def test_paged_twin_matches_contiguous_reference(device, backend, kind, block_size):
    """Same data in a contiguous cache and a shuffled block pool: same attention output."""
    _skip(backend, device)
    if backend == "flash_attn":
        block_size = 256  # FA2 paged needs pages of a multiple of 256 tokens
    S = 48 if device == "cpu" else 600
    H, H_kv, D = 8, 2, 64
    b = make_batch(kind, H=H, H_kv=H_kv, D=D, dtype=torch.bfloat16, device=device, S_max=S, seed=2)
    k, v = make_cache("per_layer", len(b.lengths), S, H_kv, D, dtype=torch.bfloat16, device=device, seed=2)
    # Contiguous reference after the append.
    tkm = attn_mod._triton_kernels() if HAS_TRITON else None
    if tkm is None:
        pytest.skip("reference helpers live next to the Triton kernels")
    kr, vr = k.clone(), v.clone()
    tkm.append_kv_reference(kr, vr, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q)
    ref = tkm.attention_reference(b.q, kr, vr, b.cache_seqlens, b.cu_seqlens_q)

    # Paged: load the old tokens, poison the pool's free rows, append, attend.
    old = [L - n for L, n in zip(b.lengths, b.q_lens)]
    cache = PagedKVCache(1, H_kv, D, num_blocks=sum(-(-L // block_size) for L in b.lengths) + 3,
                         max_requests=len(b.lengths), max_seq_len=S, block_size=block_size,
                         dtype=torch.bfloat16, device=device, shuffle=True)  # fmt: skip
    cache.kv.fill_(float("nan"))
    cache.load_dense(0, k, v, old)
    kp, vp = cache.layer(0)
    for r, L in enumerate(b.lengths):
        cache.reserve(r, L)
        # rows past the old length inside the loaded blocks were zero-padded: make them NaN again
        for p in range(old[r], -(-old[r] // block_size) * block_size):
            blk = int(cache.block_table[r, p // block_size])
            kp[blk, p % block_size] = float("nan")
            vp[blk, p % block_size] = float("nan")
    cache.append(0, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q)
    out = cache.attention(0, b.q, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, backend=backend)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_from_dense_with_slots(device):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    S, H, H_kv, D = 40, 4, 4, 64
    b = make_batch("decode", H=H, H_kv=H_kv, D=D, dtype=torch.bfloat16, device=device, S_max=S, with_slots=True, seed=4)
    k, v = make_cache("interleaved", len(b.lengths), S, H_kv, D, dtype=torch.bfloat16, device=device, seed=4)
    poison(k, v, b.lengths, b.slot_list)
    lengths_by_slot = [0] * k.shape[0]
    for s, L in zip(b.slot_list, b.lengths):
        lengths_by_slot[s] = L
    cache = paged_from_dense(k, v, lengths_by_slot, block_size=16, shuffle=True)
    tkm = attn_mod._triton_kernels()
    ref = tkm.attention_reference(b.q, k, v, b.cache_seqlens, None, slots=b.slots)
    for backend in ("triton", "sdpa", "flex"):
        if backend == "triton" and not attn_mod._triton_usable(torch.device(device)):
            continue
        out = cache.attention(0, b.q, b.cache_seqlens, slots=b.slots, backend=backend)
        torch.testing.assert_close(out.double(), ref, **TOL)


def test_paged_cache_copies_are_independent_and_shallow_copy_is_refused():
    import copy
    import pickle

    c = PagedKVCache(1, 1, 4, num_blocks=6, max_batch_size=2, max_seq_len=32, page_size=8, dtype=torch.float32)
    assert c.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # the default, as KVCache's
    a = c.alloc()
    c.commit(a, 10)
    c.kv.fill_(1.0)
    with pytest.raises(TypeError, match="copy.copy: expected copy.deepcopy for a PagedKVCache"):
        copy.copy(c)
    for twin in (copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        assert twin.kv.data_ptr() != c.kv.data_ptr() and torch.equal(twin.kv, c.kv)
        assert torch.equal(twin.block_table, c.block_table) and twin.committed_tokens(a) == 16
        b = twin.alloc()
        twin.commit(b, 32)  # changes the twin only
        twin.kv.zero_()
        assert c.num_free_slots == 1 and c.pool.num_free == 4 and bool((c.kv == 1.0).all())
        assert twin.pool.num_free == 0 and twin._lock is not c._lock


def test_paged_cache_bookkeeping_from_threads():
    """Threads alloc / commit / free concurrently: no block is handed out twice
    and every block comes back. A tiny switch interval makes thread switches
    frequent; with the GIL the list operations rarely interleave, so this
    mostly guards the invariants (and free-threaded builds, where they would)."""
    import sys
    import threading

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    c = PagedKVCache(1, 1, 4, num_blocks=64, max_batch_size=8, max_seq_len=64, page_size=4, dtype=torch.float32,
                     device="cpu")  # fmt: skip
    errors = []

    def worker(seed):
        import random

        rng = random.Random(seed)
        try:
            for _ in range(300):
                try:
                    slot = c.alloc()
                except OutOfSlotsError:
                    continue
                try:
                    c.commit(slot, rng.randint(1, 64))
                    c.commit(slot, 64)
                except OutOfPagesError:
                    pass
                c.memory_stats()
                c.free(slot)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors
    assert c.num_free_slots == 8 and sorted(c.pool._free) == list(range(64))


def test_paged_decommit_keeps_blocks_another_slot_holds():
    """decommit drops one holder of the blocks past keep_tokens: shared blocks stay with the fork."""
    cache = PagedKVCache(1, 1, 4, num_blocks=8, max_batch_size=3, max_seq_len=64, page_size=4, dtype=torch.float32,
                         device="cpu")  # fmt: skip
    a = cache.alloc()
    cache.commit(a, 14)  # 4 blocks
    b = cache.fork(a, 8)  # shares blocks 0-1
    assert cache.memory_stats()["free_pages"] == 4 and cache.memory_stats()["shared_pages"] == 2
    assert cache.decommit(a, 5) == 2  # keeps blocks 0-1 (tokens 0-7 cover 5)
    assert cache.committed_tokens(a) == 8 and cache.memory_stats()["free_pages"] == 6
    assert cache.decommit(a, 0) == 2  # drops a's holds on the shared blocks: b still has them
    assert cache.memory_stats()["free_pages"] == 6 and cache.memory_stats()["shared_pages"] == 0
    assert cache.decommit(b, 8) == 0 and cache.committed_tokens(b) == 8
    cache.free(b)
    assert cache.memory_stats()["free_pages"] == 8
    with pytest.raises(ValueError, match="keep_tokens"):
        cache.decommit(a, 65)


def test_block_pool_refuses_a_double_free_and_unallocated_blocks():
    """A second free of a block (or a free of one never allocated) put it on the free list twice, and two
    requests then got the same block: now a ValueError that frees none of the list."""
    from torch_vkv import BlockPool

    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(ValueError, match=f"block {a} has 0 holder"):
        pool.free([a])
    with pytest.raises(ValueError, match=f"block {b} freed 2 time"):
        pool.free([b, b])  # one holder, two frees: all or nothing
    with pytest.raises(ValueError, match="block 3 has 0 holder"):
        BlockPool(4).free([3])
    with pytest.raises(ValueError, match="block 2, which is free"):
        pool.share([2])
    assert pool.num_free == 3
    pool.share([b])
    pool.free([b, b])  # allocated plus one share: two holders
    assert pool.num_free == 4 and sorted(pool.allocate(4)) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda k, v: (k, v, [3]), r"lengths/slots: expected one per row of k \(2\), got 1 and 1"),
        (lambda k, v: (k, v, [3, 3, 3]), r"one per row of k \(2\), got 3 and 3"),
        (lambda k, v: (k, v[:1], [3, 3]), r"two tensors of one shape .*got \(2, 8, 2, 4\) and \(1, 8, 2, 4\)"),
        (lambda k, v: (k[0], v[0], [3]), r"k/v: expected two tensors of one shape .*got \(8, 2, 4\)"),
        (lambda k, v: (k, v, [3, 9]), r"lengths\[1\]: expected an int <= 8, got 9"),
        (lambda k, v: (k, v, [3, -1]), r"lengths\[1\]: expected an int >= 0, got -1"),
    ],
    ids=["fewer lengths", "more lengths", "v of another shape", "3-D k", "longer than k", "negative"],
)
def test_paged_from_dense_refuses_mismatched_input_with_the_reason(make, message):
    """Fewer lengths than rows were taken silently, and a 3-D ``k`` or a ``v`` of another shape gave an
    unpacking or index error."""
    k, v = torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4)
    with pytest.raises(ValueError, match=message):
        paged_from_dense(*make(k, v))


def test_paged_repr_lists_slots_loaded_without_alloc():
    """``load_dense`` fills slots without ``alloc``: the repr counted only allocated slots ("slots {}")."""
    k, v = torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4)
    assert repr(paged_from_dense(k, v, [3, 8], block_size=4)).endswith("0 blocks free; slots {0: 1 blocks, 1: 2 blocks})")
