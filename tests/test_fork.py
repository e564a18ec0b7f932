"""fork() after creating a cache (issue 8, item 4).

A child inherits the parent's caches as memory: its writes must not reach the
parent, destroying or closing its copy must not touch the parent's pages, it
must never wait for the parent's committer thread, and every operation of the
core on an inherited object raises RuntimeError. Each scenario forks inside a
fresh interpreter (tests/_subprocess.py) with timeouts, so a hang or a crash
is a failed test.
"""

from __future__ import annotations

import pytest

from _subprocess import check_scenario

PRELUDE = """
import gc, os, signal, sys, time
import torch
from torch_vkv import KVCache

def make():
    return KVCache(2, 2, 8, max_batch_size=2, max_seq_len=256, dtype=torch.float32, device="cpu", page_size=4096)

def fork_and_wait(child, timeout=30.0):
    # Runs child() in a forked child that then exits normally (sys.exit:
    # interpreter teardown, destructors and all). Returns its exit code and
    # how long it took; a child still alive after `timeout` s is a hang.
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child()
        except SystemExit:  # a nested fork_and_wait's child exiting: let it
            raise
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.exit(code)
    while time.monotonic() - t0 < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - t0
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the child did not exit within {timeout} s: it hangs")

def raises_forked(fn, what):
    # A core object inherited from the parent refuses to work in the child.
    try:
        fn()
    except RuntimeError as e:
        # The C++ object's message, or the Python wrapper's (KVCache, PagePool), which checks first.
        msg = str(e)
        assert f"created in process {os.getppid()}" in msg and "in the child" in msg, (what, msg)
    else:
        raise AssertionError(f"{what} did not raise in the child")

# How long a forked child of this interpreter takes to exit with no cache in
# the process at all: tearing down an interpreter that imported torch takes
# seconds on a loaded 2-core machine (copy-on-write faults all over the heap).
BASELINE = fork_and_wait(lambda: None)[1]

def filled():
    cache = make()
    slot = cache.alloc()
    cache.reserve(slot, 64)
    x = torch.randn(64, 2, 8)
    cache.key(0)[slot, :64] = x
    return cache, slot, x
"""


def test_child_writes_close_and_teardown_never_reach_the_parent():
    check_scenario(
        PRELUDE
        + """
cache, slot, x = filled()
k, v1, pool = cache.key(0), cache.value(1), cache.pool
before = pool.stats()

def child():
    buf = k.source
    assert buf.forked and cache._committer.forked and pool._core.forked
    assert torch.equal(k[slot, :64], x)          # the child reads the parent's data
    k[slot, :64] = 7.0                           # ... and writes a private copy
    v1[slot, :64] = -1.0
    assert float(k[slot, 0, 0, 0]) == 7.0
    raises_forked(lambda: buf.commit(1), "commit")
    raises_forked(lambda: buf.decommit(0), "decommit")
    raises_forked(lambda: buf.reservation.committed_ranges(), "committed_ranges")
    raises_forked(lambda: buf.release(), "release")
    raises_forked(lambda: pool.stats(), "pool.stats")
    raises_forked(lambda: pool.trim(), "pool.trim")
    raises_forked(lambda: cache._committer.submit([]), "committer.submit")
    assert "<inherited through fork()" in repr(k) and "<inherited through fork()" in repr(buf)
    for method in (lambda: cache.reserve(slot, 200), cache.close):   # KVCache's own methods raise too
        try:
            method()
        except RuntimeError:
            pass
        else:
            raise AssertionError("a KVCache method worked in the child")

code, seconds = fork_and_wait(child)
assert code == 0, code
assert torch.equal(k[slot, :64], x)                       # the child's writes stayed in the child
assert torch.count_nonzero(cache.value(1)[slot, :64]) == 0
after = pool.stats()
for key in ("created_pages", "mapped_pages", "free_pages", "pages_destroyed_total", "unmap_calls"):
    assert after[key] == before[key], (key, before[key], after[key])
print("the child exited in", round(seconds, 2), "s")
""",
        timeout=120,
    )


def test_destroying_the_inherited_cache_in_the_child_leaves_the_parent_intact():
    check_scenario(
        PRELUDE
        + """
cache, slot, x = filled()
k = cache.key(0)
cache.reserve(slot, 200)   # more pages, all committed before the fork

def child():
    global cache, k
    del cache, k           # no punch-hole, no zeroing, no join in the child
    gc.collect()

code, seconds = fork_and_wait(child)
assert code == 0, code
assert torch.equal(k[slot, :64], x)
s = cache.pool.stats()
assert s["mapped_pages"] == 4 * 4 and s["pages_destroyed_total"] == 0, s   # 4 buffers x 4 pages of 64 tokens
""",
        timeout=120,
    )


@pytest.mark.parametrize("pending", [False, True], ids=["idle", "step_async_pending"])
def test_child_exits_promptly_whether_or_not_it_touched_the_cache(pending):
    check_scenario(
        PRELUDE
        + f"""
cache, slot, x = filled()
if {pending}:
    cache.step_async([200, 0])   # a background commit may be in flight at fork()

k0 = cache.key(0)   # views taken in the parent stay readable and writable (privately) in the child

def untouched():
    pass

def touched():
    assert torch.equal(k0[slot, :64], x)
    k0[slot, 0] = 3.0

for child in (untouched, touched):
    code, seconds = fork_and_wait(child)
    assert code == 0, (child.__name__, code)
    # Prompt: at most 5 s more than a child of a process without any cache.
    assert seconds < BASELINE + 5.0, (child.__name__, seconds, BASELINE)
    print(child.__name__, round(seconds, 2), "baseline", round(BASELINE, 2))
cache.synchronize()
""",
        timeout=120,
    )


def test_step_async_and_synchronize_in_the_child_raise_and_the_parent_keeps_working():
    check_scenario(
        PRELUDE
        + """
cache, slot, x = filled()
cache.step_async([100, 0])      # maybe still pending when the child starts

def child():
    # synchronize() waits for the parent's ticket: it raises (the committer
    # is the parent's) or, with nothing left to wait for, returns; it never hangs.
    for fn in (cache.synchronize, cache.synchronize):
        try:
            fn()
        except RuntimeError:
            pass
    try:
        cache.step_async([150, 0])
    except RuntimeError:
        pass
    else:
        raise AssertionError("step_async worked in the child")
    raises_forked(lambda: cache._committer.wait(1), "committer.wait")

code, seconds = fork_and_wait(child)
assert code == 0, code
assert seconds < BASELINE + 5.0, (seconds, BASELINE)
# The parent goes on as if nothing happened.
cache.synchronize()
cache.step_async([230, 0])
cache.synchronize()
assert cache.committed_tokens(slot) >= 231
y = torch.randn(230, 2, 8)
cache.key(1)[slot, :230] = y
assert torch.equal(cache.key(1)[slot, :230], y) and torch.equal(cache.key(0)[slot, :64], x)
other = cache.alloc()
cache.reserve(other, 10)
cache.close()
assert cache.pool.stats()["mapped_pages"] == 0
""",
        timeout=120,
    )


def test_nested_fork_keeps_each_process_private():
    check_scenario(
        PRELUDE
        + """
cache, slot, x = filled()
k = cache.key(0)

def grandchild():
    assert float(k[slot, 0, 0, 0]) == 7.0      # what its parent (the child) wrote, not the memfd's bytes
    k[slot, :64] = 9.0

def child():
    k[slot, :64] = 7.0
    code, _ = fork_and_wait(grandchild)
    assert code == 0, code
    assert float(k[slot, :64].min()) == 7.0 == float(k[slot, :64].max())

code, _ = fork_and_wait(child)
assert code == 0, code
assert torch.equal(k[slot, :64], x)
""",
        timeout=180,
    )


def test_child_writes_past_the_inherited_pages_raise_not_fault():
    """A forked child's writes through a view are checked against its own copy of the page table
    (``Reservation.inherited_ranges``): past what was mapped at fork() they raise ``ValueError``
    (before: SIGSEGV, the child killed), within it they write the child's private copy."""
    check_scenario(
        PRELUDE
        + """
cache, slot, x = filled()          # 64 rows committed: 2 pages of 32 rows
k = cache.key(0)

def child():
    assert k.source.forked
    for write in (lambda: k.__setitem__((slot, 200), 1.0), lambda: k.__setitem__((slot, slice(60, 70)), 1.0),
                  lambda: k.zero_()):
        try:
            write()
        except ValueError as e:
            assert f"rows written in slot {slot}" in str(e) and "leading 64" in str(e), str(e)
        else:
            raise AssertionError("a write past the inherited pages did not raise")
    k[slot, 10:20] = 5.0                       # within them: the child's private copy
    assert float(k[slot, 15, 0, 0]) == 5.0

code, _ = fork_and_wait(child)
assert code == 0, code
assert torch.equal(k[slot, :64], x)            # the parent's rows are untouched
try:
    k[slot, 200] = 1.0
except ValueError:
    pass
else:
    raise AssertionError("the parent's check broke")
""",
        timeout=120,
    )
