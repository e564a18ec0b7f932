"""Launch rules of :func:`~.decode.decode_attention`: splits, key tiles, pipeline stages, tensor
descriptors and the L2 policy of its loads, from the call's shapes only (never from the lengths on
the device), so a CUDA graph captured once replays with any lengths. Each rule's docstring holds
the measurements it rests on.
"""

from __future__ import annotations

import functools
import math

import torch

from .prefill import _tma_capable, capturing


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``, asked of the driver once per device (the query
    cost several microseconds of host time in every decode call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


#: Fewest cache rows (``S_max``) for which decode takes 128-key tiles (descriptors, or
#: :func:`long_cache_decode_launch`'s pointer loads).
LONG_TILE_MIN_ROWS = 4096

#: Share of the SMs that one program per ``(request, kv head)`` must cover for :func:`default_num_splits`
#: to keep one split on contiguous rows.
ONE_SPLIT_SM_SHARE = 0.7

#: Waves of programs (on the SMs) that :func:`default_num_splits` splits a small batch's keys into.
SPLIT_WAVES = 4

#: Most keys a split may span (a cache's rows over its splits) for :func:`default_decode_evict_first`.
EVICT_FIRST_MAX_SPAN = 512


def default_num_splits(num_requests: int, num_kv_heads: int, max_len: int, device: torch.device,
                       paged: bool = False) -> int:  # fmt: skip
    """Splits per (request, kv head), at least 256 keys a split.

    Contiguous rows: one split when the ``(request, kv head)`` programs already cover
    :data:`ONE_SPLIT_SM_SHARE` (70%) of the SMs, else as many splits as fill
    :data:`SPLIT_WAVES` waves (``4 * SMs // programs``, rounded down, then to the power of two
    below where that keeps 15/16 of them), read without a software pipeline
    (:func:`default_decode_stages`). Paged (``paged=True``): about four waves, whatever the batch
    (rounded up), as the block-table loads gain from more programs in flight.

    Four waves of unpipelined programs against the former one wave of two pipelined programs an SM
    (thirty-third session, H100, ``scripts/diag_decode.py``, Llama-3-8B heads, bf16, one graph
    replay; L2 emptied by reads / by writes, each with :func:`default_decode_evict_first`'s policy):
    batch 1, 16K, 64 splits 31.0 / 35.2 us against 32 splits' 30.8 / 38.8; 1 x 32K 51.6 / 58.9
    against 52.4 / 62.4; 2 x 16K, 32 splits 50.9 / 58.8 against 16 splits' 53.3 / 63.5; 4 x 16K, 16
    splits 93.2 / 103.7 against 8 splits' 94.8 / 104.7; 8 x 4K, 8 splits 51.1 / 58.4 against 4
    splits' 63.5 (writes); 8 x 16K alike (177.2 / 187.4 against 187.5 by writes).

    Earlier measurements, with pipelined loads (the split rule then filled one wave of two programs an
    SM): on the H200 (``bench kernels``, CUDA-graph replay, 2026-12-02), Llama-3-8B heads:
    contiguous, batch 32, 4K (256 programs on 132 SMs): 1 split 134.9 us against 142.3 for 3
    (the four-wave rule); batch 1, 16K: 32 splits 31.7 us against 34.3 for 64. The paged twin
    under the two-wave rule slowed down instead: batch 32, 4K, block 16: 161.4 us against 148.9
    (16K: 588 against 513), so it keeps four waves. Rounding down rather than up (2026-12-04,
    ``scripts/diag_ab.py``, per layer of a 32-layer step graph): batch 8, 32K, 4 splits 246.4 us
    against 5 splits' 265.7 (1.2 waves); batch 8, 16K 127.6 against 136.7; batch 4, 32K 127.5
    against 143.1; batch 2, 32K 67.9 against 72.9; batch 16, 16K 246.5 against 249.9.
    One split from 70% of the SMs (thirty-first session, H100, ``scripts/diag_decode.py``, one
    graph replay, splits compared in the same run): batch 16, 16K (128 programs on 132 SMs):
    351.5 us with one split against 362.7 with two; 32K 681.6 against 704.4; 8K 184.1 against
    191.0; 4K 103.4 against 107.8; batch 15, 16K (120 programs) 331.0 against 339.6; batch 14
    (112) 312.9 against 327.2, 4K 93.6 against 100.0; batch 13 (104) 302.0 against 316.6; batch
    12 (96, 73% of the SMs) 286.3 against 302.4; but batch 10 (80, 61%) 264.9 against 244.6.
    Two splits of 96-128 programs leave some SMs one program and others two, half as long: the
    memory is read by fewer programs at the end, while one split's programs already read at
    95-100% of the copy rate.
    Depends only on shapes (never on the lengths on the device), so a CUDA graph captured
    once replays with any lengths.
    """
    sms = sm_count(device) if device.type == "cuda" else 4
    # The CPU interpreter runs programs one after another: two "waves" of its 4 "SMs" test the split path.
    waves = SPLIT_WAVES if device.type == "cuda" else 2
    programs = max(1, num_requests * num_kv_heads)
    if not paged and programs >= ONE_SPLIT_SM_SHARE * sms:
        return 1
    # Contiguous: SPLIT_WAVES waves, rounded down (the former rule's 1.2 waves of pipelined programs
    # left a short second wave, slower than 1.0). Paged: rounded up, as measured.
    want = math.ceil(4 * sms / programs) if paged else (waves * sms) // programs
    # The merge reads next_pow2(splits) partials: 33 cost as many as 64. The power of two below,
    # where it keeps 15/16 of the programs (H100, batch 1, 16K, 8 KV heads: 32 splits 39.3-39.6 us
    # against 33's 39.9-40.2, both with two stages, two rounds).
    below = 1 << (want.bit_length() - 1)
    if not paged and 16 * below >= 15 * want:
        want = below
    cap = max(1, math.ceil(max_len / 256))
    return int(max(1, min(want, cap, 64)))


def _many_waves(num_requests: int, num_kv_heads: int, device: torch.device) -> bool:
    """Whether one program per ``(request, kv head)`` already makes at least four waves on ``device``'s SMs."""
    return device.type == "cuda" and num_requests * num_kv_heads >= 4 * sm_count(device)


#: Waves of ``(request, kv head)`` programs (one split, a long cache) at which
#: :func:`long_cache_decode_launch` changes the decode's tiles: past the first, 128 keys in two
#: stages; from the second, 128 keys without a software pipeline; from the third, 64 keys without one.
LONG_CACHE_WAVE_STEPS = (1.0, 1.5, 3.0)


def long_cache_decode_launch(num_requests: int, num_kv_heads: int, head_dim: int, num_splits: int,
                             device: torch.device, max_len: int | None = None, element_size: int = 2,
                             paged: bool = False) -> tuple[int, int] | None:  # fmt: skip
    """``(block_n, num_stages)`` of :func:`decode_attention`'s defaults with pointer loads over a long
    contiguous cache past one wave of programs, else ``None`` (the other rules decide): 16-bit rows
    of head_dim 128 on a GPU, one split, a cache of at least :data:`LONG_TILE_MIN_ROWS` rows
    (``max_len``; ``None``: long), more than one wave of programs (:data:`LONG_CACHE_WAVE_STEPS`).

    A pipelined tile waits in shared memory (three stages of 64 keys: 96 KiB a program, so two
    programs an SM); without the pipeline a tile goes to registers and four programs share an SM,
    which keeps as many bytes in flight; below two waves there are too few programs for 64-key tiles
    to do that. Measured on the H100 (thirty-third session, ``scripts/diag_decode.py``, Llama-3-8B
    heads, bf16, one graph replay; the former default in parentheses):

    * 1-1.5 waves, 128 keys, 2 stages (L2 emptied by writes): batch 18, 16K 409.6 us (417.4); 20 x
      4K 126.4 (128.4); 20 x 16K 446.9 (458.2); 24 x 4K 146.9 (154.6); 24 x 16K 528.0 (566.6);
    * 1.5-3 waves, 128 keys, 1 stage: 28 x 4K 165.4 (174.6, by writes); 32 x 4K 174.7 (177.9), 32 x
      16K 674.2 (683.0), by reads; with 64-key tiles 186.9 at 32 x 4K;
    * from 3 waves, 64 keys, 1 stage (L2 emptied by reads): batch 64, 4K 340.4 (347.3), 16K 1341.1
      (1363.2); batch 128, 4K 679.5 (686.4, descriptors), 16K 2692.2 (2707.7); batch 256, 4K
      1348.5 (1370.5), 16K 5378.8 (5405.1); 2 or 8 warps and 32- or 128-key tiles no faster
      (within 0.6%).

    At one wave (batch 16, 128 programs on 132 SMs) the pipelined 64-key tiles stay: 341.1 us at 16K
    against 342.6 with 128 keys and 396 without a pipeline.
    """
    if device.type != "cuda" or paged or head_dim != 128 or element_size != 2 or num_splits != 1:
        return None
    if max_len is not None and max_len < LONG_TILE_MIN_ROWS:  # short caches: not measured
        return None
    waves = num_requests * num_kv_heads / sm_count(device)
    one, no_pipeline, short_tiles = LONG_CACHE_WAVE_STEPS
    if waves <= one:
        return None
    if waves < no_pipeline:
        return 128, 2
    return (128 if waves < short_tiles else 64), 1


def default_decode_tma(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_table: torch.Tensor | None, num_splits: int, max_len: int | None = None) -> bool:  # fmt: skip
    """Whether :func:`decode_attention` reads full tiles through tensor descriptors by itself: where
    :func:`~.prefill.default_tma`'s kernel conditions hold, with one split and at least four waves of
    programs, and only in a call being captured into a CUDA graph; never where
    :func:`long_cache_decode_launch` gives a launch (``max_len``: the keys a call may read, default the
    cache's rows), whose plain loads measured as fast or faster (batch 128, 4K: 679.5 against 686.4 us on the H100).

    Measured on the H200 (``scripts/diag_ab.py``, Llama-3-8B heads, bf16, 2026-12-04), with
    128-key tiles (:func:`default_decode_block_n`): batch 128, 4K: 490 against 507 us; 16K: 1897
    against 1998 us. At smaller batches the kernel gained 0-3%. But Triton encodes the descriptors
    on the host at every launch, and a decode call's length is on the device: an eager loop of
    calls at batch 128, 512 keys took 135.1 us per call with them against 75.0 without (the host's
    time, not the kernel's), at 16K 1940 against 2044. A graph pays that host time once, at capture.
    """
    # Cheapest first: an eager call (almost every call outside a graph) stops at capturing().
    if not (num_splits == 1 and capturing(q) and _many_waves(q.shape[0], k_cache.shape[2], q.device)):
        return False
    if long_cache_decode_launch(q.shape[0], k_cache.shape[2], q.shape[-1], num_splits, q.device,
                                k_cache.shape[1] if max_len is None else max_len, q.element_size(),
                                block_table is not None) is not None:  # fmt: skip
        return False
    return _tma_capable(q, k_cache, v_cache, block_table)


def default_decode_block_n(num_requests: int, num_kv_heads: int, head_dim: int, num_splits: int,
                           device: torch.device, tma: bool, max_len: int | None = None, element_size: int = 2,
                           paged: bool = False) -> int:  # fmt: skip
    """Keys per tile of :func:`decode_attention`: 64 (32 past head_dim 128); 128 with tensor
    descriptors when one split per ``(request, kv head)`` already gives at least four waves of
    programs and the cache holds at least :data:`LONG_TILE_MIN_ROWS` rows (``max_len``, its
    ``S_max``; ``None``: not known, taken as long); with pointer loads, the tiles of
    :func:`long_cache_decode_launch` where it gives a launch.

    Measured on the H200 (``scripts/diag_ab.py``, Llama-3-8B heads, bf16, batch 128, per layer of a
    step graph, 2026-12-04), descriptors with 128- against 64-key tiles: 16K 1886 against 1929 us,
    4K 493 against 497, 2K 256.5 against 253.1, 512 keys 75.9 against 68.5 (pointer loads 70.5). At
    batch 32 (two waves) 128-key tiles were 1% slower and at batch 1-8 3-7% slower. The cache's
    ``S_max`` bounds the lengths a call may see (which are on the device): a long cache may still
    hold short requests, where the 128-key tiles cost up to 10% of a short kernel.
    """
    if head_dim > 128:
        return 32
    if tma and num_splits == 1 and _many_waves(num_requests, num_kv_heads, device) and \
            (max_len is None or max_len >= LONG_TILE_MIN_ROWS):  # fmt: skip
        return 128
    launch = None if tma else long_cache_decode_launch(num_requests, num_kv_heads, head_dim, num_splits, device,
                                                         max_len, element_size, paged)  # fmt: skip
    return 64 if launch is None else launch[0]


def default_decode_stages(num_requests: int, num_kv_heads: int, head_dim: int, num_splits: int,
                          device: torch.device, tma: bool, element_size: int = 2, paged: bool = False,
                          max_len: int | None = None) -> int:  # fmt: skip
    """Pipeline stages of :func:`decode_attention`'s key loop: with pointer loads where
    :func:`long_cache_decode_launch` gives a launch (``max_len``: the keys a call may read; ``None``:
    long), its stages (1 or 2); with split keys, 1 at three to :data:`SPLIT_WAVES` waves of programs
    (:func:`default_num_splits` makes four), 2 within one wave of two an SM; else 3, but 2 for 16-bit head_dim 128
    (pointer loads over contiguous rows; the paged twin was not measured) with one split per
    ``(request, kv head)`` and between two and four waves of programs on the GPU's SMs, where three
    stages' 96 KiB of shared memory fit two programs on an SM and two stages' 64 KiB three.

    Measured on the H200 (``scripts/diag_decode.py``, Llama-3-8B heads, bf16, one split, 64-key
    tiles, CUDA-graph replays, two device calls alike, 2026-12-04): batch 64 (512 programs on 132
    SMs), 4K: 251.0 us with 2 stages against 287.7 with 3; 16K: 952.6 against 1110.0 (FlashInfer's
    paged decode: 960.7); batch 48, 16K: 715.8 against 722.9. One wave or less (batch 32) and four
    waves (batch 128) are faster with 3: 135.3 against 152.5 us at batch 32, 4K; 1930.8 against
    1967.5 at batch 128, 16K. Split keys (thirty-first session, H100, the same script, two rounds
    of each L2 flush): batch 1, 16K, 32 splits: 39.3-39.6 us with 2 stages against 40.6-40.9 with
    3; batch 1, 32K: 63.8-64.0 against 64.8-65.0; batch 2, 16K, 16 splits: alike (54.7 both, L2
    emptied by reads).
    """
    if head_dim != 128 or element_size != 2 or tma or paged or device.type != "cuda":
        return 3
    launch = long_cache_decode_launch(num_requests, num_kv_heads, head_dim, num_splits, device, max_len, element_size,
                                      paged)  # fmt: skip
    if launch is not None:
        return launch[1]
    if num_splits > 1:  # split keys: none at three to four waves (default_num_splits'); two within one of two an SM
        programs = num_requests * num_kv_heads * num_splits
        if 3 * sm_count(device) <= programs <= SPLIT_WAVES * sm_count(device):
            return 1
        return 2 if programs <= 2 * sm_count(device) else 3
    more_than_two_waves = num_requests * num_kv_heads > 2 * sm_count(device)
    return 2 if more_than_two_waves and not _many_waves(num_requests, num_kv_heads, device) else 3


def default_decode_evict_first(num_splits: int, num_stages: int, max_len: int, tma: bool, paged: bool) -> bool:
    """Whether :func:`decode_attention` reads K and V with the L2's evict-first policy by itself: split
    keys read without a pipeline (``num_stages == 1``, pointer loads, contiguous rows) where a split
    spans at most :data:`EVICT_FIRST_MAX_SPAN` keys of the ``max_len`` a call may read. Triton 3.6
    gives a pipelined load (``cp.async``) no cache hint, so only unpipelined loads can carry it.

    What it changes is which lines the L2 gives up: the decode's own, read once, rather than the
    lines already there, which cost a write back when dirty. Measured on the H100 (thirty-third
    session, ``scripts/diag_decode.py``, Llama-3-8B heads, bf16, one graph replay), with the L2
    emptied by writes (``do_bench``'s flush: dirty lines) against the plain loads: batch 1, 16K, 64
    splits 35.2 against 39.0 us; 1 x 32K 58.9 against 61.7; 2 x 16K, 32 splits 58.8 against 61.3; 8 x
    4K, 8 splits 58.4 against 61.4. Emptied by reads (clean lines) the two are level (31.0 / 31.0,
    51.6 / 51.8, 50.9 / 50.9, 51.1 / 51.1). Longer splits lost with it: 4 x 16K, 16 splits (1024 keys)
    105.6 against 103.7; 8 x 16K, 8 splits 196.6 against 187.4; one split at batch 32-128 by 2-6%.
    """
    return num_splits > 1 and num_stages == 1 and not tma and not paged and \
        math.ceil(max_len / num_splits) <= EVICT_FIRST_MAX_SPAN  # fmt: skip
