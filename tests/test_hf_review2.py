"""Second review of the Hugging Face adapter, as a new user of the documented API: each test
here failed before its fix (or pins a behaviour the review checked and the docs now state)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_vkv.hf import VirtualKVCache  # noqa: E402

from _hf_models import generate, prompts, tiny_config, tiny_model  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")


# -- max_cache_len past the address space ------------------------------------------------------------
# tiny_config: 2 layers x K and V x 2 KV heads x 16 dims = 128 elements a token; with 2 rows the
# 128 TiB address space holds 2**47 // (2 * 128 * itemsize) tokens a row.
FITS_NO_DTYPE = 2**47 // (2 * 128 * 1)  # the smallest floating dtype (1 byte)
FITS_FLOAT32 = 2**47 // (2 * 128 * 4)


def test_max_cache_len_that_no_dtype_fits_is_refused_at_construction_naming_it():
    """Was accepted (device and dtype default to the first update's), then the first generate()
    raised 'max_seq_len: ...', an argument the user never passed."""
    with pytest.raises(ValueError, match=rf"max_cache_len: expected at most {FITS_NO_DTYPE} tokens .* got {10**12}"):
        VirtualKVCache(tiny_config("llama"), 2, 10**12)
    with pytest.raises(ValueError, match=rf"max_cache_len: expected at most {FITS_FLOAT32} tokens .* got {2 * 10**11}"):
        VirtualKVCache(tiny_config("llama"), 2, 2 * 10**11, dtype=torch.float32)


def test_max_cache_len_that_the_models_dtype_does_not_fit_is_refused_naming_it():
    """Without a dtype, the size is known at the first update: the error names max_cache_len and
    the cache stays empty and usable."""
    model = tiny_model("llama", "sdpa")  # float32
    cache = VirtualKVCache(model.config, 2, 2 * 10**11)  # fits a 1-byte dtype, not float32
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match=rf"max_cache_len: expected at most {FITS_FLOAT32} tokens .* got {2 * 10**11}"):
        generate(model, ids, mask, cache, max_new_tokens=2)
    assert cache.kv_cache is None and cache.mode is None and cache.get_seq_length() == 0


# -- threads -------------------------------------------------------------------------------------------
def _in_thread(fn, worker=None):
    """Runs ``fn()`` in ``worker`` (a one-thread executor that keeps its thread alive, so two
    workers are two live threads) or a new thread; returns its result or the exception it raised."""
    from concurrent.futures import ThreadPoolExecutor

    if worker is None:
        with ThreadPoolExecutor(1) as one:
            return _in_thread(fn, one)
    try:
        return worker.submit(fn).result()
    except Exception as e:  # handed back to the test
        return e


def _kv(batch=1, tokens=3):
    return torch.randn(batch, 2, tokens, 16), torch.randn(batch, 2, tokens, 16)


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_two_threads_whose_steps_overlap_on_one_cache_are_refused_until_reset(impl):
    """Two threads stepping one cache at once interleaved their tokens in the same rows (each
    step's layer 0 advanced the lengths): wrong tokens, silently. The layer that finds another
    thread's step in progress raises, and so does every later step until reset()."""
    model = tiny_model("llama", impl)
    from concurrent.futures import ThreadPoolExecutor

    cache = VirtualKVCache(model.config, 1, 64, page_size=4096)
    with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b:
        assert not isinstance(_in_thread(lambda: cache.update(*_kv(), 0), a), Exception)  # A: layer 0
        assert not isinstance(_in_thread(lambda: cache.update(*_kv(), 0), b), Exception)  # B: layer 0
        err = _in_thread(lambda: cache.update(*_kv(), 1), a)  # A: its layer 1, in B's step
        assert isinstance(err, RuntimeError) and "two threads" in str(err), err
    for layer in (1, 0):  # the step of B, and any later step of any thread: the lengths are not to be trusted
        with pytest.raises(RuntimeError, match="two threads .* cache.reset()"):
            cache.update(*_kv(), layer)
    cache.reset()
    ids, mask = prompts(1)
    from transformers import DynamicCache

    assert torch.equal(generate(model, ids, mask, cache), generate(model, ids, mask, DynamicCache(config=model.config)))


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_a_cache_handed_from_thread_to_thread_between_steps_and_one_cache_per_thread(impl):
    """Not refused: whole steps from different threads, one after the other (a server that
    continues a sequence on another worker), and threads that each have their own cache."""
    from transformers import DynamicCache

    model = tiny_model("llama", impl)
    ids, mask = prompts(2)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=6)
    cache = VirtualKVCache(model.config, 2, 64, page_size=4096)
    first = _in_thread(lambda: generate(model, ids, mask, cache, max_new_tokens=3))
    grown = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    assert torch.equal(_in_thread(lambda: generate(model, first, grown, cache, max_new_tokens=3)), ref)
    import threading

    outs = [None, None]

    def own(i):
        outs[i] = generate(model, ids, mask, VirtualKVCache(model.config, 2, 64, page_size=4096), max_new_tokens=6)

    threads = [threading.Thread(target=own, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, ref) for o in outs)


def test_two_threads_whose_first_updates_meet_build_one_kv_cache():
    """Both first updates saw no KVCache and built one each; the second replaced the first, which,
    freed, was still being written by the other thread: a SIGSEGV of the whole process (seen with
    two threads' generate() on one cache). Now the second waits, and finds the cache built."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    cache = VirtualKVCache(tiny_config("llama"), 1, 64, page_size=4096)
    builds, entered, go = [], threading.Event(), threading.Event()
    build = cache._build_kv

    def slow_build(device, dtype):
        builds.append(threading.current_thread())
        entered.set()
        go.wait(10)
        build(device, dtype)

    cache._build_kv = slow_build
    with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b:
        first = a.submit(cache.update, *_kv(), 0)
        assert entered.wait(10)
        second = b.submit(cache.update, *_kv(), 0)
        time.sleep(0.2)  # B reaches its first update while A builds
        go.set()
        first.result(10)
        second.result(10)
    assert len(builds) == 1 and cache.kv_cache is not None
