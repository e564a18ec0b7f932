"""Sliding-window (``window_left``) and soft-capped (``softcap``) attention in every backend.

Each backend is compared with the float64 reference
(``triton_kernels.attention_reference``) on random inputs: windows smaller
than, equal to and larger than the context, decode, prefill and a chunked
prefill whose chunk straddles the window's edge, contiguous and paged caches.
Rows behind every query's window are poisoned with NaN: a backend that read
them (or multiplied them by a zero weight) would return NaN, so a decommitted
page behind the window is never touched. On the CPU the Triton kernels run
under ``TRITON_INTERPRET=1``; ``pytest -m cuda`` runs every backend in bf16.
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

attn_mod = importlib.import_module("torch_vkv.attention")
from torch_vkv.attention import attention, available_backends, select_backend  # noqa: E402
from torch_vkv.attention.selection import supports  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
H, H_KV, D = 4, 2, 16
# fp32 inputs on the CPU against float64: fp32 accumulation, tanh of fp32 scores.
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def reference(*args, **kwargs):
    return attn_mod._triton_kernels().attention_reference(*args, **kwargs)


def cpu_backends():
    out = ["sdpa", "flex"]
    if HAS_TRITON:
        out.append("triton")
    return out


def make_case(lens, n_new, *, S, device, dtype, paged=False, seed=0, head_dim=D):
    """Random cache (``[B, S, H_kv, head_dim]`` or a shuffled block pool), queries and metadata."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    k = torch.randn(B, S, H_KV, head_dim, generator=g)
    v = torch.randn(B, S, H_KV, head_dim, generator=g)
    q = torch.randn(sum(n_new), H, head_dim, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(n_new).cumsum(0).tolist()), dtype=torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), lens_t.to(device), cu.to(device)


def to_paged(k, v, page):
    """The same rows as a shuffled block pool and its block table."""
    B, S = k.shape[:2]
    nb = S // page
    perm = torch.randperm(B * nb, generator=torch.Generator().manual_seed(1))
    pool_k = torch.empty((B * nb, page) + tuple(k.shape[2:]), dtype=k.dtype, device=k.device)
    pool_v = torch.empty_like(pool_k)
    pool_k[perm] = k.reshape(B * nb, page, *k.shape[2:])
    pool_v[perm] = v.reshape(B * nb, page, *v.shape[2:])
    return pool_k, pool_v, perm.reshape(B, nb).to(torch.int32).to(k.device)


def poison_behind(k, v, lens, n_new, window):
    """NaN in every row behind the window of each request's first query (never needed)."""
    k, v = k.clone(), v.clone()
    for r, (L, n) in enumerate(zip(lens, n_new)):
        stop = max(0, L - n - window)
        k[r, :stop] = float("nan")
        v[r, :stop] = float("nan")
    return k, v


def run(backend, q, k, v, lens, cu, *, decode, window, softcap, block_table=None):
    kw = dict(backend=backend, window_left=window, softcap=softcap, block_table=block_table)
    if decode:
        return attention(q, k, v, lens, **kw)
    return attention(q, k, v, lens, cu_seqlens_q=cu, **kw)


# lens / new tokens per request: prefill (n == L), a chunk straddling the window edge, decode-like rows.
PREFILL = ([40, 37, 9], [40, 12, 1])
DECODE = ([45, 20, 1], [1, 1, 1])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["prefill", "decode"])
@pytest.mark.parametrize("window", [0, 7, 19, 39, 44, 100])  # smaller than, equal to, larger than the contexts
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_window_softcap_vs_reference_cpu(backend, kind, window, softcap, paged):
    lens, n_new = PREFILL if kind == "prefill" else DECODE
    q, k, v, lens_t, cu = make_case(lens, n_new, S=48, device="cpu", dtype=torch.float32)
    want = reference(q, k, v, lens_t, cu, window_left=window, softcap=softcap)
    kp, vp = poison_behind(k, v, lens, n_new, window)
    bt = None
    if paged:
        kp, vp, bt = to_paged(kp, vp, 16)
    got = run(backend, q, kp, vp, lens_t, cu, decode=kind == "decode", window=window, softcap=softcap, block_table=bt)
    assert torch.isfinite(got).all(), "a row behind the window was read"
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", cpu_backends())
def test_window_changes_the_result_and_none_is_full_attention(backend):
    """A window shorter than the context differs from full attention; one longer than it equals it."""
    lens, n_new = PREFILL
    q, k, v, lens_t, cu = make_case(lens, n_new, S=48, device="cpu", dtype=torch.float32, seed=3)
    full = run(backend, q, k, v, lens_t, cu, decode=False, window=None, softcap=None)
    wide = run(backend, q, k, v, lens_t, cu, decode=False, window=47, softcap=None)
    narrow = run(backend, q, k, v, lens_t, cu, decode=False, window=4, softcap=None)
    torch.testing.assert_close(wide, full, **TOL[torch.float32])
    assert (narrow - full).abs().max() > 1e-2
    capped = run(backend, q, k, v, lens_t, cu, decode=False, window=None, softcap=0.5)
    assert (capped - full).abs().max() > 1e-2


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("window", [3, 16, 33])
def test_triton_chunked_prefill_across_the_window_edge_equals_one_prefill(window):
    """Prefill in chunks of 5 over a growing length, each chunk against the reference of that step."""
    L_total = 37
    q, k, v, _, _ = make_case([L_total], [L_total], S=48, device="cpu", dtype=torch.float32, seed=5)
    for start in range(0, L_total, 5):
        n = min(5, L_total - start)
        lens = torch.tensor([start + n], dtype=torch.int32)
        cu = torch.tensor([0, n], dtype=torch.int32)
        kp, vp = poison_behind(k, v, [start + n], [n], window)
        got = attention(q[start : start + n], kp, vp, lens, cu_seqlens_q=cu, backend="triton", window_left=window)
        want = reference(q[start : start + n], k, v, lens, cu, window_left=window)
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_decode_splits_only_the_window():
    """Any split count gives the same result: splits share the window, not the whole context."""
    lens, n_new = [45, 30], [1, 1]
    q, k, v, lens_t, _ = make_case(lens, n_new, S=48, device="cpu", dtype=torch.float32, seed=7)
    want = reference(q, k, v, lens_t, window_left=9, softcap=2.0)
    kp, vp = poison_behind(k, v, lens, n_new, 9)
    for splits in (1, 2, 5):
        got = attention(q, kp, vp, lens_t, backend="triton", window_left=9, softcap=2.0, num_splits=splits)
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(window_left=-1), ValueError, "window_left: expected an int >= 0, got -1"),
        (dict(window_left=2.5), TypeError, "window_left: expected an int"),
        (dict(window_left=True), TypeError, "window_left: expected an int"),
        # The ops take an int64: a larger int raised torch's "Expected a value of type 'int' ... found type 'int'".
        (dict(window_left=2**63), ValueError, r"window_left: expected an int <= 9223372036854775807, got 9223372036854775808"),
        (dict(window_left=2**63, backend="flex"), ValueError, "window_left: expected an int <="),
        (dict(softcap=0.0), ValueError, "softcap: expected None or a finite real number > 0"),
        (dict(softcap=-1), ValueError, "softcap: expected"),
        (dict(softcap=float("nan")), ValueError, "softcap: expected"),
        (dict(softcap="3"), TypeError, "softcap: expected None or a real number > 0"),
        (dict(softcap=True), TypeError, "softcap: expected"),
        (dict(softcap=30.0, backend="torch_fa2"), ValueError, "backend 'torch_fa2' with softcap"),
    ],
)
def test_bad_window_and_softcap(kwargs, exc, match):
    q, k, v, lens, _ = make_case([5], [1], S=8, device="cpu", dtype=torch.float32)
    kwargs = {"backend": "sdpa", **kwargs}
    with pytest.raises(exc, match=match):
        attention(q, k, v, lens, **kwargs)


def test_feature_table_and_auto_never_picks_a_backend_without_softcap():
    assert supports("torch_fa2", window_left=True) and not supports("torch_fa2", softcap=True)
    for name in ("flash_attn", "flashinfer", "triton", "flex", "sdpa"):
        assert supports(name, window_left=True, softcap=True)
    q, k, v, _, _ = make_case([5], [1], S=8, device="cpu", dtype=torch.float32)
    assert select_backend(q, k, v, decode=True, softcap=True) == "sdpa"


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["prefill", "decode"])
@pytest.mark.parametrize("window", [0, 63, 200, 4000])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_window_softcap_every_backend_cuda(kind, window, softcap):
    """Every CUDA backend in bf16, head_dim 64 (one every backend takes); rows behind the window
    NaN where a backend masks exactly (flex, FA2 and FlashInfer read the whole KV tile holding
    the window's start: poisoned tile-aligned)."""
    lens = [700, 333, 1] if kind == "prefill" else [700, 129, 1]
    n_new = [700, 100, 1] if kind == "prefill" else [1, 1, 1]
    q, k, v, lens_t, cu = make_case(lens, n_new, S=768, device="cuda", dtype=torch.bfloat16, head_dim=64)
    want = reference(q, k, v, lens_t, cu, window_left=window, softcap=softcap)
    for backend in available_backends("cuda"):
        if not supports(backend, window_left=True, softcap=softcap is not None):
            with pytest.raises(ValueError, match="softcap"):
                run(backend, q, k, v, lens_t, cu, decode=kind == "decode", window=window, softcap=softcap)
            continue
        if backend in ("flex", "torch_fa2", "flashinfer"):
            # They read whole KV tiles (flex: 128-row blocks; FA2: 64 or 128 rows, aligned from row 0)
            # and mask scores, so 0 * NaN would poison rows of the tile holding the window's start.
            # KVCache never decommits that tile: it keeps the page holding row length - W.
            poison = [max(0, L - n - window) // 128 * 128 for L, n in zip(lens, n_new)]
            kp, vp = k.clone(), v.clone()
            for r, stop in enumerate(poison):
                kp[r, :stop] = float("nan")
                vp[r, :stop] = float("nan")
        else:
            kp, vp = poison_behind(k, v, lens, n_new, window)
        got = run(backend, q, kp, vp, lens_t, cu, decode=kind == "decode", window=window, softcap=softcap)
        assert torch.isfinite(got).all(), f"{backend} read a row behind the window"
        torch.testing.assert_close(got.double(), want, **TOL[torch.bfloat16], msg=backend)
