"""Input checks of :func:`attention` and :func:`append_kv`, done once at the public entry.

Two kinds of check:

* **Metadata of the tensors** (shapes, dtypes, devices, strides): always, never
  a host sync. :func:`check_attention`, :func:`check_append`.
* **Values of the sequence metadata** (``cache_seqlens``, ``cu_seqlens_q``,
  ``slots``, the used entries of ``block_table``): :func:`check_values`. When
  they live on the host (CPU tensors) they are checked on every eager call, for
  free. When they live on the device they are *not* read (a read is a sync, and
  impossible inside a CUDA graph); the kernels and the torch paths mask a bad
  request instead (it reads no key, writes no row; its output rows are zero).
  ``TORCH_VKV_DEBUG=1`` checks device metadata too, with a sync
  (:func:`debug_enabled`; skipped while tracing or capturing a CUDA graph).

A request ``r`` is valid when ``0 <= slots[r] < num_slots``,
``num_new[r] <= cache_seqlens[r] <= max_len`` (its new tokens sit below its
length, its length inside the row) and, with a block table, the block ids of
positions ``[0, cache_seqlens[r])`` lie in ``[0, num_blocks)``; ``cu_seqlens_q``
starts at 0, never decreases and ends at ``total_q``.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import numpy as np
import torch

from .._checks import ArgumentTypeError, check_int, fail

#: Every ``attention(backend=...)`` name (``torch_vkv.BACKENDS``); :func:`available_backends` says which
#: of them can run on a device in this process.
BACKENDS = ("auto", "torch_fa2", "flash_attn", "flashinfer", "triton", "flex", "sdpa")


def debug_enabled() -> bool:
    """``TORCH_VKV_DEBUG=1``: check device-side metadata values too (with a device sync).

    Read at call time, so a test or a REPL can switch it on and off.
    """
    return os.environ.get("TORCH_VKV_DEBUG", "0") not in ("", "0")


def _committed_rows_check(cache: torch.Tensor):
    """For a ``VirtualKVView`` (``KVCache.key``/``value``) of an open cache, or a
    plain tensor over its memory (a slice, ``view.as_subclass(torch.Tensor)``): a
    function ``(slot, start, end) -> bool``, whether those rows are committed
    (the page table read once); ``None`` when nothing can be known (another
    tensor). In a forked child: the pages mapped at fork() (its private
    copies). A closed cache's view raises ``RuntimeError``."""
    from ..tensor import view_over_cache  # the tensor module never imports attention

    cache = view_over_cache(cache)
    if cache is None:
        return None
    reservation = cache.source.reservation
    if reservation.closed:
        raise RuntimeError("append_kv: the cache of k_cache/v_cache is closed (its memory is released); "
                           "take new views from an open KVCache")  # fmt: skip
    runs = reservation.inherited_ranges() if reservation.forked else reservation.committed_ranges()
    return lambda slot, start, end: cache._rows_committed(slot, start, end, runs)


def cache_bounds(k_cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> tuple:
    """(num_slots, max_len, num_blocks): the limits every request's metadata is held to."""
    if block_table is None:
        return k_cache.shape[0], k_cache.shape[1], 1
    return block_table.shape[0], block_table.shape[1] * k_cache.shape[1], k_cache.shape[0]


# ----------------------------------------------------------------------------
# metadata of the tensors
# ----------------------------------------------------------------------------


def _check_tensor(what, t):
    if not isinstance(t, torch.Tensor):
        fail(what, "a torch.Tensor", type(t).__name__, TypeError)


def _check_common(k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, device, what_new):
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        _check_tensor(name, t)
    if k_cache.dim() != 4:
        fail("k_cache", "4-D [B, S_max, num_kv_heads, head_dim]" if block_table is None
             else "4-D [num_blocks, page_size, num_kv_heads, head_dim]", tuple(k_cache.shape))  # fmt: skip
    if k_cache.stride(-1) != 1:  # first: a transposed k_cache would otherwise be reported as v_cache's shape
        fail("k_cache.stride(-1)", "1 (contiguous head_dim, shape [..., num_kv_heads, head_dim])", k_cache.stride(-1))
    if v_cache.shape != k_cache.shape:
        fail("v_cache.shape", f"k_cache.shape {tuple(k_cache.shape)}", tuple(v_cache.shape))
    if k_cache.dtype != v_cache.dtype:
        fail("v_cache.dtype", f"k_cache.dtype {k_cache.dtype}", v_cache.dtype, TypeError)
    if v_cache.stride(-1) != 1:
        fail("v_cache.stride(-1)", "1 (contiguous head_dim, shape [..., num_kv_heads, head_dim])", v_cache.stride(-1))
    if cache_seqlens.dim() != 1 or cache_seqlens.dtype != torch.int32:
        fail("cache_seqlens", "a 1-D int32 tensor [num_requests]", f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    R = cache_seqlens.shape[0]
    if cu_seqlens_q is not None:
        _check_tensor("cu_seqlens_q", cu_seqlens_q)
        if cu_seqlens_q.dtype != torch.int32 or tuple(cu_seqlens_q.shape) != (R + 1,):
            fail("cu_seqlens_q", f"an int32 tensor of shape [{R + 1}] (num_requests + 1)",
                 f"{cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")  # fmt: skip
    if slots is not None:
        _check_tensor("slots", slots)
        if slots.dtype not in (torch.int32, torch.int64) or tuple(slots.shape) != (R,):
            fail("slots", f"an int32/int64 tensor of shape [{R}]", f"{slots.dtype} {tuple(slots.shape)}")
    if block_table is not None:
        _check_tensor("block_table", block_table)
        if block_table.dtype != torch.int32 or block_table.dim() != 2:
            fail("block_table", "a 2-D int32 tensor [num_slots, max_blocks]", f"{block_table.dtype} {tuple(block_table.shape)}")
        if block_table.stride(-1) != 1:
            fail("block_table.stride(-1)", "1", block_table.stride(-1))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens),
                    ("cu_seqlens_q", cu_seqlens_q), ("slots", slots), ("block_table", block_table)):  # fmt: skip
        if t is not None and t.device != device:
            fail(f"{name}.device", f"{what_new}'s device {device}", t.device)


def check_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, backend) -> None:
    """Shapes, dtypes, devices and strides of :func:`attention`'s arguments (no value is read)."""
    _check_tensor("q", q)
    if q.dim() != 3:
        fail("q", "3-D [total_q, num_heads, head_dim]", tuple(q.shape))
    if q.shape[2] < 1:  # the default scale 1 / sqrt(head_dim) divided by zero
        fail("head_dim", "an int >= 1", q.shape[2])
    _check_tensor("k_cache", k_cache)
    if k_cache.dim() == 4 and k_cache.shape[3] != q.shape[2]:  # before k/v agreement: names the culprit
        fail("k_cache head_dim", f"q's head_dim {q.shape[2]}", k_cache.shape[3])
    _check_common(k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, q.device, "q")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        fail("q.dtype", "float16, bfloat16 or float32", q.dtype, TypeError)
    if k_cache.dtype != q.dtype:
        fail("k_cache.dtype", f"q.dtype {q.dtype}", k_cache.dtype, TypeError)
    if k_cache.shape[3] != q.shape[2]:
        fail("k_cache head_dim", f"q's head_dim {q.shape[2]}", k_cache.shape[3])
    if k_cache.shape[2] == 0 or q.shape[1] % k_cache.shape[2]:
        fail("num_heads", f"a multiple of num_kv_heads {k_cache.shape[2]}", q.shape[1])
    if q.stride(-1) != 1:
        fail("q.stride(-1)", "1", q.stride(-1))
    if cu_seqlens_q is None and q.shape[0] != cache_seqlens.shape[0]:
        fail("q.shape[0] (decode, cu_seqlens_q=None)", f"num_requests = {cache_seqlens.shape[0]}", q.shape[0])
    if not isinstance(backend, str) or backend not in BACKENDS:
        fail("backend", f"one of {BACKENDS}", backend)


def check_window(window_left, softcap) -> tuple:
    """``(window_left, softcap)`` as the ops take them: ``-1`` / ``0.0`` for None.

    ``window_left``: None or an int >= 0 (a query at ``p`` sees keys ``[p - window_left, p]``);
    ``softcap``: None or a finite real > 0 (scores ``softcap * tanh(score / softcap)``).
    """
    # high: the ops take an int64 (a larger int failed deep in the dispatcher with an unreadable message).
    win = -1 if window_left is None else check_int("window_left", window_left, low=0, high=2**63 - 1)
    if softcap is None:
        return win, 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        fail("softcap", "None or a real number > 0", softcap, TypeError)
    if not (math.isfinite(float(softcap)) and float(softcap) > 0):
        fail("softcap", "None or a finite real number > 0", softcap)
    return win, float(softcap)


def check_scale_causal(scale, causal, head_dim: int) -> float:
    """``scale`` as the ops take it (None: ``1 / sqrt(head_dim)``; else a finite
    real > 0), after checking that ``causal`` is a bool."""
    if not isinstance(causal, (bool, np.bool_)):
        fail("causal", "a bool", causal, ArgumentTypeError)
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        fail("scale", "None or a real number > 0", scale, ArgumentTypeError)
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        fail("scale", "None or a finite real number > 0 (the softmax scale)", scale)
    return float(scale)


def check_launch_ints(max_seqlen_q, num_splits) -> tuple:
    """``max_seqlen_q`` and ``num_splits``: None or an int >= 0 (``num_splits`` 0: from the shapes).
    They size launch grids, so a bool, a float or a negative count is refused here instead of being
    clamped or truncated into another value (a SymInt from a trace passes as it is)."""
    checked = []
    for what, value in (("max_seqlen_q", max_seqlen_q), ("num_splits", num_splits)):
        if value is not None and not isinstance(value, torch.SymInt):
            value = check_int(what, value, low=0, high=2**31 - 1)
        checked.append(value)
    return tuple(checked)


def window_from_module_kwargs(kwargs: dict) -> dict:
    """``attention``'s ``window_left`` / ``softcap`` from what a transformers attention module passes its
    attention function: ``sliding_window = W`` lets a query see ``W`` keys, itself included, so
    ``window_left = W - 1`` (Mistral, Gemma 2/3, Qwen2/3 sliding layers); ``softcap`` as is (Gemma 2).
    Only the keys that apply: ``{}`` for a global, uncapped layer."""
    out = {}
    if kwargs.get("sliding_window") is not None:
        out["window_left"] = int(kwargs["sliding_window"]) - 1
    if kwargs.get("softcap") is not None:
        out["softcap"] = float(kwargs["softcap"])
    return out


def check_append(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table) -> None:
    """Shapes, dtypes, devices and strides of :func:`append_kv`'s arguments (no value is read)."""
    _check_tensor("k_new", k_new)
    _check_tensor("v_new", v_new)
    _check_common(k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, k_new.device, "k_new")
    want = (k_cache.shape[2], k_cache.shape[3])
    if k_new.dim() != 3 or tuple(k_new.shape[1:]) != want:
        fail("k_new", f"shape [total_q, {want[0]}, {want[1]}]", tuple(k_new.shape))
    if v_new.shape != k_new.shape:
        fail("v_new.shape", f"k_new.shape {tuple(k_new.shape)}", tuple(v_new.shape))
    if k_new.dtype != k_cache.dtype or v_new.dtype != v_cache.dtype:
        fail("k_new/v_new dtype", f"the cache dtype {k_cache.dtype}", (k_new.dtype, v_new.dtype), TypeError)
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        fail("k_new/v_new stride(-1)", "1", (k_new.stride(-1), v_new.stride(-1)))
    if cu_seqlens_q is None and k_new.shape[0] != cache_seqlens.shape[0]:
        fail("k_new.shape[0] (decode, cu_seqlens_q=None)", f"num_requests = {cache_seqlens.shape[0]}", k_new.shape[0])


# ----------------------------------------------------------------------------
# values of the sequence metadata
# ----------------------------------------------------------------------------


def check_values(
    k_cache, cache_seqlens, cu_seqlens_q, slots, block_table, total_q, *, max_seqlen_q=None, what="attention",
    v_cache=None,
) -> None:
    """Raise ``ValueError`` naming the first bad request; a no-op for device metadata
    unless :func:`debug_enabled`, and always while tracing or capturing a CUDA graph.

    For ``append_kv`` into views of a ``KVCache`` (``v_cache`` given) it also
    checks that the rows written are committed: a write to an uncommitted row
    is a segfault on the host backend and an illegal address on CUDA."""
    if torch.compiler.is_compiling():
        return
    on_device = cache_seqlens.device.type != "cpu"
    if on_device:
        if not debug_enabled() or (cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        origin = " (TORCH_VKV_DEBUG=1 check of device metadata)"
    else:
        origin = ""
    lens = cache_seqlens.tolist()  # a device sync only in debug mode
    R = len(lens)
    if cu_seqlens_q is not None:
        cu = cu_seqlens_q.tolist()
        if cu[0] != 0 or cu[-1] != total_q or any(b < a for a, b in zip(cu, cu[1:])):
            fail(f"{what}: cu_seqlens_q{origin}", f"non-decreasing offsets from 0 to total_q = {total_q}", cu)
        longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
        if max_seqlen_q is not None and longest > max_seqlen_q:
            fail(f"{what}: max_seqlen_q{origin}", f"at least the longest request's {longest} queries", max_seqlen_q)
    else:
        cu = list(range(R + 1))
    slot_list = slots.tolist() if slots is not None else list(range(R))
    num_slots, max_len, num_blocks = cache_bounds(k_cache, block_table)
    checks = []  # append_kv into KVCache views: the rows written must be committed
    if v_cache is not None and block_table is None:
        checks = [(name, f) for name, c in (("k_cache", k_cache), ("v_cache", v_cache))
                  if (f := _committed_rows_check(c)) is not None]  # fmt: skip
    # append_kv, host metadata: slot -> [(start, end, request)] of new rows. Not in the debug check of device
    # metadata: CUDA-graph padding rows all write row 0 of the serving engine's scratch slot, on purpose.
    written = {} if v_cache is not None and not on_device else None
    for r in range(R):
        s, L, n = slot_list[r], lens[r], cu[r + 1] - cu[r]
        if not 0 <= s < num_slots:
            fail(f"{what}: request {r}'s slot{origin}", f"a slot in [0, {num_slots})", s)
        if L < n:
            fail(f"{what}: request {r} (slot {s}) cache_seqlens{origin}",
                 f"at least its {n} new token(s) (the length counts them: append first, then attend)", L)  # fmt: skip
        if L > max_len:
            fail(f"{what}: request {r} (slot {s}) cache_seqlens{origin}", f"at most the {max_len} rows of a slot", L)
        if n and written is not None:  # two writers of one row: which lands is up to the kernel's schedule
            for a, b, other in written.setdefault(s, []):
                if a < L and L - n < b:
                    fail(f"{what}: request {r} (slot {s}) new rows [{L - n}, {L}){origin}",
                         "rows that no other request of the call writes", f"request {other} writes [{a}, {b}) too")  # fmt: skip
            written[s].append((L - n, L, r))
        if n and checks:
            for name, committed in checks:
                if not committed(s, L - n, L):
                    fail(f"{what}: request {r} (slot {s}) cache_seqlens{origin}",
                         f"a length whose new rows [{L - n}, {L}) of {name} are committed (commit them first: "
                         "KVCache.commit or step)", L)  # fmt: skip
    if block_table is not None and R:
        page = k_cache.shape[1]
        for r in range(R):
            used = block_table[slot_list[r], : -(-lens[r] // page)].tolist()
            bad = [b for b in used if not 0 <= b < num_blocks]
            if bad:
                fail(f"{what}: request {r} (slot {slot_list[r]}) block_table entries{origin}",
                     f"block ids in [0, {num_blocks}) for its {lens[r]} tokens", bad)  # fmt: skip


def check_committed_writes(k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table) -> None:
    """``append_kv``'s committed-rows check alone, run by the op itself for host metadata: a compiled step
    skips :func:`check_values` while tracing and its masking keeps writes inside a slot's rows, not inside
    committed pages (a write to an uncommitted row of a ``KVCache`` view is a segfault on the host backend).
    Requests that the masking drops (slot or length out of range) are skipped: they write nothing."""
    if cache_seqlens.device.type != "cpu" or block_table is not None or torch.compiler.is_compiling():
        return
    checks = [(name, f) for name, c in (("k_cache", k_cache), ("v_cache", v_cache))
              if (f := _committed_rows_check(c)) is not None]  # fmt: skip
    if not checks:
        return
    lens = cache_seqlens.tolist()
    cu = cu_seqlens_q.tolist() if cu_seqlens_q is not None else list(range(len(lens) + 1))
    slot_list = slots.tolist() if slots is not None else list(range(len(lens)))
    for r, (s, L) in enumerate(zip(slot_list, lens)):
        n = cu[r + 1] - cu[r]
        if n <= 0 or not (0 <= s < k_cache.shape[0] and n <= L <= k_cache.shape[1]):
            continue
        for name, committed in checks:
            if not committed(s, L - n, L):
                fail(f"append_kv: request {r} (slot {s}) cache_seqlens",
                     f"a length whose new rows [{L - n}, {L}) of {name} are committed (commit them first: "
                     "KVCache.commit or step)", L)  # fmt: skip


def valid_requests(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table):
    """Device-side twin of :func:`check_values` for the torch paths (no sync, traceable).

    Returns ``(ok, lens, rows)``: ``ok`` bool ``[R]`` marks valid requests; ``lens``
    (int64) is the length of a valid request and 0 otherwise; ``rows`` (int64) its
    slot and 0 otherwise, so gathers stay in bounds and read nothing of a bad request.
    Block ids are not checked here; see :func:`safe_blocks`.
    """
    R = cache_seqlens.shape[0]
    num_slots, max_len, _ = cache_bounds(k_cache, block_table)
    lens = cache_seqlens.long()
    rows = slots.long() if slots is not None else torch.arange(R, device=lens.device)
    n = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long() if cu_seqlens_q is not None else torch.ones_like(lens)
    ok = (rows >= 0) & (rows < num_slots) & (lens >= n) & (lens <= max_len) & (n >= 0)
    return ok, torch.where(ok, lens, 0), torch.where(ok, rows, 0)


def safe_blocks(block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``block_table`` with every id clamped into ``[0, num_blocks)`` (reads stay in the pool)."""
    return block_table.clamp(0, num_blocks - 1)
