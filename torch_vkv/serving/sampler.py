"""``Sampler``: batched, seeded sampling on the device.

Every request draws its randomness from its own ``(seed, output index)``, not
from a shared generator: token ``i`` of a request gets the noise
``hash(seed, i, token id)`` (splitmix64 on int64 tensors, counter-based), and
is sampled by the Gumbel-max trick over the filtered logits. So a seeded
request gives the same tokens alone or in any batch, and after a preemption
(which recomputes but re-samples index ``i`` with the same noise). Temperature,
top-k and top-p are tensor ops over the whole batch; rows with
``temperature == 0`` take the argmax.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

__all__ = ["Sampler", "gumbel_noise", "splitmix64"]


def _signed(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (two's-complement wrap-around): a
    bijective mix of 64 bits, the same on every device."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise ``[R, vocab_size]`` (float32) that depends only on
    each row's ``(seeds[r], positions[r])`` and the token id.

    Args:
        seeds: int64 ``[R]``.
        positions: int64 ``[R]``, the output index being sampled.
    """
    row = splitmix64(seeds ^ splitmix64(positions))  # [R]
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = splitmix64(row[:, None] + ids[None, :] * _GOLDEN)
    # 24 random bits -> a float32 uniform in (0, 1), exactly representable.
    u = (_shr(bits, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


class Sampler:
    """Samples one token per row of ``logits`` ``[R, vocab_size]``.

    Args (all ``[R]`` tensors on the logits' device, or ``None`` when every
    row is greedy):
        temperature: float32, ``0`` = greedy.
        top_k: int64, ``<= 0`` = off.
        top_p: float32 in ``(0, 1]``.
        seeds, positions: int64, the noise key of each row (see :func:`gumbel_noise`).
        use_top_k, use_top_p: host flags, skip the sort when no row filters.

    Returns int64 ``[R]`` token ids.
    """

    def for_requests(self, logits: torch.Tensor, reqs: Sequence[Any]) -> torch.Tensor:
        """Samples row ``i`` for the engine's ``reqs[i]`` (its ``params``, ``seed`` and output index)."""
        if all(r.params.temperature == 0.0 for r in reqs):
            return self(logits)
        p = [r.params for r in reqs]
        dev = logits.device
        floats = torch.tensor([[q.temperature for q in p], [q.top_p for q in p]], dtype=torch.float32)
        ints = torch.tensor([[q.top_k for q in p], [r.seed for r in reqs], [len(r.output_token_ids) for r in reqs]],
                            dtype=torch.int64)  # fmt: skip
        floats, ints = floats.to(dev, non_blocking=True), ints.to(dev, non_blocking=True)
        return self(
            logits, floats[0], ints[0], floats[1], ints[1], ints[2],
            use_top_k=any(q.top_k > 0 for q in p), use_top_p=any(q.top_p < 1.0 for q in p),
        )  # fmt: skip

    def __call__(
        self,
        logits: torch.Tensor,
        temperature: Optional[torch.Tensor] = None,
        top_k: Optional[torch.Tensor] = None,
        top_p: Optional[torch.Tensor] = None,
        seeds: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        *,
        use_top_k: bool = False,
        use_top_p: bool = False,
    ) -> torch.Tensor:
        logits = logits.float()
        greedy = logits.argmax(-1)
        if temperature is None:
            return greedy
        R, V = logits.shape
        # Shifted by the row's max before scaling (sampling is shift-invariant): a tiny
        # temperature then sends the other logits to -inf instead of overflowing every
        # positive logit to +inf, where the first inf, not the best token, won.
        x = (logits - logits.amax(-1, keepdim=True)) / torch.where(temperature > 0, temperature, 1.0)[:, None]
        if use_top_k or use_top_p:
            xs, order = x.sort(-1, descending=True)
            remove = torch.zeros_like(xs, dtype=torch.bool)
            if use_top_k:
                k = torch.where(top_k > 0, top_k.clamp(max=V), V)
                remove = torch.arange(V, device=x.device)[None, :] >= k[:, None]
                xs = xs.masked_fill(remove, float("-inf"))
            if use_top_p:
                probs = xs.softmax(-1)
                # Drop a token when the tokens ranked above it already hold top_p
                # of the mass: the smallest set reaching top_p stays (never empty).
                before = probs.cumsum(-1) - probs
                remove = remove | (before > top_p[:, None])
            x = x.masked_fill(torch.zeros_like(remove).scatter(1, order, remove), float("-inf"))
        sampled = (x + gumbel_noise(seeds, positions, V)).argmax(-1)
        return torch.where(temperature > 0, sampled, greedy)
