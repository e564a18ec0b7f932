"""The Gluon prefill kernel for Hopper (``triton_kernels/prefill_hopper.py``) in its three forms:
one program a query block, the same with the consumers' ping-pong turns, and persistent (one
program an SM over all blocks: ``prefill_hopper_persistent.py``).

On an sm90 GPU: against the float64 reference over NaN-poisoned tails (so a key read past a length,
or a probability of 0 times a NaN value, shows), causal and not, whole prompts and chunks over
earlier keys, GQA groups of 1, 4 and 7, head_dim 64 and 128, lengths of whole tiles (every band
through the ring) and ragged ones, bad metadata (zero rows). On any machine: the kernel compiles
for sm90 with the Triton installed where that Triton ships the Gluon dialect (the compile check
costs no GPU), its tile arithmetic (``tile_plan``) covers every visible key once and reads nothing
past a length, and too many requests for one launch are a clear error.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

TOL = dict(atol=2e-2, rtol=2e-2)  # bf16 inputs and output against a float64 reference

#: The kernel's forms: keyword arguments of ``prefill_hopper``.
VARIANTS = {"plain": {}, "pingpong": dict(pingpong=True), "persistent": dict(persistent=True),
            "head_order": dict(group_order=False)}


def _gluon():
    """The kernel's module; the test is skipped where the installed Triton has no Gluon dialect
    (the kernel is then never offered: ``hopper_problem`` names it)."""
    from torch_vkv.triton_kernels import prefill_hopper

    if prefill_hopper.GLUON_IMPORT_ERROR is not None:
        pytest.skip(f"this Triton lacks Gluon: {prefill_hopper.GLUON_IMPORT_ERROR}")
    return prefill_hopper


def _hopper():
    """:func:`_gluon`, on an sm90 GPU (the only architecture the kernel is built for)."""
    prefill_hopper = _gluon()
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"the kernel is built for sm90, this GPU is sm{''.join(map(str, torch.cuda.get_device_capability()))}")
    return prefill_hopper


def _case(H, H_kv, D, lengths, num_new, S_max, seed, slots=None, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    B = len(lengths) if slots is None else max(slots) + 1
    k = torch.randn((B, S_max, H_kv, D), generator=g).to(dtype).to(dev)
    v = torch.randn((B, S_max, H_kv, D), generator=g).to(dtype).to(dev)
    for r, L in enumerate(lengths):
        s = r if slots is None else slots[r]
        k[s, L:] = float("nan")
        v[s, L:] = float("nan")
    cu = [0]
    for n in num_new:
        cu.append(cu[-1] + n)
    q = torch.randn((cu[-1], H, D), generator=g).to(dtype).to(dev)
    lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    cu_q = torch.tensor(cu, dtype=torch.int32, device=dev)
    slot_t = None if slots is None else torch.tensor(slots, dtype=torch.int32, device=dev)
    return q, k, v, lens, cu_q, slot_t, max(num_new)


CASES = {
    # lengths, queries per request: whole prompts (ragged last tiles), chunks over earlier keys, decode rows
    "prompts": ([1000, 300, 129], [1000, 300, 129]),
    "chunks": ([1500, 700], [256, 700]),
    "one_tile": ([128, 64], [128, 1]),
    "long": ([4100], [4100]),
    # lengths of whole tiles: every diagonal band through the ring (TMA), no ragged end; an aligned chunk
    "aligned": ([1024, 384, 2048], [1024, 384, 640]),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("H,H_kv,D", [(8, 8, 128), (32, 8, 128), (28, 4, 128), (16, 4, 64)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_float64_reference(case, H, H_kv, D, causal, variant):
    ph = _hopper()
    from torch_vkv.triton_kernels import attention_reference

    lengths, num_new = CASES[case]
    q, k, v, lens, cu, slots, max_q = _case(H, H_kv, D, lengths, num_new, S_max=max(lengths) + 300, seed=len(case) + H + D)
    out = torch.full_like(q, float("nan"))
    ph.prefill_hopper(q, k, v, lens, cu, max_q, slots=slots, causal=causal, scale=D**-0.5, out=out,
                      **VARIANTS[variant])  # fmt: skip
    # The long case's float64 scores take 4 GiB: float32 there (several test processes share the GPU)
    ref = attention_reference(q, k, v, lens, cu, causal=causal, dtype=torch.float32 if case == "long" else torch.float64)
    torch.testing.assert_close(out.double(), ref.double(), **TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slots_and_stages(stages, variant, dtype):
    ph = _hopper()
    from torch_vkv.triton_kernels import attention_reference

    q, k, v, lens, cu, slots, max_q = _case(32, 8, 128, [2000, 513], [2000, 1], S_max=2600, seed=3, slots=[2, 0],
                                            dtype=dtype)  # fmt: skip
    out = ph.prefill_hopper(q, k, v, lens, cu, max_q, slots=slots, causal=True, scale=0.1, out=torch.empty_like(q),
                            stages=stages, **VARIANTS[variant])  # fmt: skip
    ref = attention_reference(q, k, v, lens, cu, slots=slots, causal=True, scale=0.1)
    torch.testing.assert_close(out.double(), ref.double(), **TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bad_metadata_gives_zero_rows_and_reads_nothing(variant):
    ph = _hopper()
    # request 1: length below its query count; request 2: slot out of range
    q, k, v, lens, cu, _, max_q = _case(8, 8, 128, [300, 10, 200], [300, 20, 200], S_max=400, seed=5)
    slots = torch.tensor([0, 1, 9], dtype=torch.int32, device="cuda")
    out = ph.prefill_hopper(q, k, v, lens, cu, max_q, slots=slots, causal=True, scale=0.1, out=torch.full_like(q, 7.0),
                            **VARIANTS[variant])  # fmt: skip
    assert out[300:].eq(0).all()
    assert out[:300].isfinite().all()


@pytest.mark.cuda
def test_prefill_attention_routes_to_it_and_agrees_with_the_triton_kernel(monkeypatch):
    ph = _hopper()
    from torch_vkv import triton_kernels as tk
    from torch_vkv.triton_kernels import prefill

    q, k, v, lens, cu, _, max_q = _case(32, 8, 128, [3000, 1200], [3000, 1200], S_max=3100, seed=7)
    assert tk.default_kernel(q, k, v, None, None, None, max_keys=3000) == "gluon"
    assert tk.default_kernel(q, k, v, None, 64, None, max_keys=3000) == "triton"  # a window
    assert tk.default_kernel(q, k, v, None, None, None, max_keys=8) == "triton"  # too small for descriptors
    out = tk.prefill_attention(q, k, v, lens, cu, max_q, kernel="gluon")
    base = tk.prefill_attention(q, k, v, lens, cu, max_q, kernel="triton")
    torch.testing.assert_close(out.float(), base.float(), **TOL)
    assert ph.hopper_problem(q, k, None, 128, None) is not None  # a window: the Triton kernel
    # Launch parameters or tma=False mean the Triton kernel.
    calls = []
    real = ph.prefill_hopper
    monkeypatch.setattr(ph, "prefill_hopper", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    tk.prefill_attention(q, k, v, lens, cu, max_q, tma=False)
    tk.prefill_attention(q, k, v, lens, cu, max_q, block_n=64)
    assert not calls
    tk.prefill_attention(q, k, v, lens, cu, max_q)
    assert calls
    monkeypatch.setattr(prefill, "GLUON_PREFILL_DEFAULT", False)  # the switch
    assert tk.default_kernel(q, k, v, None, None, None, max_keys=3000) == "triton"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiles_for_sm90_without_a_gpu(variant):
    """The kernels' source compiles for sm90 with the installed Triton (no GPU needed) into
    asynchronous warpgroup MMAs (wgmma), within the shared memory of an H100/H200 (227 KiB)."""
    from _subprocess import run_python

    _gluon()
    # In a child without TRITON_INTERPRET (set for the CPU tests): interpreted functions do not compile.
    child = run_python(
        f"""
        import json
        from torch_vkv.triton_kernels import prefill_hopper as ph
        print("INFO", json.dumps(ph.compile_for_sm90(head_dim=128, **{VARIANTS[variant]!r})))
        """,
        env={"TRITON_INTERPRET": ""},
        timeout=300,
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("INFO ")]
    assert child.returncode == 0 and lines, child.stdout[-2000:] + child.stderr[-4000:]
    info = json.loads(lines[-1][5:])
    assert info["wgmma"] >= 32, info
    assert info["shared_bytes"] <= 227 * 1024, info


def test_shared_layouts_are_built_once():
    """``shared_layout`` (the launch's NVMMA shared layouts: ~12 us of host time each to build with
    ``get_default_for``) gives Gluon's default layout of the tile, the same object on every call."""
    ph = _gluon()
    from triton.experimental.gluon import language as gl

    for dtype, element in ((torch.bfloat16, gl.bfloat16), (torch.float16, gl.float16)):
        for block in ((1, 128, 1, 64), (128, 128)):
            layout = ph.shared_layout(block, dtype)
            assert layout == gl.NVMMASharedLayout.get_default_for(list(block), element)
            assert ph.shared_layout(block, dtype) is layout


def test_kernel_argument_is_checked():
    """A kernel name outside the two, or the Gluon kernel where it cannot run (here: CPU tensors),
    raises ValueError saying what was expected; the default on the CPU is the Triton kernel."""
    from torch_vkv.triton_kernels import default_kernel, prefill_attention

    q = torch.randn(4, 2, 16)
    k = torch.randn(1, 8, 2, 16)
    lens = torch.tensor([4], dtype=torch.int32)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="kernel: expected 'triton', 'gluon' or None, got 'cuda'"):
        prefill_attention(q, k, k, lens, cu, 4, kernel="cuda")
    with pytest.raises(ValueError, match=r"kernel='gluon'\): expected"):
        prefill_attention(q, k, k, lens, cu, 4, kernel="gluon")
    assert default_kernel(q, k, k, None, None, None) == "triton"


def test_more_requests_than_a_launch_takes_is_a_clear_error():
    """Requests are the launch grid's third dimension (at most 65535 programs): beyond that a
    ValueError names the limit instead of a failed launch (checked before anything is launched)."""
    from torch_vkv.triton_kernels import prefill_attention

    R = 65536
    q = torch.randn(1, 2, 16)
    k = torch.randn(1, 8, 2, 16)
    lens = torch.ones(R, dtype=torch.int32)
    cu = torch.ones(R + 1, dtype=torch.int32)
    cu[0] = 0
    slots = torch.zeros(R, dtype=torch.int32)
    with pytest.raises(ValueError, match="at most 65535 requests in one call, got 65536"):
        prefill_attention(q, k, k, lens, cu, 1, slots=slots, kernel="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_attention_on_a_kv_cache_takes_it_by_default(layout, monkeypatch):
    """``attention(backend="triton")`` over a ``KVCache`` (virtual memory, pages committed for the
    lengths only) runs the Gluon kernel for a prompt large enough, and matches the float64 reference."""
    ph = _hopper()
    import torch_vkv
    from torch_vkv import KVCache
    from torch_vkv.triton_kernels import attention_reference

    calls = []
    real = ph.prefill_hopper
    monkeypatch.setattr(ph, "prefill_hopper", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    H, H_kv, D, lengths = 32, 8, 128, [2500, 1700]
    g = torch.Generator().manual_seed(11)
    with KVCache(2, H_kv, D, max_batch_size=2, max_seq_len=4096, dtype=torch.bfloat16, device="cuda",
                 layout=layout) as cache:  # fmt: skip
        slots = [cache.alloc() for _ in lengths]
        for s, L in zip(slots, lengths):
            cache.reserve(s, L)
            cache.key(1)[s, :L] = torch.randn((L, H_kv, D), generator=g).to(torch.bfloat16).cuda()
            cache.value(1)[s, :L] = torch.randn((L, H_kv, D), generator=g).to(torch.bfloat16).cuda()
        q = torch.randn((sum(lengths), H, D), generator=g).to(torch.bfloat16).cuda()
        lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device="cuda")
        slot_t = torch.tensor(slots, dtype=torch.int32, device="cuda")
        k, v = cache.key(1), cache.value(1)
        out = torch_vkv.attention(q, k, v, lens, cu_seqlens_q=cu, slots=slot_t, max_seqlen_q=max(lengths),
                                  backend="triton")  # fmt: skip
        ref = attention_reference(q, k, v, lens, cu, slots=slot_t)
        torch.testing.assert_close(out.double(), ref.double(), **TOL)
    assert calls, "the Gluon kernel was not called"


def test_stages_outside_two_or_three_are_refused():
    ph = _gluon()
    q = torch.zeros(4, 2, 128, dtype=torch.bfloat16)
    lens = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="stages: expected 2 or 3, got 1"):
        ph.prefill_hopper(q, q[None], q[None], lens, torch.tensor([0, 4], dtype=torch.int32), 4, slots=None,
                          causal=True, scale=0.1, out=torch.empty_like(q), stages=1)  # fmt: skip


@pytest.mark.parametrize("causal", [True, False])
def test_tile_plan_reads_each_visible_key_once_and_nothing_past_the_length(causal):
    """The kernel's tile arithmetic (``tile_plan`` mirrors its prologue), over lengths around tile
    boundaries, whole prompts and chunks: the TMA tiles stay below the length, the unmasked tiles
    are visible to every query of the block, and ring tiles plus each consumer's masked rows cover
    exactly the keys each of its queries may see."""
    from torch_vkv.triton_kernels import prefill_hopper as ph

    BN, rows = ph.BLOCK_N, ph.BLOCK_M // 2
    seen = 0
    for seqlen in (1, 63, 64, 127, 128, 129, 255, 256, 300, 640, 1000, 1024):
        for q_len in sorted({1, 64, 128, 129, seqlen // 2 or 1, seqlen}):
            if q_len > seqlen:
                continue
            for m_block in range(-(-q_len // ph.BLOCK_M)):
                plan = ph.tile_plan(seqlen, q_len, m_block, causal)
                n_full, n_ring, n_tiles = plan["n_full"], plan["n_ring"], plan["n_tiles"]
                assert 0 <= n_full <= n_ring and n_ring * BN <= seqlen, (seqlen, q_len, m_block, plan)
                if not causal:
                    assert n_ring == n_full
                # The persistent kernel: its tiles reach every consumer's end and hold no tile of keys
                # nobody sees; at most one (crossing the length) is not a TMA tile.
                assert n_ring <= n_tiles <= n_ring + 1 and (n_tiles - 1) * BN < max(plan["hi"]) <= n_tiles * BN
                for half in (0, 1):
                    hi = plan["hi"][half]
                    for i in range(rows):
                        row = m_block * ph.BLOCK_M + half * rows + i  # query row of the request
                        if row >= q_len:
                            continue
                        pos = plan["first_pos"] + half * rows + i
                        visible = set(range(pos + 1 if causal else seqlen))
                        assert set(range(n_full * BN)) <= visible  # unmasked tiles: visible to all
                        ring = set(range(n_ring * BN)) & visible  # the band's tiles: causal mask
                        masked = {key for key in range(n_ring * BN, hi) if not causal or key <= pos}
                        assert ring | masked == visible and not ring & masked, (seqlen, q_len, m_block, half, i)
                        seen += 1
    assert seen > 5000  # rows checked


def test_persistent_kernel_deals_every_item_once_and_evens_out_causal_work():
    """The persistent kernel's order (``snake_items`` mirrors its formula): every item of the grid
    goes to exactly one program, and over a causal prompt (an item's key tiles fall linearly with
    its index) the programs' tile counts differ by less than one heaviest item plus one round."""
    from torch_vkv.triton_kernels import prefill_hopper_persistent as pp

    for programs, num_items in ((132, 2048), (132, 100), (7, 50), (1, 5), (132, 132 * 9 + 1)):
        dealt = [pp.snake_items(p, programs, num_items) for p in range(programs)]
        assert sorted(i for items in dealt for i in items) == list(range(num_items))
    heads, m_blocks, programs = 32, 64, 132  # an 8K causal prompt of Llama-3-8B heads
    tiles = [[m_blocks - i // heads for i in pp.snake_items(p, programs, m_blocks * heads)] for p in range(programs)]
    loads = [sum(t) for t in tiles]
    assert max(loads) - min(loads) <= m_blocks + 2 * programs // heads, (min(loads), max(loads))


@pytest.mark.parametrize("order", [0, 1, 2, 4, 8, 32])
def test_persistent_kernel_orders_cover_every_item_heaviest_first(order):
    """``item_coords`` (the kernel's ``_item`` orders in plain Python): each order maps the items one to
    one onto the ``(m_block, head, request)`` grid; within each request and group of ``order`` heads
    (order 0: every head, 1: one head) the query blocks come heaviest first."""
    from torch_vkv.triton_kernels import prefill_hopper_persistent as pp

    m_blocks, heads, requests = 5, 32, 3
    coords = [pp.item_coords(i, m_blocks, heads, requests, order) for i in range(m_blocks * heads * requests)]
    assert sorted(coords) == sorted((m, h, r) for m in range(m_blocks) for h in range(heads) for r in range(requests))
    group = heads * requests if order == 0 else max(order, 1)
    for start in range(0, len(coords), m_blocks * group):
        levels = [m for m, _, _ in coords[start : start + m_blocks * group]]
        assert levels == sorted(levels, reverse=True), (order, start, levels)


def test_persistent_kernel_takes_only_calls_it_can_copy_and_dense_grids():
    """``tma_queries_problem``: queries whose rows TMA cannot copy (strides not 16-byte multiples)
    are refused with what was expected and given; ``persistent_problem`` also keeps grids mostly of
    empty items (many short requests beside a long one) on the other kernel; ``prefill_hopper``
    refuses ``persistent=True`` with ``pingpong=True`` or ``group_order=True``."""
    ph = _gluon()
    from torch_vkv.triton_kernels import prefill_hopper_persistent as pp

    q = torch.zeros(4096, 32, 128, dtype=torch.bfloat16)
    assert pp.tma_queries_problem(q, 1, 4096) is None and pp.persistent_problem(q, 1, 4096) is None
    odd = torch.zeros(4096, 32, 132, dtype=torch.bfloat16)[..., :128]  # rows of 264 bytes
    assert "16-byte aligned base and strides" in pp.tma_queries_problem(odd, 1, 4096)
    assert "(4224, 132, 1)" in pp.tma_queries_problem(odd, 1, 4096)
    # 64 requests, one of 4000 rows, the others of 1: 32 blocks x 64 requests, almost all empty
    assert "mostly of query blocks" in pp.persistent_problem(q[: 4000 + 63], 64, 4000)
    assert pp.persistent_problem(q, 2, 2048) is None  # two prompts of 2048 rows: every item holds queries
    lens = torch.tensor([4096], dtype=torch.int32)
    cu = torch.tensor([0, 4096], dtype=torch.int32)
    for other in (dict(pingpong=True), dict(group_order=True)):
        with pytest.raises(ValueError, match="persistent=True has its own order and no ping-pong schedule"):
            ph.prefill_hopper(q, q[None, :, :8], q[None, :, :8], lens, cu, 4096, slots=None, causal=True, scale=0.1,
                              out=torch.empty_like(q), persistent=True, **other)  # fmt: skip
    with pytest.raises(ValueError, match="num_programs: expected >= 1, got 0"):
        pp.prefill_hopper_persistent(q, q[None, :, :8], q[None, :, :8], lens, cu, 4096, slots=None, causal=True,
                                     scale=0.1, out=torch.empty_like(q), num_programs=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"persistent=True\): expected queries TMA can copy"):
        ph.prefill_hopper(odd, q[None, :, :8], q[None, :, :8], lens, cu, 4096, slots=None, causal=True, scale=0.1,
                          out=torch.empty_like(odd), persistent=True)  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("num_programs", [1, 3, 7])
@pytest.mark.parametrize("case", ["prompts", "chunks"])
def test_persistent_kernel_on_few_programs(num_programs, case):
    """Few programs, each taking many items in turn: the ring's and the query buffers' phases run
    on across items of different lengths (ragged ends, masked tiles) and requests."""
    _hopper()
    from torch_vkv.triton_kernels import attention_reference
    from torch_vkv.triton_kernels import prefill_hopper_persistent as pp

    lengths, num_new = CASES[case]
    q, k, v, lens, cu, slots, max_q = _case(8, 2, 128, lengths, num_new, S_max=max(lengths) + 100, seed=num_programs)
    out = pp.prefill_hopper_persistent(q, k, v, lens, cu, max_q, slots=slots, causal=True, scale=0.1,
                                       out=torch.full_like(q, float("nan")), num_programs=num_programs)  # fmt: skip
    ref = attention_reference(q, k, v, lens, cu, causal=True, scale=0.1)
    torch.testing.assert_close(out.double(), ref.double(), **TOL)


@pytest.mark.cuda
def test_prefill_attention_takes_the_persistent_kernel_where_it_is_the_default(monkeypatch):
    """With ``GLUON_PERSISTENT_DEFAULT`` on, ``prefill_attention`` runs the persistent kernel for a
    dense grid and the one-program-a-block kernel for queries TMA cannot copy; both match the
    float64 reference."""
    ph = _hopper()
    from torch_vkv import triton_kernels as tk
    from torch_vkv.triton_kernels import attention_reference, prefill
    from torch_vkv.triton_kernels import prefill_hopper_persistent as pp

    monkeypatch.setattr(prefill, "GLUON_PERSISTENT_DEFAULT", True)
    calls = []
    real = pp.prefill_hopper_persistent
    monkeypatch.setattr(pp, "prefill_hopper_persistent", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, lens, cu, _, max_q = _case(32, 8, 128, [3000, 1200], [3000, 1200], S_max=3100, seed=13)
    out = tk.prefill_attention(q, k, v, lens, cu, max_q, kernel="gluon")
    assert calls == [1]
    ref = attention_reference(q, k, v, lens, cu)
    torch.testing.assert_close(out.double(), ref.double(), **TOL)
    wide = torch.full((q.shape[0], q.shape[1], 132), float("nan"), dtype=q.dtype, device=q.device)
    wide[..., :128] = q
    out = tk.prefill_attention(wide[..., :128], k, v, lens, cu, max_q, kernel="gluon")  # rows of 264 bytes
    assert calls == [1]
    torch.testing.assert_close(out.double(), ref.double(), **TOL)
