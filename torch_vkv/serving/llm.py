"""``LLM``: the engine behind a text API (strings in, strings out).

    from torch_vkv.serving import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", max_batch_size=16, max_seq_len=2048)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    print(out[0].outputs[0].text)

Text is produced incrementally (:class:`TextStream`), the way the HTTP server
streams it: a multi-byte character split over several tokens is emitted only
once complete, and with stop strings the text stops before the first one (the
request is then aborted in the engine, so its pages return at once).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from torch_vkv._checks import ArgumentTypeError, Described, check_checkpoint_path, fail
from torch_vkv._lifetime import Closable, one_thread
from torch_vkv.serving.engine import Engine
from torch_vkv.serving.inputs import prompt_batch, token_id_list, token_level
from torch_vkv.serving.runner import load_causal_lm
from torch_vkv.serving.outputs import RequestOutput
from torch_vkv.serving.params import SamplingParams

__all__ = ["LLM", "TextStream"]

# Prompt tokens decoded in front of the output, so that the first output
# token's text (a leading space, a merged byte sequence) comes out as it would
# inside the whole sequence (vLLM does the same).
_CONTEXT_TOKENS = 5

Messages = Sequence[dict]


class TextStream:
    """Incremental detokenization and stop strings of one request.

    Feed it the request's cumulative output token ids (:meth:`update`); it
    returns the text to emit now. Text is never emitted while it ends in an
    incomplete multi-byte character (the decoder's ``"\\ufffd"``), nor while
    its end could be the beginning of a stop string; once finished, whatever is
    left is flushed. ``text`` is everything decoded so far, cut before the first
    stop string; the concatenation of all returned pieces equals the final ``text``.

    Args:
        tokenizer: a transformers tokenizer (``decode``).
        prompt_token_ids: the prompt (its last few tokens give the decoder context).
        stop: stop strings (non-empty).
        skip_special_tokens: drop special tokens (EOS, ...) from the text.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # ids[prefix:read]: decoded already, kept as context
        self._read = len(self._ids)
        self._num_output = 0
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self._emitted = 0
        self.stopped = False  # a stop string was found: the request should end

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def _decode_new(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        if final:  # nothing printable came of the last tokens
            self._prefix, self._read = self._read, len(self._ids)
        return ""

    def _held_back(self) -> int:
        """Characters at the end of ``text`` that could start a stop string."""
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def update(self, token_ids: Sequence[int], finished: bool = False) -> str:
        """Takes the cumulative output ``token_ids`` (and whether the request
        has finished); returns the new text to emit (maybe ``""``)."""
        if self.stopped:
            return ""
        if len(token_ids) < self._num_output:
            fail("token_ids", f"cumulative outputs (at least {self._num_output} tokens)", f"{len(token_ids)} tokens")
        self._ids.extend(token_ids[self._num_output :])
        self._num_output = len(token_ids)
        piece = self._decode_new(final=finished)
        if piece:
            start = max(0, len(self.text) - self._max_stop + 1)
            self.text += piece
            cut = min((i for i in (self.text.find(s, start) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
        end = len(self.text) if (self.stopped or finished) else len(self.text) - self._held_back()
        end = max(end, self._emitted)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta


def check_text(what: str, text: str) -> str:
    """``text`` when it encodes as UTF-8, as a tokenizer needs; else ``ValueError`` (a lone surrogate such
    as ``"\\ud800"``, which JSON and Python strings can hold, made the tokenizer raise a bare ``TypeError``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        fail(what, "text that encodes as UTF-8",
             Described(f"a string with an unpaired surrogate {text[e.start]!r} at character {e.start}"))  # fmt: skip
    return text


def message_text(what: str, content: Any) -> str:
    """A chat message's ``content`` as the text a chat template takes: a string; ``None`` (OpenAI's
    assistant turn of tool calls) as ``""``; OpenAI's list of parts (``[{"type": "text", "text": ...}]``)
    as its texts joined, as the HTTP server joins them (a template would render the list's repr). Other
    parts (images, audio) are ``ValueError``: the model reads text only."""
    if content is None:
        return ""
    if isinstance(content, str):
        return check_text(what, content)
    if isinstance(content, (bytes, dict)) or not isinstance(content, Sequence):
        fail(what, "a string, a list of text parts or None", content, ArgumentTypeError)
    texts = []
    for j, part in enumerate(content):
        expected = "a text part {'type': 'text', 'text': str} (the model reads text only)"
        if not isinstance(part, dict):
            fail(f"{what}[{j}]", expected, part, ArgumentTypeError)
        if part.get("type") != "text" or "text" not in part:
            fail(f"{what}[{j}]", expected, Described(f"a part of type {part.get('type')!r} with keys {sorted(part)}"))
        if not isinstance(part["text"], str):
            fail(f"{what}[{j}].text", "a str", part["text"], ArgumentTypeError)
        texts.append(check_text(f"{what}[{j}].text", part["text"]))
    return "".join(texts)


@one_thread
def text_api_call(engine: Engine, call: Any) -> Any:
    """Runs ``call()`` inside ``engine``'s thread guard (:func:`torch_vkv._lifetime.one_thread`): another
    thread's call into the engine meanwhile raises ``RuntimeError`` naming this function."""
    return call()


def _load_tokenizer(source: Any) -> Any:
    from transformers import AutoTokenizer

    check_checkpoint_path("tokenizer", source)
    return AutoTokenizer.from_pretrained(source)


class LLM(Closable):
    """A text API over an :class:`Engine`.

    Args:
        model: a local checkpoint path or a loaded transformers causal LM.
        tokenizer: a transformers tokenizer or a path; ``None`` loads it from
            ``model`` (the path, or the loaded model's ``name_or_path``).
        **engine_kwargs: :class:`Engine`'s keyword arguments. ``max_batch_size``
            defaults to 16 and ``max_seq_len`` to the model's
            ``max_position_embeddings`` (at most 8192) when not given.

    ``generate`` and ``chat`` run the engine to the end of their requests and
    return :class:`RequestOutput`\\ s in the order of the prompts; each
    completion carries ``text``. A stop string ends a request with
    ``finish_reason="stop"``: its text stops before the stop string, its
    ``token_ids`` are the tokens sampled until then.
    """

    def __init__(self, model: Any, tokenizer: Any = None, **engine_kwargs: Any) -> None:
        if isinstance(model, (str, os.PathLike)):
            check_checkpoint_path("model", model)  # before the tokenizer is looked for there
        if tokenizer is None:
            source = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
            if not source:
                fail("tokenizer", "a tokenizer or a path (the model has no name_or_path to load one from)",
                     tokenizer, ArgumentTypeError)  # fmt: skip
            tokenizer = _load_tokenizer(source)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(tokenizer)
        if not callable(getattr(tokenizer, "decode", None)) or not callable(tokenizer):
            fail("tokenizer", "a transformers tokenizer or a path", type(tokenizer), ArgumentTypeError)
        self.tokenizer = tokenizer
        if isinstance(model, (str, os.PathLike)):
            model = load_causal_lm(model, engine_kwargs.get("dtype"))
        engine_kwargs.setdefault("max_batch_size", 16)
        if "max_seq_len" not in engine_kwargs:
            cfg = getattr(model, "config", None)
            if hasattr(cfg, "get_text_config"):
                cfg = cfg.get_text_config()
            engine_kwargs["max_seq_len"] = min(int(getattr(cfg, "max_position_embeddings", 2048) or 2048), 8192)
        self.engine = Engine(model, **engine_kwargs)

    # ----------------------------------------------------------------- input
    def encode(self, prompt: Union[str, Sequence[int]]) -> list[int]:
        """A prompt as token ids: a string is tokenized, a list of ids is kept (a 1-D tensor or numpy
        array of ids too, as ``Engine.add_request`` takes them)."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer(check_text("prompt", prompt))["input_ids"])
            if not ids:  # the engine's own message would name prompt_token_ids, which the caller never gave
                fail("prompt", "text the tokenizer makes at least one token of", prompt)
            return ids
        if isinstance(prompt, (torch.Tensor, np.ndarray)):
            if prompt.ndim == 1:
                return prompt.tolist()  # the engine checks the ids (ints, their range)
            token_id_list(prompt, "prompt")  # raises, naming the rank: a [1, length] tensor is a batch of one
        if isinstance(prompt, bytes) or not isinstance(prompt, Sequence):
            fail("prompt", "a string or a sequence of token ids", type(prompt), ArgumentTypeError)
        return list(prompt)

    def apply_chat_template(self, messages: Messages) -> list[int]:
        """One conversation (a list of ``{"role", "content"}`` dicts) as the
        token ids of a prompt that asks for the assistant's reply."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            fail("messages", "a list of {'role', 'content'} dicts", type(messages), ArgumentTypeError)
        texts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                fail("message", "a dict with 'role' and 'content'", m, ArgumentTypeError)
            texts.append({**m, "content": message_text(f"messages[{i}].content", m["content"])})
        if not getattr(self.tokenizer, "chat_template", None):
            fail("tokenizer", "a tokenizer with a chat template (chat_template is not set)", None)
        text = self.tokenizer.apply_chat_template(texts, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -------------------------------------------------------------- generate
    def generate(
        self,
        prompts: Union[str, Sequence[int], Sequence[Union[str, Sequence[int]]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generates for ``prompts`` (strings or token-id lists, or 1-D tensors / numpy arrays of ids; a
        single one is accepted too; a 2-D tensor or array is a batch of prompts, one a row, taken whole:
        padding included); ``sampling_params``: one for all or one per prompt.
        A bad prompt raises ``ValueError`` (``TypeError``) and nothing of the call keeps running."""
        rows = prompt_batch(prompts)  # a tensor or array of ids: its rows (1-D: one prompt; other ranks refused)
        if rows is not None:
            prompts = rows
        elif isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and all(isinstance(t, numbers.Integral) for t in prompts)
        ):
            prompts = [prompts]  # one prompt
        if isinstance(prompts, bytes) or not isinstance(prompts, Sequence):
            fail("prompts", "a string, a list of token ids, or a list of those", type(prompts), ArgumentTypeError)
        return self._run([self.encode(p) for p in prompts], sampling_params, use_tqdm)

    def chat(
        self,
        messages: Union[Messages, Sequence[Messages]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Replies to one conversation (a list of message dicts) or to several
        (a list of such lists), through the tokenizer's chat template."""
        if isinstance(messages, Sequence) and messages and isinstance(messages[0], dict):
            messages = [messages]
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            fail("messages", "a conversation (list of dicts) or a list of conversations", type(messages),
                 ArgumentTypeError)  # fmt: skip
        return self._run([self.apply_chat_template(c) for c in messages], sampling_params, use_tqdm)

    def _run(self, prompts: list[list[int]], params: Any, use_tqdm: bool) -> list[RequestOutput]:
        # The whole call holds the engine's thread guard, as Engine.generate does: between two steps (while
        # this thread detokenizes) another thread's call could add requests and step, and each call's steps
        # would return the other's outputs, which it drops: both waited forever. Now the other call raises.
        return text_api_call(self.engine, lambda: self._serve(prompts, params, use_tqdm))

    def _serve(self, prompts: list[list[int]], params: Any, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
            if len(params) != len(prompts):
                fail("sampling_params", f"one SamplingParams or a list of {len(prompts)}",
                     Described(f"a list of {len(params)}"))  # fmt: skip
            params = list(params)
        else:
            fail("sampling_params", "a SamplingParams or a list of them", type(params), ArgumentTypeError)
        for p in params:
            if not isinstance(p, SamplingParams):
                fail("sampling_params", "SamplingParams", type(p), ArgumentTypeError)
            if p.n != 1:
                # Stop strings end one completion early, which the engine cannot do alone (Engine supports n > 1).
                fail("sampling_params.n", "1 with the text API (use Engine for n > 1 completions)", p.n)
        streams: dict[str, tuple[int, TextStream]] = {}
        results: list[Optional[RequestOutput]] = [None] * len(prompts)
        ours: set[str] = set()
        others: list[RequestOutput] = []  # requests added to the engine directly: the next step() returns them
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                # Stop strings stay here (TextStream finds them); the engine, which has no tokenizer, refuses them.
                rid = engine.add_request(prompt, token_level(p))  # a bad prompt raises; the finally drops the others
                streams[rid] = (i, TextStream(self.tokenizer, prompt, p.stop))
                ours.add(rid)
            from tqdm.auto import tqdm

            with tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm) as bar:
                while streams:
                    for out in engine.step():
                        entry = streams.get(out.request_id)
                        if entry is None:  # not ours, or ended by a stop string already
                            others += [out] if out.finished and out.request_id not in ours else []
                            continue
                        i, stream = entry
                        stream.update(out.token_ids, out.finished)
                        if stream.stopped:
                            if not out.finished:
                                engine.abort(out.request_id)  # pages return now; its "abort" output is ignored
                            out.finished = True
                            out.outputs[0].finish_reason = "stop"
                        if out.finished:
                            out.outputs[0].text = stream.text
                            results[i] = out
                            del streams[out.request_id]
                            bar.update(1)
        finally:
            # Nothing added (a refused call: another thread may be inside step()): leave the engine alone.
            if not engine.closed and (ours or others):
                for rid in streams:  # a bad prompt or an interrupt: leave nothing running
                    engine.abort(rid)
                # ours: their abort outputs (a stop string's, or those just above) are for no one: a later
                # call would take them for others' and hand them on, call after call.
                engine._return_later(others, drop=ours)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Closes the engine (frees its KV memory)."""
        self.engine.close()

