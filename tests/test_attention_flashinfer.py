"""backend="flashinfer": host metadata (CPU, pure functions), the dispatch logic through a
stand-in for FlashInfer's two wrappers (CPU), and the real kernels (``pytest -m cuda``).

The stand-in implements only the documented contract of FlashInfer's wrappers (a ragged
request ``i`` attends its rows ``kv_indptr[i]:kv_indptr[i+1]`` with a bottom-right causal
mask; a paged request reads pages ``indices[indptr[r]:indptr[r+1]]``, length
``(pages - 1) * page_size + last_page_len[r]``, from the buffers given at construction, as
a replayed CUDA graph would) and reads no other row, so NaN-poisoned tails reach the output
only if our metadata points at them.
"""

from __future__ import annotations

import importlib
import random
import sys
import types

import pytest
import torch

from _layouts import KINDS, LAYOUTS, make_batch, make_cache, poison

attn_mod = importlib.import_module("torch_vkv.attention")
fib = importlib.import_module("torch_vkv.attention.flashinfer_backend")
deps = importlib.import_module("torch_vkv.attention.deps")
from torch_vkv.attention import append_kv, attention, metadata_tensor  # noqa: E402


def reference(q, k, v, lens, cu, slots, **kw):
    from torch_vkv.triton_kernels import attention_reference

    return attention_reference(q, k, v, lens, cu, slots=slots, **kw)


# --------------------------------------------------------------------------- pure host metadata


def _ragged_reference(lengths, cu, slots, s_pad, num_slots, max_len, total_q):
    """Per request: (valid, its kv rows, its q rows), straight from the definitions."""
    out = []
    for r in range(len(lengths)):
        n = cu[r + 1] - cu[r]
        ok = (0 <= slots[r] < num_slots and 0 <= n <= lengths[r] <= max_len and cu[r] >= 0
              and cu[r + 1] <= total_q)  # fmt: skip
        kv = list(range(slots[r] * s_pad, slots[r] * s_pad + lengths[r])) if ok else []
        out.append((ok, kv, list(range(cu[r], cu[r + 1])) if ok else []))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_ragged_layout_matches_definition(seed):
    rng = random.Random(seed)
    num_slots, s_pad = rng.randint(1, 6), rng.choice([16, 48, 64])
    max_len = s_pad - rng.randint(0, 8)
    R = rng.randint(1, num_slots)
    slots = rng.sample(range(num_slots), R)
    if seed % 5 == 0:
        slots[0] = num_slots + 3  # out of range: the request must get no keys
    lengths = [rng.randint(0, max_len) for _ in range(R)]
    n = [rng.randint(0, L) for L in lengths]
    cu = [0]
    for x in n:
        cu.append(cu[-1] + x)
    total_q = cu[-1]
    if seed % 4 == 1:
        total_q = rng.randint(0, cu[-1])  # offsets past the query rows given: those requests are invalid
    qo, kv, q_order, valid = fib.ragged_layout(lengths, cu, slots, s_pad, num_slots, max_len, total_q)
    assert all(a <= b for a, b in zip(qo, qo[1:])) and all(a <= b for a, b in zip(kv, kv[1:]))
    expected = _ragged_reference(lengths, cu, slots, s_pad, num_slots, max_len, total_q)
    planned = sorted(i for _, _, rows in expected for i in rows)
    assert qo[0] == kv[0] == 0 and qo[-1] == len(planned) and len(qo) == len(kv)
    order = list(range(total_q)) if q_order is None else q_order
    assert sorted(order) == planned and all(0 <= i < total_q for i in order)
    # Recover each pseudo request's rows; a pseudo request with queries is exactly one real one.
    seen = {}
    for i in range(len(qo) - 1):
        rows_q = order[qo[i]:qo[i + 1]]
        if rows_q:
            r = next(r for r in range(R) if cu[r] <= rows_q[0] < cu[r + 1])
            seen[r] = (list(range(kv[i], kv[i + 1])), rows_q)
    for r, (ok, kv_rows, q_rows) in enumerate(expected):
        assert valid[r] == ok
        if q_rows:
            assert seen[r] == (kv_rows, q_rows), r


def test_ragged_layout_rejects_shared_slots_and_keeps_identity():
    with pytest.raises(ValueError, match="distinct slots.*slot 1"):
        fib.ragged_layout([4, 4], [0, 1, 2], [1, 1], 16, 4, 16)
    qo, kv, order, valid = fib.ragged_layout([5, 3], [0, 2, 3], [0, 1], 16, 2, 16)
    assert (qo, kv, order, valid) == ([0, 2, 2, 3], [0, 5, 16, 19], None, [True, True])
    # Slots in the other order: request 1's row moves first (the order is listed only then).
    assert fib.ragged_layout([5, 3], [0, 2, 3], [1, 0], 16, 2, 16)[2] == [2, 0, 1]
    assert fib.ragged_layout([5, 0, 3], [0, 2, 2, 3], [0, 5, 1], 16, 2, 16)[2] is None  # an invalid empty one
    # Offsets past the 3 query rows given: request 1 is invalid and gets no row (the others move).
    assert fib.ragged_layout([5, 4], [0, 2, 6], [0, 1], 16, 2, 16, 3)[2:] == ([0, 1], [True, False])
    assert fib.ragged_layout([5, 1], [0, 2, 3], [0, 9], 16, 2, 16, 3)[2] == [0, 1]  # row 2 is nobody's


@pytest.mark.parametrize("page_rows, max_pages", [(16, 4), (32, 1)])
def test_decode_page_table_lengths_follow_flashinfer_formula(page_rows, max_pages):
    lens = torch.tensor([7, 0, max_pages * page_rows, 17], dtype=torch.int32)
    rows = torch.tensor([2, 0, 1, 3])
    pages_per_slot = max_pages + 1  # S_pad one page longer than S_max
    indptr, indices, last = fib.decode_page_table(lens, rows, page_rows, pages_per_slot, max_pages)
    assert indptr.tolist() == [r * max_pages for r in range(5)]
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    for r, slot in enumerate(rows.tolist()):  # all of the slot's pages, in order
        pages = indices[r * max_pages:(r + 1) * max_pages].tolist()
        assert pages == [slot * pages_per_slot + j for j in range(max_pages)]
    # FlashInfer's paged_kv_t::get_length in 32-bit unsigned arithmetic:
    # pages == 0 -> 0, else (pages - 1) * page_size + last_page_len.
    got = [0 if b == a else ((b - a - 1) * page_rows + last[r].item()) % 2**32
           for r, (a, b) in enumerate(zip(indptr.tolist(), indptr.tolist()[1:]))]
    assert got == lens.tolist()


@pytest.mark.parametrize("S, S_pad, want", [(4096, 4160, 64), (48, 64, 32), (40, 64, 32), (4096, 4100, 4096),
                                            (128, 128, 64), (99727, 106496, 64), (45, 64, 32), (12, 64, 12)])
def test_decode_page_rows_divide_the_pitch(S, S_pad, want):
    """Pages divide the pitch between slots and are at most S_max rows; S_max itself need not be a
    multiple (a 99,727-row cache took one page per slot before: no split of its long requests)."""
    cache = torch.empty((3, S_pad, 2, 8), device="meta")[:, :S]
    assert fib.decode_page_rows(cache) == want
    if want != S:
        assert fib.decode_max_pages(S, want) * want <= S_pad


def test_decode_pages_stay_inside_the_storage():
    """The last slot's last page must lie whole in the tensor's storage: a view whose storage ends
    at its last row takes pages that divide S_max, or one page per slot."""
    B, S, S_pad, H, D = 3, 45, 64, 2, 8
    padded = torch.randn(B, S_pad, H, D)[:, :S]
    assert fib.decode_page_rows(padded) == 32
    flat = torch.randn((B - 1) * S_pad + S, H, D)  # storage ends at the last slot's row S - 1
    tight = flat.as_strided((B, S, H, D), (S_pad * H * D, H * D, D, 1))
    assert fib.decode_page_rows(tight) == S
    tight_even = torch.randn((B - 1) * S_pad + 48, H, D).as_strided((B, 48, H, D), (S_pad * H * D, H * D, D, 1))
    assert fib.decode_page_rows(tight_even) == 16  # 16 divides 48: every page inside the view


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("S", [48, 45])
def test_decode_pages_are_the_cache_rows(layout, S):
    k, _ = make_cache(layout, 3, S, 2, 8, dtype=torch.float32, device="cpu")
    P = fib.decode_page_rows(k)
    assert P == 32  # the pitch is 64 rows
    pages = fib.decode_pages(k, P)
    pitch = fib.flat_rows(k) // P
    for slot in range(3):
        for j in range(fib.decode_max_pages(S, P)):
            n = min(P, S - j * P)  # the last page reaches past S_max into the slot's padding rows
            assert pages[slot * pitch + j].data_ptr() == k[slot, j * P].data_ptr()
            assert torch.equal(pages[slot * pitch + j, :n], k[slot, j * P:j * P + n])
    assert fib.decode_pages(k, S) is k


def _meta_cache(layout, B, S, H_kv, D, L=3):
    """``[B, S, H_kv, D]`` K/V views of a layout on the meta device (shapes and strides only)."""
    S_pad = -(-(S + 1) // 64) * 64
    if layout == "per_layer":
        kb = torch.empty((B, S_pad, H_kv, D), device="meta", dtype=torch.bfloat16)
        return kb[:, :S], torch.empty_like(kb)[:, :S]
    buf = torch.empty((B, S_pad, L, 2, H_kv, D), device="meta", dtype=torch.bfloat16)
    return buf[:, :S, 1, 0], buf[:, :S, 1, 1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_problem(layout):
    k, v = _meta_cache(layout, 3, 40, 2, 64)
    assert fib.layout_problem(k, v, decode=True) is None
    assert fib.layout_problem(k, v, decode=False) is None
    # Interleaved, 32 layers, 128K rows: one slot's rows span more than 2**32 elements.
    bk, bv = _meta_cache(layout, 4, 131072, 8, 128, L=32)
    # Decode reads pages of 64 rows, whose strides fit; the ragged prefill addresses the slots' rows.
    assert fib.layout_problem(bk, bv, decode=True) is None
    if layout == "interleaved":
        assert "2**32" in fib.layout_problem(bk, bv, decode=False)
    # S_max not a multiple of 16 in a padded pitch: still pages of 64 rows (the last one reaching
    # into the padding), so the strides fit.
    odd_rows, _ = _meta_cache(layout, 4, 131071, 8, 128, L=32)
    assert fib.decode_page_rows(odd_rows) == 64 and fib.layout_problem(odd_rows, odd_rows, decode=True) is None
    # One page per slot (a pitch that no page size divides): the page stride is stride(0).
    buf = torch.empty((4, 131073, 32, 2, 8, 128), device="meta", dtype=torch.bfloat16)
    one = buf[:, :131071, 1, 0] if layout == "interleaved" else torch.empty((4, 131073, 8, 128), device="meta")[:, :131071]
    assert fib.decode_page_rows(one) == 131071
    if layout == "interleaved":
        assert "2**32" in fib.layout_problem(one, one, decode=True)
    assert "equal strides" in fib.layout_problem(k, k.contiguous(), decode=True)
    odd = torch.empty((3, 40, 2, 64), device="meta").as_strided((3, 40, 2, 64), (5000, 128, 64, 1))
    assert "multiple of stride(1)" in fib.layout_problem(odd, odd, decode=False)


def test_unavailable_or_cpu_is_a_clear_error():
    b = make_batch("decode", H=4, H_kv=2, D=64, dtype=torch.bfloat16, device="cpu", S_max=48)
    k, v = make_cache("per_layer", 5, 48, 2, 64, dtype=torch.bfloat16, device="cpu")
    want = "importable" if not deps.has_flashinfer() else "CUDA fp16/bf16"
    with pytest.raises(ValueError, match=f"backend 'flashinfer'.*{want}"):
        attention(b.q, k, v, b.cache_seqlens, backend="flashinfer")
    assert "flashinfer" not in attn_mod.available_backends("cpu")
    assert attn_mod.select_backend(b.q, k, v, decode=True) == "sdpa"


# --------------------------------------------------------------------------- dispatch through a stand-in


class _FakeRagged:
    made: list = []  # the FlashInfer backend ("fa2"/"fa3") of each wrapper made

    def __init__(self, workspace, layout, backend="auto"):
        assert layout == "NHD"
        _FakeRagged.made.append(backend)

    def plan(self, qo_indptr, kv_indptr, H, H_kv, D, **kw):
        self._plan(qo_indptr, kv_indptr, H, H_kv, D, **kw)

    def _plan(self, qo_indptr, kv_indptr, H, H_kv, D, **kw):
        self.qo, self.kv, self.kw = qo_indptr.tolist(), kv_indptr.tolist(), kw

    def run(self, q, k, v):
        out = torch.zeros_like(q)
        for i in range(len(self.qo) - 1):
            a, b, s, e = self.qo[i], self.qo[i + 1], self.kv[i], self.kv[i + 1]
            if b > a:
                out[a:b] = _attend(q[a:b], k[s:e], v[s:e], self.kw["causal"], self.kw).to(q.dtype)
        return out


class _FakeDecode:
    def __init__(self, workspace, layout, *, use_cuda_graph, use_tensor_cores, paged_kv_indptr_buffer,
                 paged_kv_indices_buffer, paged_kv_last_page_len_buffer, backend):  # fmt: skip
        assert layout == "NHD" and use_cuda_graph and use_tensor_cores
        self.indptr, self.indices, self.last = paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer
        _FakeDecode.plans += 1

    def plan(self, indptr, indices, last, H, H_kv, D, page_size, **kw):
        self.page, self.kw = page_size, kw

    def run(self, q, kv):
        k, v = kv
        out = torch.zeros_like(q)
        for r in range(q.shape[0]):  # reads the buffers, as a replayed graph does
            pages = self.indices[self.indptr[r]:self.indptr[r + 1]].tolist()
            n = 0 if not pages else ((len(pages) - 1) * self.page + int(self.last[r])) % 2**32  # FlashInfer's uint32
            kr = torch.cat([k[p] for p in pages])[:n] if pages else k[0, :0]
            vr = torch.cat([v[p] for p in pages])[:n] if pages else v[0, :0]
            out[r:r + 1] = _attend(q[r:r + 1], kr, vr, True, self.kw).to(q.dtype)
        return out


_FakeDecode.plans = 0


def _attend(q, k, v, causal, kw):
    """One request through the float64 reference (only the rows given)."""
    n, L = q.shape[0], k.shape[0]
    lens = torch.tensor([L], dtype=torch.int32)
    cu = torch.tensor([0, n], dtype=torch.int32)
    win = kw.get("window_left", -1)
    cap = kw.get("logits_soft_cap") or None
    return reference(q, k[None], v[None], lens, cu, None, causal=causal, scale=kw["sm_scale"],
                     window_left=None if win < 0 else win, softcap=cap)  # fmt: skip


@pytest.fixture
def fake_flashinfer(monkeypatch):
    fake = types.SimpleNamespace(BatchPrefillWithRaggedKVCacheWrapper=_FakeRagged,
                                 BatchDecodeWithPagedKVCacheWrapper=_FakeDecode)  # fmt: skip
    monkeypatch.setattr(deps, "flashinfer_module", lambda: fake)
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 16)
    monkeypatch.setattr(fib, "_prefill_backend", lambda device: "fa2")
    for table in ("_WORKSPACE", "_DECODE", "_RAGGED"):  # fresh plan caches for the stand-in
        monkeypatch.setattr(fib, table, {})
    return fake


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_slots", [False, True])
def test_dispatch_against_reference(fake_flashinfer, kind, layout, with_slots):
    """The op's metadata (trivial page table, ragged gaps, query order) against the float64 reference."""
    H, H_kv, D, S = 8, 2, 64, 48
    b = make_batch(kind, H=H, H_kv=H_kv, D=D, dtype=torch.float32, device="cpu", S_max=S, with_slots=with_slots, seed=11)
    k, v = make_cache(layout, len(b.lengths) + 1, S, H_kv, D, dtype=torch.float32, device="cpu", seed=11)
    poison(k, v, b.lengths, b.slot_list)
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    for win, cap in ((-1, 0.0), (9, 0.0), (-1, 5.0)):
        out = fib.flashinfer_attention(b.q, k, v, b.cache_seqlens, b.cu_seqlens_q, b.slots, None, True, 0.125,
                                       max(b.q_lens), 0, win, cap)  # fmt: skip
        ref = reference(b.q, k, v, b.cache_seqlens, b.cu_seqlens_q, b.slots, scale=0.125,
                        window_left=None if win < 0 else win, softcap=cap or None)  # fmt: skip
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_with_s_max_not_a_page_multiple(fake_flashinfer, layout):
    """S_max = 45 rows in a 64-row pitch: pages of 32 rows, the last reaching into the padding rows;
    every length up to S_max (the full view included) against the float64 reference, the padding
    rows poisoned with NaN (a read past a length would show)."""
    H, H_kv, D, S = 4, 2, 64, 45
    k, v = make_cache(layout, 4, S, H_kv, D, dtype=torch.float32, device="cpu", seed=5)
    lens = torch.tensor([45, 1, 33, 32], dtype=torch.int32)
    pad_k, pad_v = k.as_strided((4, 64, H_kv, D), k.stride()), v.as_strided((4, 64, H_kv, D), v.stride())
    for n, t in ((lens.tolist(), pad_k), (lens.tolist(), pad_v)):
        for r, length in enumerate(n):
            t[r, length:] = float("nan")  # past each length: the rest of the view and the padding rows
    q = torch.randn(4, H, D)
    assert fib.decode_page_rows(k) == 32
    out = fib.flashinfer_attention(q, k, v, lens, None, None, None, True, 0.125, 1, 0)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), reference(q, k, v, lens, None, None, scale=0.125), atol=1e-5, rtol=1e-5)


def test_decode_plans_per_page_size_of_caches_with_one_shape(fake_flashinfer):
    """Two caches of one shape and strides whose storages differ in size take different pages (32
    rows where the padding rows exist, one page per slot where the storage ends at the last row):
    each decode gets a plan of its own page size (the key once left it out: a shape error)."""
    B, S, S_pad, H, H_kv, D = 3, 45, 64, 4, 2, 64
    padded = [torch.randn(B, S_pad, H_kv, D)[:, :S] for _ in range(2)]
    tight = [torch.randn((B - 1) * S_pad + S, H_kv, D).as_strided((B, S, H_kv, D), padded[0].stride())
             for _ in range(2)]  # fmt: skip
    assert fib.decode_page_rows(padded[0]) == 32 and fib.decode_page_rows(tight[0]) == S
    q, lens = torch.randn(B, H, D), torch.tensor([45, 7, 33], dtype=torch.int32)
    for k, v in (padded, tight, padded):
        out = fib.flashinfer_attention(q, k, v, lens, None, None, None, True, 0.125, 1, 0)
        torch.testing.assert_close(out.double(), reference(q, k, v, lens, None, None, scale=0.125), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


def test_plans_make_flashinfers_scratch_first(fake_flashinfer, monkeypatch):
    """Prefill and decode plans make FlashInfer's process-wide scratch (its ALiBi slopes, which a
    wrapper's run() otherwise makes and keeps on its first call) before any run, for the call's
    query heads: inside a CUDA-graph warm-up, a run would put them in the graph's pool."""
    made = []
    fake_flashinfer.__name__ = "fake_flashinfer"
    monkeypatch.setitem(sys.modules, "fake_flashinfer.utils", types.SimpleNamespace(
        _get_cache_alibi_slopes_buf=lambda heads, device: made.append((heads, device))))  # fmt: skip
    for kind in ("mixed", "decode"):
        b = make_batch(kind, H=8, H_kv=2, D=64, dtype=torch.float32, device="cpu", S_max=48, seed=3)
        k, v = make_cache("per_layer", len(b.lengths), 48, 2, 64, dtype=torch.float32, device="cpu", seed=3)
        fib.flashinfer_attention(b.q, k, v, b.cache_seqlens, b.cu_seqlens_q if kind == "mixed" else None, None,
                                 None, True, 0.125, max(b.q_lens), 0, -1, 0.0)  # fmt: skip
    assert made == [(8, torch.device("cpu"))] * 2
    assert fib.with_flashinfer_scratch(torch.device("cpu"), 4, lambda: "made") == "made"
    assert made[-1] == (4, torch.device("cpu"))


@pytest.mark.parametrize("triton", [True, False])
def test_decode_plans_once_per_shape_and_masks_bad_requests(fake_flashinfer, monkeypatch, triton):
    if triton and not deps.triton_usable(torch.device("cpu")):
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    monkeypatch.setattr(deps, "triton_usable", lambda device: triton)  # the page table's kernel or its fallback
    H, H_kv, D, S = 4, 2, 64, 32
    k, v = make_cache("per_layer", 3, S, H_kv, D, dtype=torch.float32, device="cpu")
    q = torch.randn(3, H, D)
    _FakeDecode.plans = 0
    for lens in ([5, 9, 32], [6, 1, 2]):
        lens_t = torch.tensor(lens, dtype=torch.int32)
        out = fib.flashinfer_attention(q, k, v, lens_t, None, None, None, True, 0.125, 1, 0)
        torch.testing.assert_close(out.double(), reference(q, k, v, lens_t, None, None, scale=0.125), atol=1e-5, rtol=1e-5)
    assert _FakeDecode.plans == 1  # planned once, then only the page-table buffers change
    bad = torch.tensor([5, 99, 3], dtype=torch.int32)  # device-style metadata is masked, not read
    out = fib.flashinfer_attention(q, k, v, bad, None, torch.tensor([0, 1, 7]), None, True, 0.125, 1, 0)
    assert out[1:].abs().sum() == 0 and out[0].abs().sum() > 0


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_prefill_zeroes_rows_of_bad_requests_only(fake_flashinfer, monkeypatch, backend):
    """A request with a slot past the cache gets zero rows, the others their attention, whether the
    call takes the path for all-valid metadata (no masking after the kernel) or not."""
    monkeypatch.setattr(fib, "_prefill_backend", lambda device: backend)
    H, H_kv, D, S = 4, 2, 64, 600
    k, v = make_cache("per_layer", 3, S, H_kv, D, dtype=torch.float32, device="cpu", seed=9)
    q = torch.randn(12, H, D)
    lens = torch.tensor([40, 30, 25], dtype=torch.int32)
    cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    for slots, bad in ((torch.tensor([2, 0, 1]), None), (torch.tensor([2, 7, 1]), 1)):
        out = fib.flashinfer_attention(q, k, v, lens, cu, slots, None, True, 0.125, 4, 0, -1, 0.0)
        ref = reference(q, k, v, lens, cu, slots, scale=0.125)  # zero rows for the bad request
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        if bad is not None:
            assert out[4:8].eq(0).all() and out[:4].abs().sum() > 0


def test_fa3_tail_fits_needs_tail_rows_in_the_view_and_committed():
    k = torch.zeros(3, 800, 2, 64)
    # A tile of any size up to 256 rows may end 255 rows past a length: tails end at 355, 555, 800.
    assert fib.fa3_tail_fits(k, [100, 300, 545], [0, 1, 2], [True] * 3)
    assert not fib.fa3_tail_fits(k, [100, 546], [0, 1], [True] * 2)  # 801 rows > 800: the next slot's rows
    assert fib.fa3_tail_fits(k, [100, 546], [0, 1], [True, False])  # invalid requests read nothing
    from torch_vkv import KVCache

    page = 64 << 10  # 128 tokens per page for 2 heads x 64 x fp32
    for margin, fits in ((0, False), (fib.FA3_TILE, True)):
        with KVCache(1, 2, 64, max_batch_size=2, max_seq_len=1024, dtype=torch.float32, device="cpu",
                     page_size=page, margin_tokens=margin) as cache:  # fmt: skip
            slot = cache.alloc()
            cache.commit(slot, 260)  # 3 pages, 384 rows (5 with the margin); the tail ends at row 515
            assert fib.fa3_tail_fits(cache.key(0), [260], [slot], [True]) is fits
            # A plain slice over the cache (the HF adapter's layers): its pages are looked up all the same.
            plain = cache.key(0).as_subclass(torch.Tensor)[:, :1000]
            assert fib.fa3_tail_fits(plain, [260], [slot], [True]) is fits


@pytest.mark.parametrize("window, lengths, want", [(-1, [40, 300], "fa3"), (-1, [40, 600], "fa2"),
                                                   (9, [40, 300], "fa2")])  # fmt: skip
def test_prefill_takes_fa2_where_fa3_tiles_are_unsafe(fake_flashinfer, monkeypatch, window, lengths, want):
    """FA3 reads whole 256-row tiles: a request whose tile would leave its slot's view (the
    next slot's rows: here NaN) or a sliding window sends the call to FlashInfer's FA2."""
    monkeypatch.setattr(fib, "_prefill_backend", lambda device: "fa3")
    H, H_kv, D, S = 4, 2, 64, 600
    k, v = make_cache("per_layer", 3, S, H_kv, D, dtype=torch.float32, device="cpu", seed=3)
    poison(k, v, lengths, [0, 1])
    n_new = [8, 8]
    q = torch.randn(sum(n_new), H, D)
    lens = torch.tensor(lengths, dtype=torch.int32)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    _FakeRagged.made = []
    out = fib.flashinfer_attention(q, k, v, lens, cu, None, None, True, 0.125, 8, 0, window, 0.0)
    assert _FakeRagged.made == [want]
    ref = reference(q, k, v, lens, cu, None, scale=0.125, window_left=None if window < 0 else window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if want == "fa3":  # the tail FA3 may read was zeroed, nothing past it
        assert k[1, 300:555].eq(0).all() and k[1, 555:].isnan().all()


def test_layers_alternating_windows_plan_once_per_step_each(fake_flashinfer, monkeypatch):
    """A model alternating sliding and global layers (Gemma 2/3) re-planned one wrapper at every
    layer: plan() rewrites a pinned host buffer whose copy to the GPU is only queued, so a layer
    could run with the next one's plan. Each kind of layer keeps its own wrapper, planned once a step."""
    monkeypatch.setattr(fib, "_prefill_backend", lambda device: "fa2")
    plans = []
    monkeypatch.setattr(_FakeRagged, "plan", lambda self, qo, kv, *a, **kw: (plans.append(kw["window_left"]),
                                                                           _FakeRagged.__dict__["_plan"](self, qo, kv, *a, **kw)))  # fmt: skip
    H, H_kv, D, S = 4, 2, 64, 600
    k, v = make_cache("per_layer", 2, S, H_kv, D, dtype=torch.float32, device="cpu", seed=3)
    lens = torch.tensor([40, 30], dtype=torch.int32)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    q = torch.randn(16, H, D)
    _FakeRagged.made = []
    for step in range(2):
        for layer in range(6):
            window = 7 if layer % 2 == 0 else -1
            out = fib.flashinfer_attention(q, k, v, lens + step, cu, None, None, True, 0.125, 8, 0, window, 0.0)
            ref = reference(q, k, v, lens + step, cu, None, scale=0.125, window_left=None if window < 0 else window)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert len(_FakeRagged.made) == 2 and plans == [7, -1, 7, -1]


# --------------------------------------------------------------------------- the real kernels (GPU)


def _fill_rows(k, v, slots, lengths, *, seed):
    """Random K/V in each slot's first ``length`` rows (committed ones); the generator, for the queries."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    H_kv, D = k.shape[2], k.shape[3]
    for slot, n in zip(slots, lengths):
        k[slot, :n] = torch.randn((n, H_kv, D), generator=g, device="cuda").to(k.dtype)
        v[slot, :n] = torch.randn((n, H_kv, D), generator=g, device="cuda").to(v.dtype)
    return g


def _skip_unless_flashinfer():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not deps.has_flashinfer():
        pytest.skip("flashinfer is not importable (bash ../shared/tools/flashinfer-wheels.sh brings it)")


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D", [64, 128])
def test_flashinfer_window_softcap_cuda(kind, layout, D):
    _skip_unless_flashinfer()
    b = make_batch(kind, H=8, H_kv=2, D=D, dtype=torch.bfloat16, device="cuda", S_max=700, with_slots=True, seed=41)
    k, v = make_cache(layout, len(b.lengths) + 1, 700, 2, D, dtype=torch.bfloat16, device="cuda", seed=41)
    poison(k, v, b.lengths, b.slot_list)
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    for win, cap in ((None, None), (100, None), (None, 30.0)):
        out = attention(b.q, k, v, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots,
                        backend="flashinfer", window_left=win, softcap=cap)  # fmt: skip
        ref = reference(b.q, k, v, b.cache_seqlens, b.cu_seqlens_q, b.slots, window_left=win, softcap=cap)
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["decode", "mixed", "mixed-fa3-slots"])
def test_flashinfer_first_call_inside_reduce_overhead(kind, monkeypatch):
    """``torch.compile(mode="reduce-overhead")`` over attention (the append runs eagerly before each
    call) whose first flashinfer call is the CUDA-graph trees' warm-up: the workspace, wrappers and
    plans made there must stay out of the graph's pool, where the trees refuse a live tensor that is
    not an output ("tensor(s) in the cudagraph pool not tracked as outputs"). Warm-up, recording and three replays with new inputs,
    each against the float64 reference. ``mixed`` takes FA2 (a tile past a length would leave
    the slot), ``mixed-fa3-slots`` FA3 with its tail rows and permuted slots (the step's layout
    keeps a device tensor there: the order of the moved query rows)."""
    _skip_unless_flashinfer()
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    for table in ("_WORKSPACE", "_DECODE", "_RAGGED", "_LAYOUT"):  # nothing left from earlier tests
        monkeypatch.setattr(fib, table, {})
    fi_utils = sys.modules.get(f"{deps.flashinfer_module().__name__}.utils")
    if hasattr(fi_utils, "_cache_buf"):  # FlashInfer's own scratch too, as in a fresh process
        monkeypatch.setattr(fi_utils, "_cache_buf", {})
    # A failure then names where the stray tensor was allocated.
    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_trees_history_recording", True)
    fa3 = kind == "mixed-fa3-slots"
    b = make_batch(kind.split("-")[0], H=8, H_kv=2, D=128, dtype=torch.bfloat16, device="cuda", S_max=600,
                   with_slots=fa3, seed=53)  # fmt: skip
    # FA3 where every length + 255 rows fit the slot's view (fib.fa3_tail_fits)
    S_view = 600 + fib.FA3_TILE if fa3 else 600
    k, v = make_cache("per_layer", len(b.lengths) + 1, S_view, 2, 128, dtype=torch.bfloat16, device="cuda", seed=53)
    max_q = max(b.q_lens)

    def step(q, k_cache, v_cache, lens, cu, slots):  # no input mutated: the trees would run it without a graph
        return attention(q, k_cache, v_cache, lens, cu_seqlens_q=cu, slots=slots, backend="flashinfer",
                         max_seqlen_q=max_q)  # fmt: skip

    torch._dynamo.reset()
    counters.clear()
    for cache in (k, v):  # read in place by the graphs, as a KV cache is (not copied into static inputs)
        torch._dynamo.mark_static_address(cache)
    compiled = torch.compile(step, mode="reduce-overhead")
    for call in range(5):
        q, k_new, v_new = (torch.randn_like(x) for x in (b.q, b.k_new, b.v_new))
        poison(k, v, b.lengths, b.slot_list)
        append_kv(k, v, k_new, v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
        out = compiled(q, k, v, b.cache_seqlens, b.cu_seqlens_q, b.slots).clone()
        ref = reference(q, k, v, b.cache_seqlens, b.cu_seqlens_q, b.slots)
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"call {call}"
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"call {call}: {m}")
    assert counters["inductor"]["cudagraph_skips"] == 0  # the calls after the warm-up were graph replays
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("margin", [0, 256])
def test_flashinfer_prefill_on_a_kvcache_reads_only_committed_rows(layout, margin):
    """A KVCache without a margin: FA3's tile past a request's end would reach an uncommitted page
    (an illegal memory access); the call takes FA2 instead. With the margin, FA3 runs. Either way the
    output matches the reference and the process keeps its GPU (a later op still works)."""
    _skip_unless_flashinfer()
    from torch_vkv import KVCache

    # Llama-3-8B's KV shape: interleaved, a 2 MiB page holds 16 tokens of all 32 layers (so without a
    # margin, 1000 tokens commit 1008 rows and FA3's tile would read to 1024); per_layer, 1024 tokens.
    H, H_kv, D = 32, 8, 128
    lengths, n_new = [300, 1000], [300, 17]  # the second: a chunk at the end of a 1000-token prompt
    with KVCache(32, H_kv, D, max_batch_size=2, max_seq_len=4096, dtype=torch.bfloat16, device="cuda",
                 layout=layout, margin_tokens=margin) as cache:  # fmt: skip
        slots = [cache.alloc() for _ in lengths]
        for slot, n in zip(slots, lengths):
            cache.commit(slot, n)
        k, v = cache.key(0), cache.value(0)
        g = _fill_rows(k, v, slots, lengths, seed=5)
        q = torch.randn((sum(n_new), H, D), generator=g, device="cuda").to(torch.bfloat16)
        lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        cu = torch.tensor([0, n_new[0], sum(n_new)], dtype=torch.int32, device="cuda")
        slots_t = torch.tensor(slots, dtype=torch.int32, device="cuda")
        fits = fib.fa3_tail_fits(k, lengths, slots, [True, True])
        assert fits == (margin > 0)  # 1000 + 255 rows: past the 1008 / 1024 committed without a margin
        out = attention(q, k, v, lens, cu_seqlens_q=cu, slots=slots_t, backend="flashinfer")
        ref = reference(q, k, v, lens, cu, slots_t)
        torch.cuda.synchronize()
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flashinfer_decode_on_a_kvcache_of_odd_length(layout):
    """A KVCache whose max_seq_len (4001) is no multiple of 16 still gets 16-64-row decode pages (its
    long requests split over the GPU); the last page of a slot reaches past S_max into the slot's own
    padding. Each request reads only its committed rows: against the reference, the GPU still sound."""
    _skip_unless_flashinfer()
    from torch_vkv import KVCache

    H, H_kv, D, S = 32, 8, 128, 4001
    lengths = [4001, 3990, 17]
    with KVCache(2, H_kv, D, max_batch_size=3, max_seq_len=S, dtype=torch.bfloat16, device="cuda",
                 layout=layout) as cache:  # fmt: skip
        slots = [cache.alloc() for _ in lengths]
        for slot, n in zip(slots, lengths):
            cache.commit(slot, n)
        k, v = cache.key(1), cache.value(1)
        assert fib.decode_page_rows(k) > 1 and S % fib.decode_page_rows(k) != 0
        g = _fill_rows(k, v, slots, lengths, seed=9)
        q = torch.randn((len(lengths), H, D), generator=g, device="cuda").to(torch.bfloat16)
        lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        slots_t = torch.tensor(slots, dtype=torch.int32, device="cuda")
        out = attention(q, k, v, lens, slots=slots_t, backend="flashinfer")
        ref = reference(q, k, v, lens, None, slots_t)
        torch.cuda.synchronize()
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_auto_picks_flashinfer_for_large_eager_prefills_only(monkeypatch):
    """The rule, with FlashInfer and Hopper stood in for (CPU): prefills of at least
    FLASHINFER_PREFILL_MIN_TOKENS query rows, metadata with host copies, no window, not traced."""
    sel = importlib.import_module("torch_vkv.attention.selection")
    monkeypatch.setattr(deps, "has_flashinfer", lambda: True)
    monkeypatch.setattr(deps, "cuda_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(fib, "flashinfer_supported", lambda q, k, v, decode: True)
    k = torch.empty(2, 64, 2, 128)
    n = sel.FLASHINFER_PREFILL_MIN_TOKENS
    big, small = torch.empty(n, 8, 128), torch.empty(n - 1, 8, 128)
    assert sel._flashinfer_prefill_wins(big, k, k, window=False, host_metadata=True)
    assert not sel._flashinfer_prefill_wins(small, k, k, window=False, host_metadata=True)
    assert not sel._flashinfer_prefill_wins(big, k, k, window=True, host_metadata=True)
    assert not sel._flashinfer_prefill_wins(big, k, k, window=False, host_metadata=False)  # it would sync per call
    monkeypatch.setattr(deps, "cuda_capability", lambda index: (10, 0))  # measured on Hopper only
    assert not sel._flashinfer_prefill_wins(big, k, k, window=False, host_metadata=True)
    monkeypatch.setattr(deps, "cuda_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # traced: the same choice at run time
    assert not sel._flashinfer_prefill_wins(big, k, k, window=False, host_metadata=True)


@pytest.mark.parametrize("margin", [0, 256])
def test_auto_keeps_flashinfer_prefill_only_where_fa3_runs(margin):
    """``flashinfer_prefill_runs_fa3`` (CPU, host-backend KVCache): FA3 reads each request's tile tail
    (FA3_TILE - 1 rows past its length), so ``auto`` keeps ``flashinfer`` only where those rows lie in
    the slot's view and are committed; else FlashInfer would run its slower FA2 and ``auto`` takes
    ``triton``. Metadata without host copies: no (the check would read the device)."""
    from torch_vkv import KVCache

    sel = importlib.import_module("torch_vkv.attention.selection")
    tile = fib.FA3_TILE
    cache = KVCache(1, 2, 64, max_batch_size=2, max_seq_len=1024 + margin, dtype=torch.float32,
                    margin_tokens=margin, page_size=64 * 1024)  # fmt: skip
    try:
        s0, s1 = cache.alloc(), cache.alloc()
        cache.reserve(s0, 1024)
        cache.reserve(s1, 100)
        k = cache.key(0)
        fits = sel.flashinfer_prefill_runs_fa3(k, metadata_tensor([1024, 100]), metadata_tensor([s0, s1]))
        assert fits == (margin >= tile - 1)
        # The short request alone: its tail lies in the view; committed with the margin (or by its page).
        short = sel.flashinfer_prefill_runs_fa3(k, metadata_tensor([100]), metadata_tensor([s1]))
        assert short == (margin >= tile - 1 or cache.committed_tokens(s1) >= 100 + tile - 1)
        assert not sel.flashinfer_prefill_runs_fa3(k, torch.tensor([100], dtype=torch.int32))  # no host copy
    finally:
        cache.close()


@pytest.mark.cuda
def test_auto_picks_flashinfer_on_the_gpu_where_it_measured_faster():
    """On CUDA: decode never ``flashinfer``; prefill only from FLASHINFER_PREFILL_MIN_TOKENS query rows
    with host copies of the metadata, on Hopper with FlashInfer importable, without a window; the
    call's output against the reference."""
    sel = importlib.import_module("torch_vkv.attention.selection")
    b = make_batch("decode", H=8, H_kv=2, D=128, dtype=torch.bfloat16, device="cuda", S_max=256)
    k, v = make_cache("per_layer", 5, 256, 2, 128, dtype=torch.bfloat16, device="cuda")
    assert attn_mod.select_backend(b.q, k, v, decode=True) != "flashinfer"
    assert attn_mod.select_backend(b.q, k, v, decode=False) != "flashinfer"  # a few query rows
    N = sel.FLASHINFER_PREFILL_MIN_TOKENS
    k, v = make_cache("per_layer", 1, N + 256, 2, 128, dtype=torch.bfloat16, device="cuda", seed=4)
    q = torch.randn(N, 8, 128, dtype=torch.bfloat16, device="cuda")
    hopper_fi = deps.has_flashinfer() and deps.cuda_capability(q.device.index or 0)[0] == 9
    want = "flashinfer" if hopper_fi else "triton"
    assert attn_mod.select_backend(q, k, v, decode=False, host_metadata=True) == want
    assert attn_mod.select_backend(q, k, v, decode=False, host_metadata=True, window=True) != "flashinfer"
    assert attn_mod.select_backend(q, k, v, decode=False) != "flashinfer"  # it would sync per call
    lens, cu = metadata_tensor([N], "cuda"), metadata_tensor([0, N], "cuda")
    out = attention(q, k, v, lens, cu_seqlens_q=cu, max_seqlen_q=N)
    ref = reference(q.float(), k.float(), v.float(), lens, cu, None)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)  # bf16 inputs and output
    assert sel.flashinfer_prefill_runs_fa3(k, lens)
    # A cache of exactly N rows: no room for FA3's tile tail, so auto runs triton (not FlashInfer's FA2).
    k0, v0 = k[:, :N], v[:, :N]
    assert not sel.flashinfer_prefill_runs_fa3(k0, lens)
    out0 = attention(q, k0, v0, lens, cu_seqlens_q=cu, max_seqlen_q=N)
    torch.testing.assert_close(out0.float(), ref.float(), atol=2e-2, rtol=2e-2)
