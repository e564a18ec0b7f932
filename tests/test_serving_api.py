"""The public serving API used as a new user would: odd orders of calls, odd
arguments, errors in the middle of a run. Every test here failed before the fix
it names.

Tiny random models (``test_serving``'s), on the CPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_serving import (  # noqa: E402
    _plain_torch_append,
    engine_for,
    greedy,
    interrupted_execute,
    make_model,
    model_of,
    reference,
)

from torch_vkv.serving import Engine, SamplingParams  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

__all__ = ["_plain_torch_append"]  # the autouse fixture, re-exported so pytest applies it here


def drain(engine) -> dict:
    """Steps ``engine`` to the end; the last output of each request."""
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step()})
    return final


# ---------------------------------------------------------------- lost outputs
def test_a_step_that_raises_keeps_the_aborted_outputs_for_the_next_step():
    """An aborted request's final output is returned by the next ``step()``.
    When that step raised (Ctrl-C in the forward, a backend error), the output
    was dropped with it: ``has_unfinished_requests()`` turned False and the
    request never ended for its caller. Now the next successful step returns it."""
    model = model_of("llama")
    want = reference(model, [7, 8, 9], 6)
    with engine_for(model) as e:
        a = e.add_request([1, 2, 3], greedy(6))
        b = e.add_request([7, 8, 9], greedy(6))
        e.step()
        assert e.abort(a)
        with interrupted_execute(e, 1):
            with pytest.raises(KeyboardInterrupt):
                e.step()
            assert e.has_unfinished_requests()
            final = drain(e)
        assert final[a].finish_reason == "abort" and final[a].finished
        assert final[b].token_ids == want and final[b].finish_reason == "length"


def test_an_aborted_requests_id_is_not_reused_before_its_final_output_is_returned():
    """``abort`` leaves the final output for the next ``step()``, but the id was free at once: ``generate``
    (or ``LLM.generate``) could number its own request with it (the counter reaches an id a user gave) and
    return that aborted output, ``token_ids == []``, as the result of its prompt; ``add_request`` took the id
    again, and the next ``step()`` returned two outputs under it, one finished and one not."""
    model = model_of("llama")
    want, want_x = reference(model, [1, 2, 3], 4), reference(model, [7, 8], 4)  # before the engine takes the model
    with engine_for(model) as e:
        e.add_request([5, 6], greedy(4), request_id="0")  # the id generate's counter gives first
        assert e.abort("0")
        out = e.generate([[1, 2, 3]], greedy(4), use_tqdm=False)[0]
        assert out.prompt_token_ids == [1, 2, 3] and out.finish_reason == "length" and out.token_ids == want
        assert out.request_id != "0"
        final = drain(e)
        assert final["0"].finish_reason == "abort" and final["0"].prompt_token_ids == [5, 6]
        e.add_request([5, 6], greedy(4), request_id="x")
        assert e.abort("x")
        with pytest.raises(ValueError, match="request_id: expected an id not used"):
            e.add_request([7, 8], greedy(4), request_id="x")
        assert [(o.request_id, o.finish_reason) for o in e.step()] == [("x", "abort")]
        assert e.add_request([7, 8], greedy(4), request_id="x") == "x"  # free once its output is returned
        assert drain(e)["x"].token_ids == want_x


def test_generate_hands_back_the_final_outputs_of_requests_it_does_not_own():
    """``generate`` serves requests added earlier with ``add_request``
    alongside its own and does not return them; but one that finished during
    the call had its final output swallowed: the caller's own ``step()`` loop
    never saw it end. Now the next ``step()`` returns it."""
    model = model_of("llama")
    want = reference(model, [9, 10, 11], 2)
    with engine_for(model) as e:
        mine = e.add_request([9, 10, 11], greedy(2))
        aborted = e.add_request([4, 5], greedy(8))
        assert e.abort(aborted)  # its final output is due at the next step, which generate takes
        e.generate([[1, 2, 3]], greedy(8), use_tqdm=False)
        assert e.has_unfinished_requests()
        final = drain(e)
        assert final[mine].token_ids == want and final[mine].finish_reason == "length"
        assert final[aborted].finish_reason == "abort"


# ------------------------------------------------------------- construction
def test_a_dtype_the_attention_cannot_run_is_refused_before_the_model_moves():
    """``Engine(model, dtype=torch.float64)`` (or a float64 model) was accepted:
    the model was converted to float64 for good and the first ``step()`` failed
    in the attention kernel ("q.dtype: expected float16, bfloat16 or float32"),
    so every later engine on that model failed too. Now the constructor refuses
    it and leaves the model as it was."""
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"dtype: expected torch.float16, torch.bfloat16 or torch.float32.*float64"):
        engine_for(model, dtype=torch.float64)
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"dtype: expected .*float32.*, got torch.float64 \(the model's"):
        engine_for(model.to(torch.float64))
    with engine_for(model, dtype=torch.float32) as e:
        assert e.generate([[1, 2, 3]], greedy(2), use_tqdm=False)[0].finish_reason == "length"


def test_a_max_seq_len_past_the_address_space_names_the_engines_slots():
    """``Engine(max_batch_size=2, max_seq_len=10**12)``'s error named
    ``max_batch_size=4`` (the KVCache's slots: the engine adds its own), a value
    the user never gave. It now says what the engine's slots are."""
    with pytest.raises(ValueError, match=r"max_seq_len: expected at most \d+ tokens: every one of the engine's \d+ "
                                         r"slots \(max_batch_size, .*got 1000000000000"):  # fmt: skip
        engine_for(model_of("llama"), max_batch_size=2, max_seq_len=10**12)


def test_a_paged_engine_too_large_to_allocate_is_a_capacity_error():
    """The paged baseline allocates its pool and block table up front: a size the
    machine cannot hold was a bare ``MemoryError`` (or the allocator's message);
    now a typed capacity error naming the sizes."""
    from torch_vkv import KVCacheCapacityError

    # Past the 128 TiB address space: refused by every allocator, whatever the machine's overcommit policy.
    with pytest.raises(KVCacheCapacityError, match=r"could not allocate its memory up front.*max_seq_len=10{12}\)"):
        engine_for(model_of("llama"), kv="paged", max_batch_size=2, max_seq_len=10**12)


def test_numpy_sizes_are_stored_as_ints():
    """``Engine(memory_budget=np.int64(...))`` kept the numpy integer:
    ``engine.memory_budget`` and ``stats()["memory_budget"]`` were
    ``np.int64``, and ``json.dumps(engine.stats())`` raised TypeError."""
    import json

    import numpy as np

    with engine_for(model_of("llama"), memory_budget=np.int64(1 << 20), page_size=np.int64(4096)) as e:
        assert type(e.memory_budget) is int and type(e.stats()["memory_budget"]) is int
        json.dumps(e.stats())
    with pytest.raises(ValueError, match=r"attention_backend: expected one of \('auto', "):
        engine_for(model_of("llama"), attention_backend="fast")


# ------------------------------------------------------------------ records
def test_an_int_too_large_for_a_float_is_a_value_error():
    """``SamplingParams(temperature=10**400)`` raised a bare OverflowError ("int
    too large to convert to float") instead of naming the field."""
    from torch_vkv.serving import SamplingParams

    with pytest.raises(ValueError, match=r"temperature: expected a finite float >= 0 \(0 is greedy\), got 1000"):
        SamplingParams(temperature=10**400)
    with pytest.raises(ValueError, match=r"top_p: expected a float in \(0, 1\], got -1000"):
        SamplingParams(top_p=-(10**400))


def test_copies_of_an_output_compare_equal():
    """``RequestOutput`` is a dataclass compared field by field, but its
    ``metrics`` (``RequestMetrics``) compared by identity: a deepcopy or a
    pickled round trip of an output never equalled the original."""
    import copy
    import pickle

    with engine_for(model_of("llama")) as e:
        out = e.generate([[1, 2, 3]], greedy(3), use_tqdm=False)[0]
    for other in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert other == out and other.metrics == out.metrics
        assert other.metrics.token_times == out.metrics.token_times and len(other.metrics.token_times) == 3
    changed = copy.deepcopy(out)
    changed.metrics.finished_time += 1.0
    assert changed != out


# ---------------------------------------------------------------- backends
@pytest.mark.parametrize("kv, backend", [("virtual", "torch_fa2"), ("paged", "flash_attn"), ("paged", "flashinfer")])
def test_a_backend_that_cannot_serve_is_refused_at_construction(kv, backend):
    """``attention_backend`` naming a backend this process cannot run (PyTorch's FA2 or flash-attn on
    the CPU, FlashInfer without CUDA) was accepted: every ``step()`` then raised and the queued requests
    stayed stuck. Now the constructor refuses it, lists the usable ones, and leaves the model as it was."""
    model = make_model("llama")
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match=rf"attention_backend: expected 'auto' or a backend that can serve "
                                         rf"kv='{kv}' on cpu in this process, one of \(.*'sdpa'\), got '{backend}'"):
        Engine(model, max_batch_size=2, max_seq_len=64, kv=kv, attention_backend=backend, device="cpu",
               cuda_graphs=False)  # fmt: skip
    assert model.config._attn_implementation == attn
    with Engine(model, max_batch_size=2, max_seq_len=64, kv=kv, attention_backend="sdpa", device="cpu",
                cuda_graphs=False) as engine:  # fmt: skip
        rid = engine.add_request([3, 4, 5], greedy(3))
        assert len(drain(engine)[rid].token_ids) == 3


def test_a_mapping_is_not_a_list_of_stops():
    """``SamplingParams(stop={"a": 1})`` took the dict's keys as stop strings (and ``stop_token_ids={5: 0}``
    its keys as ids), silently: a mapping is refused, naming the field; lists, tuples and sets still work."""
    from torch_vkv.serving import SamplingParams
    from torch_vkv._checks import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match=r"stop: expected a string, a sequence of strings or None, got"):
        SamplingParams(stop={"a": 1})
    with pytest.raises(ArgumentTypeError, match=r"stop_token_ids: expected a sequence of token ids, got"):
        SamplingParams(stop_token_ids={5: 0})
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b") and SamplingParams(stop=("x",)).stop == ("x",)
    assert SamplingParams(stop_token_ids={7}).stop_token_ids == (7,)


def test_completion_seed_takes_the_seeds_a_request_can_have():
    """``completion_seed(2**64, 1)``, ``(True, 1)`` and ``(1, -1)`` returned a seed, and a float or ``None``
    failed inside the arithmetic ("unsupported operand type(s) for &"): the seed is an int64, as
    ``SamplingParams.seed``, and the index an int >= 0."""
    from torch_vkv.serving import completion_seed

    with pytest.raises(ValueError, match=r"seed: expected an int <= 9223372036854775807, got 18446744073709551616"):
        completion_seed(2**64, 1)
    with pytest.raises(ValueError, match=r"index: expected an int >= 0, got -1"):
        completion_seed(1, -1)
    for seed, index in ((True, 1), (1.5, 1), (None, 1), (1, 2.0)):
        with pytest.raises(TypeError, match=r"(seed|index): expected an int, got"):
            completion_seed(seed, index)
    assert completion_seed(-(2**63), 0) == -(2**63) and completion_seed(7, 0) == 7
    assert 0 <= completion_seed(2**63 - 1, 3) < 2**63


# ------------------------------------------------------------- padded lm_head
def test_an_lm_head_wider_than_the_embeddings_never_samples_an_id_without_an_embedding():
    """A model whose ``lm_head`` has more outputs than its embedding rows (a
    padded head) could sample an id past ``vocab_size``; the next step's
    embedding lookup then failed and ended every request in flight. The
    sampler sees only the logits of ids the model can read back."""
    model = make_model("llama", seed=3)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    head = torch.nn.Linear(hidden, vocab + 16, bias=True)
    with torch.no_grad():
        head.weight[:vocab] = model.lm_head.weight
        head.weight[vocab:] = 0.0
        head.bias.zero_()
        head.bias[vocab:] = 1e4  # the padded ids would win every argmax and every draw
    model.lm_head = head
    with engine_for(model) as e:
        outs = e.generate([[1, 2, 3], [4, 5]], [greedy(5), SamplingParams(max_tokens=5, temperature=1.0, seed=0)],
                          use_tqdm=False)  # fmt: skip
    for o in outs:
        ids = o.outputs[0].token_ids
        assert len(ids) == 5 and all(0 <= t < vocab for t in ids), ids


def test_an_interrupted_generate_leaves_no_output_to_hand_on():
    """``generate`` aborts its requests when interrupted; their final outputs
    were kept for the next ``step()``, which a later ``generate`` took for
    another caller's and kept again, call after call."""
    model = model_of("llama")
    want = reference(model, [1, 2, 3], 6)
    with engine_for(model) as e:
        with interrupted_execute(e, 2), pytest.raises(KeyboardInterrupt):
            e.generate([[1, 2, 3], [4, 5]], greedy(6), use_tqdm=False)
        other = e.add_request([7, 8, 9], greedy(2))  # a step() loop's request: its output still comes back
        outs = e.generate([[1, 2, 3]], greedy(6), use_tqdm=False)
        assert outs[0].outputs[0].token_ids == want
        rest = drain(e)
        assert list(rest) == [other] and rest[other].finished
        assert not e.has_unfinished_requests() and e.step() == []
