"""Attention over a KV cache held in contiguous (virtual) memory, and its paged twins.

One entry point, :func:`attention`, shared by the Hugging Face adapter and the
serving engine, and one in-place writer, :func:`append_kv`. Attention kernels
see ordinary strided tensors: a ``KVCache`` layer view (both layouts) is a
``[B, S_max, num_kv_heads, head_dim]`` tensor with ``stride(-1) == 1`` and any
batch/row/head strides::

    per_layer:   buf[B, S_pad, H, D]         k = buf[:, :S_max]            stride(1) = H*D
    interleaved: buf[B, S_pad, L, 2, H, D]   k = buf[:, :S_max, l, 0]      stride(1) = L*2*H*D

Conventions (the contract):

* ``q`` is packed varlen ``[total_q, num_heads, head_dim]``; request ``r`` owns
  rows ``cu_seqlens_q[r]:cu_seqlens_q[r+1]`` (``cu_seqlens_q=None``: decode,
  one row per request).
* ``cache_seqlens[r]`` (int32, on the device) counts request ``r``'s valid
  keys *including* its new tokens: append first, then attend. The queries sit
  at the last positions, so the causal mask is bottom-right aligned.
* ``slots[r]`` is the cache row of request ``r`` (default ``r``).
* Rows past ``cache_seqlens`` may hold anything, NaN included: every backend
  masks them (loads are masked, or the rows are zeroed, never multiplied by 0).

Backends (``backend=``):

==============  ============================================================
``torch_fa2``   PyTorch's built-in FlashAttention-2, varlen path with
                ``seqused_k``, unchanged: the cache is flattened to
                ``[B*S_pad, H, D]`` rows (``cum_seq_k = slots * S_pad``).
                CUDA, fp16/bf16, ``stride(0) % stride(1) == 0``.
``flash_attn``  ``flash_attn_with_kvcache`` from the flash-attn package, if
                importable (paged: page size a multiple of 256).
``flashinfer``  FlashInfer's kernels, unchanged, if importable: tensor-core
                decode over a page table of 16-64-row pages laid on each
                slot's rows, FA3 (Hopper) / FA2 ragged prefill on each slot's
                contiguous rows. CUDA, fp16/bf16, head_dim 64/128/256, no
                ``block_table``; prefill plans on the host: it reads the
                lengths back (a sync per call) unless the metadata tensors
                carry host copies (``metadata_tensor``, ``host_values.py``).
``triton``      our kernels (``torch_vkv.triton_kernels``): split-KV decode
                (flash-decoding) and varlen causal prefill; with
                ``block_table=`` their paged twins.
``flex``        FlexAttention over the flattened cache (or the block pool),
                block mask built on the device from the lengths.
``sdpa``        ``scaled_dot_product_attention`` with a dense mask: the
                reference and CPU fallback. Reads all ``S_max`` rows (or
                ``max_blocks * page_size``), so on a virtual cache those rows
                must be committed; never chosen by ``auto`` on CUDA.
``auto``        see :func:`select_backend`.
==============  ============================================================

Layout of this package (one module per concern)::

    __init__.py        attention(), append_kv(): checks once, then dispatch
    inputs.py          every input check, host metadata values, TORCH_VKV_DEBUG
    selection.py       available_backends(), select_backend() (the ``auto`` rule)
    deps.py            optional dependencies (triton, flash-attn, flex), found lazily
    common.py          the op schema and flat views shared by backends
    torch_fa2.py  flash_attn.py  flashinfer_backend.py  triton_backend.py  flex.py  sdpa.py
                       one backend each
    append.py          the ops that write the cache (append_kv, zero_tail)
    host_values.py     host copies attached to metadata tensors (no sync where a backend plans on the host)

The Triton kernels live in the top-level ``triton_kernels/`` folder, installed
as ``torch_vkv.triton_kernels`` (setup.py ``package_dir``) and imported on
first use only.

**Name clash, resolved one way:** ``torch_vkv.attention`` is the *function*.
``torch_vkv/__init__.py`` imports it eagerly, after this package, so the
attribute always names the function, also after ``import
torch_vkv.attention.<submodule>`` (importing a submodule of an already imported
package does not rebind the package attribute). The package (this module) is
reached with ``from torch_vkv.attention import ...`` or
``importlib.import_module("torch_vkv.attention")``; ``torch.compile`` traces a
call to the function like any other.

**Bad metadata values** (``inputs.py``): on the host (CPU tensors) a slot out of
range, a length below the request's new tokens or past the row, inconsistent
``cu_seqlens_q`` or a block id outside the pool raise ``ValueError`` naming the
request, slot and lengths. On the device they are never read (no sync): every
backend treats such a request as empty, it writes nothing and reads nothing
outside ``[0, S_max)`` of a slot, and its output rows are zero.
``TORCH_VKV_DEBUG=1`` checks device metadata too, with a sync.

Every backend is a ``torch.library`` custom op with a fake implementation (or
plain traceable torch code), so ``torch.compile(fullgraph=True)`` sees no graph
break; none reads a length on the host, so all but ``sdpa`` over an
uncommitted tail are CUDA-graph capturable (launch shapes depend only on
tensor shapes and on the host ints ``max_seqlen_q`` / ``num_splits``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import fail
from .._compile_guard import check_backend
from ..tensor import VirtualKVTensor, VirtualKVView
from . import deps
from .append import append_kv_impl, append_kv_op
from .common import dispatch_free, flat_rows
from .flash_attn import flash_attn_attention
from .flashinfer_backend import flashinfer_attention, flashinfer_attention_impl, layout_problem
from .host_values import attach_host_values, host_values, metadata_tensor
from .flex import flex_attend, flex_attention_op, uncommitted_block_reads
from .inputs import (
    BACKENDS, check_append, check_attention, check_launch_ints, check_scale_causal, check_values, check_window,
    debug_enabled,
)
from .sdpa import sdpa_attention
from .selection import available_backends, flashinfer_prefill_runs_fa3, select_backend, supports
from .torch_fa2 import fa2_attention, fa2_supported
from .triton_backend import pow2_dim, triton_attention, triton_attention_impl

__all__ = [
    "BACKENDS",
    "append_kv",
    "attention",
    "attach_host_values",
    "available_backends",
    "debug_enabled",
    "host_values",
    "metadata_tensor",
    "select_backend",
]


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    slots: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    backend: str = "auto",
    block_table: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    num_splits: Optional[int] = None,
    window_left: Optional[int] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Attention of packed queries over their requests' cached keys.

    Parameters
    ----------
    q : shape ``[total_q, num_heads, head_dim]``, fp16/bf16/fp32. Decode: one
        row per request.
    k_cache, v_cache : shape ``[B, S_max, num_kv_heads, head_dim]``, q's dtype,
        ``stride(-1) == 1``, any batch/row/head strides (``KVCache`` layer
        views of both layouts). With ``block_table``: block pools
        ``[num_blocks, page_size, num_kv_heads, head_dim]`` (``torch_vkv.paged``).
    cache_seqlens : int32, shape ``[num_requests]``, on q's device: valid keys
        per request *including* the new tokens (append first, then attend).
    cu_seqlens_q : int32, shape ``[num_requests + 1]``: query row offsets.
        ``None``: decode, one query per request.
    slots : int32/int64, shape ``[num_requests]``: cache row (block-table row)
        of each request; default ``arange(num_requests)``.
    causal : bool: bottom-right aligned causal mask (queries at the last positions).
    scale : softmax scale, a finite real > 0; default ``1 / sqrt(head_dim)``.
    backend : one of :data:`BACKENDS`; ``"auto"`` follows :func:`select_backend`.
    block_table : int32, shape ``[num_slots, max_blocks]``: run the paged twin.
    max_seqlen_q : host int >= 0, an upper bound on any request's query count
        (sizes launch grids / padding; default ``total_q``; a smaller value
        than the longest request's raises ``ValueError``). Passing a tight
        bound makes padded backends (flex, sdpa, flash_attn) cheaper.
    num_splits : host int, Triton decode only: KV splits per (request, kv head);
        ``None`` or 0: from the shapes (never from the lengths).
    window_left : sliding window, int >= 0: a query at position ``p`` sees keys
        ``[p - window_left, p]`` (bottom-right aligned like the causal mask; a
        Hugging Face ``sliding_window = W`` is ``window_left = W - 1``). Keys
        behind every query's window are never read (those rows may be
        decommitted); ``None``: no window. Every backend takes it.
    softcap : float > 0: scores become ``softcap * tanh(score / softcap)`` before
        the softmax (Gemma 2). ``torch_fa2`` has none: it raises, ``auto`` picks
        another backend.

    Returns
    -------
    out : shape ``[total_q, num_heads, head_dim]``, q's dtype.

    Raises
    ------
    TypeError, ValueError : bad tensors ("expected X, got Y"); bad metadata values
        when they are on the host (or always, with ``TORCH_VKV_DEBUG=1``).
    """
    check_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, backend)
    decode = cu_seqlens_q is None
    scale = check_scale_causal(scale, causal, q.shape[2])
    max_seqlen_q, num_splits = check_launch_ints(max_seqlen_q, num_splits)
    T = q.shape[0]
    max_q = 1 if decode else max(1, min(T, max_seqlen_q if max_seqlen_q is not None else T))
    check_values(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table, T, max_seqlen_q=max_seqlen_q)
    win, cap = check_window(window_left, softcap)
    if backend == "auto":
        known = not decode and host_values(cache_seqlens) is not None and host_values(cu_seqlens_q) is not None \
            and (slots is None or host_values(slots) is not None)  # fmt: skip
        backend = select_backend(q, k_cache, v_cache, decode=decode, block_table=block_table, softcap=cap > 0,
                                 window=win >= 0, host_metadata=known)  # fmt: skip
        if backend == "flashinfer" and not flashinfer_prefill_runs_fa3(k_cache, cache_seqlens, slots):
            # No committed rows for FA3's tile tails: FlashInfer would run FA2, slower than triton.
            backend = select_backend(q, k_cache, v_cache, decode=decode, block_table=block_table, softcap=cap > 0,
                                     window=win >= 0, host_metadata=False)  # fmt: skip
    if not supports(backend, window_left=win >= 0, softcap=cap > 0):
        fail(f"backend {backend!r} with softcap", "a backend with soft-capping (flash_attn, flashinfer, triton, flex, sdpa, "
             "or 'auto')", backend)  # fmt: skip
    if backend == "torch_fa2" and not fa2_supported(q, k_cache, v_cache, block_table):
        # Not flattenable (or paged, or fp32, or CPU): the same math through our kernels.
        if block_table is None and q.is_cuda and deps.HAS_TORCH_FA2 and q.dtype != torch.float32 and flat_rows(k_cache) is None:
            backend = "triton" if deps.triton_usable(q.device) else "sdpa"
        else:
            fail("backend 'torch_fa2'", "CUDA fp16/bf16 tensors, head_dim % 8 == 0, no block_table, "
                 "torch with _flash_attention_forward(seqused_k=)",
                 f"device={q.device}, dtype={q.dtype}, head_dim={q.shape[2]}, block_table={block_table is not None}")  # fmt: skip
    # The kernels index these 1-D tensors densely (no-ops when already contiguous).
    cache_seqlens = cache_seqlens.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous() if cu_seqlens_q is not None else None
    slots = slots.contiguous() if slots is not None else None
    args = (q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, bool(causal), scale, max_q)
    extra = (win, cap)
    if backend == "triton":
        if not deps.HAS_TRITON:
            fail("backend 'triton'", "the triton package to be importable", "ImportError")
        if not deps.triton_usable(q.device):
            fail("backend 'triton'", "CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)", str(q.device))
        if not pow2_dim(q.shape[2]):
            fail("head_dim for backend 'triton'", "a power of two in [16, 256]", q.shape[2])
        op = triton_attention_impl if dispatch_free(q, k_cache, v_cache) else triton_attention
        return op(*args, int(num_splits or 0), *extra)
    if backend == "torch_fa2":
        return fa2_attention(*args, 0, *extra)
    if backend == "flash_attn":
        if not deps.has_flash_attn():
            fail("backend 'flash_attn'", "the flash-attn package to be importable", "ImportError")
        return flash_attn_attention(*args, 0, *extra)
    if backend == "flashinfer":
        _check_flashinfer(q, k_cache, v_cache, decode, block_table)
        op = flashinfer_attention_impl if dispatch_free(q, k_cache, v_cache) else flashinfer_attention
        return op(*args, 0, *extra)
    if backend == "flex":
        if deps.flex_module() is None:
            fail("backend 'flex'", "torch.nn.attention.flex_attention", "ImportError")
        if q.is_cuda and not deps.HAS_TRITON:
            fail("backend 'flex' on CUDA", "the triton package to be importable", "ImportError")
        # Eager calls only: a traced call sees no cache attributes (documented in docs/attention.md).
        checked = q.is_cuda and block_table is None and not torch.compiler.is_compiling()
        problem = uncommitted_block_reads(k_cache) if checked else None
        if problem is not None:
            raise ValueError(f"backend 'flex' on CUDA: expected {problem}")
        # CPU: plain traceable code; CUDA: one opaque op (see flex.flex_attention_op).
        if q.is_cuda:
            return flex_attention_op(*args, *extra)
        if any(t.requires_grad for t in (q, k_cache, v_cache)):
            # Inference only, as the ops (no backward): torch's CPU flex refuses grad inputs outright.
            args = tuple(a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)
        return flex_attend(*args, *extra)
    return sdpa_attention(*args, 0, *extra)


def _check_flashinfer(q, k_cache, v_cache, decode: bool, block_table) -> None:
    """What ``backend="flashinfer"`` needs, checked before the op (clear errors, no value read)."""
    if not deps.has_flashinfer():
        fail("backend 'flashinfer'", "the flashinfer package (>= 0.7) to be importable", "ImportError")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        fail("backend 'flashinfer'", "CUDA fp16/bf16 tensors", f"device={q.device}, dtype={q.dtype}")
    if q.shape[2] not in (64, 128, 256):
        fail("head_dim for backend 'flashinfer'", "64, 128 or 256", q.shape[2])
    if block_table is not None:  # FlashInfer's own paged kernels over the block pool
        from .flashinfer_paged import paged_layout_problem

        problem = paged_layout_problem(k_cache, v_cache, block_table)
        if problem is not None:
            fail("block pool for backend 'flashinfer'", problem, "another layout")
        return
    problem = layout_problem(k_cache, v_cache, decode=decode)
    if problem is not None:
        fail("cache layout for backend 'flashinfer'", problem, "another layout (use 'auto' to skip flashinfer)")


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    slots: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> None:
    """Write the new tokens' K/V at their positions in the cache, in place.

    Token ``i`` of request ``r`` (of ``n`` new tokens) goes to position
    ``cache_seqlens[r] - n + i`` of cache row ``slots[r]``: ``cache_seqlens``
    already counts the new tokens, exactly as :func:`attention` expects.
    A Triton kernel on CUDA (and on the CPU under ``TRITON_INTERPRET=1``),
    otherwise one ``index_put_`` per cache; a custom op, so it traces and
    captures like :func:`attention`.

    Parameters
    ----------
    k_cache, v_cache : shape ``[B, S_max, num_kv_heads, head_dim]`` (any
        batch/row/head strides, ``stride(-1) == 1``), or block pools
        ``[num_blocks, page_size, num_kv_heads, head_dim]`` with ``block_table``.
    k_new, v_new : shape ``[total_q, num_kv_heads, head_dim]``, packed like ``q``.
    cache_seqlens : int32, shape ``[num_requests]``, new tokens included.
    cu_seqlens_q : int32, shape ``[num_requests + 1]``; ``None``: one new token per request.
    slots : shape ``[num_requests]``: cache row (block-table row) per request.
    block_table : int32, shape ``[num_slots, max_blocks]`` (paged cache).

    A request whose metadata is out of range writes nothing: ``ValueError`` when the
    metadata is on the host, masked on the device (see the module docstring).
    """
    if torch.compiler.is_compiling() and isinstance(k_cache, (VirtualKVTensor, VirtualKVView)):
        check_backend()  # aot_eager would copy the whole reservation around the write: an error, not a fault
    check_append(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table)
    check_values(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table, k_new.shape[0], what="append_kv",
                 v_cache=v_cache)  # fmt: skip
    cache_seqlens = cache_seqlens.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous() if cu_seqlens_q is not None else None
    slots = slots.contiguous() if slots is not None else None
    op = append_kv_impl if dispatch_free(k_cache, v_cache, k_new, v_new) else append_kv_op
    op(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table)


# ----------------------------------------------------------------------------
# Private names of the former single module, kept importable from
# ``torch_vkv.attention`` for code not yet moved to the public names (hf.py,
# tests/test_paged.py, bench). They are plain aliases: patching one here does
# not change what the backends call (patch ``torch_vkv.attention.deps`` instead).
# ----------------------------------------------------------------------------
_triton_kernels = deps.triton_kernels
_triton_usable = deps.triton_usable
_flash_attn_fn = deps.flash_attn_fn
_has_flash_attn = deps.has_flash_attn
_flex_module = deps.flex_module
_append_kv_op = append_kv_op
_pow2_dim = pow2_dim
_fa2_supported = fa2_supported


def _has_triton() -> bool:
    return deps.HAS_TRITON


def _has_torch_fa2() -> bool:
    return deps.HAS_TORCH_FA2
