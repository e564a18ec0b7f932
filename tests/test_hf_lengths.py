"""torch_vkv.hf.lengths (the one owner of row lengths) and torch_vkv.hf.commit_op
(the in-graph commit safety net), on their own."""

from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("transformers")

from torch_vkv.hf import commit_op  # noqa: E402
from torch_vkv.hf.lengths import SequenceLengths, StepPlan, padding_counts  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")


def test_eager_steps_count_on_host_and_device():
    ln = SequenceLengths(4, torch.device("cpu"))
    ln.start(3, on_device=True)
    ln.advance([5, 3, 0], 5)
    ln.advance([1, 1, 1], 1)
    assert ln.rows() == [6, 4, 1] and ln.seq_length() == 6 and ln.batch == 3
    assert ln.cache_seqlens.tolist() == [6, 4, 1, 0] and int(ln.seq_length_t) == 6
    ln.set([2, 2], 2)  # a batch operation
    assert ln.cache_seqlens.tolist() == [2, 2, 0, 0] and ln.rows() == [2, 2]


def test_padded_mode_keeps_device_untouched():
    ln = SequenceLengths(2, torch.device("cpu"))
    ln.start(2, on_device=False)
    ln.advance([4, 4], 4)
    assert ln.rows() == [4, 4] and ln.cache_seqlens.tolist() == [0, 0]


def test_announced_compiled_step_is_added_without_reading_the_device():
    ln = SequenceLengths(2, torch.device("cpu"))
    ln.start(2, on_device=True)
    ln.advance([3, 2], 3)
    ln.announce(1)
    assert ln.announced == 1
    ln.advance_on_device(2, 1)  # what the traced step does
    ln.cache_seqlens.fill_(99)  # proof that settle() does not read the device here
    assert ln.report_compiled_step(1) is True
    assert ln.announced == 0
    assert ln.rows() == [4, 3] and ln.seq_length() == 4
    # A second compiled step that nobody announced: the op must read back.
    assert ln.report_compiled_step(1) is False
    # A step of other tokens than announced: the announcement's commit did not cover it.
    ln.announce(1)
    assert ln.report_compiled_step(2) is False


def test_announcement_waits_for_its_step_and_eager_step_uses_it_up():
    ln = SequenceLengths(1, torch.device("cpu"))
    ln.start(1, on_device=True)
    ln.advance([2], 2)
    ln.announce(1)
    assert ln.rows() == [2]  # nothing ran yet: host exact, announcement kept
    assert ln.announced == 1
    ln.advance([1], 1)  # the announced step ran eagerly
    assert ln.rows() == [3] and ln.announced == 0


def test_after_a_capture_unreported_steps_are_read_back():
    ln = SequenceLengths(2, torch.device("cpu"))
    ln.start(2, on_device=True)
    ln.advance([3, 1], 3)
    ln.report_capture()
    ln.announce(1)
    ln.advance_on_device(2, 1)  # a replay: no report
    ln.advance_on_device(2, 1)  # and another one
    assert ln.rows() == [5, 3] and ln.seq_length() == 5


def test_padding_counts_left_only():
    m = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert padding_counts(m, 3, 4) == [2, 4, 3]
    assert padding_counts(torch.ones(2, 3, dtype=torch.bool), 2, 3) is None
    assert padding_counts(None, 2, 3) is None
    with pytest.raises(ValueError, match="left padding"):
        padding_counts(torch.tensor([[1, 0, 1]], dtype=torch.bool), 1, 3)


def test_step_plan_packs_real_tokens():
    m = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    plan = StepPlan.build(2, 3, 0, padded=False, mask=m, real=[2, 3], device=torch.device("cpu"))
    assert plan.real_index.tolist() == [1, 2, 3, 4, 5]
    assert plan.cu_seqlens_q.tolist() == [0, 2, 5] and plan.max_seqlen_q == 3
    dense = StepPlan.build(2, 3, 4, padded=False, mask=None, real=None, device=torch.device("cpu"))
    assert dense.real_index is None and dense.cu_seqlens_q.tolist() == [0, 3, 6]
    assert plan.cache_seqlens is None and dense.cache_seqlens is None  # no rows given


def test_step_plan_metadata_carries_host_copies():
    """With the rows' lengths, a multi-token vkv step's cache_seqlens and cu_seqlens_q carry host
    copies equal to their contents (a host-planned backend then needs no sync); decode needs none."""
    from torch_vkv.attention import host_values

    m = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    for plan in (StepPlan.build(2, 3, 0, padded=False, mask=m, real=[2, 3], rows=[9, 12], device=torch.device("cpu")),
                 StepPlan.build(2, 3, 0, padded=False, mask=None, real=None, rows=[9, 12], device=torch.device("cpu"))):
        assert plan.cache_seqlens.tolist() == [9, 12] and plan.cache_seqlens.dtype == torch.int32
        for t in (plan.cache_seqlens, plan.cu_seqlens_q):
            assert host_values(t) == tuple(t.tolist())
    assert StepPlan.build(2, 1, 4, padded=False, mask=None, real=None, rows=[5, 5], device=torch.device("cpu")).cache_seqlens is None
    assert StepPlan.build(2, 1, 4, padded=False, mask=None, real=None, device=torch.device("cpu")).cu_seqlens_q is None


class _Observer:
    def __init__(self):
        self.calls = []

    def _on_compiled_step(self, cache_seqlens, seq_length_t, capturing, num_tokens):
        self.calls.append((cache_seqlens.tolist(), int(seq_length_t), capturing))


def test_ensure_committed_calls_its_cache_and_returns_zero():
    obs = _Observer()
    key = commit_op.register_cache(obs, torch.device("cpu"))
    out = commit_op.ensure_committed(torch.tensor([3, 4], dtype=torch.int32), torch.tensor(4), key, 1)
    assert out.dtype == torch.int32 and out.shape == () and int(out) == 0
    assert obs.calls == [([3, 4], 4, False)]


def test_ensure_committed_runs_at_run_time_of_a_compiled_step():
    obs = _Observer()
    key = commit_op.register_cache(obs, torch.device("cpu"))

    def step(lens, seq):
        lens = lens + 1
        return lens + commit_op.ensure_committed(lens, seq + 1, key, 1)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    lens = torch.tensor([1, 2], dtype=torch.int32)
    for i in range(3):
        lens = compiled(lens, torch.tensor(i))
    assert [c[0] for c in obs.calls] == [[2, 3], [3, 4], [4, 5]]  # once per call, after the add


def test_ensure_committed_holds_caches_weakly():
    obs = _Observer()
    key = commit_op.register_cache(obs, torch.device("cpu"))
    del obs
    gc.collect()
    out = commit_op.ensure_committed(torch.tensor([1], dtype=torch.int32), torch.tensor(1), key, 1)
    assert int(out) == 0  # no cache any more: nothing to do, no error


def test_ensure_committed_finds_each_cache_by_its_key_without_recompiling():
    """Two caches through one compiled function: each call reaches its own
    cache, and the second cache does not recompile (dynamo guards on ints,
    not on a tensor's address: an int handle recompiled for every cache)."""
    import torch._dynamo.testing

    first, second = _Observer(), _Observer()
    keys = [commit_op.register_cache(o, torch.device("cpu")) for o in (first, second)]
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(lens, seq, key):
        return lens + commit_op.ensure_committed(lens, seq, key, 1)

    lens = torch.tensor([5, 6], dtype=torch.int32)
    step(lens, torch.tensor(6), keys[0])
    step(lens + 1, torch.tensor(7), keys[1])
    assert first.calls == [([5, 6], 6, False)] and second.calls == [([6, 7], 7, False)]
    assert counter.frame_count == 1
