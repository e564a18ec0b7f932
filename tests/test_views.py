"""Reads of uncommitted memory, safe repr, copies refused, and views that
outlive their cache (issue 8, items 1 and 2).

Every scenario that could crash the interpreter runs in a child process
(tests/_subprocess.py). Host backend unless marked ``cuda``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_vkv import KVCache, VirtualKVTensor
from torch_vkv.tensor import VirtualKVView

from _subprocess import check_scenario, describe, run_cases, run_python

# A small cache: 64 tokens per 4 KiB host page (2 heads x 8 dims x 4 bytes),
# 4 pages per slot.
PRELUDE = """
import copy, gc, io, pickle
import torch
from torch_vkv import KVCache, VirtualKVTensor

def make(layout="per_layer"):
    return KVCache(2, 2, 8, max_batch_size=3, max_seq_len=256, dtype=torch.float32, device="cpu",
                   page_size=4096, layout=layout)

def filled(layout="per_layer"):
    # slot 0 holds 40 random tokens in layer 0's K; slots 1 and 2 are not committed.
    cache = make(layout)
    slot = cache.alloc()
    cache.reserve(slot, 40)
    x = torch.randn(40, 2, 8)
    cache.key(0)[slot, :40] = x
    return cache, slot, x
"""

STRICT = {"TORCH_VKV_DEBUG": "1"}
LAX = {"TORCH_VKV_DEBUG": ""}


# ---------------------------------------------------------------- item 1: reads
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_repr_reads_no_uncommitted_row(layout):
    """In strict mode any read of an uncommitted row is a SIGSEGV, so a child
    that prints every tensor we hand out and exits 0 proves repr reads none."""
    out = check_scenario(
        PRELUDE
        + f"""
cache, slot, x = filled({layout!r})
k = cache.key(0)
for t in (k, cache.value(0), cache.key(1), cache._buffers[0]):
    print(t)
    print(str(t), f"{{t}}", repr(t))
print("rows", k.committed_rows())
""",
        env=STRICT,
    )
    assert "VirtualKVView(shape=(3, 256, 2, 8), dtype=torch.float32, device=cpu" in out
    assert "slot 0, rows [0, " in out and "VirtualKVTensor(" in out
    if layout == "per_layer":
        assert "rows [64, 0, 0]" in out  # 40 tokens round up to one 64-token page


def test_strict_mode_faults_on_an_uncommitted_read():
    r = run_python(PRELUDE + "cache, slot, x = filled()\nprint(float(cache.key(0)[slot + 1].sum()))", env=STRICT)
    assert r.returncode == -signal.SIGSEGV, f"expected SIGSEGV in strict mode, got {describe(r.returncode)}\n{r.stderr}"


def test_uncommitted_rows_read_zeros_by_default():
    check_scenario(
        PRELUDE
        + """
cache, slot, x = filled()
k = cache.key(0)
ref = x.double().sum()
assert torch.equal(k[slot, :40], x)
assert float((k.double().sum() - ref).abs()) < 1e-9, (k.sum(), ref)  # every other row reads 0
assert torch.count_nonzero(k[slot + 1]) == 0 and torch.count_nonzero(cache.value(1)) == 0
print(k)
""",
        env=LAX,
    )


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_committed_rows_follow_the_page_table(layout):
    cache = KVCache(3, 2, 8, max_batch_size=3, max_seq_len=300, dtype=torch.float32, device="cpu",
                    page_size=4096, layout=layout)
    with cache:
        a, b = cache.alloc(), cache.alloc()
        cache.reserve(a, 100)
        cache.reserve(b, 7)
        for layer in range(3):
            for view in (cache.key(layer), cache.value(layer)):
                rows = view.committed_rows()
                assert rows[2] == 0
                for slot in (a, b):
                    t = cache.committed_tokens(slot)
                    # interleaved: a layer's part of the first token past the
                    # committed ones may still lie inside the last page
                    assert t <= rows[slot] <= t + (layout == "interleaved"), (layer, slot, rows, t)


# ------------------------------------------------------------ item 2: copies
def test_pickle_save_and_deepcopy_refuse_with_a_hint():
    check_scenario(
        PRELUDE
        + """
cache, slot, x = filled()
for t in (cache.key(0), cache.value(1), cache._buffers[0]):
    for what, fn in [("pickle", pickle.dumps), ("deepcopy", copy.deepcopy), ("copy", copy.copy)]:
        try:
            fn(t)
        except TypeError as e:
            assert "clone" in str(e) and "cache.key(0)[slot, :n].clone()" in str(e), str(e)
        else:
            raise AssertionError(f"{what} of {type(t).__name__} did not raise")
    buf = io.BytesIO()
    try:
        torch.save(t, buf)
    except TypeError as e:
        assert "clone" in str(e)
    else:
        raise AssertionError("torch.save did not raise")
    assert buf.tell() < 4096, buf.tell()  # nothing like the virtual range was written
# what the message suggests works
rows = pickle.loads(pickle.dumps(cache.key(0)[slot, :40].clone()))
assert torch.equal(rows, x)
""",
        env=LAX,
    )


# --------------------------------------------------------- item 2: lifetimes
def test_view_outlives_a_dropped_cache():
    """Dropping the cache releases nothing under a live view; each buffer's
    pages go when its last view dies."""
    check_scenario(
        PRELUDE
        + """
cache, slot, x = filled()
pool = cache.pool
k, v = cache.key(0), cache.value(1)
mapped = pool.stats()["mapped_pages"]
assert mapped == 4, mapped   # one page per buffer (2 layers x K, V)
del cache
gc.collect()
assert pool.stats()["mapped_pages"] == 2        # the pages under k and v stay; the other buffers' go
assert torch.equal(k[slot, :40], x)              # read
y = torch.randn(40, 2, 8)
k[slot, :40] = y                                 # write
v[slot, :5] = 1.0
assert torch.equal(k[slot, :40], y) and float(v[slot, :5].sum()) == 80.0
print(k)                                         # print
print(float(k.sum()))
del k
gc.collect()
assert pool.stats()["mapped_pages"] == 1         # v keeps its own buffer's page
del v
gc.collect()
s = pool.stats()
assert s["mapped_pages"] == 0 and s["free_pages"] == s["created_pages"], s
""",
        env=LAX,
    )


def test_tensors_detached_from_a_view_stay_known_after_the_cache_is_dropped():
    """``view.detach()`` / ``view.data`` share the storage but not the view's base: once the cache and its
    views were dropped, nothing knew them for a cache's memory, so ``append_kv`` into rows past the committed
    ones faulted (SIGSEGV) and pickling copied the whole reservation. The storage itself remembers its
    reservation now."""
    check_scenario(
        PRELUDE
        + """
import pytest
from torch_vkv import append_kv
from torch_vkv.tensor import cache_source
cache, slot, x = filled()
pool = cache.pool
k, v = cache.key(0).detach(), cache.value(0).data
del cache
gc.collect()
assert pool.stats()["mapped_pages"] == 2                 # the pages under k and v stay
assert cache_source(k) is not None and cache_source(v) is not None
assert cache_source(k) is cache_source(k[slot])          # one source while it lives
new = torch.ones(1, 2, 8)
slots = torch.tensor([slot], dtype=torch.int32)
with pytest.raises(ValueError):
    append_kv(k, v, new, new, torch.tensor([200], dtype=torch.int32), slots=slots)  # row 199: not committed
append_kv(k, v, new, new, torch.tensor([41], dtype=torch.int32), slots=slots)       # row 40: committed
assert torch.equal(k[slot, :40], x) and k[slot, 40].eq(1).all() and v[slot, 40].eq(1).all()
for what in (lambda: pickle.dumps(k), lambda: copy.deepcopy(v[slot]), lambda: k.share_memory_(),
             lambda: k.untyped_storage().fill_(1), lambda: v.storage().tolist()):
    with pytest.raises(TypeError):
        what()
del k, v
gc.collect()
s = pool.stats()
assert s["mapped_pages"] == 0 and s["free_pages"] == s["created_pages"], s  # nothing kept alive by the record
""",
        env=LAX,
    )


def test_view_after_close_reads_zeros_and_says_released():
    check_scenario(
        PRELUDE
        + """
cache, slot, x = filled()
pool = cache.pool
k = cache.key(0)
buf = k.source
assert "<released>" not in repr(k) and "<released>" not in repr(buf)
cache.close()
assert pool.stats()["mapped_pages"] == 0      # close() returns the pages at once
assert repr(k).endswith("<released>)") and repr(buf).endswith("<released>)"), (repr(k), repr(buf))
print(k, buf)
assert float(k.sum()) == 0.0 and torch.count_nonzero(k[slot, :40]) == 0   # stale views read zeros
try:
    buf.commit(0)
except ValueError as e:
    assert "closed" in str(e)
else:
    raise AssertionError("commit after close did not raise")
""",
        env=LAX,
    )


def test_virtual_tensor_repr_after_release():
    check_scenario(
        """
import torch
from torch_vkv import VirtualKVTensor
t = VirtualKVTensor.empty((4, 1024), dtype=torch.uint8, device="cpu", page_size=4096)
t.commit(1)
t[1] = 7
assert "committed_bytes=4096" in repr(t)
t.release()
assert "committed_bytes=0" in repr(t) and int(t.sum()) == 0
t.commit(2)   # release() keeps the tensor usable
t.close()
assert t.closed and repr(t).endswith("<released>)"), repr(t)
print(t)
""",
        env=LAX,
    )


# ------------------------------------------------- the view type itself
def test_views_are_plain_for_ops_compile_and_static_addresses():
    with KVCache(2, 2, 8, max_batch_size=2, max_seq_len=128, dtype=torch.float32, device="cpu",
                 page_size=4096) as cache:
        slots = [cache.alloc(), cache.alloc()]
        for slot in slots:
            cache.reserve(slot, 64)
        k = cache.key(1)
        assert type(k) is VirtualKVView and isinstance(k, torch.Tensor)
        assert k.data_ptr() == cache._buffers[2].data_ptr() and k.stride() == cache._buffers[2][:, :128].stride()
        for out in (k[0], k + 1, k.sum(), k[:, :4].reshape(-1), torch.nn.functional.relu(k[0]), k.narrow(1, 0, 3)):
            assert type(out) is torch.Tensor
        torch._dynamo.mark_static_address(k)

        @torch.compile(fullgraph=True)
        def append_and_score(cache_k, x, pos, q):
            cache_k[:, pos] = x
            return (cache_k[:, : pos + 1] * q).sum(dim=(-1, -2))

        k[:, :10] = torch.randn(2, 10, 2, 8)
        x, q = torch.randn(2, 2, 8), torch.randn(2, 8)
        rows = k[:, :10].clone()
        rows[:, 9] = x
        ref = (rows.double() * q.double()).sum(dim=(-1, -2))
        out = append_and_score(k, x, 9, q)
        assert type(out) is torch.Tensor
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)  # float32 against a float64 reference
        assert torch.equal(k[:, 9], x)


def test_views_pass_custom_ops_in_compiled_graphs():
    """torch.compile's first call checks custom ops' inputs and refuses tensor
    subclasses other than parameters: the views must get through."""

    @torch.library.custom_op("torch_vkv_test::write_row", mutates_args=("k",))
    def write_row(k: torch.Tensor, x: torch.Tensor, pos: int) -> None:
        k[:, pos].copy_(x)

    @write_row.register_fake
    def _(k, x, pos):
        return None

    with KVCache(1, 2, 8, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu",
                 page_size=4096) as cache:
        for slot in (cache.alloc(), cache.alloc()):
            cache.reserve(slot, 64)
        k = cache.key(0)
        assert isinstance(k, torch.nn.Parameter) and not k.requires_grad

        @torch.compile(fullgraph=True)
        def step(k, x, pos):
            write_row(k, x, pos)
            return k[:, : pos + 1].sum(dim=(1, 2, 3))

        x = torch.randn(2, 2, 8)
        out = step(k, x, 3)
        assert torch.equal(k[:, 3], x)
        torch.testing.assert_close(out.double(), k[:, :4].double().sum(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)


def test_view_of_checks_its_arguments():
    t = VirtualKVTensor.empty((2, 64, 4), dtype=torch.float32, device="cpu", page_size=4096)
    with pytest.raises(TypeError, match="source: expected a VirtualKVTensor"):
        VirtualKVView.of(torch.zeros(2, 2), t)
    with pytest.raises(ValueError, match="over the source's storage"):
        VirtualKVView.of(t, torch.zeros(2, 64, 4))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        VirtualKVView.of(t, t[0, 0])


# ------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_repr_reads_no_uncommitted_row_and_context_stays_healthy():
    """Printing every tensor we hand out on CUDA, before and after close(),
    reads no uncommitted row: the CUDA context is healthy afterwards."""
    check_scenario(
        """
import gc, torch
from torch_vkv import KVCache
for layout in ("per_layer", "interleaved"):
    cache = KVCache(2, 8, 128, max_batch_size=4, max_seq_len=4096, dtype=torch.bfloat16, device="cuda",
                    layout=layout)
    slot = cache.alloc()
    cache.reserve(slot, 100)
    cache.key(0)[slot, :100] = 1.0
    k = cache.key(0)
    for t in (k, cache.value(1), cache._buffers[0]):
        print(t)
        print(str(t), f"{t}")
    rows = k.committed_rows()
    assert rows[slot] >= 100 and all(r == 0 for s, r in enumerate(rows) if s != slot), rows
    cache.close()
    assert repr(k).endswith("<released>)"), repr(k)
    print(k, k.source)
    del cache, k
    gc.collect()
torch.cuda.synchronize()
x = torch.randn(1024, 1024, device="cuda")
assert torch.isfinite((x @ x).sum()).item()
torch.cuda.synchronize()
""",
        timeout=300,
    )


@pytest.mark.cuda
def test_cuda_view_outlives_a_dropped_cache():
    check_scenario(
        """
import gc, torch
from torch_vkv import KVCache
cache = KVCache(2, 8, 128, max_batch_size=2, max_seq_len=4096, dtype=torch.float16, device="cuda")
slot = cache.alloc()
cache.reserve(slot, 100)
x = torch.randn(100, 8, 128, device="cuda", dtype=torch.float16)
cache.key(0)[slot, :100] = x
k = cache.key(0)
del cache
gc.collect()
torch.cuda.synchronize()
assert torch.equal(k[slot, :100], x)
k[slot, :100] = 2 * x
assert torch.equal(k[slot, :100], 2 * x)
print(k)
del k
gc.collect()
torch.cuda.synchronize()
y = torch.randn(256, 256, device="cuda")
assert torch.isfinite(y.sum()).item()
""",
        timeout=300,
    )


# ------------------------------------------------------- writes through a view
# A write to an uncommitted row faults (SIGSEGV on the host backend, an illegal address on CUDA).
# Writes through the view itself are checked first; each scenario runs in a child, so a missed
# check fails the test instead of killing pytest.

WRITES = {
    "zero_": "k.zero_()",
    "copy_": "k.copy_(torch.ones_like(k))",
    "fill_": "k.fill_(1.0)",
    "iadd": "k += 1",
    "row past the committed ones": "k[slot, k.committed_rows()[slot]] = 1.0",
    "row 0 of every slot": "k[:, 0] = 1.0",
    "negative row": "k[slot, -1] = 1.0",
    "slice of rows": "k[slot, 30:k.committed_rows()[slot] + 5] = 1.0",
    "numpy ints": "k[np.int64(slot), np.int64(k.committed_rows()[slot])] = 1.0",
    "0-d tensor row": "k[slot, torch.tensor(k.committed_rows()[slot])] = 1.0",
    "bool index": "k[True] = 1.0",
    "list of slots": "k[[slot, 1], 0] = 1.0",
    "tensor of rows": "k[slot, torch.tensor([2, k.committed_rows()[slot]])] = 1.0",
    # Index forms that were passed through unchecked (and faulted): NumPy arrays, masks, ranges,
    # tuples of rows, 2-D index tensors, Ellipsis and None.
    "numpy array of rows": "k[slot, np.array([2, k.committed_rows()[slot]])] = 1.0",
    "0-d numpy row": "k[slot, np.array(k.committed_rows()[slot])] = 1.0",
    "bool tensor mask of rows": "k[slot, torch.arange(256) >= 30] = 1.0",
    "numpy bool mask of rows": "k[slot, np.arange(256) >= 30] = 1.0",
    "list of bools": "k[slot, [r >= 30 for r in range(256)]] = 1.0",
    "2-D bool mask of slots and rows": "k[torch.ones(3, 256, dtype=torch.bool)] = 1.0",
    "range of rows": "k[slot, range(30, 256)] = 1.0",
    "tuple of rows": "k[slot, (2, k.committed_rows()[slot])] = 1.0",
    "2-D tensor of rows": "k[slot, torch.tensor([[2, k.committed_rows()[slot]]])] = 1.0",
    "Ellipsis after the slot": "k[slot, ...] = 1.0",
    "Ellipsis first": "k[..., 0] = 1.0",
    "None before the slot": "k[None, slot, k.committed_rows()[slot]] = 1.0",
    # In-place methods past the hand-picked few faulted (SIGSEGV): every method that writes
    # the view's data is checked, the ones writing chosen places against the places they address.
    "exp_": "k.exp_()",
    "neg_": "k.neg_()",
    "ipow": "k **= 2",
    "masked_fill_": "k.masked_fill_(torch.ones(3, 256, 1, 1, dtype=torch.bool), 1.0)",
    "masked_scatter_": "k.masked_scatter_(torch.ones_like(k, dtype=torch.bool), torch.ones_like(k))",
    "index_fill_ of a slot": "k.index_fill_(0, torch.tensor([1]), 1.0)",
    "index_copy_ of a row": "k.index_copy_(1, torch.tensor([k.committed_rows()[slot]]), torch.ones(3, 1, 2, 8))",
    "index_add_ of a row": "k.index_add_(1, torch.tensor([255]), torch.ones(3, 1, 2, 8))",
    "index_put_": "k.index_put_((torch.tensor([slot]), torch.tensor([k.committed_rows()[slot]])), torch.tensor(1.0))",
    "scatter_ along rows": "k.scatter_(1, torch.full((1, 1, 2, 8), 255), 1.0)",
    "scatter_add_ along slots": "k.scatter_add_(0, torch.full((1, 1, 2, 8), 2), torch.ones(1, 1, 2, 8))",
    "put_": "k.put_(torch.tensor([k.numel() - 1]), torch.tensor([1.0]))",
    # torch takes a uint8 index as a mask (row 200 here), not as the row indices 0 and 1 (SIGSEGV).
    "index_put_ with a uint8 row mask":
        "k.index_put_((torch.tensor([slot]), (torch.arange(256) == 200).to(torch.uint8)), torch.tensor(1.0))",
    "uint8 row mask": "k[slot, (torch.arange(256) == 200).to(torch.uint8)] = torch.ones(1, 2, 8)",
    # An augmented assignment writes in its in-place step, before the checked __setitem__ (SIGSEGV):
    # indexing the view checks the rows when the calling bytecode is one (_view_writes._getitem).
    "augmented assignment to a row": "k[slot, k.committed_rows()[slot]] += 1.0",
    "augmented assignment to rows": "k[slot, 30:k.committed_rows()[slot] + 5] *= 2",
    "augmented assignment to a slot": "k[1] -= 1.0",
    "augmented assignment to a slice of slots": "k[1:3] += 1.0",  # BINARY_SLICE from Python 3.12 on
    "augmented assignment with a mask": "k[slot, torch.arange(256) >= 30] += torch.ones(2, 8)",
    # In a loop CPython 3.11-3.12 specialise the subscript (its f_lasti then points at an inline cache entry):
    # the first iterations raised, a later one faulted.
    "augmented assignments in a loop": "for s in [slot] * 40 + [1]: k[s, 0] += 0.0",  # slot 1: nothing committed
    "NumPy uint8 row mask": "k[slot, (np.arange(256) == 200).astype(np.uint8)] = torch.ones(1, 2, 8)",
    # An in-place method on what indexing returned (a plain tensor) wrote unchecked (SIGSEGV): when it is called
    # on the result at once, the subscript checks the rows as a write (_view_writes._method_called_on_result).
    "zero_ of an indexed slot": "k[slot].zero_()",
    "fill_ of indexed slots": "k[0:2].fill_(1.0)",
    "mul_ of indexed rows": "k[slot, 30:].mul_(2.0)",
    "copy_ into an indexed slot": "k[slot].copy_(torch.ones(256, 2, 8))",
    "mul_ in a loop": "for s in [slot] * 40 + [1]: k[s, 0].mul_(1.0)",  # slot 1: nothing committed
}


WRITE_SCENARIO = """
for layout in ("per_layer", "interleaved"):
    cache, slot, x = filled(layout)
    k = cache.key(0)
    try:
        {write}
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError(f"{{layout}}: no error")
    assert "committed" in msg and "slot" in msg and "rows [" in msg, (layout, msg)
    assert torch.equal(k[slot, :40], x), layout
"""


@pytest.fixture(scope="module")
def write_outcomes() -> dict[str, str | None]:
    """Every write of WRITES in as few child processes as possible (a child's start, importing torch, is
    most of its time; a write that crashes its child fails alone and the rest run in a new one)."""
    return run_cases({name: WRITE_SCENARIO.format(write=code) for name, code in WRITES.items()},
                     PRELUDE + "import numpy as np\n", env=LAX)  # fmt: skip


@pytest.mark.parametrize("write", list(WRITES), ids=list(WRITES))
def test_writes_to_uncommitted_rows_raise_and_change_nothing(write, write_outcomes):
    """The checked writes raise ValueError naming the slot, the committed rows
    and the end of the write; the committed rows keep their values. Both layouts."""
    failure = write_outcomes[write]
    assert failure is None, failure


# _view_writes' bytecode test on its own (no torch: any interpreter on the machine can run it).
AUGMENTED_PROBE = """
import dis, sys
src = open(sys.argv[1]).read()
ns = {"dis": dis, "Any": object}
exec("from __future__ import annotations\\n" + src[src.index("def _augmented_subscript_patterns"):src.index("def _getitem")], ns)
class V:
    log = []
    def __getitem__(self, i):
        self.log.append(ns["_in_augmented_assignment"](sys._getframe(1)))
        return 0
    def __setitem__(self, i, x):
        pass
v = V()
v[1, 2:3] += 1          # augmented: True
v[1:3] += 1             # BINARY_SLICE from 3.12 on: True
v[0] -= 2 * v[5]        # True, then the read v[5]: False
x, y = v[7], v[1:2]     # reads: False, False
import operator; operator.getitem(v, 9)  # called, not a subscript: False
print(v.log)
def loop(v):  # warm: CPython 3.11-3.12 specialise the subscript, and f_lasti then points at its inline cache
    for _ in range(40):
        v[1, 2] += 1
        v[1:2] += 1
        x = v[3]
V.log = []
loop(V())
print(V.log.count(True), V.log.count(False))
class Any_:
    def __getattr__(self, name):
        return lambda *a: None
class W:  # the method looked up on the result at once (view[i].zero_()): its name, else None
    log = []
    def __getitem__(self, i):
        f = sys._getframe(1)
        self.log.append(ns["_method_called_on_result"](f, ns["_subscript_at"](f)))
        return Any_()
w = W()
w[1].zero_()
w[2:3].fill_(1.0)
x = w[4]
w[5].shape
print(W.log)
def warm(w):
    for _ in range(40):
        w[1, 2].add_(1)
        w[1:2].mul_(2)
W.log = []
warm(W())
print(W.log.count("add_"), W.log.count("mul_"), len(W.log))
"""


def _interpreter(version: str) -> str | None:
    """A working ``python<version>``: on PATH, or installed by pyenv (whose shims fail for versions
    that are installed but not selected)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in [shutil.which(f"python{version}"), *sorted(map(str, pyenv.glob(f"{version}.*/bin/python{version}")))]:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True, timeout=30).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13", "3.14"])
def test_augmented_assignment_is_told_from_a_read_in_each_python(version):
    """The bytecode of ``x[i] op= y`` differs between Python versions (``DUP_TOP_TWO``; ``COPY 2``
    twice; ``COPY 3`` three times before 3.12's ``BINARY_SLICE``): each interpreter on this machine runs
    the detection on the same statements."""
    python = sys.executable if sys.version.startswith(version + ".") else _interpreter(version)
    if python is None:
        pytest.skip(f"no python{version} on this machine")
    source = Path(__file__).resolve().parents[1] / "torch_vkv" / "_view_writes.py"
    proc = subprocess.run([python, "-c", AUGMENTED_PROBE, str(source)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, warm, methods, warm_methods = proc.stdout.splitlines()
    assert first.split() == ["[True,", "True,", "True,", "False,", "False,", "False,", "False]"]
    assert warm.split() == ["80", "40"]  # every augmented assignment of a warm loop seen, no read taken for one
    assert methods == "['zero_', 'fill_', None, 'shape']"  # _getitem checks only in-place writers
    assert warm_methods.split() == ["40", "40", "80"]


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_writes_within_committed_rows_still_work(layout):
    check_scenario(PRELUDE + f"""
cache, slot, x = filled({layout!r})
k = cache.key(0)
rows = k.committed_rows()[slot]
assert rows >= 40
k[slot, rows - 1] = 3.0
k[slot, :rows] += 0  # a plain tensor view: unchecked, and within the rows
k[slot, 2:4] = torch.zeros(2, 2, 8)
assert float(k[slot, rows - 1].sum()) == 3.0 * 16 and float(k[slot, 2:4].abs().sum()) == 0
import numpy as np
k[slot, np.array([0, rows - 1])] = 5.0            # index forms checked like ints and slices
k[slot, torch.arange(256) < rows] += 0
k[slot, (torch.arange(256) < rows).to(torch.uint8)] += 0  # a uint8 mask: torch takes it as a bool one
k[slot, range(rows)] = k[slot, :rows].clone()
k[slot, :rows, ..., 0] = 5.0
k[None, slot, :rows] = k[slot, :rows].clone()
assert float(k[slot, rows - 1, 0, 0]) == 5.0
# Writes of chosen places are checked against those places only: slots 1 and 2 are empty.
k.index_put_((torch.tensor([slot]), torch.tensor([rows - 1])), torch.tensor(7.0))
k.masked_fill_((torch.arange(256) < torch.tensor([[rows], [0], [0]]))[:, :, None, None], 0.5)  # slot 0's rows
k.scatter_(1, torch.full((1, 1, 2, 8), rows - 1), 2.0)
k.put_(torch.tensor([0]), torch.tensor([4.0]))
assert float(k[slot, rows - 1, 1, 7]) == 2.0 and float(k[slot, 0, 0, 0]) == 4.0 and float(k[slot, 1, 0, 0]) == 0.5
cache.commit(slot, 256)
for other in (1, 2):
    cache.commit(cache.alloc(), 256)
k.exp_()
k.index_copy_(1, torch.tensor([255]), torch.ones(3, 1, 2, 8))
k.zero_()  # every row of every slot is committed now
k.copy_(torch.ones_like(k))
assert float(k.sum()) == k.numel()
""", env=LAX)


def test_writes_through_a_view_kept_after_close_raise():
    check_scenario(PRELUDE + """
cache, slot, x = filled()
k = cache.key(0)
cache.close()
for write in (lambda: k.__setitem__((slot, 0), 2.0), k.zero_, lambda: k.fill_(1.0)):
    try:
        write()
    except RuntimeError as e:
        assert "closed" in str(e), e
    else:
        raise AssertionError("no error")
""", env=LAX)


def test_tensors_derived_from_a_view_take_writes_after_close():
    """A slice, a detached view or a NumPy array of a cache view, kept past close(), used to
    segfault on its first write (the pages were put back read-only). close() now gives the
    range writable memory of its own: the write lands there, never in a page of the pool."""
    check_scenario(PRELUDE + """
from torch_vkv import PagePool
pool = PagePool("cpu", page_size=4096)
a = KVCache(2, 2, 8, max_batch_size=3, max_seq_len=256, dtype=torch.float32, pool=pool)
slot = a.alloc()
a.commit(slot, 256)
k = a.key(0)
row, rows, plain, arr = k[slot], k[slot, :40], k.detach(), k[slot].numpy()
a.close()
assert pool.stats()["mapped_pages"] == 0
b = KVCache(2, 2, 8, max_batch_size=3, max_seq_len=256, dtype=torch.float32, pool=pool)
b_slot = b.alloc()
b.commit(b_slot, 256)   # takes the pages a gave back
b.key(0)[b_slot] = 0.0
row[0] = 1.0
rows.fill_(2.0)
plain[slot, 100:] = 3.0
arr[50] = 4.0
plain.add_(1.0)         # every row, none ever committed
assert float(rows.sum()) == 3.0 * rows.numel(), float(rows.sum())
assert int(torch.count_nonzero(b.key(0)[b_slot])) == 0   # nothing reached b's pages
del a, k, row, rows, plain, arr
gc.collect()
b.close()
""", env=LAX)


def test_close_while_another_thread_writes_through_the_view():
    """One thread writes through a view (checked) and a row of it (unchecked) while another
    closes the cache: each write lands or raises RuntimeError; none faults."""
    check_scenario(PRELUDE + """
import threading
for _ in range(20):
    cache = KVCache(2, 2, 8, max_batch_size=2, max_seq_len=4096, dtype=torch.float32, device="cpu",
                    page_size=4096)
    slot = cache.alloc()
    cache.commit(slot, 4096)
    k = cache.key(0)
    row = k[slot]
    errors = []
    def write():
        try:
            for i in range(4000):
                row[i] = 1.0
                k[slot, i] = 2.0
        except RuntimeError as e:
            errors.append(e)
    t = threading.Thread(target=write)
    t.start()
    cache.close()
    t.join()
    assert all("closed" in str(e) for e in errors), errors
""", env=LAX, timeout=300)


def test_checked_writes_trace_under_torch_compile():
    """In-place ops on a view compile (fullgraph): the check runs eagerly only."""
    cache = KVCache(2, 2, 8, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu", page_size=4096)
    for _ in range(2):
        cache.commit(cache.alloc(), 64)
    k = cache.key(0)
    fn = torch.compile(lambda view, x: (view.add_(1.0), x + 1), fullgraph=True, backend="eager")
    fn(k, torch.ones(2))
    assert float(k[0, 0, 0, 0]) == 1.0

    def bump(view):
        view[1, :4] += 1.0  # the augmented-assignment check of indexing (eager only)
        return view[1, :4].sum()

    assert float(torch.compile(bump, fullgraph=True, backend="eager")(k)) == 2.0 * 4 * 2 * 8  # add_ made them 1
    assert float(k[1, 0, 0, 0]) == 2.0 and float(k[1, 4, 0, 0]) == 1.0
    k[False] = 5.0  # writes nothing
    assert float(k[0, 0, 0, 0]) == 1.0
    cache.close()


@pytest.mark.parametrize("call", [
    lambda k: k.transpose_(1, 2), lambda k: k.t_() if k.dim() == 2 else k.swapaxes_(0, 1), lambda k: k.unsqueeze_(0),
    lambda k: k.squeeze_(), lambda k: k.as_strided_((2,), (1,)), lambda k: k.set_(torch.zeros(3)),
    lambda k: k.resize_(3), lambda k: k.swapdims_(2, 3),
])  # fmt: skip
def test_in_place_reshapes_of_the_shared_view_raise_and_change_nothing(call):
    """``KVCache.key(l)`` returns the same object to every caller (kernels, engine, HF adapter): an in-place
    transpose or resize of it would change the cache for all of them. TypeError naming what to use instead."""
    with KVCache(1, 2, 8, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu",
                 page_size=4096) as cache:  # fmt: skip
        k = cache.key(0)
        shape, stride, ptr = tuple(k.shape), k.stride(), k.data_ptr()
        with pytest.raises(TypeError, match=r"shared .* expected (the out-of-place \w+\(\.\.\.\)|a new tensor)"):
            call(k)
        assert cache.key(0) is k and (tuple(k.shape), k.stride(), k.data_ptr()) == (shape, stride, ptr)
        assert k.transpose(1, 2).shape == (2, 2, 64, 8)  # the out-of-place view is fine
        assert k.detach_() is k and not k.requires_grad  # metadata that keeps the shape: allowed


def test_assigning_data_or_requires_grad_of_the_shared_view_raises():
    """``view.data = t`` re-pointed the one view every caller holds (as ``set_``); ``requires_grad_(True)``
    made the cache's in-place writes autograd errors and attention's outputs require grad."""
    with KVCache(1, 2, 8, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu",
                 page_size=4096) as cache:  # fmt: skip
        k = cache.key(0)
        ptr = k.data_ptr()
        with pytest.raises(TypeError, match="data: a cache's view is shared"):
            k.data = torch.zeros(2, 64, 2, 8)
        with pytest.raises(TypeError, match="expected requires_grad=False, got True"):
            k.requires_grad_(True)
        with pytest.raises(TypeError, match="expected requires_grad=False, got True"):
            k.requires_grad = True
        assert k.data_ptr() == ptr and not k.requires_grad and cache.key(0) is k
        assert type(k.data) is torch.Tensor and k.data.data_ptr() == ptr  # reading .data is as before
        k.requires_grad_(False)
        k.requires_grad = False


def test_in_place_methods_on_indexed_committed_rows_still_write():
    """The check of ``view[index].method_()`` refuses only rows that are not committed: whole-result writes
    into committed rows, and the chosen-places methods (which may write fewer places than indexed), work."""
    check_scenario(PRELUDE + """
cache, slot, x = filled("per_layer")
k = cache.key(0)
k[slot, :40].zero_()
assert k[slot, :40].abs().sum().item() == 0.0
for i in range(40):  # specialised subscripts in a loop
    k[slot, i].add_(1.0)
assert torch.equal(k[slot, :40], torch.ones(40, 2, 8))
k[slot].index_fill_(0, torch.tensor([3]), 5.0)  # row 3 only: committed
assert k[slot, 3].eq(5.0).all() and k[slot, 4].eq(1.0).all()
t = k[slot]  # a read kept and written later is not seen: only a method called on the result at once
assert t.shape == (256, 2, 8)
""", env=LAX)
