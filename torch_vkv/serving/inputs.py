"""What a request arrives as, checked before it reaches the engine's queues.

Prompts come as lists of ints, 1-D tensors or numpy arrays (``tokenizer(text,
return_tensors="pt").input_ids[0]``), and batches of them as 2-D tensors
(``tokenizer(texts, return_tensors="pt").input_ids``): :func:`token_id_list`
and :func:`prompt_batch` turn them into lists. :func:`check_token_level`
refuses what the token-level :class:`~torch_vkv.serving.Engine` cannot apply
(stop strings), and :func:`token_level` is how the text API hands a request
with stop strings to the engine after taking them over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from torch_vkv._checks import ArgumentTypeError, Described, check_int, fail
from torch_vkv.serving.params import SamplingParams

__all__ = ["check_token_level", "prompt_batch", "token_id_list", "token_level"]


def _describe(array: Any) -> Described:
    kind = f"{array.dtype} tensor" if isinstance(array, torch.Tensor) else f"{array.dtype} array"
    return Described(f"a {array.ndim}-D {kind} of shape {tuple(array.shape)}")


def token_id_list(prompt: Any, what: str = "prompt_token_ids") -> list[int]:
    """One prompt as a list of ints: a sequence of ints, or a 1-D integer tensor or numpy array.
    The ids' range is the engine's to check (it knows the vocabulary)."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            fail(what, "a 1-D integer tensor or a sequence of ints", _describe(prompt))
        prompt = prompt.tolist()
    elif isinstance(prompt, np.ndarray):
        if prompt.ndim != 1:  # a [1, length] array (return_tensors="np") is a batch of one: say so
            fail(what, "a 1-D array or a sequence of token ids", _describe(prompt))
        prompt = prompt.tolist()
    elif isinstance(prompt, (str, bytes, bytearray)) or not isinstance(prompt, Sequence):
        fail(what, "a sequence of token ids", type(prompt), ArgumentTypeError)
    return [check_int("prompt token id", t) for t in prompt]


def prompt_batch(prompts: Any, what: str = "prompts") -> Optional[list[Any]]:
    """The prompts of a tensor or numpy array of token ids: a 1-D one is one prompt, each row of a 2-D one
    a prompt (rows are taken whole: padding included, as no attention mask comes with them); any other
    rank is ``ValueError``. ``None`` when ``prompts`` is neither (the caller reads it as a sequence)."""
    if not isinstance(prompts, (torch.Tensor, np.ndarray)):
        return None
    if prompts.ndim == 1:
        return [prompts]
    if prompts.ndim == 2:
        return list(prompts)
    kind = "tensor" if isinstance(prompts, torch.Tensor) else "array"
    fail(what, f"a 1-D {kind} (one prompt) or a 2-D {kind} (a batch of prompts) of token ids", _describe(prompts))


def check_token_level(params: SamplingParams) -> None:
    """``ValueError`` for stop strings: the engine sees token ids only, so it could never find them, and a
    request that ignored them would run to ``max_tokens`` and end as ``"length"``, silently."""
    if params.stop:
        fail("params.stop", "no stop strings (the Engine has no tokenizer to find text with: LLM and the HTTP "
             "server apply stop strings; stop_token_ids stop the Engine)", params.stop)  # fmt: skip


def token_level(params: SamplingParams) -> SamplingParams:
    """``params`` without its stop strings, for the text API, which applies them itself."""
    return dataclasses.replace(params, stop=()) if params.stop else params
