"""Triton kernels of torch_vkv (installed as ``torch_vkv.triton_kernels``).

Every kernel reads an ordinary strided cache ``[B, S_max, num_kv_heads,
head_dim]`` (contiguous virtual memory, any row stride) or, in its *paged
twin*, a block pool ``[num_blocks, page_size, num_kv_heads, head_dim]``
through a block table. The twins are the same source compiled with
``PAGED=True``; only the row addressing differs (see ``_common.py``).

* :func:`prefill_attention`: varlen queries over the cache, causal bottom-right
  aligned (prefill, chunked prefill, mixed batches); on Hopper it can run the
  Gluon kernel of ``prefill_hopper.py`` (``kernel="gluon"``).
* :func:`decode_attention`: split-KV flash-decoding, one query per request.
* :func:`append_kv`: write new tokens' K/V at their positions, in place.
* :func:`decode_page_entries`: FlashInfer's decode page table of a step (the
  ``flashinfer`` backend's decode), in one launch.

Each has a plain-PyTorch reference beside it (``*_reference``).
Importing this package imports ``triton``.
"""

import os

#: Whether these kernels were defined under Triton's CPU interpreter: Triton reads
#: ``TRITON_INTERPRET`` when a kernel is decorated, so this, not the variable's
#: value later, says whether they run on CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

from .append import append_kv, append_kv_reference, zero_tail  # noqa: E402
from .decode import (  # noqa: E402
    decode_attention,
    decode_reference,
    default_fuse_merge,
    default_merge_counters,
)
from .decode_launch import (  # noqa: E402
    LONG_CACHE_WAVE_STEPS,
    LONG_TILE_MIN_ROWS,
    SPLIT_WAVES,
    default_decode_block_n,
    default_decode_evict_first,
    default_decode_stages,
    default_decode_tma,
    default_num_splits,
    long_cache_decode_launch,
)
from .page_table import decode_page_entries  # noqa: E402
from .prefill import (  # noqa: E402
    EAGER_TMA_MIN_ROWS,
    GLUON_PREFILL_DEFAULT,
    attention_reference,
    block_order,
    capturing,
    default_group_order,
    default_kernel,
    default_launch,
    default_tma,
    gather_paged,
    prefill_attention,
    tma_problem,
)

__all__ = [
    "EAGER_TMA_MIN_ROWS",
    "GLUON_PREFILL_DEFAULT",
    "INTERPRETED",
    "LONG_CACHE_WAVE_STEPS",
    "LONG_TILE_MIN_ROWS",
    "SPLIT_WAVES",
    "append_kv",
    "append_kv_reference",
    "attention_reference",
    "block_order",
    "capturing",
    "decode_attention",
    "decode_page_entries",
    "decode_reference",
    "default_kernel",
    "default_launch",
    "default_tma",
    "default_decode_block_n",
    "default_decode_evict_first",
    "default_decode_stages",
    "default_decode_tma",
    "default_fuse_merge",
    "default_group_order",
    "default_merge_counters",
    "default_num_splits",
    "gather_paged",
    "long_cache_decode_launch",
    "prefill_attention",
    "tma_problem",
    "zero_tail",
]
