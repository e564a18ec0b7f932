"""torch_vkv.attention: every backend against a float64 reference, both cache layouts.

On the CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set below
before triton is imported), next to ``sdpa`` and ``flex``; the GPU
(``pytest -m cuda``) runs every backend, CUDA graphs included.
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from _layouts import KINDS, LAYOUTS, make_batch, make_cache, poison  # noqa: E402
attn_mod = importlib.import_module("torch_vkv.attention")  # the module; torch_vkv.attention is the function
from torch_vkv.attention import BACKENDS, append_kv, attention, select_backend  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
RUN_BACKENDS = [b for b in BACKENDS if b != "auto"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
HEADS = {"MHA": (4, 4), "GQA": (8, 2)}
# bf16 inputs, fp32 accumulation, compared with a float64 reference on the same bf16 inputs.
TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.float32: dict(atol=2e-3, rtol=2e-3)}  # fmt: skip


def tk():
    return attn_mod._triton_kernels()


def decode_mod():
    """The Triton decode module (``decode_attention`` asks the launch rules through its names)."""
    return importlib.import_module(tk().__name__ + ".decode")


def launch_mod():
    """The decode's launch rules (whose ``sm_count`` they read)."""
    return importlib.import_module(tk().__name__ + ".decode_launch")


def skip_unless_runs(backend: str, device: str) -> None:
    if backend in ("torch_fa2", "flash_attn", "flashinfer") and device != "cuda":
        pytest.skip(f"{backend} needs CUDA")
    if backend == "flash_attn" and attn_mod._flash_attn_fn() is None:
        pytest.skip("flash-attn is not installed")
    if backend == "flashinfer" and not importlib.import_module("torch_vkv.attention.deps").has_flashinfer():
        pytest.skip("flashinfer is not importable (bash ../shared/tools/flashinfer-wheels.sh brings it)")
    if backend == "torch_fa2" and not attn_mod._has_torch_fa2():
        pytest.skip("this torch has no _flash_attention_forward(seqused_k=)")
    if backend in ("triton", "flex") and not HAS_TRITON and device == "cuda":
        pytest.skip("triton is not installed")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if backend == "triton" and not attn_mod._triton_usable(torch.device(device)):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set only where CUDA is absent)")


def s_max_for(device: str) -> int:
    # Interpreter runs are slow: small caches on the CPU; on the GPU long enough to
    # cross split, tile and block boundaries.
    return 48 if device == "cpu" else 700


def setup_case(kind, heads, D, layout, device, *, dtype=torch.bfloat16, with_slots=False, seed=0):
    H, H_kv = HEADS[heads]
    S = s_max_for(device)
    b = make_batch(kind, H=H, H_kv=H_kv, D=D, dtype=dtype, device=device, S_max=S, with_slots=with_slots, seed=seed)
    k, v = make_cache(layout, len(b.lengths) + 1, S, H_kv, D, dtype=dtype, device=device, seed=seed)
    # The new tokens' rows are written by append_kv; rows past the lengths hold NaN.
    poison(k, v, b.lengths, b.slot_list)
    return b, k, v


def reference(b, k, v, causal=True, scale=None):
    k2, v2 = k.clone(), v.clone()
    tk().append_kv_reference(k2, v2, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    return tk().attention_reference(
        b.q, k2, v2, b.cache_seqlens, b.cu_seqlens_q, slots=b.slots, causal=causal, scale=scale
    )


def run(b, k, v, backend, **kw):
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    return attention(b.q, k, v, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots, backend=backend, **kw)


def assert_close(out, ref, dtype):
    assert out.dtype == dtype
    assert not out.isnan().any(), "NaN leaked into the output"
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", RUN_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_backend_matrix(device, backend, kind, heads, D, layout):
    skip_unless_runs(backend, device)
    b, k, v = setup_case(kind, heads, D, layout, device)
    ref = reference(b, k, v)
    out = run(b, k, v, backend)
    assert out.shape == b.q.shape
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", RUN_BACKENDS + ["auto"])
@pytest.mark.parametrize("device", DEVICES)
def test_slots_and_auto(device, backend, kind):
    """Requests in permuted cache rows (``slots``), and the ``auto`` choice."""
    skip_unless_runs(backend, device)
    b, k, v = setup_case(kind, "GQA", 64, "interleaved", device, with_slots=True, seed=3)
    assert_close(run(b, k, v, backend), reference(b, k, v), torch.bfloat16)


@pytest.mark.parametrize("backend", RUN_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_nan_tail_does_not_change_output(device, backend):
    """Rows past cache_seqlens: NaN or finite garbage, the output is bitwise the same."""
    skip_unless_runs(backend, device)
    b, k, v = setup_case("mixed", "GQA", 64, "per_layer", device, seed=5)
    out_nan = run(b, k, v, backend)
    # In place, so the layout (strides) stays the same; the second append rewrites the same rows.
    k.nan_to_num_(7.0)
    v.nan_to_num_(-3.0)
    out_fin = run(b, k, v, backend)
    assert not out_nan.isnan().any()
    assert torch.equal(out_nan, out_fin)


@pytest.mark.parametrize("D", [64, 128])  # fp32 x 128 once overflowed shared memory on the H200
@pytest.mark.parametrize("backend", ["triton", "sdpa", "flex"])
@pytest.mark.parametrize("device", DEVICES)
def test_noncausal_scale_fp32(device, backend, D):
    skip_unless_runs(backend, device)
    b, k, v = setup_case("mixed", "GQA", D, "per_layer", device, dtype=torch.float32, seed=7)
    ref = reference(b, k, v, causal=False, scale=0.3)
    out = run(b, k, v, backend, causal=False, scale=0.3)
    # Our Triton kernels multiply fp32 exactly on the GPU too (a TF32 dot once flipped a float32 model's
    # greedy token); flex's generated kernels may use TF32.
    tf32 = device != "cpu" and backend == "flex"
    tol = dict(atol=2e-2, rtol=2e-2) if tf32 else TOL[torch.float32]
    torch.testing.assert_close(out.double(), ref, **tol)


@pytest.mark.parametrize("D", [64, 128])  # 128: where the GPU default turns descriptors on (default_tma)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["prefill", "mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_tma_equals_pointer_loads(device, kind, layout, D):
    """``prefill_attention(tma=True)`` reads the full tiles through tensor descriptors and the
    masked ones as before: bitwise the same output, and NaN past the lengths never read."""
    skip_unless_runs("triton", device)
    b, k, v = setup_case(kind, "GQA", D, layout, device, seed=43)
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    blocks = dict(block_m=16, block_n=16) if device == "cpu" else {}
    args = (b.q, k, v, b.cache_seqlens, b.cu_seqlens_q, max(b.q_lens))
    out = tk().prefill_attention(*args, tma=True, **blocks)
    assert torch.equal(out, tk().prefill_attention(*args, tma=False, **blocks))
    assert_close(out, reference(b, k, v), torch.bfloat16)


@pytest.mark.parametrize("kind", ["prefill", "mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_group_order_changes_the_launch_not_the_output(device, kind):
    """``prefill_attention(group_order=...)``: a KV head's query heads launched together (the default
    for causal GQA) or one head after another give bitwise the same output, within bf16 tolerance
    of the float64 reference, causal or not; on an H100/H200 for the Gluon kernel too."""
    skip_unless_runs("triton", device)
    b, k, v = setup_case(kind, "GQA", 128, "per_layer", device, seed=53)
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    args = (b.q, k, v, b.cache_seqlens, b.cu_seqlens_q, max(b.q_lens))
    kernels = [dict(block_m=16, block_n=16) if device == "cpu" else dict(kernel="triton")]
    if device == "cuda" and tk().default_kernel(b.q, k, v, None, None, None) == "gluon":
        kernels.append(dict(kernel="gluon"))
    for kernel in kernels:
        for causal in (True, False):
            out = tk().prefill_attention(*args, causal=causal, group_order=True, **kernel)
            assert torch.equal(out, tk().prefill_attention(*args, causal=causal, group_order=False, **kernel))
            assert torch.equal(out, tk().prefill_attention(*args, causal=causal, **kernel)), (kernel, causal)
            assert_close(out, reference(b, k, v, causal=causal), torch.bfloat16)


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_block_order_deals_each_block_once_heaviest_first_over_a_kv_heads_group(group, causal):
    """``group_order``'s grid (``block_order`` mirrors both kernels' prologues): one program for every
    ``(m_block, head)``; a KV head's programs hold its ``group`` query heads, each level of blocks
    for all of them before the next, heaviest first where causal. On by default for causal GQA."""
    num_m_blocks, num_kv_heads = 5, 3
    dealt = [[tk().block_order(i, g, num_m_blocks, group, causal) for i in range(num_m_blocks * group)]
             for g in range(num_kv_heads)]  # fmt: skip
    assert sorted(c for programs in dealt for c in programs) == [
        (m, h) for m in range(num_m_blocks) for h in range(num_kv_heads * group)]  # fmt: skip
    for g, programs in enumerate(dealt):
        assert {h // group for _, h in programs} == {g}  # the KV head's own query heads
        levels = [m for m, _ in programs]
        assert levels == sorted(levels, reverse=causal)
        assert levels[:group] == [num_m_blocks - 1 if causal else 0] * group
    assert tk().default_group_order(True, 4) and not tk().default_group_order(True, 1)
    assert not tk().default_group_order(False, 4)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_decode_tma_equals_pointer_loads(device, layout, num_splits):
    """``decode_attention(tma=True)`` reads the full key tiles through tensor descriptors: bitwise
    the pointer loads' output, against the float64 reference, NaN past the lengths never read;
    a paged pool is refused with the reason."""
    skip_unless_runs("triton", device)
    b, k, v = setup_case("decode", "GQA", 128, layout, device, seed=47)
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, slots=b.slots)
    blocks = dict(block_n=16) if device == "cpu" else {}
    args = (b.q, k, v, b.cache_seqlens)
    out = tk().decode_attention(*args, tma=True, num_splits=num_splits, **blocks)
    assert torch.equal(out, tk().decode_attention(*args, tma=False, num_splits=num_splits, **blocks))
    assert_close(out, reference(b, k, v), torch.bfloat16)
    with pytest.raises(ValueError, match="no block_table"):
        tk().decode_attention(b.q, k, v, b.cache_seqlens, block_table=torch.zeros(5, 3, dtype=torch.int32, device=device),
                              tma=True)  # fmt: skip


@pytest.mark.parametrize("num_stages", [1, 3])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_decode_evict_first_equals_plain_loads(device, paged, num_splits, num_stages):
    """``decode_attention(evict_first=True)`` only changes the loads' L2 policy: bitwise the plain
    loads' output, contiguous or paged, pipelined or not, against the float64 reference, NaN past
    the lengths never read."""
    skip_unless_runs("triton", device)
    b, k, v = setup_case("decode", "GQA", 128, "per_layer", device, seed=53)
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, slots=b.slots)
    extra = dict(block_n=16) if device == "cpu" else {}
    if paged:  # the same rows as a pool of 4-row pages, one block table row per slot
        B, S = k.shape[:2]
        k, v = (t.reshape(B * S // 4, 4, *t.shape[2:]) for t in (k, v))
        extra["block_table"] = torch.arange(B * S // 4, dtype=torch.int32, device=device).reshape(B, S // 4)
    args = (b.q, k, v, b.cache_seqlens)
    kw = dict(slots=b.slots, num_splits=num_splits, num_stages=num_stages, **extra)
    out = tk().decode_attention(*args, evict_first=True, **kw)
    assert torch.equal(out, tk().decode_attention(*args, evict_first=False, **kw))
    assert_close(out, tk().decode_reference(*args, slots=b.slots, block_table=extra.get("block_table")), torch.bfloat16)


def test_decode_evict_first_rule(monkeypatch):
    """The evict-first policy by default only on unpipelined split keys of contiguous rows whose splits
    span at most EVICT_FIRST_MAX_SPAN (512) keys; decode_attention asks the rule unless told."""
    rule = tk().default_decode_evict_first
    assert rule(64, 1, 16384, False, False) and rule(32, 1, 16384, False, False)  # 256 and 512 keys a split
    assert not rule(16, 1, 16384, False, False)  # 1024 keys a split
    assert not rule(64, 2, 16384, False, False) and not rule(1, 1, 256, False, False)  # pipelined; one split
    assert not rule(64, 1, 16384, True, False) and not rule(64, 1, 16384, False, True)  # descriptors; paged
    seen = []
    real = decode_mod().default_decode_evict_first
    monkeypatch.setattr(decode_mod(), "default_decode_evict_first", lambda *a: seen.append(a) or real(*a))
    b, k, v = setup_case("decode", "GQA", 64, "per_layer", "cpu", seed=5)
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, slots=b.slots)
    out = tk().decode_attention(b.q, k, v, b.cache_seqlens, slots=b.slots, block_n=16, num_splits=2, num_stages=1)
    assert_close(out, reference(b, k, v), torch.bfloat16)
    assert seen == [(2, 1, k.shape[1], False, False)]
    tk().decode_attention(b.q, k, v, b.cache_seqlens, slots=b.slots, block_n=16, evict_first=False)
    assert len(seen) == 1  # given: not asked


def test_decode_block_n_rule(monkeypatch):
    """64-key decode tiles, 32 past head_dim 128; 128 only with descriptors, one split and at least
    four waves of (request, kv head) programs (where the H200 measured it faster); descriptors by
    default only on the GPU (test_cuda_decode_default_tma_on_hopper)."""
    monkeypatch.setattr(launch_mod(), "sm_count", lambda device: 132)
    rule, cuda = tk().default_decode_block_n, torch.device("cuda")
    q, k = torch.zeros(128, 32, 128, dtype=torch.bfloat16), torch.zeros(128, 64, 8, 128, dtype=torch.bfloat16)
    assert tk().default_decode_tma(q, k, k, None, 1) is False  # CPU tensors: never descriptors
    assert rule(128, 8, 128, 1, cuda, True) == 128  # 1024 programs >= 4 x 132
    assert rule(32, 8, 128, 1, cuda, True) == 64  # two waves
    assert rule(128, 8, 128, 1, cuda, False) == 64  # pointer loads
    assert rule(128, 8, 128, 2, cuda, True) == 64
    assert rule(128, 8, 256, 1, cuda, True) == 32
    assert rule(128, 8, 128, 1, torch.device("cpu"), True) == 64
    # A short cache (S_max below LONG_TILE_MIN_ROWS) keeps 64-key tiles, where they measured faster.
    long_rows = tk().LONG_TILE_MIN_ROWS
    assert rule(128, 8, 128, 1, cuda, True, long_rows) == 128
    assert rule(128, 8, 128, 1, cuda, True, long_rows - 1) == 64
    # Pointer loads over a long cache (long_cache_decode_launch): 128 keys past one wave (132
    # programs) to below 3 (396), 64 from there; one wave, short caches, the paged twin and fp32 keep 64.
    assert rule(17, 8, 128, 1, cuda, False, long_rows) == 128 and rule(16, 8, 128, 1, cuda, False, long_rows) == 64
    assert rule(49, 8, 128, 1, cuda, False, long_rows) == 128 and rule(50, 8, 128, 1, cuda, False, long_rows) == 64
    assert rule(32, 8, 128, 1, cuda, False) == 128  # max_len unknown: taken as long
    assert rule(32, 8, 128, 1, cuda, False, long_rows - 1) == 64
    assert rule(32, 8, 128, 1, cuda, False, long_rows, paged=True) == 64
    assert rule(32, 8, 128, 1, cuda, False, long_rows, element_size=4) == 64
    assert rule(32, 8, 128, 2, cuda, False, long_rows) == 64  # split keys


def test_decode_stages_rule(monkeypatch):
    """Two pipeline stages for 16-bit head_dim 128 with one split between two and four waves of
    (request, kv head) programs (three programs an SM instead of two: measured faster on the H200),
    or split keys within one wave of two programs an SM (measured faster on the H100), three elsewhere; decode_attention takes the rule's value unless num_stages is given."""
    monkeypatch.setattr(launch_mod(), "sm_count", lambda device: 132)
    rule, cuda = tk().default_decode_stages, torch.device("cuda")
    short = dict(max_len=tk().LONG_TILE_MIN_ROWS - 1)  # below long_cache_decode_launch's caches
    assert rule(64, 8, 128, 1, cuda, False, **short) == 2  # 512 programs: 3.9 waves of 132
    assert rule(48, 8, 128, 1, cuda, False, **short) == 2  # 384
    assert rule(34, 8, 128, 1, cuda, False, **short) == 2 and rule(33, 8, 128, 1, cuda, False, **short) == 3  # 264 = 2 x 132
    assert rule(65, 8, 128, 1, cuda, False, **short) == 2 and rule(66, 8, 128, 1, cuda, False, **short) == 3  # 528
    # A long cache (or max_len unknown), one split: two stages past one wave, none from 1.5 waves (198 programs).
    for batch, stages in ((16, 3), (17, 2), (24, 2), (25, 1), (33, 1), (64, 1), (66, 1), (256, 1)):
        assert rule(batch, 8, 128, 1, cuda, False) == stages == rule(batch, 8, 128, 1, cuda, False, max_len=4096)
    assert rule(64, 8, 128, 1, cuda, False, paged=True) == 3 and rule(64, 8, 128, 1, cuda, True) == 3
    launch = tk().long_cache_decode_launch
    assert [launch(b, 8, 128, 1, cuda) for b in (16, 17, 25, 50)] == [None, (128, 2), (128, 1), (64, 1)]
    assert launch(25, 8, 128, 1, torch.device("cpu")) is None and launch(25, 8, 128, 2, cuda) is None
    assert rule(64, 8, 128, 2, cuda, False) == 3  # split keys past four waves
    # Split keys at three to four waves (default_num_splits' small batches): no pipeline.
    assert rule(1, 8, 128, 64, cuda, False) == 1 and rule(2, 8, 128, 32, cuda, False) == 1
    assert rule(8, 8, 128, 8, cuda, False) == 1 and rule(1, 8, 128, 50, cuda, False) == 1  # 400 >= 396
    assert rule(1, 8, 128, 49, cuda, False) == 3 and rule(1, 8, 128, 67, cuda, False) == 3  # 392; 536 > 528
    assert rule(1, 8, 128, 32, cuda, False) == 2 and rule(2, 8, 128, 16, cuda, False) == 2  # 256 programs
    assert rule(1, 8, 128, 34, cuda, False) == 3  # 272 > 2 x 132
    assert rule(64, 8, 128, 1, cuda, True) == 3  # descriptors: measured with 3
    assert rule(64, 8, 64, 1, cuda, False) == 3 and rule(64, 8, 128, 1, cuda, False, element_size=4) == 3
    assert rule(64, 8, 128, 1, torch.device("cpu"), False) == 3
    assert rule(64, 8, 128, 1, cuda, False, paged=True) == 3  # the paged twin: not measured

    seen = []
    real = decode_mod().default_decode_stages
    monkeypatch.setattr(decode_mod(), "default_decode_stages", lambda *a, **kw: seen.append(a) or real(*a, **kw))
    b, k, v = setup_case("decode", "GQA", 64, "per_layer", "cpu", seed=11)
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, slots=b.slots)
    out = tk().decode_attention(b.q, k, v, b.cache_seqlens, slots=b.slots, block_n=16)
    assert_close(out, reference(b, k, v), torch.bfloat16)
    assert len(seen) == 1 and seen[0][:3] == (b.q.shape[0], k.shape[2], b.q.shape[2])
    tk().decode_attention(b.q, k, v, b.cache_seqlens, slots=b.slots, block_n=16, num_stages=2)
    assert len(seen) == 1  # given: not asked


@pytest.mark.cuda
def test_cuda_decode_two_stage_default_equals_three_stages():
    """Where the default takes two stages (64 requests of 8 KV heads on an H100/H200-sized GPU), the
    output is bitwise that of three stages and within bf16 rounding of the float64 reference."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    R = 2 * sms // 8 + 1 + 8  # between two and four waves of 8-head requests
    if tk().default_decode_stages(R, 8, 128, 1, torch.device("cuda"), False, max_len=512) != 2:
        pytest.skip(f"two stages are not the default for {R} requests on this GPU ({sms} SMs)")
    gen = torch.Generator(device="cuda").manual_seed(29)
    q = torch.randn(R, 32, 128, dtype=torch.bfloat16, device="cuda", generator=gen)
    k = torch.randn(R, 512, 8, 128, dtype=torch.bfloat16, device="cuda", generator=gen)
    v = torch.randn(R, 512, 8, 128, dtype=torch.bfloat16, device="cuda", generator=gen)
    lens = torch.randint(1, 513, (R,), dtype=torch.int32, device="cuda", generator=gen)
    out = tk().decode_attention(q, k, v, lens, num_splits=1)
    assert torch.equal(out, tk().decode_attention(q, k, v, lens, num_splits=1, num_stages=3))
    assert_close(out, tk().decode_reference(q, k, v, lens), torch.bfloat16)


def _while_capturing(fn):
    """``fn()`` called while a CUDA graph is being captured (with one kernel in it, so the graph is not empty)."""
    graph, x = torch.cuda.CUDAGraph(), torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        result = fn()
        x.add_(1)
    return result


@pytest.mark.cuda
def test_cuda_decode_default_tma_on_hopper():
    """On Hopper, bf16 x 128 decode reads through descriptors by default from four waves of
    (request, kv head) programs with one split, in CUDA-graph capture only (an eager call would pay
    their host cost at every launch); never below four waves, with splits or on a paged pool."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("descriptors are a default on Hopper (sm_90) only; this GPU is not one")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    many = -(-4 * sms // 8)  # requests of 8 KV heads for four waves
    k = torch.zeros(many, 64, 8, 128, dtype=torch.bfloat16, device="cuda")
    q = torch.zeros(many, 32, 128, dtype=torch.bfloat16, device="cuda")
    table = torch.zeros(many, 2, dtype=torch.int32, device="cuda")
    rule = tk().default_decode_tma
    cases = [(q, None, 1), (q[: many - 1], None, 1), (q, None, 2), (q, table, 1)]
    assert [rule(q_, k, k, bt, splits) for q_, bt, splits in cases] == [False] * 4  # eager
    assert _while_capturing(lambda: [rule(q_, k, k, bt, splits) for q_, bt, splits in cases]) == [True, False, False, False]
    # A call that may read LONG_TILE_MIN_ROWS keys takes long_cache_decode_launch's plain loads instead.
    assert _while_capturing(lambda: rule(q, k, k, None, 1, tk().LONG_TILE_MIN_ROWS)) is False


@pytest.mark.cuda
@pytest.mark.parametrize("waves", [1.2, 1.5, 4])
def test_cuda_long_cache_decode_default_against_reference(waves):
    """Past one wave of (request, kv head) programs over a long cache the default decode takes
    long_cache_decode_launch's tiles (128 keys in two stages, then without a pipeline; 64 keys from 3
    waves): eager and replayed from a CUDA graph, within bf16 rounding of the float64 reference,
    ragged lengths and NaN past them."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    R, H, H_kv, D, S = -(-int(waves * sms) // 8), 32, 8, 128, tk().LONG_TILE_MIN_ROWS
    assert tk().long_cache_decode_launch(R, H_kv, D, 1, torch.device("cuda"), S) is not None
    gen = torch.Generator(device="cuda").manual_seed(67)
    q = torch.randn(R, H, D, dtype=torch.bfloat16, device="cuda", generator=gen)
    k = torch.randn(R, S, H_kv, D, dtype=torch.bfloat16, device="cuda", generator=gen)
    v = torch.randn(R, S, H_kv, D, dtype=torch.bfloat16, device="cuda", generator=gen)
    lens = torch.randint(1, S + 1, (R,), dtype=torch.int32, device="cuda", generator=gen)
    lens[0] = S  # one request fills the cache
    poison(k, v, lens.tolist(), list(range(R)))  # rows past a length are never read
    assert_close(tk().decode_attention(q, k, v, lens), tk().decode_reference(q, k, v, lens), torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = tk().decode_attention(q, k, v, lens)
    q.copy_(torch.randn(q.shape, dtype=q.dtype, device="cuda", generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, tk().decode_reference(q, k, v, lens), torch.bfloat16)


@pytest.mark.cuda
def test_cuda_decode_graph_takes_descriptors_compiled_during_capture():
    """At four waves of programs a captured decode takes the descriptor variant, which the eager
    warm-up (pointer loads) did not compile: it compiles and loads during the capture, and each
    replay matches the float64 reference on fresh queries and lengths, as the eager call does."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("descriptors are a default on Hopper (sm_90) only; this GPU is not one")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    R, H, H_kv, D, S = -(-4 * sms // 8), 32, 8, 128, 384
    gen = torch.Generator(device="cuda").manual_seed(61)
    q = torch.randn(R, H, D, dtype=torch.bfloat16, device="cuda", generator=gen)
    k = torch.randn(R, S, H_kv, D, dtype=torch.bfloat16, device="cuda", generator=gen)
    v = torch.randn(R, S, H_kv, D, dtype=torch.bfloat16, device="cuda", generator=gen)
    lens = torch.randint(1, S + 1, (R,), dtype=torch.int32, device="cuda", generator=gen)
    eager = tk().decode_attention(q, k, v, lens)
    assert_close(eager, tk().decode_reference(q, k, v, lens), torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        assert tk().default_decode_tma(q, k, v, None, 1)
        captured = tk().decode_attention(q, k, v, lens)
    for _ in range(2):
        q.copy_(torch.randn(q.shape, dtype=q.dtype, device="cuda", generator=gen))
        lens.copy_(torch.randint(1, S + 1, (R,), dtype=torch.int32, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(captured, tk().decode_reference(q, k, v, lens), torch.bfloat16)


def test_kernels_refuse_a_scale_that_is_not_positive():
    """The full tiles take the max of the unscaled scores: a scale <= 0 is refused, not miscomputed."""
    b, k, v = setup_case("decode", "GQA", 64, "per_layer", "cpu", seed=3)
    for scale in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="scale > 0"):
            tk().decode_attention(b.q, k, v, b.cache_seqlens, scale=scale)


def test_prefill_launch_defaults():
    """The launch that prefill_attention picks by itself: 128-key tiles for 16-bit head_dim 128
    on a GPU (measured faster), small tiles in the interpreter, never descriptors off a GPU."""
    assert tk().default_launch(128, 2, True) == (128, 128, 8, 3)
    assert tk().default_launch(64, 2, True) == (128, 64, 4, 3)
    assert tk().default_launch(128, 4, True) == (64, 64, 4, 2)  # fp32 x 128 must fit shared memory
    assert tk().default_launch(256, 2, True) == (64, 32, 4, 2)
    assert tk().default_launch(128, 2, False)[:2] == (32, 64)
    q, k = torch.zeros(4, 8, 128, dtype=torch.bfloat16), torch.zeros(1, 32, 2, 128, dtype=torch.bfloat16)
    assert tk().default_tma(q, k, k, None) is False


def test_prefill_eager_tma_rule_weighs_the_work(monkeypatch):
    """Eagerly, descriptors only where query rows x the longest key count reach EAGER_TMA_MIN_ROWS**2
    (their host cost hidden behind the kernel); the triton backend passes the longest length when the
    host knows it (metadata_tensor), else the rule counts the query rows alone."""
    prefill_mod = importlib.import_module(tk().__name__ + ".prefill")
    monkeypatch.setattr(prefill_mod, "_tma_capable", lambda *a: True)  # as on Hopper, bf16 x 128
    n = tk().EAGER_TMA_MIN_ROWS
    k = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    rows = lambda t: torch.zeros(t, 8, 128, dtype=torch.bfloat16)  # noqa: E731
    assert tk().default_tma(rows(n), k, k, None) and not tk().default_tma(rows(n - 1), k, k, None)
    assert tk().default_tma(rows(512), k, k, None, max_keys=16384)  # a chunk over a long context
    assert not tk().default_tma(rows(512), k, k, None, max_keys=4096)
    assert not tk().default_tma(rows(256), k, k, None, max_keys=256)

    seen = []
    monkeypatch.setattr(tk(), "default_tma", lambda q, kc, vc, bt, max_keys=None: seen.append(max_keys) or False)
    b, kc, vc = setup_case("prefill", "GQA", 64, "per_layer", "cpu", seed=7)
    append_kv(kc, vc, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    lens = attn_mod.metadata_tensor(b.cache_seqlens.tolist())
    for lengths in (lens, b.cache_seqlens):
        out = attention(b.q, kc, vc, lengths, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots, backend="triton")
        assert_close(out, reference(b, kc, vc), torch.bfloat16)
    assert seen == [max(b.lengths), None]


@pytest.mark.cuda
def test_cuda_prefill_default_tma_on_hopper():
    """On Hopper, bf16 x 128 prefill reads through descriptors by default from EAGER_TMA_MIN_ROWS
    query rows eagerly, at any size under CUDA-graph capture; never a paged pool or fp32."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("descriptors are a default on Hopper (sm_90) only; this GPU is not one")
    q = torch.zeros(4, 8, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.zeros(1, 32, 2, 128, dtype=torch.bfloat16, device="cuda")
    table = torch.zeros(1, 2, dtype=torch.int32, device="cuda")
    rows = torch.zeros(tk().EAGER_TMA_MIN_ROWS, 8, 128, dtype=torch.bfloat16, device="cuda")
    assert tk().default_tma(q, k, k, None) is False  # eager, 4 rows: the host's cost would dominate
    assert tk().default_tma(rows, k, k, None) is True
    assert tk().default_tma(rows[1:], k, k, None) is False
    assert _while_capturing(lambda: tk().default_tma(q, k, k, None)) is True
    assert tk().default_tma(rows, k, k, table) is False
    assert tk().default_tma(rows.float(), k.float(), k.float(), None) is False


def test_prefill_tma_refuses_what_a_descriptor_cannot_address():
    k = torch.zeros(2, 32, 2, 64)
    assert tk().tma_problem(k, k, None) is None
    assert "no block_table" in tk().tma_problem(k, k, torch.zeros(2, 2, dtype=torch.int32))
    odd = torch.zeros(2, 32, 3, 6)[..., :5]  # a 20-byte head stride
    assert "16-byte" in tk().tma_problem(odd, odd, None)


def test_default_num_splits_fills_the_gpu_in_about_four_waves(monkeypatch):
    """Contiguous: one split once (request, kv head) programs cover 70% of the SMs, else ~SPLIT_WAVES (4)
    waves (two off CUDA); paged: ~4 waves; >= 256 keys a split (the H100's 132 SMs; shapes only, no GPU
    needed)."""
    skip_unless_runs("triton", "cpu")
    monkeypatch.setattr(launch_mod(), "sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert tk().SPLIT_WAVES == 4
    assert tk().default_num_splits(32, 8, 4096, cuda) == 1  # 256 programs >= 132 SMs
    assert tk().default_num_splits(1, 8, 16384, cuda) == 64  # 4 * 132 // 8 = 66: its power of two below
    assert tk().default_num_splits(2, 8, 16384, cuda) == 32  # 33
    assert tk().default_num_splits(3, 8, 16384, cuda) == 22  # 528 // 24: 16 would lose more than 1/16
    assert tk().default_num_splits(16, 8, 16384, cuda) == 1  # 128 programs: >= 70% of the SMs
    assert tk().default_num_splits(12, 8, 16384, cuda) == 1  # 96 programs: 73%
    assert tk().default_num_splits(11, 8, 16384, cuda) == 6  # 88 programs, 67%: 4 * 132 // 88
    assert tk().default_num_splits(1, 8, 1024, cuda) == 4  # 256 keys a split at least
    assert tk().default_num_splits(1, 1, 1 << 20, cuda) == 64  # capped
    assert tk().default_num_splits(8, 8, 4096, cuda) == 8  # 512 programs
    assert tk().default_num_splits(1, 2, 4096, torch.device("cpu")) == 4  # 2 waves of 4 "SMs" off CUDA
    # The paged twin keeps about four waves (its block-table loads gain from more programs).
    assert tk().default_num_splits(32, 8, 4096, cuda, paged=True) == 3
    assert tk().default_num_splits(1, 8, 16384, cuda, paged=True) == 64


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_triton_decode_splits(num_splits):
    """Split-KV merge is exact whatever the number of splits (empty splits included)."""
    skip_unless_runs("triton", "cpu")
    b, k, v = setup_case("decode", "GQA", 64, "per_layer", "cpu", seed=11)
    assert_close(run(b, k, v, "triton", num_splits=num_splits), reference(b, k, v), torch.bfloat16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_append_kv(device, kind, layout):
    b, k, v = setup_case(kind, "GQA", 64, layout, device, seed=13)
    k2, v2 = k.clone(), v.clone()
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    tk().append_kv_reference(k2, v2, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    assert torch.equal(k.nan_to_num(9.0), k2.nan_to_num(9.0))
    assert torch.equal(v.nan_to_num(9.0), v2.nan_to_num(9.0))


def test_append_kv_torch_fallback(monkeypatch):
    """Without Triton, append_kv falls back to index_put_ with device-side positions."""
    monkeypatch.setattr(attn_mod.deps, "triton_usable", lambda device: False)
    b, k, v = setup_case("mixed", "GQA", 64, "interleaved", "cpu", with_slots=True, seed=17)
    k2, v2 = k.clone(), v.clone()
    append_kv(k, v, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    tk().append_kv_reference(k2, v2, b.k_new, b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, slots=b.slots)
    assert torch.equal(k.nan_to_num(9.0), k2.nan_to_num(9.0))


def test_bad_input_messages():
    b, k, v = setup_case("mixed", "GQA", 64, "per_layer", "cpu")
    with pytest.raises(ValueError, match="expected"):
        attention(b.q, k, v, b.cache_seqlens.long(), cu_seqlens_q=b.cu_seqlens_q)
    with pytest.raises(ValueError, match="expected"):
        attention(b.q, k, v, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q[:-1])
    with pytest.raises(ValueError, match="expected"):
        attention(b.q[:, :3], k, v, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q)  # 3 heads, 2 kv heads
    with pytest.raises(TypeError, match="expected"):
        attention(b.q.float(), k, v, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q)
    with pytest.raises(ValueError, match="expected one of"):
        attention(b.q, k, v, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, backend="nope")
    with pytest.raises(ValueError, match="expected"):
        attention(b.q, k, v, b.cache_seqlens)  # decode needs one query per request
    with pytest.raises(TypeError, match="expected"):
        attention(b.q, k.numpy() if False else None, v, b.cache_seqlens)
    with pytest.raises(ValueError, match="expected"):
        attention(b.q, k, v, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q, backend="torch_fa2")  # CPU
    with pytest.raises(ValueError, match="expected"):
        append_kv(k, v, b.k_new[:, :1], b.v_new, b.cache_seqlens, cu_seqlens_q=b.cu_seqlens_q)


def test_auto_rule_cpu():
    b, k, v = setup_case("decode", "GQA", 64, "per_layer", "cpu")
    assert select_backend(b.q, k, v, decode=True) == "sdpa"


@pytest.mark.parametrize("backend", ["sdpa", "triton", "flex"])
def test_compile_fullgraph_no_graph_breaks(backend):
    """append + attention traced by dynamo as one graph (custom ops with fake impls, no host syncs)."""
    skip_unless_runs(backend, "cpu")
    import torch._dynamo

    b, k, v = setup_case("mixed", "GQA", 64, "per_layer", "cpu", seed=19)
    ref = reference(b, k, v)

    def step(q, k_cache, v_cache, k_new, v_new, lens, cu, slots):
        append_kv(k_cache, v_cache, k_new, v_new, lens, cu_seqlens_q=cu, slots=slots)
        return attention(q, k_cache, v_cache, lens, cu_seqlens_q=cu, slots=slots, backend=backend)

    torch._dynamo.reset()
    args = (b.q, k, v, b.k_new, b.v_new, b.cache_seqlens, b.cu_seqlens_q, b.slots)
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    assert_close(out, ref, torch.bfloat16)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("backend", RUN_BACKENDS)
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_cuda_graph_replay_with_new_lengths(backend, kind):
    """Capture append + attention once; change lengths and inputs on the device; replay: correct."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    skip_unless_runs(backend, "cuda")
    b, k, v = setup_case(kind, "GQA", 128, "interleaved", "cuda", seed=23)
    static = dict(q=b.q.clone(), k_new=b.k_new.clone(), v_new=b.v_new.clone(), lens=b.cache_seqlens.clone())
    max_q = max(b.q_lens)

    def step():
        append_kv(k, v, static["k_new"], static["v_new"], static["lens"], cu_seqlens_q=b.cu_seqlens_q)
        return attention(static["q"], k, v, static["lens"], cu_seqlens_q=b.cu_seqlens_q, backend=backend,
                         max_seqlen_q=max_q)  # fmt: skip

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: compile Triton / flex kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for trial in range(3):
        new_lens = [max(q_len, min(k.shape[1], L - 37 * trial)) for L, q_len in zip(b.lengths, b.q_lens)]
        static["lens"].copy_(torch.tensor(new_lens, dtype=torch.int32))
        static["q"].normal_()
        static["k_new"].normal_()
        static["v_new"].normal_()
        b2 = make_batch(kind, H=8, H_kv=2, D=128, dtype=torch.bfloat16, device="cuda", S_max=k.shape[1])
        b2.q, b2.k_new, b2.v_new, b2.cache_seqlens = static["q"], static["k_new"], static["v_new"], static["lens"]
        poison(k, v, new_lens, b2.slot_list)
        ref = reference(b2, k, v)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out.clone(), ref, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_cuda_compile_fullgraph(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    skip_unless_runs(backend, "cuda")
    b, k, v = setup_case("mixed", "GQA", 128, "per_layer", "cuda", seed=29)
    ref = reference(b, k, v)

    def step(q, k_cache, v_cache, k_new, v_new, lens, cu):
        append_kv(k_cache, v_cache, k_new, v_new, lens, cu_seqlens_q=cu)
        return attention(q, k_cache, v_cache, lens, cu_seqlens_q=cu, backend=backend)

    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(b.q, k, v, b.k_new, b.v_new, b.cache_seqlens, b.cu_seqlens_q)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["sdpa", "triton", "flex", "auto"])
def test_on_kvcache_host_backend(backend, layout):
    """On a real KVCache (CPU host backend, uncommitted rows inaccessible) no backend reads past a length.

    An uncommitted row is PROT_NONE memory there: a read past the committed rows is a segfault,
    as it is an illegal-address fault on the GPU.
    """
    skip_unless_runs(backend, "cpu")
    from torch_vkv import KVCache
    H, H_kv, D = 8, 2, 64
    b = make_batch("mixed", H=H, H_kv=H_kv, D=D, dtype=torch.float32, device="cpu", S_max=200, seed=31)
    with KVCache(2, H_kv, D, max_batch_size=len(b.lengths), max_seq_len=200, dtype=torch.float32, device="cpu",
                 layout=layout, page_size=64 << 10) as cache:  # fmt: skip
        slots = [cache.alloc() for _ in b.lengths]
        for s, L in zip(slots, b.lengths):
            cache.reserve(s, L)
        b.slots = torch.tensor(slots, dtype=torch.int32)
        b.slot_list = slots
        k, v = cache.key(1), cache.value(1)
        out = run(b, k, v, backend)
        ref = tk().attention_reference(b.q, k, v, b.cache_seqlens, b.cu_seqlens_q, slots=b.slots)
        torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])


@pytest.mark.slow
def test_bench_kernels_smoke(tmp_path):
    """`python -m torch_vkv bench kernels --smoke` runs end to end and writes its report (the sections
    the interpreter runs in seconds; vm and tune: the next test)."""
    import json

    from torch_vkv.bench.kernels import main

    assert main(["--smoke", "--no-plots", "--sections", "decode,prefill,layout,window,step", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    sections = {r["section"] for r in rows}
    assert {"copy", "decode", "prefill", "window", "step"} <= sections
    assert not [r for r in rows if str(r.get("note", "")).startswith("error")], rows
    win = [r for r in rows if r["section"] == "window"]
    full = {r["backend"]: r["bytes_read"] for r in win if r["note"] == "window_left=None"}
    cut = {r["backend"]: r["bytes_read"] for r in win if r["note"] != "window_left=None"}
    assert full and all(full[b] == 4 * cut[b] for b in full)  # context 256, window_left 63: a quarter of the rows
    assert "Sliding-window decode vs full attention" in (tmp_path / "kernels.md").read_text()
    step = [r for r in rows if r["section"] == "step"]
    assert {(r["batch"], r["context"]) for r in step} == {(1, 256), (4, 256)}
    assert all(r["us"] > 0 and r["layers"] == 2 and r["memory"] == "vm" for r in step), step


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TORCH_VKV_SLOW_TESTS") != "1",
                    reason="about 75 s in the Triton interpreter; runs with TORCH_VKV_SLOW_TESTS=1, and on the GPU "
                           "in every `bench kernels --quick` of scripts/gpu_check.sh")  # fmt: skip
def test_bench_kernels_smoke_vm_and_tune_sections(tmp_path):
    """`bench kernels --smoke --sections vm,tune`: the same kernel on both memories, and the launch sweeps."""
    import json

    from torch_vkv.bench.kernels import main

    assert main(["--smoke", "--no-plots", "--sections", "vm,tune", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {"copy", "vm_vs_malloc", "decode_tune", "prefill_tune"} <= {r["section"] for r in rows}
    tune = [r for r in rows if r["section"] == "prefill_tune"]
    assert len(tune) >= 2 and all(r["tflop_s"] > 0 for r in tune)
    assert [r["note"] for r in tune].count("default") == 1
    assert "Triton prefill, batch 1, S=64: best" in (tmp_path / "kernels.md").read_text()
    assert not [r for r in rows if str(r.get("note", "")).startswith("error")], rows


@pytest.mark.parametrize("shape", [(8, 1, 128), (3, 1, 32), (6, 2, 64)], ids=["MQA", "MQA-group3-d32", "GQA-group3"])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
@pytest.mark.parametrize("backend", ["triton", "sdpa", "flex"])
@pytest.mark.parametrize("device", DEVICES)
def test_mqa_and_odd_groups(device, backend, kind, shape):
    skip_unless_runs(backend, device)
    H, H_kv, D = shape
    S = s_max_for(device)
    b = make_batch(kind, H=H, H_kv=H_kv, D=D, dtype=torch.float16, device=device, S_max=S, seed=37)
    k, v = make_cache("interleaved", len(b.lengths) + 1, S, H_kv, D, dtype=torch.float16, device=device, seed=37)
    poison(k, v, b.lengths, b.slot_list)
    assert_close(run(b, k, v, backend), reference(b, k, v), torch.float16)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "varlen"])
@pytest.mark.parametrize("backend", ["triton", "sdpa", "flex"])
@pytest.mark.parametrize("device", DEVICES)
def test_no_request_gives_an_empty_output(device, backend, decode):
    # flex raised IndexError (argmax of no length) where the others answer [0, H, D].
    skip_unless_runs(backend, device)
    k = torch.randn(2, 64, 2, 32, device=device)
    q = torch.randn(0, 4, 32, device=device)
    lens = torch.zeros(0, dtype=torch.int32, device=device)
    cu = None if decode else torch.zeros(1, dtype=torch.int32, device=device)
    out = attention(q, k, k, lens, cu_seqlens_q=cu, max_seqlen_q=None if decode else 1, backend=backend)
    assert out.shape == (0, 4, 32)
