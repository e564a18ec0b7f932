"""The split-KV decode's fused merge (``decode_attention(fuse_merge=True)``): the last split of each
``(request, kv head)`` to finish merges the partials inside the first kernel.

Against the float64 reference and against the merge kernel (``fuse_merge=False``), over NaN-poisoned
tails, on the CPU under ``TRITON_INTERPRET=1`` (programs run one after another there, so the
counter logic is what is checked) and on the GPU, CUDA-graph replays included (counters that every
call leaves at zero, programs finishing in any order).
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from _layouts import LAYOUTS, make_cache, poison  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def tk():
    from torch_vkv.attention import deps

    return deps.triton_kernels()


def case(device, layout, H, H_kv, D, S_max, lengths, seed):
    """q ``[R, H, D]`` bf16 and a cache of ``len(lengths)`` slots, NaN past each length."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn((len(lengths), H, D), generator=g).to(torch.bfloat16).to(device)
    k, v = make_cache(layout, len(lengths), S_max, H_kv, D, dtype=torch.bfloat16, device=device, seed=seed)
    poison(k, v, lengths, list(range(len(lengths))))
    return q, k, v, torch.tensor(lengths, dtype=torch.int32, device=device)


def check(q, k, v, lens, **kw):
    """The fused merge against the float64 reference (bf16 tolerance) and the merge kernel."""
    fused = tk().decode_attention(q, k, v, lens, fuse_merge=True, **kw)
    separate = tk().decode_attention(q, k, v, lens, fuse_merge=False, **kw)
    ref = tk().decode_reference(q, k, v, lens)
    assert not fused.isnan().any(), "NaN leaked into the output"
    torch.testing.assert_close(fused.double(), ref, atol=2e-2, rtol=2e-2)
    # Same partials, merged in another order of additions: fp32 rounding apart, then bf16.
    torch.testing.assert_close(fused.float(), separate.float(), atol=8e-3, rtol=8e-3)
    return fused


# (query heads, kv heads): a group of 1 (MHA), 4 (Llama-3-8B's), and 7 (Yi-34B's, not a power of two).
GROUPS = [(4, 4), (8, 2), (7, 1)]


@pytest.mark.parametrize("num_splits", [2, 5, 16])  # 16 splits of 40 keys: some splits empty
@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_merge_equals_the_reference_and_the_merge_kernel(device, layout, heads, num_splits):
    H, H_kv = heads
    S = 40 if device == "cpu" else 700
    q, k, v, lens = case(device, layout, H, H_kv, 32, S, [S, 1, S // 3 + 1], seed=5)
    check(q, k, v, lens, num_splits=num_splits, block_n=16)
    # Every call leaves the counters it used at zero (the next call, and a graph replay, count from 0).
    assert not tk().default_merge_counters(q.device, 3 * H_kv).any()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_merge_counters_are_reused_across_batch_sizes_and_split_counts(device):
    """One stream's counter buffer serves calls of every shape one after another, and grows."""
    S = 40 if device == "cpu" else 300
    for R, splits in [(2, 3), (5, 2), (1, 7), (3, 3)]:
        q, k, v, lens = case(device, "per_layer", 8, 2, 16, S, [S - i for i in range(R)], seed=R)
        check(q, k, v, lens, num_splits=splits, block_n=16)
    counters = tk().default_merge_counters(q.device, 1)
    assert counters.numel() >= 10 and not counters.any()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_merge_uses_the_counters_given(device):
    q, k, v, lens = case(device, "per_layer", 8, 2, 16, 40, [40, 9], seed=3)
    counters = torch.zeros(4, dtype=torch.int32, device=device)
    out = tk().decode_attention(q, k, v, lens, num_splits=3, block_n=16, fuse_merge=True, merge_counters=counters)
    ref = tk().decode_reference(q, k, v, lens)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    assert not counters.any()


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda d: torch.zeros(3, dtype=torch.int32, device=d), "at least num_requests \\* num_kv_heads = 4"),
        (lambda d: torch.zeros(4, dtype=torch.int64, device=d), "got torch.int64"),
        (lambda d: torch.zeros(8, dtype=torch.int32, device=d)[::2], "contiguous"),
    ],
    ids=["too few", "int64", "strided"],
)
def test_fused_merge_refuses_unusable_counters(bad, message):
    q, k, v, lens = case("cpu", "per_layer", 8, 2, 16, 40, [40, 9], seed=3)
    with pytest.raises(ValueError, match=message):
        tk().decode_attention(q, k, v, lens, num_splits=3, block_n=16, fuse_merge=True, merge_counters=bad("cpu"))


def test_fuse_merge_is_ignored_with_one_split():
    """One split writes the output directly: there is nothing to merge and no counter is read."""
    q, k, v, lens = case("cpu", "per_layer", 8, 2, 16, 40, [40, 9], seed=3)
    bad = torch.zeros(1, dtype=torch.int64)  # would be refused if the fused merge ran
    out = tk().decode_attention(q, k, v, lens, num_splits=1, block_n=16, fuse_merge=True, merge_counters=bad)
    torch.testing.assert_close(out.double(), tk().decode_reference(q, k, v, lens), atol=2e-2, rtol=2e-2)


def record_merge_launches(monkeypatch) -> list:
    """The grids of the merge kernel's launches from now on (the kernel still runs)."""
    decode = importlib.import_module(tk().__name__ + ".decode")
    launched, real = [], decode._decode_reduce_kernel

    class Recording:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(decode, "_decode_reduce_kernel", Recording())
    return launched


def test_fused_merge_is_opt_in_and_given_counters_opt_in(monkeypatch):
    """Off by default (counters the library keeps by itself broke CUDA-graph trees on the GPU,
    docs/benchmarks.md); ``merge_counters`` given turns it on."""
    assert tk().default_fuse_merge(33) is False and tk().default_fuse_merge(2, paged=True) is False
    launched = record_merge_launches(monkeypatch)
    q, k, v, lens = case("cpu", "per_layer", 8, 2, 16, 40, [40, 9], seed=3)
    ref = tk().decode_reference(q, k, v, lens)
    out = tk().decode_attention(q, k, v, lens, num_splits=3, block_n=16)
    assert launched == [(2, 8)]
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    counters = torch.zeros(4, dtype=torch.int32)
    out = tk().decode_attention(q, k, v, lens, num_splits=3, block_n=16, merge_counters=counters)
    assert launched == [(2, 8)]  # fused: no second launch
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("fuse_merge", [None, True])
def test_cuda_fused_merge_in_a_graph_replays_with_new_lengths(fuse_merge):
    """Captured once with counters given (made outside the capture), replayed with other lengths: each
    replay equals the reference, so every replay's counters started at zero."""
    q, k, v, lens = case("cuda", "per_layer", 32, 8, 128, 4096, [4096, 1000, 17], seed=9)
    counters = torch.zeros(24, dtype=torch.int32, device="cuda")
    kw = dict(num_splits=16, fuse_merge=fuse_merge, merge_counters=counters)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tk().decode_attention(q, k, v, lens, **kw)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tk().decode_attention(q, k, v, lens, **kw)
    for lengths in ([4096, 1000, 17], [5, 4096, 2048], [1, 1, 1]):
        lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        poison(k, v, lengths, [0, 1, 2])
        graph.replay()
        torch.cuda.synchronize()
        ref = tk().decode_reference(q, k, v, lens)
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    assert not counters.any()


@pytest.mark.parametrize("fuse_merge", [True, False])
def test_decode_from_threads_at_once_on_the_cpu(fuse_merge):
    """Triton's interpreter is not thread safe: two threads' kernels at once failed or crashed the
    process. Our launchers take turns on CPU tensors (the fused merge's counters are then one
    buffer)."""
    import threading

    cases = [case("cpu", "per_layer", 8, 2, 16, 40, [40, 13 + i], seed=20 + i) for i in range(4)]
    results, errors = {}, []

    def run(i):
        try:
            q, k, v, lens = cases[i]
            for _ in range(3):
                results[i] = tk().decode_attention(q, k, v, lens, num_splits=5, block_n=8, fuse_merge=fuse_merge)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (q, k, v, lens) in enumerate(cases):
        torch.testing.assert_close(results[i].double(), tk().decode_reference(q, k, v, lens), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_a_captured_call_takes_the_merge_kernel_unless_given_counters(device, monkeypatch):
    """In a CUDA-graph capture the default is the merge kernel (a graph cannot keep counters of its own:
    CUDA-graph trees refuse a live tensor in their pool, and zeroing them before every call was slower);
    fusing there without counters is a ValueError. On the CPU the capture is simulated."""
    decode = importlib.import_module(tk().__name__ + ".decode")
    S = 40 if device == "cpu" else 700
    q, k, v, lens = case(device, "per_layer", 8, 2, 16, S, [S, 9], seed=3)
    ref = tk().decode_reference(q, k, v, lens)
    if device == "cpu":
        monkeypatch.setattr(decode, "capturing", lambda t: True)
        launched = record_merge_launches(monkeypatch)
        out = tk().decode_attention(q, k, v, lens, num_splits=3, block_n=16)
        assert launched == [(2, 8)]
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
        with pytest.raises(ValueError, match="expected merge_counters with fuse_merge=True in a CUDA-graph capture"):
            tk().decode_attention(q, k, v, lens, num_splits=3, block_n=16, fuse_merge=True)
        with pytest.raises(RuntimeError, match="expected a call outside CUDA-graph capture"):
            monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
            tk().default_merge_counters(torch.device("cuda"), 4)
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tk().decode_attention(q, k, v, lens, num_splits=3)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tk().decode_attention(q, k, v, lens, num_splits=3)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_child_forked_while_a_thread_runs_a_cpu_kernel_can_run_kernels():
    """The launchers' turn-taking lock is made anew in a forked child: one inherited from a parent whose
    other thread held it (inside a kernel) would never be released there, and the child's first CPU
    Triton call would hang."""
    import threading

    from torch_vkv.triton_kernels import _common

    q, k, v, lens = case("cpu", "per_layer", 8, 2, 16, 40, [40, 9], seed=3)
    held, release = threading.Event(), threading.Event()

    def hold():
        with _common._INTERPRETER_LOCK:  # as a thread inside a kernel does
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(30)
    pid = os.fork()
    if pid == 0:  # the child: a kernel call must finish (exit 0), not hang (killed below)
        try:
            tk().decode_attention(q, k, v, lens, num_splits=2, block_n=16)
            os._exit(0)
        except BaseException:
            os._exit(1)
    release.set()
    t.join()
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the launchers' lock")
    assert os.waitstatus_to_exitcode(status) == 0
