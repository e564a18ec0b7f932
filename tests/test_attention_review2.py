"""A new user's review of the functional API on the CPU (second attention review).

Outputs against a float64 reference written here (plain softmax attention, bottom-right aligned
causal mask, GQA by repeating KV heads), and the bad inputs found to crash or write silently:

* ``head_dim == 0`` raised ``ZeroDivisionError`` from the default scale (every backend);
* ``backend="flex"`` on the CPU raised torch's ``NotImplementedError`` for a ``q`` that requires grad,
  where docs/attention.md promises that eager calls work (only ``backward()`` raises);
* ``append_kv`` with two requests writing the same rows of one slot wrote one of them silently (which one
  is up to the kernel's schedule on a GPU).
"""

from __future__ import annotations

import itertools
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from torch_vkv import KVCache, paged_from_dense  # noqa: E402
from torch_vkv.attention import append_kv, attention, deps  # noqa: E402

CPU_BACKENDS = ["sdpa", "flex", "auto"] + (["triton"] if deps.HAS_TRITON else [])
TOL = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # docs/attention.md's CPU tolerances
H_KV, D = 2, 16


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


def reference(q, k, v, lens, cu, slots, *, causal=True, scale=None, window_left=None, softcap=None):
    """float64 attention of packed queries over dense ``k``/``v`` ``[B, S, H_kv, D]``."""
    T, H, Dq = q.shape
    g = H // k.shape[2]
    scale = 1 / math.sqrt(Dq) if scale is None else scale
    R = len(lens)
    cu = list(range(R + 1)) if cu is None else cu
    slots = list(range(R)) if slots is None else slots
    out = torch.zeros(T, H, Dq, dtype=torch.float64)
    for r in range(R):
        a, b, L = cu[r], cu[r + 1], lens[r]
        n = b - a
        if n == 0:
            continue
        kk = k[slots[r], :L].double().repeat_interleave(g, dim=1)
        vv = v[slots[r], :L].double().repeat_interleave(g, dim=1)
        s = torch.einsum("nhd,lhd->hnl", q[a:b].double(), kk) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        qpos, kpos = torch.arange(L - n, L)[:, None], torch.arange(L)[None, :]
        mask = torch.ones(n, L, dtype=torch.bool)
        if causal:
            mask &= kpos <= qpos
        if window_left is not None:
            mask &= kpos >= qpos - window_left
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
        out[a:b] = torch.einsum("hnl,lhd->nhd", p, vv)
    return out


CASES = {  # (num_heads, lengths, queries per request or None for decode, slots, options)
    "decode_gqa": (4, [5, 1, 17], None, [2, 0, 3], {}),
    "prefill_mha": (2, [9, 12], [9, 12], [1, 3], {}),
    "mixed_mqa": (4, [9, 12, 3, 20], [9, 1, 0, 4], [3, 0, 1, 2], {}),
    "window": (2, [30, 7], [5, 7], [0, 2], {"window_left": 3}),
    "softcap_scale": (4, [30, 7], [5, 7], [0, 2], {"softcap": 2.0, "scale": 0.5}),
    "not_causal": (4, [30, 7], [5, 7], [0, 2], {"causal": False}),
    "decode_window_0": (4, [30, 1], None, [0, 2], {"window_left": 0}),
    "duplicate_slots": (4, [3, 5, 7], None, [1, 1, 1], {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_float64_reference_with_nan_tails(backend, case, dtype):
    if backend == "triton" and dtype != torch.float32 and case not in ("mixed_mqa", "decode_gqa"):
        pytest.skip("the Triton interpreter is slow: 16-bit dtypes on two cases only")
    H, lens, nq, slots, opts = CASES[case]
    torch.manual_seed(0)
    k = torch.randn(4, 48, H_KV, D, dtype=dtype)
    v = torch.randn_like(k)
    for s, L in zip(slots, lens):
        if s != 1 or case != "duplicate_slots":
            k[s, L:] = float("nan")
            v[s, L:] = float("nan")
    cu = None if nq is None else [0, *itertools.accumulate(nq)]
    q = torch.randn(len(lens) if nq is None else sum(nq), H, D, dtype=dtype)
    want = reference(q, k, v, lens, cu, slots, **opts)
    out = attention(q, k, v, i32(*lens), cu_seqlens_q=None if cu is None else i32(*cu),
                    slots=torch.tensor(slots), backend=backend, **opts)  # fmt: skip
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_kvcache_views_and_paged_twin_match_reference(layout):
    torch.manual_seed(1)
    cache = KVCache(2, H_KV, D, max_batch_size=4, max_seq_len=64, dtype=torch.float32, device="cpu",
                    layout=layout, page_size=4096, margin_tokens=127 if layout == "interleaved" else 0)  # fmt: skip
    try:
        slots = [cache.alloc() for _ in range(3)][::-1]
        prev, nq = [0, 5, 9], [7, 1, 3]
        lens = [p + n for p, n in zip(prev, nq)]
        for s, L in zip(slots, lens):
            cache.commit(s, L)
        k, v = cache.key(1), cache.value(1)
        dense_k, dense_v = torch.zeros(k.shape), torch.zeros(k.shape)
        for s, p in zip(slots, prev):
            dense_k[s, :p], dense_v[s, :p] = torch.randn(p, H_KV, D), torch.randn(p, H_KV, D)
            k[s, :p], v[s, :p] = dense_k[s, :p], dense_v[s, :p]
        cu = [0, *itertools.accumulate(nq)]
        k_new, v_new = torch.randn(cu[-1], H_KV, D), torch.randn(cu[-1], H_KV, D)
        append_kv(k, v, k_new, v_new, i32(*lens), cu_seqlens_q=i32(*cu), slots=torch.tensor(slots))
        for r, (s, p) in enumerate(zip(slots, prev)):
            dense_k[s, p : lens[r]], dense_v[s, p : lens[r]] = k_new[cu[r] : cu[r + 1]], v_new[cu[r] : cu[r + 1]]
        q = torch.randn(cu[-1], 4, D)
        want = reference(q, dense_k, dense_v, lens, cu, slots)
        paged = paged_from_dense(dense_k, dense_v, [lens[slots.index(i)] if i in slots else 0 for i in range(4)],
                                 shuffle=True)  # fmt: skip
        for backend in CPU_BACKENDS:
            kw = dict(cu_seqlens_q=i32(*cu), slots=i32(*slots), backend=backend)
            torch.testing.assert_close(attention(q, k, v, i32(*lens), **kw).double(), want, atol=2e-3, rtol=2e-3)
            out = attention(q, paged.key(0), paged.value(0), i32(*lens), block_table=paged.block_table, **kw)
            torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=2e-3)
    finally:
        cache.close()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_head_dim_zero_is_a_value_error(backend):
    q, k = torch.randn(2, 4, 0), torch.randn(2, 8, H_KV, 0)
    with pytest.raises(ValueError, match=r"head_dim: expected an int >= 1, got 0"):
        attention(q, k, k.clone(), i32(3, 4), backend=backend)


def test_flex_on_cpu_takes_inputs_that_require_grad():
    """docs/attention.md, "Inference only": with grad inputs eager calls work, backward() raises."""
    torch.manual_seed(2)
    k, v = torch.randn(2, 32, H_KV, D), torch.randn(2, 32, H_KV, D)
    q = torch.randn(2, 4, D)
    want = attention(q, k, v, i32(3, 9), backend="flex")
    got = attention(q.clone().requires_grad_(), k.requires_grad_(), v, i32(3, 9), backend="flex")
    torch.testing.assert_close(got.detach(), want)


def test_append_kv_two_requests_writing_one_slots_rows_raise_before_writing():
    k, v = torch.zeros(2, 8, 1, D), torch.zeros(2, 8, 1, D)
    new = torch.stack([torch.full((1, D), 1.0), torch.full((1, D), 2.0)])
    with pytest.raises(ValueError, match=r"append_kv: request 1 \(slot 0\) .*rows \[2, 3\).*request 0"):
        append_kv(k, v, new, new, i32(3, 3), slots=i32(0, 0))
    assert not k.any() and not v.any()
    with pytest.raises(ValueError, match=r"request 1 \(slot 1\)"):  # a prefill chunk and a decode overlapping
        three = torch.randn(3, 1, D)
        append_kv(k, v, three, three, i32(4, 4), cu_seqlens_q=i32(0, 2, 3), slots=i32(1, 1))
    assert not k.any() and not v.any()
    # Different rows of one slot are no conflict: each token lands where its request says.
    append_kv(k, v, new, new, i32(3, 5), slots=i32(0, 0))
    assert k[0, 2, 0, 0] == 1.0 and k[0, 4, 0, 0] == 2.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cache_of_zero_rows_with_a_request_of_no_query(backend):
    """``S_max == 0``: the only valid request has length 0 and no query; sdpa raised IndexError."""
    k = torch.randn(3, 0, H_KV, D)
    out = attention(torch.randn(0, 4, D), k, k.clone(), i32(0), cu_seqlens_q=i32(0, 0), backend=backend)
    assert out.shape == (0, 4, D)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16])
def test_metadata_tensor_values_out_of_a_small_dtype_are_a_value_error(dtype):
    from torch_vkv import metadata_tensor

    with pytest.raises(ValueError, match=rf"metadata_tensor: expected values that fit {dtype}.*got 70000"):
        metadata_tensor([1, 70000], dtype=dtype)
    assert metadata_tensor([1, 2], dtype=dtype).tolist() == [1, 2]


def test_select_backend_names_a_bad_argument():
    from torch_vkv import select_backend

    q, k = torch.randn(1, 4, D), torch.randn(1, 8, H_KV, D)
    assert select_backend(q, k, k, decode=True) == "sdpa"
    with pytest.raises(TypeError, match=r"select_backend: q: expected a torch.Tensor, got 'list'"):
        select_backend([1.0], k, k, decode=True)
    with pytest.raises(TypeError, match=r"select_backend: v_cache: expected a torch.Tensor, got 'NoneType'"):
        select_backend(q, k, None, decode=False)
    with pytest.raises(TypeError, match=r"select_backend: decode: expected a bool, got 'yes'"):
        select_backend(q, k, k, decode="yes")


def test_compiled_append_past_the_committed_rows_is_a_value_error_not_a_segfault():
    """A compiled step skips the host checks while tracing; at run time its append op wrote an uncommitted
    row of a KVCache view (SIGSEGV on the host backend) for host metadata past the committed rows."""
    from _subprocess import run_python

    proc = run_python(
        """
        import torch
        from torch_vkv import KVCache, append_kv, attention
        from torch_vkv.attention import deps
        deps.triton_usable = lambda device: False  # the torch fallback (the interpreter faults alike)
        c = KVCache(1, 2, 16, max_batch_size=2, max_seq_len=512, dtype=torch.float32, device="cpu",
                    page_size=4096)
        s = c.alloc(); c.commit(s, 32)
        k, v = c.key(0), c.value(0)
        def step(q, kn, lens, slots):
            append_kv(k, v, kn, kn, lens, slots=slots)
            return attention(q, k, v, lens, slots=slots, backend="sdpa")
        f = torch.compile(step, fullgraph=True, backend="eager")
        i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
        with torch.no_grad():
            q, kn = torch.randn(1, 4, 16), torch.randn(1, 2, 16)
            assert f(q, kn, i32(5), i32(s)).shape == (1, 4, 16)
            try:
                f(q, kn, i32(300), i32(s))
            except ValueError as e:
                print("ValueError:", e)
            assert torch.isfinite(f(q, kn, i32(6), i32(s))).all()  # the cache is still usable
        print("done")
        """,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "ValueError: append_kv: request 0 (slot 0) cache_seqlens: expected a length whose new rows [299, 300)" \
        in out and "done" in out, out  # fmt: skip
