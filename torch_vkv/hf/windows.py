"""Sliding windows of a :class:`~torch_vkv.hf.VirtualKVCache`: which lengths its steps tell the KVCache.

A :class:`~torch_vkv.KVCache` with a ``sliding_window`` gives back, at each ``step``, a windowed
layer's pages behind ``L - W``, ``L`` the length it was last told (``KVCache.seq_lens``): right
for a step from ``L``, whose first query (at ``L``) reads keys from ``L - W + 1``. The adapter
often commits one step twice (``get_mask_sizes`` -> ``prepare_step``, then the eager update; or
``prepare_step`` called twice); a second call would trim from the step's *end* and drop keys the
first queries of a multi-token step read (wrong logits, or writes into pages already given back).
:func:`step_need` makes every step trim from its start; :func:`check_keep` refuses a crop
behind what the windows still hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from torch_vkv._checks import fail

__all__ = ["check_keep", "step_need"]


def step_need(kv: Any, need: np.ndarray, start: list[int]) -> np.ndarray:
    """The ``KVCache.step`` lengths (``[max_batch_size]``) of a step that takes row ``b`` from
    ``start[b]`` to ``need[b]`` tokens, on a cache with sliding-window layers.

    A row told at most ``start + 1`` is passed as it is (a trim from ``start + 1 - W`` keeps
    what the step reads: decode steps commit twice, each trimming). A row an earlier call of
    this step already backed (told more than ``start + 1``, at least ``need``) is left out (0);
    one told past ``need`` (a prepared step whose left padding was squeezed out) is brought back
    to ``need`` (a decommit, which lowers the told length), so the next step trims from its real
    start; one told between ``start + 2`` and ``need - 1`` starts from ``start`` again (its pages
    past ``start`` go back and are committed by the step)."""
    n = len(start)
    told = kv.seq_lens[:n]
    old = np.asarray(start, dtype=np.int64)
    new = need[:n]
    # Told at most one token past the start: a call trims from at most start + 1 - W, which the
    # step's first query (at start) does not read; a decode step commits so twice, as before.
    ahead = told > old + 1
    done = ahead & (told >= new)
    for b in np.flatnonzero(done & (told > new)).tolist():
        kv.decommit(b, int(new[b]))
    for b in np.flatnonzero(ahead & ~done).tolist():
        kv.decommit(b, int(old[b]))
    need = need.copy()
    need[:n][done] = 0
    return need


def check_keep(kv: Any, rows: list[int], what: str) -> None:
    """Refuses (``ValueError``, nothing changed) to leave row ``b`` with ``rows[b]`` tokens where a
    sliding layer already gave back rows its next query reads: after a step from ``L`` a windowed
    layer keeps the rows from the page of ``L - W`` on, so a row can go back to the start of its
    last step, not further (``DynamicCache``'s sliding layers refuse such crops too)."""
    if kv is None or not kv.windowed:
        return
    seen = set()
    for l, w in enumerate(kv.sliding_window):
        if w is None or w in seen:
            continue
        seen.add(w)
        first = kv.window_start(l)
        for b, keep in enumerate(rows):
            if keep and int(first[b]) > max(0, keep - w):
                fail(f"tokens left in row {b} by {what}", f"0 or at least {int(first[b]) + w} (its layers with a "
                     f"{w}-token sliding window gave back the rows below {int(first[b])}: a row can go back to "
                     "the start of its last step, not further)", keep)  # fmt: skip
