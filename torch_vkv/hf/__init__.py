"""Hugging Face drop-in: :class:`VirtualKVCache` and the ``"vkv"`` attention implementation.

``VirtualKVCache`` is a ``transformers.Cache`` (5.x API: a list of
``CacheLayerMixin`` layers) over one :class:`torch_vkv.KVCache`: addresses
that never move, like ``StaticCache``, and memory that follows the tokens
used, like ``DynamicCache``. Importing this package registers
``attn_implementation="vkv"`` with transformers.

Modules, one concept each:

* :mod:`~torch_vkv.hf.cache`: ``VirtualKVCache`` (steps, commits, batch operations);
* :mod:`~torch_vkv.hf.arguments`: the checks of its constructor arguments;
* :mod:`~torch_vkv.hf.step_owner`: the thread of the eager step in progress (overlaps refused);
* :mod:`~torch_vkv.hf.layer`: ``VirtualKVLayer`` (a layer's K/V views and writes);
* :mod:`~torch_vkv.hf.lengths`: ``SequenceLengths``, the one owner of every row's length;
* :mod:`~torch_vkv.hf.attention`: the read-only ``"vkv"`` attention and mask functions;
* :mod:`~torch_vkv.hf.commit_op`: the in-graph commit safety net;
* :mod:`~torch_vkv.hf.windows`: which lengths a step tells a KVCache with sliding windows;
* :mod:`~torch_vkv.hf.compat`: ``generate_kwargs`` / ``forward_kwargs``, the
  cache keyword of the installed transformers (``cache=`` or ``past_key_values=``).

Usage (see ``docs/hf.md``)::

    import torch_vkv.hf
    from torch_vkv.hf import VirtualKVCache, generate_kwargs

    model.set_attn_implementation("vkv")
    cache = VirtualKVCache(model.config, max_batch_size=8, max_cache_len=8192)
    out = model.generate(**inputs, **generate_kwargs(cache), max_new_tokens=256)
"""

from __future__ import annotations

from torch_vkv.hf.attention import register, vkv_attention_forward, vkv_mask
from torch_vkv.hf.cache import VirtualKVCache
from torch_vkv.hf.compat import cache_keyword, forward_kwargs, generate_kwargs
from torch_vkv.hf.layer import VirtualKVLayer
from torch_vkv.hf.lengths import SequenceLengths

__all__ = [
    "SequenceLengths",
    "VirtualKVCache",
    "VirtualKVLayer",
    "cache_keyword",
    "forward_kwargs",
    "generate_kwargs",
    "register",
    "vkv_attention_forward",
    "vkv_mask",
]

register()
