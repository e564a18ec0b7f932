"""``SequenceLengths``: the one owner of every row's length in a :class:`VirtualKVCache`.

A row's length lives in two places that must agree: the host (Python ints,
for commits, ``get_seq_length()`` and the batch operations) and the device
(``cache_seqlens``, read by the kernels of compiled and captured steps without
a sync). This object holds both, and the rule that keeps them in step:

* an **eager** step counts its tokens on the host and writes them to the device;
* a **compiled** step adds its tokens on the device only (traced code);
  :meth:`VirtualKVCache.prepare_step` *announces* it beforehand, and the
  in-graph op (:mod:`torch_vkv.hf.commit_op`) reports it when it runs, so the
  host adds the announced tokens without reading the device;
* once a CUDA graph was captured, a step may run as a *replay*, which runs no
  Python and reports nothing: from then on every host read of the lengths
  reads them back from the device (one small device-to-host copy).

Nothing else keeps a copy: layers, the attention function and the mask
function ask this object.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from torch_vkv.attention.host_values import metadata_tensor

__all__ = ["SequenceLengths", "StepPlan"]


class SequenceLengths:
    """Lengths of the rows of one cache, on the host and on the device.

    Args:
        max_batch_size: rows of the cache.
        device: where ``cache_seqlens`` and ``seq_length_t`` live.

    Attributes:
        cache_seqlens: int32, shape ``[max_batch_size]``: valid tokens of each
            row (vkv layout), new tokens included once a step has written them.
        seq_length_t: int64, shape ``[]``: ``get_seq_length()`` on the device
            (tokens seen per row, left padding included, like ``DynamicCache``).

    Both tensors keep their address for the cache's lifetime and are marked
    with ``torch._dynamo.mark_static_address``, so compiled steps take them as
    static inputs and CUDA graphs read them in place.
    """

    def __init__(self, max_batch_size: int, device: torch.device) -> None:
        # Normal tensors even under inference_mode: the cache outlives the call
        # that builds it, and later steps may run outside inference mode.
        with torch.inference_mode(False):
            self.cache_seqlens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
            self.seq_length_t = torch.zeros((), dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(self.cache_seqlens)
        torch._dynamo.mark_static_address(self.seq_length_t)
        self.device = torch.device(device)
        self.on_device = False  # whether the device tensors are kept in step (vkv layout only)
        self._rows: list[int] = []
        self._seq_length = 0
        self._announced = 0  # tokens per row of the compiled step prepare_step announced
        self._reported = 0  # compiled steps the in-graph op saw since the announcement
        self._maybe_replayed = False  # a CUDA graph was captured: steps may run without Python

    # -- reads -------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return len(self._rows)

    def rows(self) -> list[int]:
        """Valid tokens per row (host, exact): a new list."""
        self.settle()
        return list(self._rows)

    def seq_length(self) -> int:
        """Tokens seen per row, left padding included (``DynamicCache``'s count)."""
        self.settle()
        return self._seq_length

    # -- writes from the host ------------------------------------------------------------
    def start(self, batch: int, *, on_device: bool) -> None:
        """A new sequence of ``batch`` empty rows."""
        self.on_device = on_device
        self.set([0] * batch, 0)

    def set(self, rows: list[int], seq_length: int) -> None:
        """Host and device take ``rows`` and ``seq_length`` (eager: crop, batch ops, reset)."""
        self.set_host(rows, seq_length)
        if self.on_device:
            with torch.inference_mode(False):
                self.cache_seqlens.zero_()
                if rows:
                    self.cache_seqlens[: len(rows)].copy_(torch.tensor(self._rows, dtype=torch.int32))
                self.seq_length_t.fill_(self._seq_length)

    def advance(self, counts: list[int], num_tokens: int) -> None:
        """An eager step: row ``b`` gains ``counts[b]`` valid tokens, every row
        ``num_tokens`` seen tokens. The step's own announcement, if any, is used up."""
        self.settle(in_step=True)
        rows = [r + c for r, c in zip(self._rows, counts)]
        if not self.on_device or len(set(counts)) != 1:
            self.set(rows, self._seq_length + num_tokens)
            return
        # Every row gains the same count (decode): add on the device, no host-to-device copy.
        self.set_host(rows, self._seq_length + num_tokens)
        with torch.inference_mode(False):
            self.cache_seqlens[: len(rows)].add_(counts[0])
            self.seq_length_t.add_(num_tokens)

    def set_host(self, rows: list[int], seq_length: int) -> None:
        """The host takes lengths read from the device (which already holds them)."""
        self._rows = [int(r) for r in rows]
        self._seq_length = int(seq_length)
        self._announced = self._reported = 0

    # -- compiled steps ----------------------------------------------------------------------
    def announce(self, num_tokens: int) -> None:
        """The next step (maybe compiled) adds ``num_tokens`` to every row."""
        self.settle()
        self._announced = num_tokens
        self._reported = 0

    @property
    def announced(self) -> int:
        """Tokens announced for a step not run yet (0: none)."""
        return self._announced if self._reported == 0 else 0

    def advance_on_device(self, batch: int, num_tokens: int, *, after: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Traced code of a compiled step: adds ``num_tokens`` on the device and
        returns ``cache_seqlens[:batch]`` (new tokens included). ``after``: a 0-d
        zero whose op must run first (it is added, which orders the adds after it)."""
        n = num_tokens if after is None else after + num_tokens
        seqlens = self.cache_seqlens[:batch]
        seqlens.add_(n)
        self.seq_length_t.add_(n)
        return seqlens

    def report_compiled_step(self, num_tokens: int) -> bool:
        """Called at run time by a compiled step of ``num_tokens`` tokens a row. True
        if prepare_step announced it (the host adds its tokens later, without a
        sync); False otherwise, also for a step of other than the announced tokens,
        whose commit did not cover it (the caller reads the lengths back and calls
        :meth:`set`)."""
        if self._announced and self._announced == num_tokens and self._reported == 0:
            self._reported = 1
            return True
        return False

    def report_capture(self) -> None:
        """A compiled step is being captured into a CUDA graph: from now on steps
        may run as replays, which report nothing."""
        self._maybe_replayed = True

    def read_device(self) -> tuple[list[int], int]:
        """The device's lengths (one device-to-host copy, a sync)."""
        both = torch.cat([self.cache_seqlens[: self.batch].long(), self.seq_length_t.view(1)]).tolist()
        return [int(r) for r in both[:-1]], int(both[-1])

    def settle(self, *, in_step: bool = False) -> None:
        """Makes the host exact after compiled steps (see the module docstring).

        ``in_step``: called by the eager step that may itself be the announced one.
        """
        if self._maybe_replayed and self.on_device:
            # A CUDA graph was captured, so a step may have run as a replay, which
            # runs no Python: only the device knows. Read it every time (one small
            # copy): an announcement can't say whether its step ran yet, and
            # trusting it left the host a step behind (an under-commit).
            self.set_host(*self.read_device())
            return
        if not self._announced:
            return
        if self._reported == 1:  # the announced step ran once, compiled: add it (no sync)
            n = self._announced
            self._rows = [r + n for r in self._rows]
            self._seq_length += n
            self._announced = self._reported = 0
        elif in_step:
            # Nothing ran yet; the announcement stays for the step to come (or,
            # from the eager step itself, is used up by it).
            self._announced = 0

    def __repr__(self) -> str:
        return f"SequenceLengths(rows={self._rows}, seq_length={self._seq_length}, announced={self._announced})"


@dataclass(frozen=True)
class StepPlan:
    """The eager step in progress, fixed by the cache in the first layer's update;
    the other layers and the attention read it."""

    batch: int
    num_tokens: int
    padded: bool  # padded mode: rows hold what DynamicCache holds
    start: int  # padded mode: where the new tokens go
    real_index: Optional[torch.Tensor] = None  # vkv + left padding: int64 [total_real], flat [B * S] index
    cu_seqlens_q: Optional[torch.Tensor] = None  # vkv: int32 [B + 1] (None: decode, one token a row)
    max_seqlen_q: int = 1
    # vkv, several tokens a row: int32 [B], the rows' lengths after this step (the values of
    # SequenceLengths.cache_seqlens[:B]). It and cu_seqlens_q carry host copies (metadata_tensor), so
    # a backend that plans on the host (FlashInfer's prefill, which `auto` takes for long prompts)
    # needs no device sync per layer.
    cache_seqlens: Optional[torch.Tensor] = None

    @staticmethod
    def build(batch: int, num_tokens: int, start: int, *, padded: bool, mask: Optional[torch.Tensor],
              real: Optional[list[int]], device: torch.device, rows: Optional[list[int]] = None) -> "StepPlan":  # fmt: skip
        """``real``: real tokens per row from :func:`padding_counts` (``None``: all); ``rows``: each
        row's length after this step (``None``: no ``cache_seqlens`` in the plan)."""
        B, S = batch, num_tokens
        if padded or (S == 1 and real is None):
            return StepPlan(B, S, padded, start)
        lens = None if rows is None else metadata_tensor(rows[:B], device)
        if real is None:
            cu = metadata_tensor(range(0, (B + 1) * S, S), device)
            return StepPlan(B, S, False, start, cu_seqlens_q=cu, max_seqlen_q=S, cache_seqlens=lens)
        cu = metadata_tensor(itertools.accumulate(real, initial=0), device)
        index = mask.reshape(-1).nonzero().flatten().to(device)
        return StepPlan(B, S, False, start, real_index=index, cu_seqlens_q=cu, max_seqlen_q=max(max(real), 1),
                        cache_seqlens=lens)  # fmt: skip


def padding_counts(mask: Optional[torch.Tensor], batch: int, num_tokens: int) -> Optional[list[int]]:
    """Real (non-padding) new tokens per row from a ``[batch, num_tokens]`` bool
    mask of the new tokens; ``None`` when every token is real. Left padding only."""
    if mask is None or tuple(mask.shape) != (batch, num_tokens) or bool(mask.all()):
        return None
    counts = mask.sum(1)
    expected = torch.arange(num_tokens, device=mask.device)[None, :] >= (num_tokens - counts[:, None])
    if not torch.equal(mask, expected):
        raise ValueError(
            "attn_implementation='vkv' supports left padding only: expected each row's new tokens as "
            "[pad..., real...] in attention_mask, got a mask with padding after real tokens"
        )
    return [int(c) for c in counts.tolist()]
