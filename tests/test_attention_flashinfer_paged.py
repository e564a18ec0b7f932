"""backend="flashinfer" over a paged block pool (``block_table``): the page tables we hand FlashInfer's
paged wrappers, checked through stand-ins that implement only their documented contract (request ``r``
reads blocks ``indices[indptr[r]:indptr[r+1]]``, length ``(pages - 1) * page_size + last_page_len[r]``,
queries ``qo_indptr[r]:qo_indptr[r+1]`` bottom-right causal) against the float64 reference over the
same rows gathered densely. Rows past each length and blocks no request owns hold NaN, so a table
that points past a request's keys shows in the output. The real kernels run in ``pytest -m cuda``.
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from test_attention_flashinfer import _attend, _FakeDecode, reference

fib = importlib.import_module("torch_vkv.attention.flashinfer_backend")
fip = importlib.import_module("torch_vkv.attention.flashinfer_paged")
deps = importlib.import_module("torch_vkv.attention.deps")

H, H_KV, D, BS = 8, 2, 64, 4


class _FakePagedPrefill:
    plans = 0

    def __init__(self, workspace, layout, backend="auto"):
        assert layout == "NHD"
        self.backend = backend

    def plan(self, qo_indptr, kv_indptr, indices, last_page_len, H, H_kv, D, page_size, **kw):
        _FakePagedPrefill.plans += 1
        self.qo, self.kv, self.idx, self.last = (t.tolist() for t in (qo_indptr, kv_indptr, indices, last_page_len))
        self.page, self.kw = page_size, kw

    def run(self, q, kv):
        k, v = kv
        assert q.shape[0] == self.qo[-1]
        out = torch.zeros_like(q)
        for r in range(len(self.qo) - 1):
            a, b, pages = self.qo[r], self.qo[r + 1], self.idx[self.kv[r] : self.kv[r + 1]]
            if b > a:
                n = (len(pages) - 1) * self.page + self.last[r]
                kr, vr = torch.cat([k[p] for p in pages])[:n], torch.cat([v[p] for p in pages])[:n]
                out[a:b] = _attend(q[a:b], kr, vr, self.kw["causal"], self.kw).to(q.dtype)
        return out


@pytest.fixture
def fake_flashinfer(monkeypatch):
    fake = types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=_FakeDecode,
                                 BatchPrefillWithPagedKVCacheWrapper=_FakePagedPrefill)  # fmt: skip
    monkeypatch.setattr(deps, "flashinfer_module", lambda: fake)
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 16)
    monkeypatch.setattr(fib, "_prefill_backend", lambda device: "fa3")
    monkeypatch.setattr(fib, "_WORKSPACE", {})
    for table in ("_DECODE", "_PREFILL"):  # fresh plan caches for the stand-ins
        monkeypatch.setattr(fip, table, {})
    return fake


def _paged(lengths, slots, num_slots=4, max_blocks=6, block_size=BS, seed=0):
    """A NaN-filled pool with each slot's blocks scattered at random; (k, v, block_table), and the
    same keys as a dense ``[num_slots, max_blocks * BS, H_KV, D]`` cache for the reference."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = num_slots * max_blocks + 3
    k = torch.full((num_blocks, block_size, H_KV, D), float("nan"))
    v = torch.full_like(k, float("nan"))
    table = torch.randperm(num_blocks, generator=g)[: num_slots * max_blocks].reshape(num_slots, max_blocks)
    dense_k = torch.full((num_slots, max_blocks * block_size, H_KV, D), float("nan"))
    dense_v = torch.full_like(dense_k, float("nan"))
    for length, slot in zip(lengths, slots):
        keys, values = torch.randn(length, H_KV, D, generator=g), torch.randn(length, H_KV, D, generator=g)
        dense_k[slot, :length], dense_v[slot, :length] = keys, values
        for j in range(-(-length // block_size)):
            rows = slice(j * block_size, min((j + 1) * block_size, length))
            k[table[slot, j], : rows.stop - rows.start] = keys[rows]
            v[table[slot, j], : rows.stop - rows.start] = values[rows]
    return k, v, table.to(torch.int32), dense_k, dense_v


def _call(q, k, v, lens, cu, slots, table, win=-1, cap=0.0):
    return fib.flashinfer_attention(q, k, v, lens, cu, slots, table, True, 0.125, 1, 0, win, cap)


@pytest.mark.parametrize("win, cap", [(-1, 0.0), (5, 0.0), (-1, 5.0)])
def test_paged_decode_against_reference(fake_flashinfer, win, cap):
    """Decode over scattered blocks, planned once per shape; each call rewrites only the buffers."""
    lengths, slots = [7, 24, 1], [2, 0, 3]
    k, v, table, dk, dv = _paged(lengths, slots, seed=3)
    q = torch.randn(3, H, D)
    lens, slot_t = torch.tensor(lengths, dtype=torch.int32), torch.tensor(slots)
    _FakeDecode.plans = 0
    for _ in range(2):
        out = _call(q, k, v, lens, None, slot_t, table, win, cap)
        ref = reference(q, dk, dv, lens, None, slot_t, scale=0.125, window_left=None if win < 0 else win,
                        softcap=cap or None)  # fmt: skip
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert _FakeDecode.plans == 1


@pytest.mark.parametrize("triton", [True, False])
def test_paged_decode_zeroes_requests_with_bad_metadata(fake_flashinfer, monkeypatch, triton):
    """A slot past the table, a length past its blocks, or a block id outside the pool in a used
    entry: that request reads nothing and gets zeros; the others their attention. The page table
    written by the Triton kernel and by its torch fallback alike."""
    if triton and not deps.triton_usable(torch.device("cpu")):
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    monkeypatch.setattr(deps, "triton_usable", lambda device: triton)
    lengths, slots = [7, 9, 5, 6], [2, 0, 3, 1]
    k, v, table, dk, dv = _paged(lengths, slots, seed=5)
    table[3, 1] = k.shape[0] + 40  # slot 3's second block, used by its 5 keys
    table[1, 5] = -7  # slot 1's last block: not used by its 6 keys (fine)
    q = torch.randn(5, H, D)
    lens = torch.tensor(lengths + [4], dtype=torch.int32)
    slot_t = torch.tensor(slots + [9])  # request 4: a slot past the table
    lens[1] = table.shape[1] * BS + 1  # request 1: longer than its blocks
    out = _call(q, k, v, lens, None, slot_t, table)
    assert out[[1, 2, 4]].eq(0).all()
    ok = [0, 3]
    ref = reference(q[ok], dk, dv, lens[ok], None, slot_t[ok], scale=0.125)
    torch.testing.assert_close(out[ok].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("win, cap", [(-1, 0.0), (6, 0.0), (-1, 5.0)])
def test_paged_prefill_against_reference(fake_flashinfer, win, cap):
    """Chunked prefill and decode rows in one batch over scattered blocks; one plan for two calls
    with the same metadata (the layers of a step)."""
    lengths, slots, q_lens = [9, 20, 3], [1, 3, 0], [9, 6, 1]
    k, v, table, dk, dv = _paged(lengths, slots, seed=7)
    cu = torch.tensor([0, 9, 15, 16], dtype=torch.int32)
    q = torch.randn(16, H, D)
    lens, slot_t = torch.tensor(lengths, dtype=torch.int32), torch.tensor(slots)
    _FakePagedPrefill.plans = 0
    for _ in range(2):
        out = _call(q, k, v, lens, cu, slot_t, table, win, cap)
        ref = reference(q, dk, dv, lens, cu, slot_t, scale=0.125, window_left=None if win < 0 else win,
                        softcap=cap or None)  # fmt: skip
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert _FakePagedPrefill.plans == 1 and q_lens == [9, 6, 1]


def test_paged_prefill_leaves_out_bad_requests(fake_flashinfer):
    """A request with a block outside the pool gets zero rows; its rows are not planned."""
    lengths, slots = [9, 8, 6], [1, 3, 0]
    k, v, table, dk, dv = _paged(lengths, slots, seed=9)
    table[3, 0] = -1
    cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    q = torch.randn(12, H, D)
    lens, slot_t = torch.tensor(lengths, dtype=torch.int32), torch.tensor(slots)
    out = _call(q, k, v, lens, cu, slot_t, table)
    assert out[4:8].eq(0).all()
    keep = [0, 2]
    ref = reference(torch.cat([q[0:4], q[8:12]]), dk, dv, lens[keep], torch.tensor([0, 4, 8], dtype=torch.int32),
                    slot_t[keep], scale=0.125)  # fmt: skip
    torch.testing.assert_close(torch.cat([out[0:4], out[8:12]]).double(), ref, atol=1e-5, rtol=1e-5)


def test_paged_layout_problem():
    pool = torch.zeros(5, BS, H_KV, D)
    table = torch.zeros(2, 3, dtype=torch.int32)
    assert fip.paged_layout_problem(pool, pool, table) is None
    assert "int32 block_table" in fip.paged_layout_problem(pool, pool, table.long())
    assert "equal strides" in fip.paged_layout_problem(pool, pool.transpose(2, 1).contiguous().transpose(2, 1), table)


@pytest.mark.cuda
@pytest.mark.parametrize("decode", [True, False])
def test_flashinfer_paged_cuda(decode):
    """FlashInfer's real paged kernels through ``attention(backend="flashinfer", block_table=...)``, bf16,
    blocks of 16, against the float64 reference. The pool's other rows are zeros, as ``PagedKVCache``
    allocates it on CUDA (FA3 loads whole tiles and masks only the scores)."""
    from test_attention_flashinfer import _skip_unless_flashinfer

    from torch_vkv.attention import attention

    _skip_unless_flashinfer()
    lengths, slots = [700, 33, 1000], [2, 0, 3]
    q_lens = [1, 1, 1] if decode else [300, 1, 17]
    k, v, table, dk, dv = _paged(lengths, slots, max_blocks=64, block_size=16, seed=11)
    k, v, dk, dv = (t.nan_to_num(0.0).to("cuda", torch.bfloat16) for t in (k, v, dk, dv))
    q = torch.randn(sum(q_lens), H, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    slot_t, table = torch.tensor(slots, device="cuda"), table.cuda()
    cu = None if decode else torch.tensor([0, 300, 301, 318], dtype=torch.int32, device="cuda")
    # Window and soft cap together: each variant is a FlashInfer module compiled on first use (~35 s for a
    # decode, ~100 s for a prefill), and either one dropped on the way shows in the comparison.
    for win, cap in ((None, None), (100, 30.0)):
        out = attention(q, k, v, lens, cu_seqlens_q=cu, slots=slot_t, block_table=table, backend="flashinfer",
                        window_left=win, softcap=cap)  # fmt: skip
        ref = reference(q, dk, dv, lens, cu, slot_t, window_left=win, softcap=cap)
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
