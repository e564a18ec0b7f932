"""``VirtualKVLayer``: one layer of a :class:`~torch_vkv.hf.VirtualKVCache`.

A layer owns views of its K/V in the shared :class:`torch_vkv.KVCache` and
writes the new tokens of each step into them. Everything else is the cache's:
lengths (:class:`~torch_vkv.hf.lengths.SequenceLengths`), commits, the step's
padding plan, batch operations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

import torch_vkv
from torch_vkv._compile_guard import check_backend

try:  # transformers is optional for torch_vkv, required for this package
    from transformers.cache_utils import CacheLayerMixin
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("torch_vkv.hf needs transformers >= 5.0 (pip install 'transformers>=5')") from e

if TYPE_CHECKING:  # pragma: no cover
    from torch_vkv.cache import KVCache
    from torch_vkv.hf.cache import VirtualKVCache

__all__ = ["VirtualKVLayer", "interleaved_base"]


def interleaved_base(kv: "KVCache") -> torch.Tensor:
    """One plain view ``[max_B, max_seq_len, L, 2, H, D]`` over the interleaved
    buffer, the single K/V input of compiled steps (see ``VirtualKVLayer._bind``)."""
    k0 = kv.key(0)
    H, D = kv.num_kv_heads, kv.head_dim
    size = (kv.max_batch_size, kv.max_seq_len, kv.num_layers, 2, H, D)
    stride = (k0.stride(0), k0.stride(1), 2 * k0.stride(2) * H, k0.stride(2) * H, k0.stride(2), 1)
    base = k0.as_strided(size, stride, k0.storage_offset())
    for l in range(kv.num_layers):  # the layout KVCache documents; a change must not pass silently
        for j, view in enumerate((kv.key(l), kv.value(l))):
            mine = base[:, :, l, j]
            if mine.data_ptr() != view.data_ptr() or mine.stride() != view.stride() or mine.shape != view.shape:
                raise RuntimeError(f"KVCache interleaved layout is not [B, S, L, 2, H, D] (layer {l}, part {j})")
    return base


class VirtualKVLayer(CacheLayerMixin):
    """One layer of a :class:`VirtualKVCache`: views of the shared :class:`KVCache`.

    ``update(key_states, value_states)`` takes ``[B, num_kv_heads, S_new,
    head_dim]`` and returns, in padded mode, the committed views ``[B,
    num_kv_heads, seq_len, head_dim]``; in vkv mode the full-capacity views
    ``[max_batch_size, num_kv_heads, max_cache_len, head_dim]`` (the cache's
    ``cache_seqlens`` says which rows are valid). Both are transposes of the
    ``[B, S, H, D]`` buffers: no copy.

    ``keys`` / ``values`` raise ``RuntimeError`` after ``VirtualKVCache.close()``.
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False
    supports_early_init = True

    def __init__(self, parent: "VirtualKVCache", layer_idx: int) -> None:
        # CacheLayerMixin.__init__ would assign self.keys/values, which are properties here.
        self._parent = parent
        self.layer_idx = layer_idx
        self._k: Optional[torch.Tensor] = None  # [max_B, S_max, H, D]
        self._v: Optional[torch.Tensor] = None
        self._base: Optional[torch.Tensor] = None  # interleaved: the one [max_B, S_max, L, 2, H, D] view
        self._k_full: Optional[torch.Tensor] = None  # what update() returns in vkv mode
        self._v_full: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return f"VirtualKVLayer(layer_idx={self.layer_idx})"

    # -- buffers ---------------------------------------------------------------------
    def _bind(self, k: torch.Tensor, v: torch.Tensor, base: Optional[torch.Tensor]) -> None:
        """Called once the KVCache exists.

        Static addresses: dynamo lifts marked tensors as graph inputs without
        guards on their data, and CUDA graphs read them in place. An unmarked
        buffer would be copied into a graph-owned input before every replay:
        the whole virtual capacity, uncommitted pages included.

        No two inputs of a compiled step may alias one another: AOTAutograd
        would merge them into a *synthetic base*, an input it does not keep
        static, and inductor would then skip CUDA graphs ("mutated inputs").
        per_layer K and V views have storages of their own, so they are the
        inputs. The interleaved views all share one buffer, so there the one
        input is ``base`` (``[max_B, S_max, L, 2, H, D]``), and :meth:`buffers`
        slices the layer out of it inside the step.
        """
        self._k, self._v, self._base = k, v, base
        # The objects update() returns in vkv mode: always the same tensors, so
        # the attention function finds this layer from them (also under compile;
        # it reads only this attribute from them, so they never become inputs).
        self._k_full = k.transpose(1, 2)
        self._v_full = v.transpose(1, 2)
        self._k_full._vkv_layer = self
        self._v_full._vkv_layer = self
        for t in ((k, v) if base is None else (base,)) + (self._k_full, self._v_full):
            torch._dynamo.mark_static_address(t)
            # Static shapes too: a second cache of another size recompiles rather than turning
            # the buffer sizes dynamic (dynamo's automatic dynamic shapes), which breaks guard
            # creation for these views in torch 2.11-2.13 ("sources must not be empty").
            torch._dynamo.mark_static(t)

    def _unbind(self) -> None:
        self._k = self._v = self._base = self._k_full = self._v_full = None

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K and V, each ``[max_batch_size, max_cache_len, num_kv_heads, head_dim]``.

        The K/V writes and the attention always take these whole buffers
        (request ``r`` is row ``r``), never slices made earlier: a slice made
        before a graph break and used after it would become a non-static input
        of the next graph, copied whole (uncommitted pages included) by CUDA
        graphs. The interleaved views are made here, right before their use."""
        if self._base is not None:
            return self._base[:, :, self.layer_idx, 0], self._base[:, :, self.layer_idx, 1]
        if self._k is None:
            self._parent._check_open()
            raise RuntimeError("VirtualKVCache: the KV cache is not built yet (no update so far)")
        return self._k, self._v

    @property
    def is_initialized(self) -> bool:  # noqa: D401 - transformers attribute
        return self._k is not None and self._parent.mode is not None

    @is_initialized.setter
    def is_initialized(self, value: bool) -> None:  # transformers' base classes assign it
        pass

    @property
    def keys(self) -> Optional[torch.Tensor]:
        """The keys as ``DynamicCache`` holds them, ``[B, num_kv_heads, seq_len, head_dim]``
        (``None`` before the first update; ``RuntimeError`` after ``close()``).

        Padded mode: a view of the committed rows (no copy). vkv mode: a copy,
        each row's valid tokens right-aligned and zeros where ``DynamicCache``
        would hold left padding (rows are ragged in the buffer, so no view can
        show them without reading past a row's pages)."""
        return self._dynamic_view(0)

    @property
    def values(self) -> Optional[torch.Tensor]:
        """The values, shaped as :attr:`keys`."""
        return self._dynamic_view(1)

    @keys.setter
    def keys(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("VirtualKVLayer.keys is a view of the virtual cache; write through update()")

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("VirtualKVLayer.values is a view of the virtual cache; write through update()")

    def _dynamic_view(self, which: int) -> Optional[torch.Tensor]:
        self._parent._check_open()
        if not self.is_initialized:
            return None
        buf = self.buffers()[which]
        rows, n = self._parent._lengths.rows(), self._parent._lengths.seq_length()
        B = len(rows)
        if self._parent.mode == "padded":
            return buf[:B, :n].transpose(1, 2)
        out = buf.new_zeros((B, n) + tuple(buf.shape[2:]))
        # A sliding layer gave back the pages behind its window: those rows are not read (on CUDA a read of
        # an unmapped page is a fault) and stay zeros, as DynamicCache's sliding layers hold none of them.
        kv = self._parent._kv
        first = kv.window_start(self.layer_idx) if kv is not None and kv.windowed else None
        for b, r in enumerate(rows):
            lo = min(r, int(first[b])) if first is not None else 0
            if r > lo:
                out[b, n - r + lo :] = buf[b, lo:r]
        return out.transpose(1, 2)

    # -- CacheLayerMixin -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._parent._ensure_kv(key_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends ``key_states``/``value_states`` ``[B, num_kv_heads, S_new, head_dim]``.

        Returns ``(keys, values)``: padded mode ``[B, H_kv, seq_len, D]`` views of
        the committed rows; vkv mode ``[max_batch_size, H_kv, max_cache_len, D]``.
        """
        p = self._parent
        p._check_states(key_states, value_states)
        B, H, S, D = key_states.shape
        compiling = torch.compiler.is_compiling()
        if compiling:
            check_backend()  # aot_eager would copy the whole buffer: a clear error instead of a fault
        if compiling and p._mode == "vkv":  # else (a compiled prefill, padded mode) _eager_step breaks the graph
            lens = p._compiled_step_lengths(self.layer_idx, B, S)
            cu = None if S == 1 else torch.arange(B + 1, dtype=torch.int32, device=key_states.device) * S
            self._append(key_states, value_states, lens, cu, None)
            return self._k_full, self._v_full
        step = p._eager_step(self.layer_idx, key_states)
        k_buf, v_buf = self.buffers()
        if step.padded:
            start, end = step.start, step.start + S
            k_buf[:B, start:end].copy_(key_states.transpose(1, 2))
            v_buf[:B, start:end].copy_(value_states.transpose(1, 2))
            # Only committed, written rows: eager/sdpa/FA2 read all of what they get.
            return k_buf[:B, :end].transpose(1, 2), v_buf[:B, :end].transpose(1, 2)
        self._append(key_states, value_states, p._lengths.cache_seqlens[:B], step.cu_seqlens_q, step.real_index)
        return self._k_full, self._v_full

    def _append(self, k, v, lens, cu, real_index) -> None:
        """vkv mode: writes the new tokens (only the real ones with ``real_index``)
        at ``lens - n`` of each row. Device-only work: traceable, capturable."""
        B, H, S, D = k.shape
        k_buf, v_buf = self.buffers()
        k_new = k.transpose(1, 2).reshape(B * S, H, D).to(k_buf.dtype)
        v_new = v.transpose(1, 2).reshape(B * S, H, D).to(v_buf.dtype)
        if real_index is not None:
            k_new, v_new = k_new[real_index], v_new[real_index]
        # append_kv reads head_dim contiguously; a model may hand K/V of any strides.
        if k_new.stride(-1) != 1:
            k_new = k_new.contiguous()
        if v_new.stride(-1) != 1:
            v_new = v_new.contiguous()
        torch_vkv.append_kv(k_buf, v_buf, k_new, v_new, lens, cu_seqlens_q=cu)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._parent.get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> Any:
        return self._parent.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return self._parent.max_cache_len

    def get_max_cache_shape(self) -> int:  # transformers < 5.16 name
        return self._parent.max_cache_len

    # Rows are shared by all layers (one KVCache), so these act on the whole
    # cache: call them on VirtualKVCache, which does each once for every layer.
    def _whole_cache_only(self, name: str) -> None:
        raise NotImplementedError(
            f"VirtualKVLayer.{name}: call VirtualKVCache.{name}(...), which acts on every layer at once"
        )

    def reset(self) -> None:
        self._whole_cache_only("reset")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._whole_cache_only("reorder_cache")

    def crop(self, tokens_to_remove: int) -> None:
        self._whole_cache_only("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._whole_cache_only("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._whole_cache_only("batch_select_indices")

    def offload(self) -> None:  # the virtual cache stays on its device
        pass

    def prefetch(self) -> None:
        pass
