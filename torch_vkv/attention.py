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

Every backend is a ``torch.library`` custom op with a fake implementation (or
plain traceable torch code), so ``torch.compile(fullgraph=True)`` sees no graph
break; none reads a length on the host, so all but ``sdpa`` over an
uncommitted tail are CUDA-graph capturable (launch shapes depend only on
tensor shapes and on the host ints ``max_seqlen_q`` / ``num_splits``).
"""

import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import fail


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing dynamo (and
    with it triton) when torch_vkv is imported: the decorator only sets this
    marker, which dynamo reads when it traces a call (torch 2.11 to 2.13)."""
    fn._dynamo_marked_constant = True
    return fn

__all__ = [
    "BACKENDS",
    "append_kv",
    "attention",
    "available_backends",
    "select_backend",
]

BACKENDS = ("auto", "torch_fa2", "flash_attn", "triton", "flex", "sdpa")

# ----------------------------------------------------------------------------
# optional dependencies, imported lazily (torch_vkv imports without triton)
# ----------------------------------------------------------------------------

_TK = None


def _triton_kernels():
    """``torch_vkv.triton_kernels`` (imports triton); also works from a source checkout.

    setup.py installs the top-level ``triton_kernels/`` folder as
    ``torch_vkv.triton_kernels``; in an uninstalled checkout we load it from
    there under the same name.
    """
    global _TK
    if _TK is None:
        try:
            _TK = importlib.import_module("torch_vkv.triton_kernels")
        except ModuleNotFoundError as e:
            if e.name not in ("torch_vkv.triton_kernels",):
                raise
            src = Path(__file__).resolve().parent.parent / "triton_kernels" / "__init__.py"
            if not src.exists():
                raise
            spec = importlib.util.spec_from_file_location(
                "torch_vkv.triton_kernels", src, submodule_search_locations=[str(src.parent)]
            )
            mod = importlib.util.module_from_spec(spec)
            sys.modules["torch_vkv.triton_kernels"] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                del sys.modules["torch_vkv.triton_kernels"]
                raise
            _TK = mod
    return _TK


# Evaluated once, at import: these are facts about the installation, and computing them
# under torch.compile would break the graph (dynamo skips importlib.util.find_spec and
# cannot wrap an op's FunctionSchema). find_spec imports nothing.
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_FLASH_ATTN_SPEC = importlib.util.find_spec("flash_attn") is not None
_HAS_TORCH_FA2 = hasattr(torch.ops.aten, "_flash_attention_forward") and "seqused_k" in str(
    torch.ops.aten._flash_attention_forward.default._schema
)


def _has_triton() -> bool:
    return _HAS_TRITON


def _triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, and on the CPU only under ``TRITON_INTERPRET=1``."""
    if not _HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_FA_FN = None
_FA_TRIED = False


def _flash_attn_fn():
    global _FA_FN, _FA_TRIED
    if not _HAS_FLASH_ATTN_SPEC:
        return None
    if not _FA_TRIED:
        try:
            from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]

            _FA_FN = flash_attn_with_kvcache
        except Exception:  # broken install, or built for another torch
            _FA_FN = None
        _FA_TRIED = True
    return _FA_FN


@_assume_constant_result
def _has_flash_attn() -> bool:
    """``flash_attn_with_kvcache`` importable (a constant for torch.compile: no import traced)."""
    return _flash_attn_fn() is not None


def _has_torch_fa2() -> bool:
    return _HAS_TORCH_FA2


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:
        return None
    return fa


# ----------------------------------------------------------------------------
# input checks (metadata only: shapes, dtypes, devices, strides; never values)
# ----------------------------------------------------------------------------


def _check_tensor(what, t):
    if not isinstance(t, torch.Tensor):
        fail(what, "a torch.Tensor", type(t).__name__, TypeError)


def _check_common(k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, device, what_new="q"):
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        _check_tensor(name, t)
    if k_cache.dim() != 4:
        fail("k_cache", "4-D [B, S_max, num_kv_heads, head_dim]" if block_table is None
             else "4-D [num_blocks, page_size, num_kv_heads, head_dim]", tuple(k_cache.shape))  # fmt: skip
    if v_cache.shape != k_cache.shape:
        fail("v_cache.shape", f"k_cache.shape {tuple(k_cache.shape)}", tuple(v_cache.shape))
    if k_cache.dtype != v_cache.dtype:
        fail("v_cache.dtype", f"k_cache.dtype {k_cache.dtype}", v_cache.dtype, TypeError)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        fail("k_cache/v_cache stride(-1)", "1 (contiguous head_dim)", (k_cache.stride(-1), v_cache.stride(-1)))
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


def _check_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, backend):
    _check_tensor("q", q)
    if q.dim() != 3:
        fail("q", "3-D [total_q, num_heads, head_dim]", tuple(q.shape))
    _check_common(k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, q.device)
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


def _flat_rows(cache: torch.Tensor) -> Optional[int]:
    """S_pad when the cache's batch rows are evenly spaced rows of one buffer, else None."""
    s0, s1 = cache.stride(0), cache.stride(1)
    if cache.shape[0] == 1:
        return cache.shape[1]
    if s1 > 0 and s0 % s1 == 0 and s0 // s1 >= cache.shape[1]:
        return s0 // s1
    return None


def _flatten(cache: torch.Tensor, s_pad: int) -> torch.Tensor:
    """``[B, S_max, H, D]`` -> ``[(B-1)*S_pad + S_max, H, D]`` rows of the same memory (no copy)."""
    B, S, H, D = cache.shape
    n = (B - 1) * s_pad + S
    return cache.as_strided((n, H, D), (cache.stride(1), cache.stride(2), 1))


# ----------------------------------------------------------------------------
# backend: triton (custom op around our kernels)
# ----------------------------------------------------------------------------

_ATTN_SCHEMA = (
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? cu_seqlens_q, Tensor? slots, "
    "Tensor? block_table, bool causal, float scale, int max_seqlen_q, int num_splits) -> Tensor"
)


@torch.library.custom_op("torch_vkv::triton_attention", mutates_args=(), schema=_ATTN_SCHEMA)
def _triton_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits):
    tk = _triton_kernels()
    if cu_seqlens_q is None:
        return tk.decode_attention(
            q, k_cache, v_cache, cache_seqlens, slots=slots, block_table=block_table, scale=scale,
            num_splits=num_splits if num_splits > 0 else None,
        )  # fmt: skip
    return tk.prefill_attention(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q,
        slots=slots, block_table=block_table, causal=causal, scale=scale,
    )  # fmt: skip


@_triton_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits):
    return torch.empty_like(q)


# ----------------------------------------------------------------------------
# backend: torch_fa2 (PyTorch's FlashAttention-2, varlen + seqused_k)
# ----------------------------------------------------------------------------


@torch.library.custom_op("torch_vkv::fa2_attention", mutates_args=(), schema=_ATTN_SCHEMA)
def _fa2_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits):
    R = cache_seqlens.shape[0]
    s_pad = _flat_rows(k_cache)
    if s_pad is None or _flat_rows(v_cache) != s_pad or block_table is not None:
        raise ValueError("torch_fa2: expected a cache whose stride(0) is a multiple of stride(1), got "
                         f"{k_cache.stride()} / {v_cache.stride()}")  # fmt: skip
    idx = slots.to(torch.int32) if slots is not None else torch.arange(R, device=q.device, dtype=torch.int32)
    # Request r's keys start at row slots[r] * S_pad of the flattened cache; seqused_k gives their
    # count, so cum_seq_k[r + 1] is never read as an end and need not be monotonic.
    cum_k = torch.cat([idx * s_pad, idx.new_full((1,), (k_cache.shape[0] - 1) * s_pad + k_cache.shape[1])])
    if cu_seqlens_q is None:
        cu_q = torch.arange(R + 1, device=q.device, dtype=torch.int32)
        max_q = 1
    else:
        cu_q, max_q = cu_seqlens_q, max_seqlen_q
    out = torch.ops.aten._flash_attention_forward(
        q, _flatten(k_cache, s_pad), _flatten(v_cache, s_pad), cu_q, cum_k, max_q, k_cache.shape[1],
        0.0, causal, False, scale=scale, seqused_k=cache_seqlens,
    )[0]  # fmt: skip
    return out


@_fa2_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits):
    return torch.empty_like(q)


def _fa2_supported(q, k_cache, v_cache, block_table) -> bool:
    return (
        q.is_cuda
        and _has_torch_fa2()
        and block_table is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[2] % 8 == 0
        and q.shape[2] <= 256
        and _flat_rows(k_cache) is not None
        and _flat_rows(k_cache) == _flat_rows(v_cache)
    )


# ----------------------------------------------------------------------------
# backend: flash_attn (flash_attn_with_kvcache, when installed)
# ----------------------------------------------------------------------------


def _pad_index(cu_seqlens_q, total_q, max_q, right_aligned):
    """For each packed query row: (request, row in a [R, max_q] padded batch)."""
    tok = torch.arange(total_q, device=cu_seqlens_q.device, dtype=torch.int32)
    # Search the whole cu_seqlens_q (cu[0] = 0 <= tok) rather than the view cu_seqlens_q[1:]:
    # torch 2.11's Inductor lowering of searchsorted read that view without its storage offset
    # (an out-of-bounds request index under torch.compile on CUDA). Clamped: never out of range.
    req = (torch.searchsorted(cu_seqlens_q, tok, right=True) - 1).clamp(0, cu_seqlens_q.shape[0] - 2)
    if right_aligned:  # last query of each request in the last padded row
        row = max_q - (cu_seqlens_q[1:][req] - tok)
    else:
        row = tok - cu_seqlens_q[:-1][req]
    return req.long(), row.long()


@torch.library.custom_op("torch_vkv::flash_attn_attention", mutates_args=(), schema=_ATTN_SCHEMA)
def _flash_attn_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits):
    fn = _flash_attn_fn()
    if fn is None:
        raise RuntimeError("flash_attn backend: expected the flash-attn package to be importable, got ImportError")
    R = cache_seqlens.shape[0]
    kw = dict(cache_seqlens=cache_seqlens, softmax_scale=scale, causal=causal)
    if block_table is not None:
        kw["block_table"] = block_table if slots is None else block_table.index_select(0, slots.long())
    elif slots is not None:
        kw["cache_batch_idx"] = slots.to(torch.int32)
    if cu_seqlens_q is None:
        return fn(q.unsqueeze(1), k_cache, v_cache, **kw).squeeze(1).contiguous()
    # flash_attn_with_kvcache has no varlen queries: pad to [R, max_q] with each request's
    # queries in the last rows; its causal mask is bottom-right aligned, so row j of the
    # padded batch sits at position len - max_q + j, as the packed query it holds.
    T, H, D = q.shape
    req, row = _pad_index(cu_seqlens_q, T, max_seqlen_q, right_aligned=True)
    qp = q.new_zeros((R, max_seqlen_q, H, D))
    qp[req, row] = q
    return fn(qp, k_cache, v_cache, **kw)[req, row]


@_flash_attn_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits):
    return torch.empty_like(q)


# ----------------------------------------------------------------------------
# backend: sdpa (dense masked reference; plain torch ops, traceable)
# ----------------------------------------------------------------------------


def _gather_valid(cache, slots, block_table, lens, W):
    """``[R, W, H_kv, D]`` copy of each request's first ``W`` positions, reading valid rows only.

    Position ``p >= len`` is read from row ``len - 1`` instead (and masked by the
    caller): on a virtual cache the rows past a length may not be committed at
    all, so they must not even be read.
    """
    R = lens.shape[0]
    pos = torch.arange(W, device=cache.device)
    safe = torch.minimum(pos[None, :], (lens - 1).clamp(min=0)[:, None])  # [R, W]
    rows = slots.long() if slots is not None else torch.arange(R, device=cache.device)
    if block_table is not None:
        page = cache.shape[1]
        blk = block_table.index_select(0, rows).long().gather(1, safe // page)
        return cache[blk, safe % page]
    return cache[rows[:, None], safe]


@torch.library.custom_op("torch_vkv::sdpa_attention", mutates_args=(), schema=_ATTN_SCHEMA)
def _sdpa_attention_op(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits):
    # An opaque op, so that the CPU path may size its window from the lengths (free on the host)
    # without a graph break; on CUDA the window is the whole row (no host sync, capturable).
    R = cache_seqlens.shape[0]
    T, H, D = q.shape
    lens = cache_seqlens.long()
    W = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    if not q.is_cuda and R > 0:
        W = max(1, min(W, int(lens.max())))
    k = _gather_valid(k_cache, slots, block_table, lens, W)
    v = _gather_valid(v_cache, slots, block_table, lens, W)
    kpos = torch.arange(W, device=q.device)
    valid = kpos[None, :] < lens[:, None]  # [R, W]
    # Mask, never multiply: rows past the length are not data (the gather repeated a valid row there).
    k = torch.where(valid[:, :, None, None], k, k.new_zeros(()))
    v = torch.where(valid[:, :, None, None], v, v.new_zeros(()))
    if cu_seqlens_q is None:
        qp = q.unsqueeze(1)  # [R, 1, H, D]
        q_pos = (lens - 1)[:, None]  # [R, 1]
    else:
        req, row = _pad_index(cu_seqlens_q, T, max_seqlen_q, right_aligned=False)
        qp = q.new_zeros((R, max_seqlen_q, H, D)).index_put((req, row), q)
        n = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        q_pos = (lens - n)[:, None] + torch.arange(max_seqlen_q, device=q.device)[None, :]
    mask = valid[:, None, :]
    if causal:
        mask = mask & (kpos[None, None, :] <= q_pos[:, :, None])
    o = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale,
        enable_gqa=H != k_cache.shape[2],
    ).transpose(1, 2)  # fmt: skip
    if cu_seqlens_q is None:
        return o[:, 0].contiguous()
    return o[req, row]


@_sdpa_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits):
    return torch.empty_like(q)


# ----------------------------------------------------------------------------
# backend: flex (FlexAttention; block mask built on the device)
# ----------------------------------------------------------------------------

_FLEX_COMPILED = None


def _flex_limits() -> dict:
    """Dynamo recompile limits for our compiled ``flex_attention`` (patched only around its call).

    With ``dynamic=False`` every new shape, dtype or stride is a recompile of the one
    ``flex_attention`` code object; at the default limit (8) dynamo silently fell back to
    eager ``flex_attention``, whose CUDA path is the unfused math reference (``0 * NaN``
    over every row, host-to-device copies in the mask: not capturable).
    """
    cfg = torch._dynamo.config
    out = {}
    for names, value in ((("recompile_limit", "cache_size_limit"), 1024),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 8192)):  # fmt: skip
        for name in names:
            if hasattr(cfg, name):
                out[name] = max(int(getattr(cfg, name)), value)
                break
    return out


def _flex_call(device, *args, **kwargs):
    """flex_attention: compiled on its own in eager CUDA code; the plain op under tracing (the
    caller compiles it with its graph) and on the CPU.

    ``fullgraph=True``: a graph break or the recompile limit raises instead of running the
    eager (math) flex_attention on CUDA.
    """
    fa = _flex_module()
    if device.type != "cuda" or torch.compiler.is_compiling():
        return fa.flex_attention(*args, **kwargs)
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(fa.flex_attention, dynamic=False, fullgraph=True)
    with torch._dynamo.config.patch(**_flex_limits()):
        return _FLEX_COMPILED(*args, **kwargs)


@_assume_constant_result
def _fkb_has(param: str) -> bool:
    """Whether this torch's ``BlockMask.from_kv_blocks`` takes ``param`` (a constant for torch.compile)."""
    import inspect

    return param in inspect.signature(_flex_module().BlockMask.from_kv_blocks).parameters


def _from_kv_blocks_kwargs(q_len: int, kv_len: int) -> dict:
    """``seq_lengths`` / ``compute_q_blocks`` where this torch's ``BlockMask.from_kv_blocks`` has them."""
    kw = {}
    if _fkb_has("seq_lengths"):
        kw["seq_lengths"] = (q_len, kv_len)
    if _fkb_has("compute_q_blocks"):
        kw["compute_q_blocks"] = False  # forward only: skip the transposed (q-major) index
    return kw


def _flex_kernel_options(Q: int, G: int, D: int, dtype, QB: int, KVB: int) -> dict:
    """Triton kernel choice and tile sizes for CUDA flex, compatible with the BlockMask's blocks.

    Inductor takes BLOCK_M/BLOCK_N from a per-GPU default config (D=64 on H100/H200:
    BLOCK_N=128), and refuses a BlockMask whose block sizes they do not divide. So we fix
    them: BLOCK_N the largest power of two dividing the KV block (at most 64), BLOCK_M
    dividing the 128-row Q block. Short queries whose GQA group packs into one Q block
    (``Q * G <= 128``, G a power of two) take the split-KV flex decoding kernel (it needs
    BLOCK_M = next_pow2(Q * G) to divide the Q block); everything else the main kernel.
    """
    bn = min(KVB & -KVB, 64)
    if bn < 16:
        raise ValueError(f"flex on CUDA: expected a KV block size with a power-of-two factor >= 16, got {KVB}")
    if Q * G <= QB and G & (G - 1) == 0:
        return {"BACKEND": "TRITON_DECODE", "BLOCK_N": bn}
    bm = 128 if dtype != torch.float32 and D <= 128 else 64
    return {"BACKEND": "TRITON", "BLOCK_M": bm, "BLOCK_N": bn}


def _flex_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q):
    fa = _flex_module()
    R = cache_seqlens.shape[0]
    T, H, D = q.shape
    H_kv = k_cache.shape[2]
    dev = q.device
    lens = cache_seqlens.long()
    idx = slots.long() if slots is not None else torch.arange(R, device=dev)
    decode = cu_seqlens_q is None
    Q = 1 if decode else max_seqlen_q
    QB = 128
    nqb = -(-Q // QB)
    n = torch.ones_like(lens) if decode else (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()

    # Keys visible to q block j (exclusive end position); 0 for blocks past the request's queries.
    qb_start = torch.arange(nqb, device=dev)[None, :] * QB
    vis = lens[:, None] - n[:, None] + torch.minimum(qb_start + QB, n[:, None]) if causal else lens[:, None].expand(R, nqb)
    vis = torch.where(qb_start < n[:, None], vis.clamp(0), torch.zeros_like(vis))

    if block_table is None:
        s_pad = _flat_rows(k_cache)
        if s_pad is None or _flat_rows(v_cache) != s_pad:
            raise ValueError(f"flex: expected stride(0) a multiple of stride(1), got {k_cache.stride()}")
        # KV blocks must not straddle two requests' rows (the straddled rows would be read, and
        # 0 * NaN leaks): a block size that divides S_pad keeps every row start block aligned.
        KVB = 128 if k_cache.shape[0] == 1 else math.gcd(s_pad, 128)
        if KVB < 16:
            raise ValueError(f"flex: expected S_pad = stride(0) / stride(1) a multiple of 16, got {s_pad}")
        start = idx * s_pad  # first flattened row of each request
        first = start // KVB
        num = torch.where(vis > 0, (start[:, None] + vis + KVB - 1) // KVB - first[:, None], torch.zeros_like(vis))
        n_rows = (k_cache.shape[0] - 1) * s_pad + k_cache.shape[1]  # rows of the flattened cache
        max_nb = -(-k_cache.shape[1] // KVB) + 1
        kv_idx = (first[:, None] + torch.arange(max_nb, device=dev)[None, :]).clamp(max=-(-n_rows // KVB) - 1)
        kv_idx = kv_idx[:, None, None, :].expand(R, 1, nqb, max_nb)
        limit = s_pad

        def logical(b, kv):
            return kv - start[b]

    else:
        page = k_cache.shape[1]
        if k_cache.stride(0) != page * k_cache.stride(1) or v_cache.stride(0) != page * v_cache.stride(1):
            raise ValueError(f"flex paged: expected pools with stride(0) == page_size * stride(1), got {k_cache.stride()}")
        KVB = page
        bt = block_table.index_select(0, idx).long()  # [R, max_blocks]
        max_nb = bt.shape[1]
        num = (vis + page - 1) // page
        kv_idx = bt.clamp(min=0)[:, None, None, :].expand(R, 1, nqb, max_nb)
        # Physical block -> logical block, for the masks (each block belongs to one request).
        nblk = (lens + page - 1) // page
        j = torch.arange(max_nb, device=dev)[None, :].expand(R, max_nb)
        dst = torch.where(j < nblk[:, None], bt.clamp(min=0), torch.full_like(bt, k_cache.shape[0]))
        p2l = torch.zeros(k_cache.shape[0] + 1, device=dev, dtype=torch.long).scatter_(0, dst.reshape(-1), j.reshape(-1))
        # ... and -> owning request, so a mask evaluated densely (CPU) never takes another request's block.
        owner = torch.full((k_cache.shape[0] + 1,), -1, device=dev, dtype=torch.long).scatter_(
            0, dst.reshape(-1), torch.arange(R, device=dev)[:, None].expand(R, max_nb).reshape(-1)
        )
        limit = max_nb * page  # positions (logical) past the table are never touched

        def logical(b, kv):
            blk = kv // page
            return torch.where(owner[blk] == b, p2l[blk] * page + kv % page, -1)

    if q.is_cuda:
        # Flex reads whole KV blocks and masks only the scores: zero the rows past each length
        # inside its last block so that 0 * NaN cannot reach P @ V.
        _zero_tail_op(k_cache, v_cache, cache_seqlens, slots, block_table, KVB, limit)
    # Flattened views taken after the in-place zeroing (so a traced graph reads the zeroed cache).
    if block_table is None:
        kf, vf = _flatten(k_cache, s_pad), _flatten(v_cache, s_pad)
    else:
        kf = k_cache.as_strided((k_cache.shape[0] * page,) + tuple(k_cache.shape[2:]), (k_cache.stride(1), k_cache.stride(2), 1))
        vf = v_cache.as_strided((v_cache.shape[0] * page,) + tuple(v_cache.shape[2:]), (v_cache.stride(1), v_cache.stride(2), 1))
    if not q.is_cuda:
        # CPU flex runs unfused (dense scores over every row): mask the keys themselves, and read
        # only valid rows (on a virtual cache the others may not be committed): an invalid row is
        # replaced by a valid one, then by zeros.
        n_rows = kf.shape[0]
        row = torch.arange(n_rows, device=dev)
        owner_len = torch.full((n_rows // KVB + 2,), -1, device=dev, dtype=torch.long)
        longest = torch.argmax(lens).view(1)  # a [1] tensor: indexing with it stays on the device
        if block_table is None:
            owner_len = owner_len.scatter(0, idx * (s_pad // KVB), lens)  # length, at each row's first block
            row_start = (row // s_pad) * s_pad
            ok = (row - row_start) < owner_len[row_start // KVB]
            fallback = start.index_select(0, longest)
        else:
            nblk = (lens + KVB - 1) // KVB
            jj = torch.arange(bt.shape[1], device=dev)[None, :]
            last_fill = lens[:, None] - jj * KVB  # rows of block j that hold data
            fill = torch.where(jj < nblk[:, None], last_fill.clamp(max=KVB), torch.zeros_like(last_fill))
            dst2 = torch.where(jj < nblk[:, None], bt.clamp(min=0), torch.full_like(bt, n_rows // KVB + 1))
            owner_len = owner_len.scatter(0, dst2.reshape(-1), fill.reshape(-1))
            ok = (row % KVB) < owner_len[row // KVB]
            fallback = bt[:, 0].index_select(0, longest).clamp(min=0) * KVB
        safe = torch.where(ok, row, fallback)
        kf = torch.where(ok[:, None, None], kf.index_select(0, safe), kf.new_zeros(()))
        vf = torch.where(ok[:, None, None], vf.index_select(0, safe), vf.new_zeros(()))

    def mask_mod(b, h, q_idx, kv_idx_):
        pos = logical(b, kv_idx_)
        ok = (pos >= 0) & (pos < lens[b]) & (q_idx < n[b])
        if causal:
            ok = ok & (pos <= lens[b] - n[b] + q_idx)
        return ok

    block_mask = fa.BlockMask.from_kv_blocks(
        num[:, None, :].to(torch.int32), kv_idx.to(torch.int32), BLOCK_SIZE=(QB, KVB), mask_mod=mask_mod,
        **_from_kv_blocks_kwargs(Q, kf.shape[0]),
    )  # fmt: skip
    if decode:
        qp = q.unsqueeze(2)  # [R, H, 1, D]
    else:
        req, row_ = _pad_index(cu_seqlens_q, T, Q, right_aligned=False)
        qp = q.new_zeros((R, Q, H, D)).index_put((req, row_), q).transpose(1, 2)
    kernel_options = _flex_kernel_options(Q, H // H_kv, D, q.dtype, QB, KVB) if q.is_cuda else None
    o = _flex_call(
        q.device, qp, kf.transpose(0, 1).unsqueeze(0), vf.transpose(0, 1).unsqueeze(0), block_mask=block_mask, scale=scale,
        enable_gqa=H != H_kv, kernel_options=kernel_options,
    )  # fmt: skip
    if decode:
        return o[:, :, 0]
    return o.transpose(1, 2)[req, row_]


@torch.library.custom_op(
    "torch_vkv::flex_attention",
    mutates_args=("k_cache", "v_cache"),
    schema="(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? cu_seqlens_q, "
    "Tensor? slots, Tensor? block_table, bool causal, float scale, int max_seqlen_q) -> Tensor",
)
def _flex_attention_op(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q):
    """Flex on CUDA as one opaque op: under an outer torch.compile, Inductor
    fused flex's index preparation (request/row padding of q) into a kernel
    that read out of bounds on torch 2.11; run eagerly here, flex itself is
    still compiled on its own (``_flex_call``). Mutates the caches: the rows
    between each length and the end of its last KV block are zeroed."""
    out = _flex_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q)
    return out.contiguous()


@_flex_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------
# append and tail zeroing (custom ops that mutate the cache)
# ----------------------------------------------------------------------------


@torch.library.custom_op(
    "torch_vkv::append_kv",
    mutates_args=("k_cache", "v_cache"),
    schema="(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens, "
    "Tensor? cu_seqlens_q, Tensor? slots, Tensor? block_table) -> ()",
)
def _append_kv_op(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table):
    if _triton_usable(k_cache.device):
        _triton_kernels().append_kv(
            k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q=cu_seqlens_q, slots=slots, block_table=block_table
        )
        return
    # Plain-torch fallback (no triton): positions computed on the device, one index_put per cache.
    R = cache_seqlens.shape[0]
    T = k_new.shape[0]
    if T == 0:
        return
    tok = torch.arange(T, device=k_new.device, dtype=torch.int32)
    if cu_seqlens_q is None:
        req, end = tok.long(), tok + 1
    else:
        req = torch.searchsorted(cu_seqlens_q[1:], tok, right=True).long()
        end = cu_seqlens_q[1:][req]
    pos = (cache_seqlens[req] - (end - tok)).long()
    row = slots.long()[req] if slots is not None else req
    if block_table is not None:
        page = k_cache.shape[1]
        blk = block_table[row, pos // page].long()
        row, pos = blk, pos % page
    k_cache.index_put_((row, pos), k_new.to(k_cache.dtype))
    v_cache.index_put_((row, pos), v_new.to(v_cache.dtype))


@_append_kv_op.register_fake
def _(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table):
    return None


@torch.library.custom_op(
    "torch_vkv::zero_tail",
    mutates_args=("k_cache", "v_cache"),
    schema="(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? slots, Tensor? block_table, "
    "int multiple, int limit) -> ()",
)
def _zero_tail_op(k_cache, v_cache, cache_seqlens, slots, block_table, multiple, limit):
    _triton_kernels().zero_tail(
        k_cache, v_cache, cache_seqlens, multiple=multiple, limit=limit, slots=slots, block_table=block_table
    )


@_zero_tail_op.register_fake
def _(k_cache, v_cache, cache_seqlens, slots, block_table, multiple, limit):
    return None


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def available_backends(device="cuda") -> list:
    """Backends that can run on ``device`` in this process (``auto`` excluded)."""
    device = torch.device(device)
    out = []
    if device.type == "cuda" and _has_torch_fa2():
        out.append("torch_fa2")
    if device.type == "cuda" and _has_flash_attn():
        out.append("flash_attn")
    if _triton_usable(device):
        out.append("triton")
    if _flex_module() is not None:
        out.append("flex")
    out.append("sdpa")
    return out


def select_backend(q, k_cache, v_cache, *, decode: bool, block_table=None) -> str:
    """The ``auto`` rule: the fastest backend measured for the device and the step kind.

    * CPU: ``triton`` under ``TRITON_INTERPRET=1`` is *not* chosen (slow); ``sdpa``.
    * CUDA decode (``cu_seqlens_q=None``): ``triton`` split-KV (flash-decoding
      over every request/head/split; FA2's varlen kernel does not split KV and
      reaches ~41% of copy bandwidth), else ``flash_attn``, else ``torch_fa2``.
    * CUDA prefill / mixed batch: ``triton`` (measured on an H200, bf16, batch 1:
      274-454 TFLOP/s for 2K-128K tokens against 189-356 for ``torch_fa2``;
      docs/benchmarks.md), else ``flash_attn`` (not measured here), else ``torch_fa2``.
    * Paged (``block_table`` given) on CUDA: ``triton`` (its paged twin), else
      ``flash_attn`` when the page size is a multiple of 256, else ``flex``.
    * Anything the preferred backend cannot take (fp32, odd strides, head_dim
      not a power of two for Triton) falls to the next; ``sdpa`` last.

    Decided from shapes and dtypes only, so the choice is the same at trace
    time and at run time.
    """
    if q.device.type != "cuda":
        return "sdpa"
    tri = _has_triton() and _pow2_dim(q.shape[2])
    fa = _has_flash_attn() and q.dtype in (torch.float16, torch.bfloat16)
    if block_table is not None:
        if tri:
            return "triton"
        if fa and k_cache.shape[1] % 256 == 0:
            return "flash_attn"
        return "flex" if _flex_module() is not None else "sdpa"
    fa2 = _fa2_supported(q, k_cache, v_cache, None)
    order = ("triton", "flash_attn", "torch_fa2")  # decode and prefill alike: see the docstring
    ok = {"triton": tri, "flash_attn": fa, "torch_fa2": fa2}
    for name in order:
        if ok[name]:
            return name
    return "sdpa"


def _pow2_dim(d: int) -> bool:
    return 16 <= d <= 256 and d & (d - 1) == 0


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
    causal : bottom-right aligned causal mask (queries at the last positions).
    scale : softmax scale; default ``1 / sqrt(head_dim)``.
    backend : one of :data:`BACKENDS`; ``"auto"`` follows :func:`select_backend`.
    block_table : int32, shape ``[num_slots, max_blocks]``: run the paged twin.
    max_seqlen_q : host int, an upper bound on any request's query count
        (sizes launch grids / padding; default ``total_q``). Passing a tight
        bound makes padded backends (flex, sdpa, flash_attn) cheaper.
    num_splits : Triton decode only: KV splits per (request, kv head);
        default from the shapes (never from the lengths).

    Returns
    -------
    out : shape ``[total_q, num_heads, head_dim]``, q's dtype.
    """
    _check_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, backend)
    decode = cu_seqlens_q is None
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    T = q.shape[0]
    max_q = 1 if decode else max(1, min(T, int(max_seqlen_q) if max_seqlen_q is not None else T))
    if backend == "auto":
        backend = select_backend(q, k_cache, v_cache, decode=decode, block_table=block_table)
    if backend == "torch_fa2" and not _fa2_supported(q, k_cache, v_cache, block_table):
        # Not flattenable (or paged, or fp32, or CPU): the same math through our kernels.
        if block_table is None and q.is_cuda and _has_torch_fa2() and q.dtype != torch.float32 and _flat_rows(k_cache) is None:
            backend = "triton" if _triton_usable(q.device) else "sdpa"
        else:
            fail("backend 'torch_fa2'", "CUDA fp16/bf16 tensors, head_dim % 8 == 0, no block_table, "
                 "torch with _flash_attention_forward(seqused_k=)",
                 f"device={q.device}, dtype={q.dtype}, head_dim={q.shape[2]}, block_table={block_table is not None}")  # fmt: skip
    # The kernels index these 1-D tensors densely (no-ops when already contiguous).
    cache_seqlens = cache_seqlens.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous() if cu_seqlens_q is not None else None
    slots = slots.contiguous() if slots is not None else None
    args = (q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, bool(causal), scale, max_q)
    if backend == "triton":
        if not _has_triton():
            fail("backend 'triton'", "the triton package to be importable", "ImportError")
        if not _triton_usable(q.device):
            fail("backend 'triton'", "CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)", str(q.device))
        if not _pow2_dim(q.shape[2]):
            fail("head_dim for backend 'triton'", "a power of two in [16, 256]", q.shape[2])
        return _triton_attention(*args, int(num_splits or 0))
    if backend == "torch_fa2":
        return _fa2_attention(*args, 0)
    if backend == "flash_attn":
        if not _has_flash_attn():
            fail("backend 'flash_attn'", "the flash-attn package to be importable", "ImportError")
        return _flash_attn_attention(*args, 0)
    if backend == "flex":
        if _flex_module() is None:
            fail("backend 'flex'", "torch.nn.attention.flex_attention", "ImportError")
        if q.is_cuda and not _has_triton():
            fail("backend 'flex' on CUDA", "the triton package to be importable", "ImportError")
        # CPU: plain traceable code; CUDA: one opaque op (see _flex_attention_op).
        return _flex_attention_op(*args) if q.is_cuda else _flex_attention(*args)
    return _sdpa_attention_op(*args, 0)


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
    """
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
    cache_seqlens = cache_seqlens.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous() if cu_seqlens_q is not None else None
    slots = slots.contiguous() if slots is not None else None
    _append_kv_op(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table)

