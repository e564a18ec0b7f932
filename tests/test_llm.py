"""The text API: ``LLM``, ``TextStream`` (incremental detokenization, stop strings),
``SamplingParams.stop`` and ``n``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _tiny_checkpoint import build_checkpoint, build_tokenizer
from torch_vkv.serving import LLM, SamplingParams
from torch_vkv.serving.llm import TextStream

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

TOKENIZER = build_tokenizer()
# ASCII, two-, three- and four-byte UTF-8 characters: byte-level BPE splits the long ones over tokens.
ALPHABET = "ab d\néöü✓日本語🙂"


# ------------------------------------------------------------- SamplingParams
def test_stop_is_normalised_to_a_tuple():
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams().stop == ()


@pytest.mark.parametrize("stop, exc", [([""], ValueError), ([1], TypeError), (b"x", TypeError), (3, TypeError)])
def test_bad_stop_is_rejected(stop, exc):
    with pytest.raises(exc, match="stop"):
        SamplingParams(stop=stop)


def test_n_is_checked():
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        SamplingParams(n=0)
    assert SamplingParams(n=1).n == 1 and SamplingParams(n=4).n == 4  # the Engine serves n > 1


# ------------------------------------------------------------------ TextStream
def _feed(stream: TextStream, ids: list[int], cuts: list[int]) -> list[str]:
    """Feeds cumulative prefixes of ``ids`` ending at ``cuts`` then all of it, finished."""
    pieces = [stream.update(ids[:c]) for c in sorted(set(cuts)) if c < len(ids)]
    pieces.append(stream.update(ids, finished=True))
    return pieces


def test_multibyte_character_split_over_tokens_is_emitted_whole():
    ids = TOKENIZER("日本語 🙂")["input_ids"]
    assert len(ids) > len("日本語 🙂") - 1  # the characters really are split over tokens
    stream = TextStream(TOKENIZER)
    pieces = [stream.update(ids[: i + 1]) for i in range(len(ids) - 1)] + [stream.update(ids, finished=True)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "日本語 🙂" == stream.text
    assert sum(1 for p in pieces if p) >= 3  # emitted as characters complete, not all at the end


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.text(ALPHABET, max_size=8),
    text=st.text(ALPHABET, min_size=1, max_size=30),
    cuts=st.lists(st.integers(0, 80), max_size=12),
)
def test_text_stream_pieces_are_whole_characters_and_add_up(prompt, text, cuts):
    prompt_ids = TOKENIZER(prompt)["input_ids"]
    ids = TOKENIZER(text)["input_ids"]
    stream = TextStream(TOKENIZER, prompt_ids)
    pieces = _feed(stream, ids, cuts)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == stream.text == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(ALPHABET, min_size=1, max_size=30),
    data=st.data(),
    cuts=st.lists(st.integers(0, 80), max_size=12),
)
def test_stop_string_cuts_the_text_before_it(text, data, cuts):
    i = data.draw(st.integers(0, len(text) - 1))
    j = data.draw(st.integers(i + 1, min(len(text), i + 4)))
    stop = text[i:j]
    other = data.draw(st.sampled_from(["zz", "\x00", stop + "q"]))  # stop strings that never occur
    ids = TOKENIZER(text)["input_ids"]
    stream = TextStream(TOKENIZER, (), [other, stop])
    pieces = _feed(stream, ids, cuts)
    expected = text[: text.find(stop)]
    assert stream.stopped
    assert "".join(pieces) == stream.text == expected
    emitted = ""
    for p in pieces:  # no prefix ever sent contains the stop string
        emitted += p
        assert stop not in emitted


def test_text_stream_rejects_shrinking_outputs():
    stream = TextStream(TOKENIZER)
    stream.update([5, 6])
    with pytest.raises(ValueError, match="cumulative"):
        stream.update([5])


# ------------------------------------------------------------------------ LLM
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def llm(ckpt):
    with LLM(str(ckpt), max_batch_size=4, max_seq_len=128, page_size=64 << 10) as llm:
        yield llm


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def test_generate_text_matches_token_ids_and_the_model(llm, ckpt):
    from transformers import AutoModelForCausalLM

    out = llm.generate(["hello world", "the quick brown fox"], GREEDY)
    assert [o.finish_reason for o in out] == ["length", "length"]
    for o in out:
        assert len(o.token_ids) == 12
        assert o.outputs[0].text == llm.tokenizer.decode(o.token_ids, skip_special_tokens=True)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = llm.tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want = ref.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, ids.shape[1] :].tolist()
    assert out[0].token_ids == want


def test_string_and_token_id_prompts_agree(llm):
    ids = llm.tokenizer("hello world")["input_ids"]
    a = llm.generate("hello world", GREEDY)
    b = llm.generate(ids, GREEDY)
    c = llm.generate([ids, "hello world"], [GREEDY, GREEDY])
    assert a[0].prompt_token_ids == ids
    assert a[0].token_ids == b[0].token_ids == c[0].token_ids == c[1].token_ids
    assert a[0].outputs[0].text == b[0].outputs[0].text == c[1].outputs[0].text


def test_stop_string_finishes_the_request_and_frees_its_pages(llm):
    full = llm.generate("hello world", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    text = full.outputs[0].text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    out = llm.generate("hello world", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=stop))[0]
    assert out.finished and out.finish_reason == "stop"
    assert out.outputs[0].text == text[: text.find(stop)]
    assert len(out.token_ids) < 40 and out.token_ids == full.token_ids[: len(out.token_ids)]
    stats = llm.engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["used_bytes"] == 0


def test_generate_leaves_the_engine_consistent_for_a_step_loop(llm):
    """A request added with ``llm.engine.add_request`` and finished during
    ``llm.generate`` had its final output swallowed (the caller's ``step()``
    loop never saw it end); and a request that ``generate`` ended with a stop
    string came back from the next ``step()`` as ``"abort"``. Now the first is
    returned by the next step and the second is not."""
    full = llm.generate("hello world", GREEDY)[0]
    stop = llm.tokenizer.decode(full.token_ids[4:6])
    mine = llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    out = llm.generate("hello world", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=stop))[0]
    assert out.finish_reason == "stop"
    final = {}
    while llm.engine.has_unfinished_requests():
        final.update({o.request_id: o for o in llm.engine.step()})
    assert list(final) == [mine]
    assert final[mine].finish_reason == "length" and len(final[mine].token_ids) == 2


def test_a_prompt_of_numpy_token_ids_is_one_prompt(llm):
    """``llm.generate([np.int64(5), np.int64(6)])`` (ids taken from a numpy
    array) was read as two prompts and refused ("prompt: expected a string or
    a sequence of token ids, got numpy.int64"), though the Engine takes numpy
    ids. Now it is one prompt, as the same list of ints is."""
    import numpy as np

    ids = llm.tokenizer("hello world")["input_ids"]
    out = llm.generate([np.int64(t) for t in ids], GREEDY)
    assert len(out) == 1 and out[0].token_ids == llm.generate(ids, GREEDY)[0].token_ids


def test_a_prompt_of_a_tensor_or_numpy_array_is_one_prompt(llm):
    """``llm.generate(torch.tensor(ids))`` and ``llm.generate([np.array(ids)])`` raised TypeError
    ("prompts: expected a string, a list of token ids, ...") though ``Engine.add_request`` takes
    1-D tensors and numpy arrays. Now they are prompts of token ids, alone or in a list."""
    import numpy as np

    ids = llm.tokenizer("hello world")["input_ids"]
    want = llm.generate(ids, GREEDY)[0].token_ids
    for prompt in (torch.tensor(ids), np.array(ids)):
        out = llm.generate(prompt, GREEDY)
        assert len(out) == 1 and out[0].token_ids == want
        out = llm.generate([prompt, ids], GREEDY)
        assert [o.token_ids for o in out] == [want, want]
    with pytest.raises(TypeError, match="prompt token id: expected an int"):
        llm.generate(torch.tensor(ids, dtype=torch.float32), GREEDY)  # the engine checks the ids


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "hello"}]
    out = llm.chat(messages, GREEDY)[0]
    prompt = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<s>assistant:")
    ids = llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids == ids
    assert out.outputs[0].text == llm.generate(ids, GREEDY)[0].outputs[0].text
    assert len(llm.chat([messages, messages], GREEDY)) == 2


def test_bad_prompts_raise_and_the_llm_keeps_serving(llm):
    with pytest.raises(ValueError, match="at least one token"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="fewer than max_seq_len"):
        llm.generate(["hello world", [5] * 200], GREEDY)  # the valid first one is dropped too
    with pytest.raises(TypeError, match="prompt"):
        llm.generate([3.5], GREEDY)
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate("hello", {"max_tokens": 3})
    with pytest.raises(ValueError, match="chat_template|role"):
        llm.chat([{"content": "x"}])
    with pytest.raises(ValueError, match=r"sampling_params.n: expected 1 with the text API .*got 2"):
        llm.generate("hello", SamplingParams(n=2))
    # A lone surrogate (JSON and Python strings hold one; UTF-8 cannot): the tokenizer raised a bare TypeError.
    with pytest.raises(ValueError, match=r"prompt: expected text that encodes as UTF-8, .*at character 2"):
        llm.generate(["ok", "ab\ud800"], GREEDY)
    with pytest.raises(ValueError, match=r"messages\[1\].content: expected text that encodes as UTF-8"):
        llm.chat([{"role": "system", "content": "x"}, {"role": "user", "content": "\udfff"}])
    assert llm.engine.stats()["num_running"] == 0
    assert len(llm.generate("hello", GREEDY)[0].token_ids) == 12
    # The refused calls' aborted requests left no final output behind for a later call to pass on forever.
    assert not llm.engine.has_unfinished_requests() and llm.engine.step() == []


def test_an_interrupted_generate_leaves_no_output_to_hand_on(llm):
    from test_serving import interrupted_execute

    engine = llm.engine
    with interrupted_execute(engine, 2), pytest.raises(KeyboardInterrupt):
        llm.generate(["hello", "world"], GREEDY)
    # Their abort outputs were kept, taken by the next call as another caller's and kept again, call after
    # call: has_unfinished_requests() stayed True.
    assert len(llm.generate("hello", GREEDY)[0].token_ids) == 12
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_llm_takes_a_loaded_model(ckpt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with LLM(model, max_batch_size=2, max_seq_len=64, page_size=64 << 10) as llm:  # tokenizer from name_or_path
        assert llm.engine.max_seq_len == 64
        out = llm.generate("hello", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert len(out[0].token_ids) == 3
    with pytest.raises(TypeError, match="tokenizer"):
        LLM(model, tokenizer=42, max_batch_size=2, max_seq_len=64)


def test_a_checkpoint_path_that_is_not_a_folder_is_named(tmp_path, ckpt):
    from torch_vkv.serving import Engine

    missing, a_file = tmp_path / "no_such_checkpoint", tmp_path / "weights.bin"
    a_file.write_bytes(b"\0")
    for source, why in [(missing, "no such folder"), (str(missing), "no such folder"), (a_file, "a file")]:
        with pytest.raises(FileNotFoundError, match=f"model: expected a local checkpoint folder, got .*{why}"):
            Engine(source, max_batch_size=2, max_seq_len=64)
        with pytest.raises(FileNotFoundError, match=f"model: expected a local checkpoint folder, got .*{why}"):
            LLM(source, max_batch_size=2, max_seq_len=64)
    with pytest.raises(FileNotFoundError, match="tokenizer: expected a local checkpoint folder"):
        LLM(ckpt, tokenizer=str(missing), max_batch_size=2, max_seq_len=64)


def test_a_relative_path_that_is_no_hub_name_is_a_path(tmp_path, monkeypatch):
    """A relative ``pathlib.Path`` and a string of more than one folder can never be a hub repo id:
    they went to the hub anyway (a Path: connection retries, then "couldn't connect to huggingface.co";
    ``"runs/exp1/final"``: the hub's "Repo id must be in the form" error the path check was added to replace)."""
    import pathlib

    from torch_vkv._checks import check_checkpoint_path
    from torch_vkv.serving import Engine

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for source in (pathlib.Path("no_such_checkpoint"), "runs/exp1/final", "runs/no such checkpoint"):
        with pytest.raises(FileNotFoundError, match=f"model: expected a local checkpoint folder, got "
                           f"'{source}' \\(no such folder\\)"):  # fmt: skip
            check_checkpoint_path("model", source)
    with pytest.raises(FileNotFoundError, match="model: expected a local checkpoint folder, got 'runs/exp1/final'"):
        Engine("runs/exp1/final", max_batch_size=2, max_seq_len=64)
    with pytest.raises(FileNotFoundError, match="model: expected a local checkpoint folder, got 'runs/exp1/final'"):
        LLM("runs/exp1/final", max_batch_size=2, max_seq_len=64)
    for name in ("org/model", "model", "org/model-v1.5_x"):  # hub names: left to from_pretrained
        check_checkpoint_path("model", name)
