"""FlashInfer prefill on the GPU: the cases a review of the backend against FlashInfer's source found
(FA3 key tiles of 176/192 rows past ``round_up(len, 256)``; FA3 over the HF adapter's plain slices with
uncommitted tails; one ragged wrapper re-planned at every layer of a model alternating windows). Each
asserts the correct behaviour; CUDA with FlashInfer only (the FA3 ones on Hopper), skipped cleanly otherwise."""

from __future__ import annotations

import pytest
import torch

from torch_vkv.attention import attention, deps
from torch_vkv.attention.host_values import metadata_tensor

from _subprocess import run_python

pytestmark = pytest.mark.cuda


def _needs(fa3: bool = False) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not deps.has_flashinfer():
        pytest.skip("needs FlashInfer (scripts/gpu_check.sh installs the wheels when carried)")
    if fa3 and deps.cuda_capability(torch.cuda.current_device())[0] != 9:
        pytest.skip("FA3 runs on Hopper only")


def _child(code: str):
    """Runs code in a fresh process: an illegal address kills only the child."""
    r = run_python(code, timeout=900)
    return r.returncode, r.stdout[-3000:] + r.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# 1. (fixed: the tail zeroed and checked is len + 255) FA3_TILE = 256 does not cover FlashInfer's FA3 KV tile of 192 rows (head_dim 128, causal=False):
#    rows [round_up(L,256), round_up(L,192)) are loaded, never zeroed, and may lie past S_max.
def test_fa3_noncausal_hd128_does_not_read_unzeroed_rows_past_the_view():
    _needs(fa3=True)
    torch.manual_seed(0)
    H, Hkv, D, L = 8, 2, 128, 512
    k = torch.randn(2, L, Hkv, D, device="cuda", dtype=torch.bfloat16)  # S_max = 512, S_pad = 512
    v = torch.randn_like(k)
    k[1, :64] = float("nan")  # the next slot's first rows: what FA3's last 192-row tile [384, 576) reaches
    v[1, :64] = float("nan")
    q = torch.randn(L, H, D, device="cuda", dtype=torch.bfloat16)
    lens, cu, slots = metadata_tensor([L], "cuda"), metadata_tensor([0, L], "cuda"), metadata_tensor([0], "cuda")
    out = attention(q, k, v, lens, cu_seqlens_q=cu, slots=slots, causal=False, backend="flashinfer")
    ref = attention(q, k, v, lens, cu_seqlens_q=cu, slots=slots, causal=False, backend="sdpa")
    assert torch.isfinite(out).all(), "FA3 read the next slot's NaN rows (tile end 576 > zeroed end 512)"
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_fa3_noncausal_hd128_nan_in_own_slot_tail():
    _needs(fa3=True)
    torch.manual_seed(0)
    H, Hkv, D, L, S = 8, 2, 128, 512, 1024
    k = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k[0, L:] = float("nan"); v[0, L:] = float("nan")  # rows past the length "may hold anything"
    q = torch.randn(L, H, D, device="cuda", dtype=torch.bfloat16)
    lens, cu = metadata_tensor([L], "cuda"), metadata_tensor([0, L], "cuda")
    out = attention(q, k, v, lens, cu_seqlens_q=cu, causal=False, backend="flashinfer")
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# 2. (fixed: committed pages looked up for plain slices too) HF adapter, interleaved layout: VirtualKVLayer.buffers() returns plain slices (no committed_rows),
#    so fa3_tail_fits trusts S_max only; FA3 + zero_tail touch rows [round_up(L,16), round_up(L,256))
#    that are not committed -> illegal address. Same call through kv.key(0) (a VirtualKVView) is refused.
def test_fa3_on_hf_interleaved_plain_view_stays_in_committed_rows():
    _needs(fa3=True)
    rc, log = _child("""
        import torch
        from torch_vkv import KVCache
        from torch_vkv.hf.layer import interleaved_base
        from torch_vkv.attention import attention
        from torch_vkv.attention.host_values import metadata_tensor
        kv = KVCache(32, 8, 128, max_batch_size=1, max_seq_len=8192, dtype=torch.bfloat16, device="cuda",
                     layout="interleaved")          # 128 KiB rows: 16 rows per 2 MiB page
        s = kv.alloc(); L = 4100
        kv.commit(s, L)                              # committed rows: 4112; FA3 zeroes/reads up to 4352
        base = interleaved_base(kv); k, v = base[:, :, 0, 0], base[:, :, 0, 1]   # what the HF adapter passes
        q = torch.randn(L, 32, 128, device="cuda", dtype=torch.bfloat16)
        lens, cu, sl = metadata_tensor([L], "cuda"), metadata_tensor([0, L], "cuda"), metadata_tensor([s], "cuda")
        out = attention(q, k, v, lens, cu_seqlens_q=cu, slots=sl)   # auto: >= 4096 rows, host copies -> flashinfer
        torch.cuda.synchronize(); print("OK", out.float().abs().sum().item())
    """)
    assert rc == 0 and "OK" in log, log


# --------------------------------------------------------------------------------------------------
# 3. (fixed: a wrapper per kind of layer, a re-plan waits for the last copy) One ragged wrapper re-planned every layer (sliding / global layers alternate; fa2 on non-Hopper, and on
#    Hopper whenever FA3's tail does not fit). FlashInfer's plan() fills the wrapper's pinned host buffer and
#    queues cudaMemcpyAsync from it with no sync; with the GPU behind, the next plan() overwrites the buffer
#    before the previous copy ran, and the earlier layer runs with the later plan's tile indices.
def test_alternating_window_plans_without_sync_match_synced_run():
    _needs()
    torch.manual_seed(0)
    H, Hkv, D = 8, 2, 128
    lens_l, cu_l = [9000, 3000, 700], [0, 1000, 3000, 3700]   # several requests: the plans' tile lists differ
    S = 9001                                                  # not a multiple of 256: FA3 tail never fits
    k = torch.randn(3, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(cu_l[-1], H, D, device="cuda", dtype=torch.bfloat16)
    lens, cu = metadata_tensor(lens_l, "cuda"), metadata_tensor(cu_l, "cuda")
    wins = [255, None] * 6

    def step(sync):
        outs = []
        if not sync:
            torch.cuda._sleep(2_000_000_000)  # keep the GPU busy: the host runs ahead through every plan()
        for w in wins:
            outs.append(attention(q, k, v, lens, cu_seqlens_q=cu, window_left=w, backend="flashinfer"))
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return outs

    ref = step(sync=True)
    got = step(sync=False)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"layer {i} (window {wins[i]}): output differs when plans are not synced"


# --------------------------------------------------------------------------------------------------
# 5. (fixed: such requests get no row in the plan) query offsets past the rows given.
def test_offsets_past_the_queries_give_zero_rows_and_read_nothing_past_q():
    _needs()
    torch.manual_seed(0)
    H, Hkv, D = 8, 2, 128
    k = torch.randn(3, 1024, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(300, H, D, device="cuda", dtype=torch.bfloat16)
    lens, slots = metadata_tensor([400, 300, 200], "cuda"), metadata_tensor([2, 0, 1], "cuda")
    cu = metadata_tensor([0, 100, 200, 100_000], "cuda")  # request 2 reaches far past the 300 rows
    out = attention(q, k, v, lens, cu_seqlens_q=cu, slots=slots, backend="flashinfer")
    torch.cuda.synchronize()
    good = attention(q[:200], k, v, metadata_tensor([400, 300], "cuda"), cu_seqlens_q=metadata_tensor([0, 100, 200], "cuda"),
                     slots=metadata_tensor([2, 0], "cuda"), backend="sdpa")  # fmt: skip
    torch.testing.assert_close(out[:200].float(), good.float(), atol=2e-2, rtol=2e-2)
    assert out[200:].eq(0).all()


# 6. (fixed: the moved rows' order is copied once a step, without a sync) slots out of request order.
def test_unordered_slots_run_a_step_of_layers_without_a_sync():
    _needs()
    torch.manual_seed(0)
    H, Hkv, D, L = 8, 2, 128, 16
    k = torch.randn(4, 2048, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1536, H, D, device="cuda", dtype=torch.bfloat16)
    lens, cu = metadata_tensor([1024, 1024, 1024], "cuda"), metadata_tensor([0, 512, 1024, 1536], "cuda")
    # The ragged plan visits slot order, so rows move; both orders plan alike (FlashInfer's own plan is not
    # what is checked), the second is a new layout whose row order is copied once, without a sync.
    warm = metadata_tensor([3, 0, 2], "cuda")
    slots = metadata_tensor([2, 3, 0], "cuda")
    ref = attention(q, k, v, lens, cu_seqlens_q=cu, slots=slots, backend="sdpa")
    attention(q, k, v, lens, cu_seqlens_q=cu, slots=warm, backend="flashinfer")  # plans, compiles
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # the GPU busy: a host sync in a layer would wait for it
    start = torch.cuda.Event(enable_timing=False)
    start.record()
    outs = [attention(q, k, v, lens, cu_seqlens_q=cu, slots=slots, backend="flashinfer") for _ in range(L)]
    queued = not start.query()  # the host queued every layer while the sleep still ran
    torch.cuda.synchronize()
    assert queued, "a layer synchronized with the GPU (the rows' order copied from pageable memory?)"
    for out in outs:
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
