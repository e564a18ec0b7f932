"""A second review of the serving API as a new user meets it: stop strings on the Engine, OpenAI-style
chat content, 2-D tensors of prompts, and the edge cases found by trying the documented API."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from _tiny_checkpoint import build_checkpoint  # noqa: E402
from test_serving import engine_for, model_of  # noqa: E402
from torch_vkv.serving import LLM, SamplingParams  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny_llama_review2"))


@pytest.fixture(scope="module")
def llm(ckpt):
    with LLM(str(ckpt), max_batch_size=4, max_seq_len=128, page_size=64 << 10) as llm:
        yield llm


# ------------------------------------------------------------ stop strings
def test_engine_refuses_stop_strings_it_cannot_apply():
    """``Engine.generate(prompts, SamplingParams(stop=["x"]))`` ran to ``max_tokens`` and said
    ``finish_reason="length"``: the Engine has no tokenizer and ignored the stop strings silently.
    Now it refuses them (``add_request`` and ``generate``), naming where they apply, and queues nothing."""
    with engine_for(model_of("llama"), max_batch_size=2, max_seq_len=64) as engine:
        params = SamplingParams(max_tokens=4, temperature=0.0, stop=["x", "y"])
        expected = r"params.stop: expected no stop strings .*LLM.*server.*stop_token_ids.*got \('x', 'y'\)"
        with pytest.raises(ValueError, match=expected):
            engine.add_request([1, 2, 3], params)
        with pytest.raises(ValueError, match=expected):
            engine.generate([[1, 2, 3], [4, 5]], [GREEDY, params], use_tqdm=False)
        assert not engine.has_unfinished_requests()
        assert engine.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].finish_reason == "length"


def test_llm_still_applies_stop_strings(llm):
    full = llm.generate("hello world", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    text = full.outputs[0].text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip())
    out = llm.generate("hello world", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=stop))[0]
    assert out.finish_reason == "stop" and out.outputs[0].text == text[: text.find(stop)]


# ---------------------------------------------------------- chat content
def test_chat_takes_openai_list_of_text_parts(llm):
    """``llm.chat([{"role": "user", "content": [{"type": "text", "text": "hello"}]}])`` rendered the
    Python list into the prompt (``user: [{'type': 'text', ...}]``). Now the text parts are joined, as the
    HTTP server joins them, and the prompt equals the one of the plain string."""
    plain = [{"role": "user", "content": "hello world"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    assert llm.apply_chat_template(parts) == llm.apply_chat_template(plain)
    assert llm.chat(parts, GREEDY)[0].token_ids == llm.chat(plain, GREEDY)[0].token_ids


def test_chat_content_none_is_empty_text(llm):
    """``content: None`` (an assistant turn of tool calls, in OpenAI's schema) is empty text, as the server
    reads it (HF's templates happen to render ``None`` as nothing; ``LLM`` no longer relies on that)."""
    assert llm.apply_chat_template([{"role": "user", "content": None}]) == llm.apply_chat_template(
        [{"role": "user", "content": ""}]
    )


@pytest.mark.parametrize(
    "content, exc, match",
    [
        ([{"type": "image_url", "image_url": {"url": "x"}}], ValueError,
         r"messages\[0\].content\[0\]: expected a text part .*got a part of type 'image_url'"),
        ([{"type": "text"}], ValueError, r"messages\[0\].content\[0\]: expected a text part"),
        ([{"type": "text", "text": 3}], TypeError, r"messages\[0\].content\[0\].text: expected a str, got 3"),
        (["hello"], TypeError, r"messages\[0\].content\[0\]: expected a text part .*got 'hello'"),
        (42, TypeError, r"messages\[0\].content: expected a string, a list of text parts or None, got 42"),
    ],
)  # fmt: skip
def test_chat_content_that_is_no_text_is_refused(llm, content, exc, match):
    with pytest.raises(exc, match=match):
        llm.chat([{"role": "user", "content": content}], GREEDY)
    assert not llm.engine.has_unfinished_requests()


# --------------------------------------------------- 2-D tensors of prompts
def test_llm_generate_takes_a_2d_tensor_as_a_batch_of_prompts(llm):
    """``llm.generate(tokenizer(texts, return_tensors="pt").input_ids)`` (a ``[batch, length]`` tensor,
    as HF users hold prompts) raised TypeError. Now each row is one prompt; a numpy array too."""
    a = llm.tokenizer("hello world")["input_ids"]
    b = llm.tokenizer("the quick brown")["input_ids"][: len(a)]
    assert len(a) == len(b)
    want = [o.token_ids for o in llm.generate([a, b], GREEDY)]
    for batch in (torch.tensor([a, b]), np.array([a, b])):
        out = llm.generate(batch, GREEDY)
        assert [o.prompt_token_ids for o in out] == [a, b]
        assert [o.token_ids for o in out] == want
    one = llm.tokenizer("hello world", return_tensors="pt")["input_ids"]  # [1, length]
    assert [o.token_ids for o in llm.generate(one, GREEDY)] == want[:1]


@pytest.mark.parametrize("shape", [(), (1, 2, 3)])
def test_llm_generate_names_the_rank_of_a_tensor_it_cannot_take(llm, shape):
    prompts = torch.ones(shape, dtype=torch.long)
    got = re.escape(f"got a {len(shape)}-D torch.int64 tensor of shape {tuple(shape)}")
    with pytest.raises(ValueError, match=r"prompts: expected a 1-D tensor \(one prompt\) or a 2-D tensor \(a batch "
                       r"of prompts\) of token ids, " + got):  # fmt: skip
        llm.generate(prompts, GREEDY)


def test_a_2d_tensor_inside_a_list_is_named(llm):
    """``llm.generate([tokenizer(text, return_tensors="pt").input_ids])`` said only "expected a string or a
    sequence of token ids, got <class 'torch.Tensor'>"; the message now gives the tensor's shape."""
    one = llm.tokenizer("hello world", return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=r"prompt: expected .*1-D.*got a 2-D torch.int64 tensor of shape \(1, \d+\)"):
        llm.generate([one], GREEDY)


def test_engine_generate_takes_a_2d_tensor_too():
    with engine_for(model_of("llama"), max_batch_size=2, max_seq_len=64) as engine:
        rows = [[1, 2, 3], [4, 5, 6]]
        want = [o.token_ids for o in engine.generate(rows, GREEDY, use_tqdm=False)]
        out = engine.generate(torch.tensor(rows), GREEDY, use_tqdm=False)
        assert [o.token_ids for o in out] == want and [o.prompt_token_ids for o in out] == rows
        with pytest.raises(ValueError, match="prompts: expected a 1-D tensor .* got a 3-D torch.int64 tensor"):
            engine.generate(torch.ones(1, 2, 3, dtype=torch.long), GREEDY, use_tqdm=False)


# ----------------------------------------------------------------- threads
def test_llm_generate_from_a_second_thread_raises_instead_of_hanging(llm):
    """Two threads calling ``llm.generate`` at once: the second one's ``add_request`` could land between
    the first one's steps (the text API detokenizes between them, outside the engine), and then each
    thread's ``step()`` took the other's outputs: both waited forever for outputs the other had consumed.
    Now an ``LLM`` call holds the engine for its whole length, as ``Engine.generate`` does: the second
    thread gets the Engine's ``RuntimeError`` at once and the first finishes."""
    import threading

    engine = llm.engine
    step, in_first_call, go_on = engine.step, threading.Event(), threading.Event()

    def step_then_wait():  # the first call, between two of its steps (where detokenizing happens)
        out = step()
        in_first_call.set()
        go_on.wait(10)
        return out

    results: dict = {}

    def first():
        results["first"] = llm.generate("hello world", GREEDY)

    engine.step = step_then_wait
    try:
        thread = threading.Thread(target=first, daemon=True)
        thread.start()
        assert in_first_call.wait(60)
        del engine.step  # the second call's steps (if it got that far) are the engine's own
        with pytest.raises(RuntimeError, match="another thread is inside this Engine"):
            llm.generate("the quick brown", GREEDY)
        go_on.set()
        thread.join(60)
    finally:
        engine.__dict__.pop("step", None)
        go_on.set()
    assert not thread.is_alive(), "the first generate hung"
    assert len(results["first"][0].token_ids) == GREEDY.max_tokens
    assert not engine.has_unfinished_requests()


def test_a_sampling_params_list_of_the_wrong_length_is_described(llm):
    """The count came out quoted, as a string value would (``got 'a list of 3'``); the Engine's reads
    ``got a list of 3``, and so does the LLM's now."""
    with pytest.raises(ValueError, match=r"^sampling_params: expected one SamplingParams or a list of 2, got a list "
                       r"of 3$"):  # fmt: skip
        llm.generate(["hello", "world"], [GREEDY] * 3)


def test_an_empty_text_prompt_is_named_as_the_prompt(llm):
    """``llm.generate("")`` (a tokenizer that adds no BOS makes no token of it) said
    ``prompt_token_ids: expected at least one token, got []``, a name the caller never used."""
    if llm.encode("x") and llm.tokenizer("")["input_ids"]:
        pytest.skip("this tokenizer makes a token of empty text (a BOS)")
    with pytest.raises(ValueError, match=r"prompt: expected text the tokenizer makes at least one token of, got ''"):
        llm.generate("", GREEDY)
    assert llm.generate("hello", GREEDY)[0].finish_reason == "length"  # the engine is unharmed
