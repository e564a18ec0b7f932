"""torch_vkv.bench.timing: the CPU path of time_us (do_bench runs on CUDA) and StepClock."""

from __future__ import annotations

import time

import pytest
import torch

from torch_vkv.bench.timing import L2_FLUSHES, StepClock, host_us, time_us, time_us_graph


def test_time_us_measures_a_known_sleep():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    us = time_us(fn, torch.device("cpu"), rep_ms=20, warmup_ms=4)
    assert 1800 < us < 20000  # 2 ms sleeps; generous upper bound for a loaded 2-core machine
    # first call + estimate + ~2 warm-up + ~10 timed calls: the budgets, not a fixed count
    assert 5 <= len(calls) <= 20, len(calls)


def test_host_us_is_the_time_per_call():
    calls = []
    us = host_us(lambda: (calls.append(1), time.sleep(0.002)), torch.device("cpu"), calls=5)
    assert len(calls) == 5
    assert 2000 <= us < 20000  # each call sleeps 2 ms


def test_time_us_rejects_bad_budgets():
    with pytest.raises(ValueError, match="expected rep_ms > 0"):
        time_us(lambda: None, torch.device("cpu"), rep_ms=0, warmup_ms=1)


def test_time_us_takes_either_l2_flush_and_refuses_others():
    # The CPU has no L2 to empty: both flushes time the same loop.
    for flush in L2_FLUSHES:
        assert time_us(lambda: time.sleep(0.001), torch.device("cpu"), rep_ms=5, warmup_ms=1, l2_flush=flush) > 900
    with pytest.raises(ValueError, match=r"l2_flush: expected one of \('write', 'read'\), got 'none'"):
        time_us(lambda: None, torch.device("cpu"), rep_ms=5, warmup_ms=1, l2_flush="none")


def test_step_clock_on_the_host():
    clock = StepClock(torch.device("cpu"), 3)
    for i in range(3):
        clock.mark(i)
        time.sleep(0.001 * (i + 1))
    clock.mark(3)
    ms = clock.step_ms()
    assert len(ms) == 3
    assert all(m >= 0.9 * (i + 1) for i, m in enumerate(ms)), ms


@pytest.mark.cuda
def test_time_us_on_cuda_uses_do_bench():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    x = torch.empty(1 << 26, device="cuda")
    us = time_us(lambda: x.zero_(), torch.device("cuda"), rep_ms=20, warmup_ms=5)
    assert 1 < us < 10_000  # 256 MiB memset on a datacenter GPU


@pytest.mark.cuda
@pytest.mark.parametrize("flush", L2_FLUSHES)
def test_time_us_and_graph_replays_with_each_l2_flush(flush):
    """Both flushes time a large read alike (its bytes dwarf the L2), eager and replayed from a graph
    (skipped without a GPU by the ``cuda`` marker, see conftest)."""
    pytest.importorskip("triton")
    x = torch.rand(1 << 28, device="cuda")  # 1 GiB
    dev = torch.device("cuda")
    eager = time_us(lambda: x.sum(), dev, rep_ms=20, warmup_ms=5, l2_flush=flush)
    replay = time_us_graph(lambda: x.sum(), dev, rep_ms=20, warmup_ms=5, l2_flush=flush)
    assert 50 < eager < 20_000 and 50 < replay < 20_000  # 1 GiB read at 0.05-20 TB/s
    assert 0.8 < eager / replay < 1.25
