"""Metadata bounds (issue 8 item 3): bad lengths, slots, ``cu_seqlens_q`` and block ids.

* host metadata (CPU tensors): ``ValueError`` naming the request, slot and lengths, nothing written;
* device metadata is never read on the host: the ops (called directly here, which is the path
  CUDA metadata takes) mask a bad request: it writes nothing, reads nothing outside the cache,
  and its output rows are zero. Compared on the whole cache against the plain references;
* ``TORCH_VKV_DEBUG=1`` checks device metadata too (GPU test) and the committed-rows hook.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from torch_vkv.attention import append_kv, attention  # noqa: E402

attn_mod = importlib.import_module("torch_vkv.attention")  # the package; torch_vkv.attention is the function
HAS_TRITON = attn_mod.deps.HAS_TRITON
H, H_KV, D = 4, 2, 16
B, S = 4, 24  # slots, rows per slot
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tk():
    return attn_mod.deps.triton_kernels()


def i32(xs, device="cpu"):
    return torch.tensor(xs, dtype=torch.int32, device=device)


def rand(*shape, seed=0, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def cache(device="cpu", seed=0):
    """(k_buf, v_buf, k, v): per_layer-like views ``[B, S]`` of buffers ``[B + 2, 32]``, slots 1..B.

    Every access the bad metadata below could make, were it not masked, lands inside the
    buffer (slot -1 and slot B are buffer rows 0 and B + 1, lengths past S the padding rows),
    so a regression shows in the whole-buffer comparison instead of crashing the test run.
    """
    kb = rand(B + 2, 32, H_KV, D, seed=seed, device=device)
    vb = rand(B + 2, 32, H_KV, D, seed=seed + 1, device=device)
    return kb, vb, kb[1 : B + 1, :S], vb[1 : B + 1, :S]


# A varlen batch mixing valid requests with every kind of bad one: (slot, new tokens, length).
VARLEN = [
    (1, 3, 10),  # valid
    (2, 4, 2),  # length below its new tokens
    (-1, 2, 5),  # negative slot
    (B, 1, 4),  # slot past the cache
    (3, 2, S + 5),  # length past the row
    (0, 2, S),  # valid, ends at the last row
    (2, 1, -3),  # negative length
]
DECODE = [(0, 1, 0), (1, 1, 5), (-1, 1, 3), (B, 1, 2), (2, 1, S + 1), (3, 1, S)]  # valid: slots 1 and 3
VALID = {"varlen": [0, 5], "decode": [1, 5]}


def batch(kind, device="cpu", seed=3):
    reqs = VARLEN if kind == "varlen" else DECODE
    slots = i32([r[0] for r in reqs], device)
    n = [r[1] for r in reqs]
    lens = i32([r[2] for r in reqs], device)
    cu = i32([0] + torch.tensor(n).cumsum(0).tolist(), device) if kind == "varlen" else None
    T = sum(n)
    return dict(slots=slots, lens=lens, cu=cu, T=T, k_new=rand(T, H_KV, D, seed=seed, device=device),
                v_new=rand(T, H_KV, D, seed=seed + 1, device=device), q=rand(T, H, D, seed=seed + 2, device=device))  # fmt: skip


def append_impls():
    out = [pytest.param("torch", id="torch-index_put")]
    if HAS_TRITON:
        out.append(pytest.param("triton", id="triton"))
    return out


def run_append_op(impl, monkeypatch, k, v, b, block_table=None):
    """The custom op itself: no value checks, the path device metadata takes."""
    if impl == "torch":
        monkeypatch.setattr(attn_mod.deps, "triton_usable", lambda device: False)
    torch.ops.torch_vkv.append_kv(k, v, b["k_new"], b["v_new"], b["lens"], b["cu"], b["slots"], block_table)


# --------------------------------------------------------------------------- host metadata


def host_cases():
    """(name, kwargs overriding a valid varlen batch, text expected in the message)."""
    return [
        ("length below new tokens", dict(lens=[5, 1]), "request 1 (slot 1) cache_seqlens: expected at least its 2 new"),
        ("negative length", dict(lens=[-1, 6]), "request 0 (slot 0) cache_seqlens"),
        ("length past the row", dict(lens=[5, S + 1]), f"at most the {S} rows"),
        ("negative slot", dict(slots=[-1, 1]), "request 0's slot: expected a slot in [0, 4), got -1"),
        ("slot past the cache", dict(slots=[0, B]), "request 1's slot"),
        ("cu not from 0", dict(cu=[1, 3, 5]), "cu_seqlens_q: expected non-decreasing offsets from 0"),
        ("cu decreasing", dict(cu=[0, 4, 3]), "cu_seqlens_q"),
        ("cu not ending at total_q", dict(cu=[0, 3, 4]), "to total_q = 5"),
    ]


@pytest.mark.parametrize("name,override,message", host_cases(), ids=[c[0] for c in host_cases()])
@pytest.mark.parametrize("op", ["append_kv", "attention"])
def test_bad_host_metadata_raises_and_writes_nothing(op, name, override, message):
    kb, vb, k, v = cache()
    before = (kb.clone(), vb.clone())
    meta = dict(lens=[5, 6], slots=[0, 1], cu=[0, 3, 5])
    meta.update(override)
    lens, slots, cu = i32(meta["lens"]), i32(meta["slots"]), i32(meta["cu"])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        if op == "append_kv":
            append_kv(k, v, rand(5, H_KV, D), rand(5, H_KV, D), lens, cu_seqlens_q=cu, slots=slots)
        else:
            attention(rand(5, H, D), k, v, lens, cu_seqlens_q=cu, slots=slots, backend="sdpa")
    assert torch.equal(kb, before[0]) and torch.equal(vb, before[1])


def test_decode_length_zero_is_named():
    """The issue's case: cache_seqlens 0 for a decode token (forgot to count it) used to write row -1."""
    _, _, k, v = cache()
    with pytest.raises(ValueError, match=r"append_kv: request 1 \(slot 1\) cache_seqlens: expected at least its 1 new token"):
        append_kv(k, v, rand(2, H_KV, D), rand(2, H_KV, D), i32([3, 0]))
    with pytest.raises(ValueError, match=r"slot"):
        append_kv(k, v, rand(1, H_KV, D), rand(1, H_KV, D), i32([3]), slots=i32([-1]))


def test_default_slots_past_the_cache():
    """Without ``slots`` request r uses slot r: more requests than slots is a bad slot."""
    _, _, k, v = cache()
    with pytest.raises(ValueError, match=r"request 4's slot: expected a slot in \[0, 4\)"):
        attention(rand(B + 1, H, D), k, v, i32([1] * (B + 1)), backend="sdpa")


def test_max_seqlen_q_below_the_longest_request():
    _, _, k, v = cache()
    with pytest.raises(ValueError, match="max_seqlen_q: expected at least the longest request's 3 queries, got 2"):
        attention(rand(5, H, D), k, v, i32([5, 6]), cu_seqlens_q=i32([0, 3, 5]), max_seqlen_q=2, backend="sdpa")


@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_max_seqlen_q_and_num_splits_are_checked_as_given(value):
    """A count that sizes launch grids is refused as the caller wrote it: not clamped to 1 (``0``, ``-1`` and
    ``True`` used to read "got 1" in the message) nor truncated (``2.5`` ran as 2)."""
    _, _, k, v = cache()
    exc = ValueError if value in (0, -1) and not isinstance(value, bool) else TypeError
    with pytest.raises(exc, match=f"max_seqlen_q: expected .*got {value}"):
        attention(rand(5, H, D), k, v, i32([5, 6]), cu_seqlens_q=i32([0, 3, 5]), max_seqlen_q=value, backend="sdpa")
    if value != 0:  # num_splits 0 means "from the shapes", as None
        with pytest.raises(exc, match=f"num_splits: expected .*got {value}"):
            attention(rand(2, H, D), k, v, i32([5, 6]), num_splits=value, backend="sdpa")


def test_bad_block_id_on_the_host():
    pool_k, pool_v = rand(6, 8, H_KV, D), rand(6, 8, H_KV, D, seed=1)
    table = i32([[0, 1, 2], [3, 99, 4]])
    with pytest.raises(ValueError, match=r"request 1 \(slot 1\) block_table entries.*got \[99\]"):
        append_kv(pool_k, pool_v, rand(2, H_KV, D), rand(2, H_KV, D), i32([3, 12]), block_table=table)
    # Entries past a request's blocks are not read, so they may hold anything.
    append_kv(pool_k, pool_v, rand(2, H_KV, D), rand(2, H_KV, D), i32([3, 8]), block_table=table)


# --------------------------------------------------------------------------- device path: masked


@pytest.mark.parametrize("kind", ["varlen", "decode"])
@pytest.mark.parametrize("impl", append_impls())
def test_append_masks_bad_requests(impl, kind, monkeypatch):
    """The whole buffer (padding rows included) equals the reference that applies valid requests only."""
    b = batch(kind)
    kb, vb, k, v = cache(seed=5)
    kb_ref, vb_ref = kb.clone(), vb.clone()
    run_append_op(impl, monkeypatch, k, v, b)
    # Expected: exactly the valid requests' tokens, written by hand.
    reqs = VARLEN if kind == "varlen" else DECODE
    cu = [0] + torch.tensor([r[1] for r in reqs]).cumsum(0).tolist()
    for r in VALID[kind]:
        slot, n, L = reqs[r]
        kb_ref[1 + slot, L - n : L] = b["k_new"][cu[r] : cu[r + 1]]
        vb_ref[1 + slot, L - n : L] = b["v_new"][cu[r] : cu[r + 1]]
    assert torch.equal(kb, kb_ref) and torch.equal(vb, vb_ref)
    # The kernels' plain reference has the same rule.
    kb2, vb2, k2, v2 = cache(seed=5)
    tk().append_kv_reference(k2, v2, b["k_new"], b["v_new"], b["lens"], cu_seqlens_q=b["cu"], slots=b["slots"])
    assert torch.equal(kb2, kb_ref) and torch.equal(vb2, vb_ref)


@pytest.mark.parametrize("impl", append_impls())
def test_append_paged_masks_bad_block_ids(impl, monkeypatch):
    """A token whose block id is outside the pool is dropped; every other token lands."""
    # Pools of 6 blocks inside buffers of 8, so that ids -1 and 6 would land in the buffer.
    buf_k, buf_v = rand(8, 8, H_KV, D), rand(8, 8, H_KV, D, seed=1)
    pool_k, pool_v = buf_k[1:7], buf_v[1:7]
    ref_k, ref_v = buf_k.clone(), buf_v.clone()
    table = i32([[0, 1, -1], [3, 6, 4], [5, 2, 2]])
    b = dict(k_new=rand(4, H_KV, D, seed=7), v_new=rand(4, H_KV, D, seed=8), lens=i32([17, 10, 25]),
             cu=i32([0, 2, 4, 4]), slots=None)  # fmt: skip
    run_append_op(impl, monkeypatch, pool_k, pool_v, b, block_table=table)
    # request 0: positions 15, 16 -> block table[0][1] = 1, row 7, and table[0][2] = -1 (dropped)
    ref_k[1 + 1, 7], ref_v[1 + 1, 7] = b["k_new"][0], b["v_new"][0]
    # request 1: positions 8, 9 -> table[1][1] = 6, past the pool: both dropped; request 2 has
    # no tokens, and its length 25 is past max_blocks * page_size = 24 anyway.
    assert torch.equal(buf_k, ref_k) and torch.equal(buf_v, ref_v)


@pytest.mark.parametrize("sync_free", [False, True])
def test_masked_index_put(sync_free):
    """Both forms write exactly the ok tokens; with none ok, the cache stays bitwise the same (NaN too)."""
    from torch_vkv.attention.append import masked_index_put

    kb = rand(3, 5, H_KV, D)
    kb[1, 2] = float("nan")
    row, pos = torch.tensor([0, 1, 2, 1]), torch.tensor([4, 2, 0, 3])
    vals = rand(4, H_KV, D, seed=9)
    ok = torch.tensor([False, True, False, True])
    want = kb.clone()
    want[1, 2], want[1, 3] = vals[1], vals[3]
    masked_index_put(kb, row, pos, vals, ok, sync_free=sync_free)
    assert torch.equal(kb, want)
    masked_index_put(kb, row, pos, vals, torch.zeros(4, dtype=torch.bool), sync_free=sync_free)
    assert torch.equal(kb.view(torch.int32), want.view(torch.int32))


def attention_impls():
    out = [pytest.param("sdpa", id="sdpa"), pytest.param("flex", id="flex")]
    if HAS_TRITON:
        out.append(pytest.param("triton", id="triton"))
    return out


def run_attention_op(impl, q, k, v, lens, cu, slots, block_table=None, max_q=None):
    scale = D**-0.5
    max_q = max_q or (1 if cu is None else q.shape[0])
    args = (q, k, v, lens, cu, slots, block_table, True, scale, max_q)
    if impl == "sdpa":
        return torch.ops.torch_vkv.sdpa_attention(*args, 0)
    if impl == "triton":
        return torch.ops.torch_vkv.triton_attention(*args, 0)
    return attn_mod.flex.flex_attend(*args)


@pytest.mark.parametrize("kind", ["varlen", "decode"])
@pytest.mark.parametrize("impl", attention_impls())
def test_attention_masks_bad_requests(impl, kind):
    """Valid requests match the float64 reference; bad ones get zero rows; no NaN; cache untouched.

    Rows past each valid length hold NaN (and the padding holds NaN), so a read past a length
    or into another slot's padding would show as NaN.
    """
    b = batch(kind)
    kb, vb, k, v = cache(seed=11)
    kb[:, S:] = float("nan")  # padding rows, and the two buffer rows outside the view
    vb[:, S:] = float("nan")
    kb[0], kb[B + 1], vb[0], vb[B + 1] = (float("nan"),) * 4
    reqs = VARLEN if kind == "varlen" else DECODE
    for r in VALID[kind]:
        slot, _, L = reqs[r]
        k[slot, L:] = float("nan")
        v[slot, L:] = float("nan")
    before = (kb.clone(), vb.clone())
    out = run_attention_op(impl, b["q"], k, v, b["lens"], b["cu"], b["slots"])
    ref = tk().attention_reference(b["q"], k, v, b["lens"], b["cu"], slots=b["slots"])
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)  # fp32 inputs, float64 reference
    cu = [0] + torch.tensor([r[1] for r in reqs]).cumsum(0).tolist()
    for r in range(len(reqs)):
        if r not in VALID[kind]:
            assert torch.equal(out[cu[r] : cu[r + 1]], torch.zeros_like(out[cu[r] : cu[r + 1]])), r
    if impl != "flex":  # CPU flex reads the cache only; CUDA flex zeroes tails (the op mutates)
        assert torch.equal(kb.nan_to_num(7.0), before[0].nan_to_num(7.0))


@pytest.mark.parametrize("impl", attention_impls())
def test_attention_inconsistent_cu_seqlens_stays_in_bounds(impl):
    """cu_seqlens_q decreasing and not ending at total_q: no error, finite output.

    Offsets far outside ``q`` are in the subprocess test below (an unmasked read would fault)."""
    _, _, k, v = cache(seed=13)
    q = rand(6, H, D, seed=14)
    out = run_attention_op(impl, q, k, v, i32([8, 6, 9]), i32([0, 4, 2, 5]), None, max_q=6)
    assert out.shape == q.shape
    assert torch.isfinite(out[:4]).all()  # request 0 is consistent: rows 0..3 are its queries


# --------------------------------------------------------------------------- KVCache: would segfault


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the kernels run under TRITON_INTERPRET=1 on the CPU)")
def test_bad_device_metadata_on_a_kvcache_never_faults():
    """On a real KVCache (host backend: uncommitted rows are PROT_NONE, past the reservation is
    unmapped) the ops with far out-of-range slots and lengths neither fault nor write. Run in a
    subprocess: an unmasked access is a SIGSEGV there."""
    code = textwrap.dedent(
        f"""
        import os, torch
        import torch_vkv
        from torch_vkv import KVCache
        import importlib
        attn = importlib.import_module("torch_vkv.attention")
        H, H_kv, D = {H}, {H_KV}, {D}
        with KVCache(1, H_kv, D, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu",
                     page_size=64 << 10) as c:
            s = c.alloc(); c.reserve(s, 8)
            k, v = c.key(0), c.value(0)
            k[s, :8] = 1.0; v[s, :8] = 2.0
            far = 10 ** 7
            for use_triton in (True, False):
                attn.deps.triton_usable = (lambda d: True) if use_triton else (lambda d: False)
                lens = torch.tensor([far, 4, 3, 5], dtype=torch.int32)
                slots = torch.tensor([s, far, -far, s], dtype=torch.int32)
                cu = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
                new = torch.full((4, H_kv, D), 9.0)
                torch.ops.torch_vkv.append_kv(k, v, new, new, lens, cu, slots, None)
                torch.ops.torch_vkv.append_kv(k, v, new, new, lens, None, slots, None)
                q = torch.randn(4, H, D)
                for op in (torch.ops.torch_vkv.triton_attention, torch.ops.torch_vkv.sdpa_attention):
                    if op is torch.ops.torch_vkv.triton_attention and not use_triton:
                        continue
                    out = op(q, k, v, lens, cu, slots, None, True, 0.25, 4, 0)
                    assert torch.isfinite(out).all()
                    out = op(q, k, v, lens, None, slots, None, True, 0.25, 1, 0)
                    bad_cu = torch.tensor([0, far, 1, -far, 4], dtype=torch.int32)
                    op(q, k, v, lens, bad_cu, slots, None, True, 0.25, 4, 0)
            # Only request 3 (slot s, length 5, one token) was valid: row 4 holds 9, the rest is intact.
            assert bool((k[s, 4] == 9.0).all()) and bool((k[s, :4] == 1.0).all()) and bool((k[s, 5:8] == 1.0).all())
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stderr[-3000:]}"
    assert out.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------- debug mode


def test_append_past_the_committed_rows_of_a_kvcache_raises():
    """append_kv into KVCache views checks (host metadata) that the new rows
    are committed in both caches: an uncommitted write is a segfault on the
    host backend, run here in a child so a missed check fails the test."""
    from _subprocess import check_scenario

    check_scenario("""
import torch
from torch_vkv import KVCache, append_kv
c = KVCache(1, 2, 16, max_batch_size=4, max_seq_len=256, dtype=torch.float32, device="cpu", page_size=4096)
s = c.alloc()
c.commit(s, 20)  # one page: 32 rows (128 bytes a token)
k, v = c.key(0), c.value(0)
rows = k.committed_rows()[s]
new = torch.randn(5, 2, 16)
cu, slots = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([s], dtype=torch.int32)
for length in (rows + 3, rows + 5, 250):
    try:
        append_kv(k, v, new, new, torch.tensor([length], dtype=torch.int32), cu_seqlens_q=cu, slots=slots)
    except ValueError as e:
        assert "slot 0" in str(e) and "committed" in str(e) and f"[{length - 5}, {length})" in str(e), e
    else:
        raise AssertionError(f"no error for length {length}")
append_kv(k, v, new, 2 * new, torch.tensor([rows], dtype=torch.int32), cu_seqlens_q=cu, slots=slots)
assert torch.equal(k[s, rows - 5:rows], new) and torch.equal(v[s, rows - 5:rows], 2 * new)
# Plain tensors over the cache's memory are checked the same way: a slice of the views, and the
# plain tensor the VirtualKVView docstring suggests storing.
for kk, vv in ((k[:, :200], v[:, :200]), (k.as_subclass(torch.Tensor), v.as_subclass(torch.Tensor))):
    assert type(kk) is torch.Tensor
    try:
        append_kv(kk, vv, new, new, torch.tensor([rows + 5], dtype=torch.int32), cu_seqlens_q=cu, slots=slots)
    except ValueError as e:
        assert "committed" in str(e) and f"[{rows}, {rows + 5})" in str(e), e
    else:
        raise AssertionError("no error for a plain tensor over the cache")
    append_kv(kk, vv, 3 * new, new, torch.tensor([rows], dtype=torch.int32), cu_seqlens_q=cu, slots=slots)
    assert torch.equal(k[s, rows - 5:rows], 3 * new)
c.close()
try:  # released memory: an error, not a fault
    append_kv(kk, vv, new, new, torch.tensor([rows], dtype=torch.int32), cu_seqlens_q=cu, slots=slots)
except RuntimeError as e:
    assert "closed" in str(e), e
else:
    raise AssertionError("no error after close()")
""", env={"TORCH_VKV_DEBUG": ""})


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "sdpa", "flex", "torch_fa2"])
def test_cuda_bad_device_metadata_masked_then_debug_raises(backend, monkeypatch):
    """On the GPU: bad device-side lengths/slots write nothing and fault nothing (the context stays
    healthy); with TORCH_VKV_DEBUG=1 the same call raises naming the request and slot."""
    if backend not in attn_mod.available_backends("cuda"):
        pytest.skip(f"{backend} is not available here")
    monkeypatch.delenv("TORCH_VKV_DEBUG", raising=False)
    dev = "cuda"
    dtype = torch.bfloat16
    kb = torch.randn(B, 2048, H_KV, 64, device=dev, dtype=dtype)
    vb = torch.randn_like(kb)
    k, v = kb[:, :2000], vb[:, :2000]
    before = (kb.clone(), vb.clone())
    lens = i32([0, -5, 10**6, 7], dev)  # the last request has a bad slot
    slots = i32([0, 1, 2, 10**6], dev)
    new = torch.randn(4, H_KV, 64, device=dev, dtype=dtype)
    append_kv(k, v, new, new, lens, slots=slots)
    out = attention(torch.randn(4, H, 64, device=dev, dtype=dtype), k, v, lens, slots=slots, backend=backend)
    torch.cuda.synchronize()
    assert torch.equal(kb, before[0]) and torch.equal(vb, before[1])
    assert torch.equal(out, torch.zeros_like(out))
    assert (torch.ones(4, device=dev) * 2).sum().item() == 8.0  # the context is still usable
    monkeypatch.setenv("TORCH_VKV_DEBUG", "1")
    with pytest.raises(ValueError, match=r"request 0 \(slot 0\) cache_seqlens \(TORCH_VKV_DEBUG=1"):
        append_kv(k, v, new, new, lens, slots=slots)
    with pytest.raises(ValueError, match="TORCH_VKV_DEBUG=1"):
        attention(torch.randn(4, H, 64, device=dev, dtype=dtype), k, v, lens, slots=slots, backend=backend)


@pytest.mark.parametrize(
    "layout, margin, refused",
    [("per_layer", 0, False),  # 128 rows a page: pages end on flex's 128-row block boundaries
     ("interleaved", 0, True),  # 32 rows a page: a length's last block can reach an uncommitted page
     ("interleaved", 95, True),
     ("interleaved", 96, False)],  # the margin covers the rest of a block
)  # fmt: skip
def test_flex_refuses_kvcache_views_whose_blocks_reach_uncommitted_pages(layout, margin, refused):
    """On CUDA flex zeroes and reads whole 128-row KV blocks; past a length they must be committed
    (an illegal memory access otherwise). The check reads only the cache's shapes, so it runs here."""
    from torch_vkv import KVCache
    from torch_vkv.attention.flex import uncommitted_block_reads

    with KVCache(2, 2, 64, max_batch_size=2, max_seq_len=256, dtype=torch.float32, device="cpu", layout=layout,
                 page_size=64 << 10, margin_tokens=margin) as cache:  # fmt: skip
        problem = uncommitted_block_reads(cache.key(1))
        assert (problem is not None) == refused
        if refused:
            assert "margin_tokens >= 96" in problem and f"got margin_tokens={margin}" in problem
    assert uncommitted_block_reads(torch.zeros(2, 256, 2, 64)) is None  # not a KVCache view: not checked


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(scale=float("nan")), ValueError, "scale: expected None or a finite real number > 0"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale=0), ValueError, "scale"),
        (dict(scale="x"), TypeError, "scale: expected None or a real number > 0, got 'x'"),
        (dict(scale=True), TypeError, "scale"),
        (dict(causal="no"), TypeError, "causal: expected a bool, got 'no'"),
        (dict(causal=1), TypeError, "causal"),
    ],
)
def test_bad_scale_and_causal_are_refused(kwargs, exc, match):
    """Scalar arguments are checked like the tensors: a NaN scale would
    silently give NaN rows, a string a bare float() error."""
    _, _, k, v = cache()
    with pytest.raises(exc, match=match):
        attention(rand(2, H, D), k, v, i32([3, 6]), backend="sdpa", **kwargs)


def test_good_scale_and_causal_forms_are_taken():
    import numpy as np

    _, _, k, v = cache()
    q = rand(2, H, D)
    ref = attention(q, k, v, i32([3, 6]), backend="sdpa", scale=0.25)
    for scale in (0.25, torch.tensor(0.25).item(), np.float32(0.25)):
        torch.testing.assert_close(attention(q, k, v, i32([3, 6]), backend="sdpa", scale=scale), ref)
    attention(q, k, v, i32([3, 6]), backend="sdpa", causal=np.bool_(True))


def test_a_transposed_k_cache_is_named_as_such():
    """The error names the argument that is wrong: a transposed k_cache is
    reported as k_cache's head_dim (it used to be "v_cache.shape")."""
    _, _, k, v = cache()
    with pytest.raises(ValueError, match="k_cache head_dim: expected q's head_dim"):
        attention(rand(2, H, D), k.transpose(-1, -2), v, i32([3, 6]), backend="sdpa")
    with pytest.raises(ValueError, match="v_cache.shape"):
        attention(rand(2, H, D), k, v.transpose(-1, -2), i32([3, 6]), backend="sdpa")


def test_append_into_a_closed_or_forked_caches_views():
    """A closed cache's views: RuntimeError naming the closed cache (not advice to
    commit). A forked child's views: appends within the pages mapped at fork() work (its private
    copy); past them, ValueError (before: unchecked, a fault)."""
    from _subprocess import check_scenario

    check_scenario("""
import os, torch
from torch_vkv import KVCache, append_kv
c = KVCache(1, 2, 16, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu", page_size=4096)
s = c.alloc()
c.commit(s, 20)
k, v = c.key(0), c.value(0)
new = torch.randn(1, 2, 16)
lens, slots = torch.tensor([5], dtype=torch.int32), torch.tensor([s], dtype=torch.int32)
pid = os.fork()
if pid == 0:
    try:
        append_kv(k, v, new, new, lens, slots=slots)
        if not torch.equal(k[s, 4], new[0]):
            os._exit(3)
        try:  # 20 rows committed: one 4 KiB page of 32 rows; row 40 lies past it
            append_kv(k, v, new, new, torch.tensor([41], dtype=torch.int32), slots=slots)
        except ValueError:
            os._exit(0)
        os._exit(5)
    except BaseException:
        os._exit(4)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
c.close()
try:
    append_kv(k, v, new, new, lens, slots=slots)
except RuntimeError as e:
    assert "closed" in str(e), e
else:
    raise AssertionError("no error after close()")
""", env={"TORCH_VKV_DEBUG": ""})
