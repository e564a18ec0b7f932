"""How the memory of :class:`~torch_vkv.KVCache` is laid out in buffers and pages, as
read-only properties: what a subclass or an adapter (the Hugging Face cache sizes its
staging pages from ``num_buffers``) reads instead of the private buffer list."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch_vkv.cache import KVCache


class _LayoutMixin:
    """Buffer and page geometry of :class:`~torch_vkv.KVCache`."""

    @property
    def num_buffers(self: "KVCache") -> int:
        """Virtual buffers the cache reserved: ``2 * num_layers`` (K and V of each layer) in the
        ``per_layer`` layout, 1 in ``interleaved``. A commit of ``n`` pages per buffer takes
        ``n * num_buffers`` pages of the pool. Still answers after :meth:`close`."""
        return 2 * self.num_layers if self.layout == "per_layer" else 1

    @property
    def tokens_per_page(self: "KVCache") -> int | float:
        """Tokens one page holds in one buffer: the commit granularity
        (about a thousand for per_layer on 2 MiB pages, tens for interleaved).
        A float when a token does not divide the page."""
        q, r = divmod(self.page_size, self.bytes_per_token_buffer)
        return q if r == 0 else self.page_size / self.bytes_per_token_buffer
