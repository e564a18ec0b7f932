"""Backend ``flex``: FlexAttention over the flattened cache (or the block pool).

The block mask is built on the device from the lengths
(``BlockMask.from_kv_blocks``, no dense mask). On CUDA the whole backend is one
opaque op (``torch_vkv::flex_attention``) and ``flex_attention`` is compiled on
its own; on the CPU it is plain traceable torch code (flex runs unfused).
``window_left`` goes into the mask (and whole KV blocks behind each q block's
window are left out of the block mask); ``softcap`` is a ``score_mod``. On
CUDA flex reads whole KV blocks: the rows behind the window inside the block
that holds its start are read (and masked), so they must be committed (a
``KVCache`` keeps the page holding ``length - window``; see docs/design.md).
"""

from __future__ import annotations

import math

import torch

from . import deps
from .append import zero_tail_op
from .common import flat_rows, flatten, pad_index
from .inputs import safe_blocks, valid_requests

_FLEX_COMPILED = None


def kv_block_rows(k_cache: torch.Tensor) -> int:
    """Rows per KV block of flex over a contiguous cache: whole blocks never straddle two
    slots' rows (a block size that divides S_pad keeps every row start block aligned)."""
    s_pad = flat_rows(k_cache)
    if k_cache.shape[0] == 1 or s_pad is None:
        return 128
    return math.gcd(s_pad, 128)


def uncommitted_block_reads(k_cache: torch.Tensor) -> "str | None":
    """What flex on CUDA needs of a ``KVCache`` view and what it got, or None when it
    can touch no uncommitted row.

    Flex zeroes and reads each request's rows up to the end of the KV block holding
    its last key. A ``KVCache`` commits whole pages plus ``margin_tokens`` past each
    length, so those rows are committed when a page holds whole blocks or the margin
    covers the rest of a block. Reading an uncommitted row is an illegal memory
    access on CUDA, which ends the process's use of the GPU: refused up front.
    Views that do not come from a ``KVCache`` (no ``margin_tokens``) are not checked.
    """
    margin = getattr(k_cache, "margin_tokens", None)
    source = getattr(k_cache, "source", None)
    if margin is None or source is None:
        return None
    row_bytes = k_cache.stride(1) * k_cache.element_size()
    rows_per_page = source.page_size // row_bytes if row_bytes else 0
    block = kv_block_rows(k_cache)
    if rows_per_page == 0 or rows_per_page % block == 0:
        return None  # a row spans pages, or every page ends on a block boundary
    need = block - rows_per_page if block % rows_per_page == 0 else block - 1
    if margin >= need:
        return None
    return (f"a KVCache with margin_tokens >= {need} (flex reads whole KV blocks of {block} rows, a page "
            f"holds {rows_per_page} rows of this layout), or another backend ('auto' never picks flex on "
            f"CUDA); got margin_tokens={margin}")


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
    fa = deps.flex_module()
    if device.type != "cuda" or torch.compiler.is_compiling():
        return fa.flex_attention(*args, **kwargs)
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(fa.flex_attention, dynamic=False, fullgraph=True)
    with torch._dynamo.config.patch(**_flex_limits()):
        return _FLEX_COMPILED(*args, **kwargs)


@deps.assume_constant_result
def _fkb_has(param: str) -> bool:
    """Whether this torch's ``BlockMask.from_kv_blocks`` takes ``param`` (a constant for torch.compile)."""
    import inspect

    return param in inspect.signature(deps.flex_module().BlockMask.from_kv_blocks).parameters


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


def flex_attend(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q,
    window_left=-1, softcap=0.0,
):  # fmt: skip
    fa = deps.flex_module()
    R = cache_seqlens.shape[0]
    T, H, D = q.shape
    if R == 0 or T == 0:  # nothing to attend (sdpa and triton answer the same; argmax below needs a request)
        return q.new_zeros(T, H, v_cache.shape[-1])
    H_kv = k_cache.shape[2]
    dev = q.device
    # Device metadata is not checked: a bad request reads no key and gets zeros (length 0, slot 0).
    good, lens, idx = valid_requests(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table)
    decode = cu_seqlens_q is None
    Q = 1 if decode else max_seqlen_q
    QB = 128
    nqb = -(-Q // QB)
    n = torch.ones_like(lens) if decode else (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()

    # Keys visible to q block j (exclusive end position); 0 for blocks past the request's queries.
    qb_start = torch.arange(nqb, device=dev)[None, :] * QB
    vis = lens[:, None] - n[:, None] + torch.minimum(qb_start + QB, n[:, None]) if causal else lens[:, None].expand(R, nqb)
    vis = torch.where(qb_start < n[:, None], vis.clamp(0), torch.zeros_like(vis))
    # First key of q block j's window (0 without one): whole KV blocks before it are skipped.
    win = window_left >= 0
    lo_qb = (lens[:, None] - n[:, None] + qb_start - window_left).clamp(min=0) if win else torch.zeros_like(vis)
    # First key any query of a request sees: rows before it are never used (CPU: never read).
    first_key = lo_qb[:, 0]

    if block_table is None:
        s_pad = flat_rows(k_cache)
        if s_pad is None or flat_rows(v_cache) != s_pad:
            raise ValueError(f"flex: expected stride(0) a multiple of stride(1), got {k_cache.stride()}")
        # KV blocks must not straddle two requests' rows (the straddled rows would be read, and
        # 0 * NaN leaks): a block size that divides S_pad keeps every row start block aligned.
        KVB = kv_block_rows(k_cache)
        if KVB < 16:
            raise ValueError(f"flex: expected S_pad = stride(0) / stride(1) a multiple of 16, got {s_pad}")
        start = idx * s_pad  # first flattened row of each request
        first = (start[:, None] + lo_qb) // KVB  # [R, nqb]
        num = torch.where(vis > lo_qb, (start[:, None] + vis + KVB - 1) // KVB - first, torch.zeros_like(vis))
        n_rows = (k_cache.shape[0] - 1) * s_pad + k_cache.shape[1]  # rows of the flattened cache
        max_nb = -(-k_cache.shape[1] // KVB) + 1
        kv_idx = (first[:, :, None] + torch.arange(max_nb, device=dev)).clamp(max=-(-n_rows // KVB) - 1)
        kv_idx = kv_idx[:, None]  # [R, 1, nqb, max_nb]
        limit = s_pad

        def logical(b, kv):
            return kv - start[b]

    else:
        page = k_cache.shape[1]
        if k_cache.stride(0) != page * k_cache.stride(1) or v_cache.stride(0) != page * v_cache.stride(1):
            raise ValueError(f"flex paged: expected pools with stride(0) == page_size * stride(1), got {k_cache.stride()}")
        KVB = page
        bt = safe_blocks(block_table, k_cache.shape[0]).index_select(0, idx).long()  # [R, max_blocks]
        max_nb = bt.shape[1]
        fb = lo_qb // page  # first logical block of each q block's window
        num = torch.where(vis > lo_qb, (vis + page - 1) // page - fb, torch.zeros_like(vis))
        jb = (fb[:, :, None] + torch.arange(max_nb, device=dev)).clamp(max=max_nb - 1)  # [R, nqb, max_nb]
        kv_idx = bt.clamp(min=0).gather(1, jb.reshape(R, -1)).reshape(R, 1, nqb, max_nb)
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
        zero_tail_op(k_cache, v_cache, lens.to(torch.int32), idx, block_table, KVB, limit)
    # Flattened views taken after the in-place zeroing (so a traced graph reads the zeroed cache).
    if block_table is None:
        kf, vf = flatten(k_cache, s_pad), flatten(v_cache, s_pad)
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
            # Length at each row's first block; amax: a bad request (length 0, slot 0) never hides
            # the length of the valid request in slot 0.
            owner_len = owner_len.scatter_reduce(0, idx * (s_pad // KVB), lens, reduce="amax")
            row_start = (row // s_pad) * s_pad
            ok = (row - row_start) < owner_len[row_start // KVB]
            if win:  # rows behind the window of a request's first query (a bad request's: none)
                owner_first = torch.zeros_like(owner_len).scatter_reduce(
                    0, idx * (s_pad // KVB), torch.where(good, first_key, s_pad), reduce="amin", include_self=False
                )
                ok = ok & ((row - row_start) >= owner_first[row_start // KVB])
            # The longest request's last row: committed, and inside its window (its first row may not be).
            fallback = (start + (lens - 1).clamp(min=0)).index_select(0, longest)
        else:
            nblk = (lens + KVB - 1) // KVB
            jj = torch.arange(bt.shape[1], device=dev)[None, :]
            last_fill = lens[:, None] - jj * KVB  # rows of block j that hold data
            fill = torch.where(jj < nblk[:, None], last_fill.clamp(max=KVB), torch.zeros_like(last_fill))
            dst2 = torch.where(jj < nblk[:, None], bt.clamp(min=0), torch.full_like(bt, n_rows // KVB + 1))
            owner_len = owner_len.scatter(0, dst2.reshape(-1), fill.reshape(-1))
            ok = (row % KVB) < owner_len[row // KVB]
            if win:  # rows of block j behind the window of the request's first query
                skip = (first_key[:, None] - jj * KVB).clamp(0, KVB)
                owner_skip = torch.zeros_like(owner_len).scatter(0, dst2.reshape(-1), skip.reshape(-1))
                ok = ok & ((row % KVB) >= owner_skip[row // KVB])
            last = (lens - 1).clamp(min=0)
            fallback = (bt.gather(1, (last // KVB)[:, None]).squeeze(1).clamp(min=0) * KVB + last % KVB).index_select(0, longest)
        safe = torch.where(ok, row, fallback)
        kf = torch.where(ok[:, None, None], kf.index_select(0, safe), kf.new_zeros(()))
        vf = torch.where(ok[:, None, None], vf.index_select(0, safe), vf.new_zeros(()))

    def mask_mod(b, h, q_idx, kv_idx_):
        pos = logical(b, kv_idx_)
        ok = (pos >= 0) & (pos < lens[b]) & (q_idx < n[b])
        if causal:
            ok = ok & (pos <= lens[b] - n[b] + q_idx)
        if win:
            ok = ok & (pos >= lens[b] - n[b] + q_idx - window_left)
        return ok

    score_mod = None
    if softcap > 0:

        def score_mod(score, b, h, q_idx, kv_idx_):
            return softcap * torch.tanh(score / softcap)

    block_mask = fa.BlockMask.from_kv_blocks(
        num[:, None, :].to(torch.int32), kv_idx.to(torch.int32), BLOCK_SIZE=(QB, KVB), mask_mod=mask_mod,
        **_from_kv_blocks_kwargs(Q, kf.shape[0]),
    )  # fmt: skip
    if decode:
        qp = q.unsqueeze(2)  # [R, H, 1, D]
    else:
        req, row_ = pad_index(cu_seqlens_q, T, Q, right_aligned=False)
        qp = q.new_zeros((R, Q, H, D)).index_put((req, row_), q).transpose(1, 2)
    kernel_options = _flex_kernel_options(Q, H // H_kv, D, q.dtype, QB, KVB) if q.is_cuda else None
    o = _flex_call(
        q.device, qp, kf.transpose(0, 1).unsqueeze(0), vf.transpose(0, 1).unsqueeze(0), block_mask=block_mask, scale=scale,
        score_mod=score_mod, enable_gqa=H != H_kv, kernel_options=kernel_options,
    )  # fmt: skip
    if decode:
        return o[:, :, 0]
    return o.transpose(1, 2)[req, row_]


@torch.library.custom_op(
    "torch_vkv::flex_attention",
    mutates_args=("k_cache", "v_cache"),
    schema="(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? cu_seqlens_q, "
    "Tensor? slots, Tensor? block_table, bool causal, float scale, int max_seqlen_q, int window_left=-1, "
    "float softcap=0.0) -> Tensor",
)
def flex_attention_op(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q,
    window_left=-1, softcap=0.0,
):  # fmt: skip
    """Flex on CUDA as one opaque op: under an outer torch.compile, Inductor
    fused flex's index preparation (request/row padding of q) into a kernel
    that read out of bounds on torch 2.11; run eagerly here, flex itself is
    still compiled on its own (``_flex_call``). Mutates the caches: the rows
    between each length and the end of its last KV block are zeroed."""
    out = flex_attend(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q,
        window_left, softcap,
    )  # fmt: skip
    return out.contiguous()


@flex_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q,
      window_left=-1, softcap=0.0):  # fmt: skip
    return torch.empty_like(q, memory_format=torch.contiguous_format)


