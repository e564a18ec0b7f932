"""``SamplingParams``: how one request is decoded."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from torch_vkv._checks import ArgumentTypeError, check_int, fail

__all__ = ["SamplingParams", "completion_seed"]

_MASK64 = (1 << 64) - 1
# Seeds and top_k reach the sampler as int64 tensors: beyond this range torch.tensor
# raises inside Engine.step, failing the whole batch, so they are refused here.
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def completion_seed(seed: int, index: int) -> int:
    """The seed completion ``index`` of an ``n > 1`` request samples with.

    Completion 0 uses ``seed`` itself (so ``n=1`` and completion 0 of ``n=k``
    give the same tokens); completion ``i > 0`` uses splitmix64 of
    ``seed + i * 0x9E3779B97F4A7C15`` (mod 2**64), its low 63 bits. So
    ``SamplingParams(n=k, seed=s)``'s completion ``i`` equals a request with
    ``SamplingParams(n=1, seed=completion_seed(s, i))``.

    ``seed`` is an int64 as ``SamplingParams.seed`` takes it and ``index`` an
    int >= 0; anything else raises ``ValueError`` (``TypeError`` for a
    non-int), instead of a seed no request could be given.
    """
    seed = check_int("seed", seed, low=_INT64_MIN, high=_INT64_MAX)
    index = check_int("index", index, low=0)
    if index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def _check_float(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(what, "a real number", value, ArgumentTypeError)
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range: infinite, refused by the caller's range check
        value = math.inf if value > 0 else -math.inf
    if value != value:  # NaN
        fail(what, "a number, not NaN", value)
    return value


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one request (vLLM's names and defaults).

    Args:
        max_tokens: most tokens to generate (>= 1). Generation also stops when
            prompt + output reaches the engine's ``max_seq_len``.
        temperature: >= 0; ``0`` is greedy (argmax).
        top_p: nucleus sampling, in ``(0, 1]``; ``1`` disables it.
        top_k: keep the ``top_k`` most likely tokens; ``-1`` or ``0`` disables it
            (at most ``2**63 - 1``; beyond the vocabulary it keeps every token).
        stop_token_ids: ids that end the request (the stop token is kept as the
            last output token, ``finish_reason="stop"``); the engine refuses an id
            outside ``[0, vocab_size)``, which could never match.
        ignore_eos: do not stop at the model's EOS ids (``stop_token_ids`` still stop).
        seed: makes sampling reproducible and independent of the batch; ``None``
            draws a seed when the request arrives. An int64: ``[-2**63, 2**63)``.
        stop: strings that end the request (text API and server only: the
            text stops before the first one, ``finish_reason="stop"``; the
            token-level ``Engine`` has no tokenizer and refuses them with
            ``ValueError`` instead of ignoring them); one string or a sequence
            of non-empty strings, kept as a tuple.
        n: completions per prompt (parallel sampling): the prompt is prefilled
            once and the ``n`` sequences fork its pages; completion ``i``
            samples with :func:`completion_seed` ``(seed, i)``. At most the
            engine's ``max_batch_size``.

    Raises ``ValueError`` (``TypeError`` for a wrong type) at construction for
    anything out of range.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    seed: Optional[int] = None
    stop: Union[str, Sequence[str], None] = None
    n: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "max_tokens", check_int("max_tokens", self.max_tokens, low=1))
        temperature = _check_float("temperature", self.temperature)
        if temperature < 0 or temperature == float("inf"):
            fail("temperature", "a finite float >= 0 (0 is greedy)", self.temperature)
        set_(self, "temperature", temperature)
        top_p = _check_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            fail("top_p", "a float in (0, 1]", self.top_p)
        set_(self, "top_p", top_p)
        set_(self, "top_k", check_int("top_k", self.top_k, low=-1, high=_INT64_MAX))
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes, Mapping)) or not hasattr(stop, "__iter__"):  # a dict: its keys, silently
            fail("stop_token_ids", "a sequence of token ids", stop, ArgumentTypeError)
        set_(self, "stop_token_ids", tuple(check_int("stop_token_ids entry", t, low=0) for t in stop))
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "a bool", self.ignore_eos, ArgumentTypeError)
        if self.seed is not None:
            set_(self, "seed", check_int("seed", self.seed, low=_INT64_MIN, high=_INT64_MAX))
        stop_strings = self.stop
        if stop_strings is None:
            stop_strings = ()
        elif isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        elif isinstance(stop_strings, (bytes, Mapping)) or not hasattr(stop_strings, "__iter__"):
            fail("stop", "a string, a sequence of strings or None", stop_strings, ArgumentTypeError)
        stop_strings = tuple(stop_strings)
        for s in stop_strings:
            if not isinstance(s, str):
                fail("stop entry", "a str", s, ArgumentTypeError)
            if not s:
                fail("stop entry", "a non-empty string", s)
        set_(self, "stop", stop_strings)
        set_(self, "n", check_int("n", self.n, low=1))

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (``temperature == 0``)."""
        return self.temperature == 0.0
