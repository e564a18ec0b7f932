"""Hugging Face drop-in: :class:`VirtualKVCache` and the ``"vkv"`` attention implementation.

``VirtualKVCache`` is a ``transformers.Cache`` (5.x API: a list of
``CacheLayerMixin`` layers) over one :class:`torch_vkv.KVCache`. Every batch
row owns a contiguous virtual range of ``max_cache_len`` tokens in every
layer; physical pages are committed as the row grows, so memory follows the
tokens used (like ``DynamicCache``) while addresses never move (like
``StaticCache``)::

    row 0  |#########=====..........................|   # written K/V
    row 1  |#####=========..........................|   = committed, not written yet
    row 2  |##############=====.....................|   . reserved only (no memory)
            ^ token 0                   max_cache_len ^

Two storage modes, chosen at the first ``update`` after construction or
:meth:`VirtualKVCache.reset`, from ``config._attn_implementation``:

* **padded** (``eager``, ``sdpa``, ``flash_attention_2``, anything but
  ``vkv``): rows hold exactly what ``DynamicCache`` holds (left padding
  included) and ``update`` returns the views ``[:B, :seq_len]`` transposed to
  ``[B, num_kv_heads, seq_len, head_dim]``: committed rows only, no copy.
* **vkv**: rows hold only real tokens (left padding is squeezed out at
  prefill), lengths live in a device tensor ``cache_seqlens`` and ``update``
  returns the full-capacity views: static shapes and addresses for
  ``torch.compile`` and CUDA graphs. The ``"vkv"`` attention implementation
  reads them with :func:`torch_vkv.attention.attention`, which never reads a
  row past ``cache_seqlens``.

Page commits cannot run inside a compiled or captured step, so in vkv mode
they happen in :meth:`VirtualKVCache.prepare_step`, *before* the step.
``generate()`` calls it without being asked: it builds the attention masks
outside the compiled forward, and the ``"vkv"`` mask function calls
``get_mask_sizes`` on the cache, which calls ``prepare_step``. A hand-written
compiled loop calls ``cache.prepare_step(num_new_tokens)`` itself before each
step (eager steps commit by themselves in ``update``). Both commit points use
``KVCache.step_async``: synchronous for the step's rows, plus a background
prefetch of the page one more token needs, so page crossings do not stall. A compiled step it
forgot still commits, through a small op inside the graph that reads the
lengths (a device sync); a captured CUDA graph cannot, so there the hook is
required.

Public names: :class:`VirtualKVCache`, :class:`VirtualKVLayer`,
:func:`register`, :func:`vkv_attention_forward`, :func:`vkv_mask`.
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from torch_vkv._checks import check_int, fail
from torch_vkv.attention import append_kv as _append_kv
from torch_vkv.attention import attention as _vkv_attention
from torch_vkv.attention import select_backend as _select_backend
from torch_vkv.cache import KVCache

try:  # transformers is optional for torch_vkv, required for this module
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("torch_vkv.hf needs transformers >= 5.0 (pip install 'transformers>=5')") from e

__all__ = ["VirtualKVCache", "VirtualKVLayer", "register", "vkv_attention_forward", "vkv_mask"]

ATTN_NAME = "vkv"


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    scale: float,
    max_seqlen_q: int,
) -> torch.Tensor:
    """Packed varlen attention over the virtual cache; never reads past ``cache_seqlens``
    (every backend of :func:`torch_vkv.attention` masks or gathers valid rows only;
    on the CPU that is ``sdpa``, sized from the lengths)."""
    backend = "sdpa" if q.device.type == "cpu" else _select_backend(q, k_cache, v_cache, decode=cu_seqlens_q is None)
    return _vkv_attention(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, causal=True, scale=scale,
        max_seqlen_q=max_seqlen_q, backend=backend,
    )  # fmt: skip


def _append(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q) -> None:
    """Writes packed new K/V ``[total_q, H_kv, D]`` at ``cache_seqlens - n + i`` of each row."""
    _append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q=cu_seqlens_q)


# ----------------------------------------------------------------------------
# safety net for compiled steps run without prepare_step
# ----------------------------------------------------------------------------

# handle -> VirtualKVCache (weak): how the op below, which only takes tensors
# and ints, finds its cache. Any number of caches can live in one process.
_CACHES: "weakref.WeakValueDictionary[int, VirtualKVCache]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


@torch.library.custom_op("torch_vkv_hf::ensure_committed", mutates_args=())
def _ensure_committed(cache_seqlens: torch.Tensor, handle: int) -> torch.Tensor:
    """Runs inside a compiled vkv step, before its K/V writes: if
    :meth:`VirtualKVCache.prepare_step` did not announce the step, commits the
    rows ``[0, cache_seqlens[b])`` now (reading the lengths: a device sync).
    Skipped while a CUDA graph is being captured (commits cannot be captured;
    such steps need ``prepare_step``). Returns an int32 zero the writes depend
    on, which orders them after this op."""
    cache = _CACHES.get(handle)
    capturing = cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()
    if cache is not None and not capturing:
        cache._commit_from_device(cache_seqlens)
    return torch.zeros((), dtype=cache_seqlens.dtype, device=cache_seqlens.device)


@_ensure_committed.register_fake
def _(cache_seqlens, handle):
    return cache_seqlens.new_empty(())


# ----------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------


def _text_config(config: Any) -> Any:
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:
            return config.get_text_config()
    return config


def _model_shape(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) from a transformers config."""
    tc = _text_config(config)
    try:
        num_layers = int(tc.num_hidden_layers)
        num_heads = int(tc.num_attention_heads)
    except AttributeError:
        fail("config", "a decoder config with num_hidden_layers and num_attention_heads", type(config).__name__,
             TypeError)  # fmt: skip
    num_kv_heads = int(getattr(tc, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // num_heads
    return num_layers, num_kv_heads, int(head_dim)


class VirtualKVLayer(CacheLayerMixin):
    """One layer of a :class:`VirtualKVCache`: views of the shared :class:`KVCache`.

    ``update(key_states, value_states)`` takes ``[B, num_kv_heads, S_new, head_dim]``
    and returns, in padded mode, the committed views ``[B, num_kv_heads, seq_len,
    head_dim]``; in vkv mode the full-capacity views ``[max_batch_size,
    num_kv_heads, max_cache_len, head_dim]`` (``self.cache_seqlens`` says which
    rows are valid). Both are transposes of the ``[B, S, H, D]`` buffers: no copy.
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False
    supports_early_init = True

    def __init__(self, parent: "VirtualKVCache", layer_idx: int) -> None:
        # CacheLayerMixin.__init__ would assign self.keys/values, which are properties here.
        self._parent = parent
        self.layer_idx = layer_idx
        self._len = 0  # logical tokens (DynamicCache's get_seq_length), host
        self._row_lens: list[int] = []  # vkv mode: valid tokens per row, host mirror of cache_seqlens
        self.cache_seqlens: Optional[torch.Tensor] = None  # vkv mode: int32 [max_batch_size], device
        self._len_t: Optional[torch.Tensor] = None  # logical length as a 0-d device tensor (for compile)
        self._k_full: Optional[torch.Tensor] = None
        self._v_full: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return f"VirtualKVLayer(layer_idx={self.layer_idx}, seq_len={self._len})"

    # -- buffers ---------------------------------------------------------------
    def _bind(self, kv: KVCache) -> None:
        """Called once the KVCache exists: full-capacity views and device counters."""
        k = kv.key(self.layer_idx)  # [max_B, S_max, H_kv, D]
        v = kv.value(self.layer_idx)
        self._k_buf, self._v_buf = k, v
        # The objects update() returns in vkv mode: always the same tensors, so
        # the attention function finds this layer from them (also under compile).
        self._k_full = k.transpose(1, 2)
        self._v_full = v.transpose(1, 2)
        self._k_full._vkv_layer = self
        self._v_full._vkv_layer = self
        # Normal tensors (built outside inference mode): they need a version counter.
        self.cache_seqlens = torch.zeros(kv.max_batch_size, dtype=torch.int32, device=k.device)
        self._len_t = torch.zeros((), dtype=torch.long, device=k.device)
        # Static addresses: dynamo lifts them as graph inputs without guards on
        # their data, and CUDA graphs read them in place. An unmarked buffer
        # would be copied into a graph-owned input before every replay: the whole
        # virtual capacity, uncommitted pages included (an illegal memory access
        # as soon as max_cache_len reaches past the committed pages).
        #
        # The mark belongs to these tensor *objects*; a view made from them in
        # traced code (``buf[:B]``) is a new, unmarked tensor. If a graph break
        # falls between making such a view and using it (generate() compiles
        # with fullgraph=False, so a break is silent), the view becomes an input
        # of the next graph, and cudagraph trees copy it whole at recording and
        # before every replay. So the K/V writes and the attention always get
        # these buffers themselves (request r is row r), never slices of them.
        for t in (self._k_buf, self._v_buf, self._k_full, self._v_full, self.cache_seqlens, self._len_t):
            torch._dynamo.mark_static_address(t)

    @property
    def is_initialized(self) -> bool:  # noqa: D401 - transformers attribute
        return self._parent._kv is not None and self._parent._mode is not None

    @is_initialized.setter
    def is_initialized(self, value: bool) -> None:  # transformers' base classes assign it
        pass

    @property
    def keys(self) -> Optional[torch.Tensor]:
        """The keys as ``DynamicCache`` holds them, ``[B, num_kv_heads, seq_len, head_dim]``.

        Padded mode: a view of the committed rows (no copy). vkv mode: a copy,
        each row's valid tokens right-aligned and zeros where ``DynamicCache``
        would hold left padding (rows are ragged in the buffer, so no view can
        show them without reading past a row's pages)."""
        return self._view(self._k_buf) if self.is_initialized else None

    @property
    def values(self) -> Optional[torch.Tensor]:
        return self._view(self._v_buf) if self.is_initialized else None

    @keys.setter
    def keys(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("VirtualKVLayer.keys is a view of the virtual cache; write through update()")

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("VirtualKVLayer.values is a view of the virtual cache; write through update()")

    def _view(self, buf: torch.Tensor) -> torch.Tensor:
        p = self._parent
        p._sync_host()
        B, n = p._batch, self._len
        if p._mode == "padded":
            return buf[:B, :n].transpose(1, 2)
        out = buf.new_zeros((B, n) + tuple(buf.shape[2:]))
        for b, r in enumerate(self._row_lens):
            if r:
                out[b, n - r :] = buf[b, :r]
        return out.transpose(1, 2)

    # -- CacheLayerMixin -------------------------------------------------------
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
        if key_states.dim() != 4 or value_states.shape[:3] != key_states.shape[:3]:
            fail("key_states/value_states", "[batch, num_kv_heads, new_tokens, head_dim] tensors of one shape",
                 (tuple(key_states.shape), tuple(value_states.shape)))  # fmt: skip
        if _is_compiling():
            if p._mode != "vkv":
                raise RuntimeError(
                    "VirtualKVCache: compiled steps need attn_implementation='vkv' and an eager first step "
                    f"(prefill) to set the cache up; got mode {p._mode!r}"
                )
            return self._update_device(key_states, value_states)
        p._ensure_kv(key_states)
        if p._mode is None:
            p._start(key_states.shape[0])
        B, _, S, _ = key_states.shape
        if B != p._batch:
            fail("batch size of key_states", f"{p._batch} (the cache's current batch)", B)
        if p._mode == "padded":
            return self._update_padded(key_states, value_states)
        if p._config_mode() != "vkv":
            # Full-capacity views would reach eager/sdpa attention, which reads all of them.
            raise RuntimeError(
                "VirtualKVCache holds this sequence in the 'vkv' layout, but the model's attn_implementation "
                f"is now {getattr(p._config, '_attn_implementation', None)!r}: expected 'vkv' until cache.reset()"
            )
        if self.layer_idx == p._first_layer:
            # The step prepare_step announced, if any, is this one: settle the
            # host lengths as they were before it, then count it here.
            p._sync_host(resolve=True, in_step=True)
        lens = [r + S for r in self._row_lens]
        if max(lens) > p._max_cache_len:
            fail("tokens in the cache", f"at most max_cache_len={p._max_cache_len}", max(lens))
        if self.layer_idx == p._first_layer:  # one commit backs every layer
            p._commit(lens, prefetch=True)
        self._row_lens = lens
        self._len += S
        out = self._update_device(key_states, value_states)
        if self.layer_idx == p._first_layer:
            p._mark_synced()
        return out

    def _update_padded(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._parent
        B, S = k.shape[0], k.shape[2]
        start, end = self._len, self._len + k.shape[2]
        if end > p._max_cache_len:
            fail("tokens in the cache", f"at most max_cache_len={p._max_cache_len}", end)
        if self.layer_idx == p._first_layer:  # one commit backs every layer
            p._commit([end] * B, prefetch=True)
        self._k_buf[:B, start:end].copy_(k.transpose(1, 2))
        self._v_buf[:B, start:end].copy_(v.transpose(1, 2))
        self._len = end
        # Only committed, written rows: eager/sdpa/FA2 read all of what they get.
        return self._k_buf[:B, :end].transpose(1, 2), self._v_buf[:B, :end].transpose(1, 2)

    def _update_device(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vkv mode: device-only work (traceable, capturable). The pages are committed already."""
        B, H, S, D = k.shape
        seqlens = self.cache_seqlens[:B]
        seqlens.add_(S)
        self._len_t.add_(S)
        lens = seqlens
        if _is_compiling() and self.layer_idx == self._parent._first_layer:
            # Safety net: commits here if prepare_step did not run (see _ensure_committed);
            # the writes of every layer come after it (data dependence of layer 0's, then the model's).
            lens = seqlens + _ensure_committed(seqlens, self._parent._handle)
        k_new = k.transpose(1, 2).reshape(B * S, H, D).to(self._k_buf.dtype)
        v_new = v.transpose(1, 2).reshape(B * S, H, D).to(self._v_buf.dtype)
        cu = None if S == 1 else torch.arange(B + 1, dtype=torch.int32, device=k.device) * S
        # The whole marked buffers, never slices of them (see _bind): request r is row r.
        _append(self._k_buf, self._v_buf, k_new, v_new, lens, cu)
        return self._k_full, self._v_full

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for mask building. In vkv mode this is also
        the pre-step hook: outside a compiled region it commits the pages the
        next ``query_length`` tokens need (see :meth:`VirtualKVCache.prepare_step`)."""
        p = self._parent
        if p._mode == "vkv":
            if _is_compiling():
                return p._max_cache_len, 0  # constant: no recompiles; the vkv mask ignores it
            if self.layer_idx == p._first_layer:
                p._prepare(query_length, strict=False)
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> Any:
        """Tokens seen (left padding included), like ``DynamicCache``: an int, or a
        0-d device tensor while compiling (so no recompile as it grows)."""
        p = self._parent
        if _is_compiling() and p._mode == "vkv":
            return self._len_t
        if not self.is_initialized:
            return 0
        p._sync_host()
        return self._len

    def get_max_length(self) -> int:
        return self._parent._max_cache_len

    def get_max_cache_shape(self) -> int:  # transformers < 5.16 name
        return self._parent._max_cache_len

    # Rows are shared by all layers (one KVCache), so these act on the whole
    # cache: call them on VirtualKVCache, which calls each of them once.
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


class VirtualKVCache(Cache):
    """A ``transformers.Cache`` in contiguous virtual memory, pages committed on demand.

    Args:
        config: the model's ``PretrainedConfig`` (pass ``model.config``: the
            cache reads ``config._attn_implementation`` to pick its mode).
        max_batch_size: most rows at once (beam search: batch x num_beams).
        max_cache_len: most tokens per row (prompt, padding and new tokens).
        device: default: the device of the first ``key_states`` (the KV cache
            is then built lazily, like ``DynamicCache``).
        dtype: default: the dtype of the first ``key_states``.
        memory_budget: bytes of physical memory the KV may commit (``None``:
            up to a static allocation's size).
        layout: ``"per_layer"`` or ``"interleaved"`` (see :data:`torch_vkv.LAYOUTS`).
        page_size: host backend only: bytes per page (default 2 MiB).
        margin_tokens: rows committed past each reservation (see :class:`KVCache`).
        prefetch: commit the next page in the background one step ahead
            (:meth:`KVCache.step_async`); ``False``: synchronous commits only
            (e.g. before capturing CUDA graphs by hand in the default
            ``capture_error_mode="global"``, which forbids driver calls from
            other threads).

    Same observable behaviour as ``DynamicCache`` in ``generate()`` and in
    hand-written loops (``get_seq_length``, ``crop``, ``reorder_cache``,
    ``batch_repeat_interleave``, ``batch_select_indices``, ``reset``,
    ``get_mask_sizes``); memory: :meth:`memory_stats`.

    ``crop``, ``reorder_cache``, ``batch_*`` and ``reset`` act on every layer at
    once (the layers share one :class:`KVCache`).
    """

    def __init__(
        self,
        config: Any,
        max_batch_size: int,
        max_cache_len: int,
        *,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        memory_budget: Optional[int] = None,
        layout: str = "per_layer",
        page_size: Optional[int] = None,
        margin_tokens: int = 0,
        prefetch: bool = True,
    ) -> None:
        self._config = config
        self._prefetch = bool(prefetch)
        self._num_layers, self._num_kv_heads, self._head_dim = _model_shape(config)
        self._max_batch_size = check_int("max_batch_size", max_batch_size, low=1)
        self._max_cache_len = check_int("max_cache_len", max_cache_len, low=1)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            fail("dtype", "a torch.dtype or None", dtype, TypeError)
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else None
        self._kv_kwargs = dict(memory_budget=memory_budget, layout=layout, page_size=page_size,
                               margin_tokens=margin_tokens)  # fmt: skip
        self._kv: Optional[KVCache] = None
        self._mode: Optional[str] = None  # None until the first update: "padded" or "vkv"
        self._batch = 0
        self._first_layer = 0
        self._announced = 0  # tokens announced by prepare_step for a step not yet seen on the host
        self._announced_version = -1
        self._synced_version = -1  # version of cache_seqlens (layer 0) when host lengths were last exact
        self._handle = next(_HANDLES)
        _CACHES[self._handle] = self
        super().__init__(layers=[VirtualKVLayer(self, i) for i in range(self._num_layers)])
        if self._device is not None and self._dtype is not None:
            self._build_kv(self._device, self._dtype)

    # -- properties transformers reads -----------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    @property
    def batch_size(self) -> int:
        """Rows in use (the batch of the current sequence), ``-1`` before the first update."""
        return self._batch if self._mode is not None else -1

    @property
    def is_compileable(self) -> bool:
        """True with ``attn_implementation="vkv"``: static shapes and addresses.
        In padded mode (eager/sdpa/...) shapes grow with the sequence, as with
        ``DynamicCache``, so generate() does not auto-compile."""
        return self._planned_mode() == "vkv"

    @property
    def kv_cache(self) -> Optional[KVCache]:
        """The underlying :class:`torch_vkv.KVCache` (``None`` until built)."""
        return self._kv

    @property
    def mode(self) -> Optional[str]:
        """``"padded"``, ``"vkv"`` or ``None`` (nothing stored since the last reset)."""
        return self._mode

    def _config_mode(self) -> str:
        """The mode the config's attention implementation asks for now."""
        impl = getattr(_text_config(self._config), "_attn_implementation", None)
        if impl is None:
            impl = getattr(self._config, "_attn_implementation", None)
        return "vkv" if impl == ATTN_NAME else "padded"

    def _planned_mode(self) -> str:
        return self._mode if self._mode is not None else self._config_mode()

    # -- set-up ------------------------------------------------------------------
    def _build_kv(self, device: torch.device, dtype: torch.dtype) -> None:
        # Normal tensors even under inference_mode: the cache outlives the call
        # that builds it, and later steps may run outside inference mode.
        with torch.inference_mode(False):
            self._build_kv_now(device, dtype)

    def _build_kv_now(self, device: torch.device, dtype: torch.dtype) -> None:
        kw = dict(self._kv_kwargs)
        if device.type != "cpu" or kw["page_size"] is None:
            kw.pop("page_size")  # host backend only
        self._kv = KVCache(
            self._num_layers, self._num_kv_heads, self._head_dim,
            max_batch_size=self._max_batch_size, max_seq_len=self._max_cache_len, dtype=dtype,
            device=device, **kw,
        )  # fmt: skip
        # Row i of the batch is slot i, always: views stay plain slices.
        for i in range(self._max_batch_size):
            slot = self._kv.alloc()
            assert slot == i, (slot, i)
        self._cap = [0] * self._max_batch_size  # rows backed per row (host copy; see _commit)
        for layer in self.layers:
            layer._bind(self._kv)

    def _ensure_kv(self, key_states: torch.Tensor) -> None:
        if self._kv is not None:
            return
        if key_states.shape[1] != self._num_kv_heads or key_states.shape[3] != self._head_dim:
            fail("key_states", f"[B, {self._num_kv_heads}, S, {self._head_dim}] (num_kv_heads, head_dim of the config)",
                 tuple(key_states.shape))  # fmt: skip
        device = self._device or key_states.device
        self._build_kv(device, self._dtype or key_states.dtype)

    def early_initialization(self, batch_size, num_heads, head_dim, dtype, device) -> None:
        """Builds the KV cache now (transformers calls this before a compiled prefill)."""
        if self._kv is None:
            self._build_kv(torch.device(device), self._dtype or dtype)

    def _start(self, batch: int) -> None:
        """First update after construction/reset: fixes the batch and the mode."""
        if batch > self._max_batch_size:
            fail("batch size", f"at most max_batch_size={self._max_batch_size}", batch)
        self._batch = batch
        self._mode = self._planned_mode()
        for layer in self.layers:
            layer._len = 0
            layer._row_lens = [0] * batch
            layer.cache_seqlens.zero_()
            layer._len_t.zero_()
        self._announced = 0
        self._mark_synced()

    # -- host/device bookkeeping ---------------------------------------------------
    def _commit(self, lens: list[int], *, prefetch: bool = False) -> None:
        """Backs rows ``[0, lens[b])`` of every row b in every layer (never shrinks),
        synchronously: when this returns, those rows are mapped.

        Most steps stay inside pages already committed: a host-side copy of each
        row's backed tokens (``_cap``, never more than what is really backed)
        skips the KVCache call then (it runs every step).

        ``prefetch=True`` (the pre-step hook and eager steps; not from inside a
        running compiled step) uses :meth:`KVCache.step_async`: the same
        synchronous commit of ``lens`` (normally already done by the previous
        call's prefetch), plus a background commit of what ``lens + 1`` needs,
        so the step that crosses a page boundary finds its page mapped instead
        of waiting for the driver. The prefetch only maps rows nobody reads yet:
        the next call joins it before anything relies on them.
        """
        kv = self._kv
        cap = self._cap
        ahead = 1 if (prefetch and self._prefetch) else 0
        if all(n + ahead <= cap[b] for b, n in enumerate(lens)):
            return
        need = {b: n for b, n in enumerate(lens) if n > 0}
        if ahead:
            kv.step_async(need, lookahead_tokens=ahead)
        else:
            kv.step(need)
        for b, n in need.items():
            # What the synchronous part guarantees (whole pages), read without
            # joining the prefetch; a prefetched page is counted once joined.
            cap[b] = max(cap[b], self._backed_tokens(n))

    def _backed_tokens(self, n: int) -> int:
        """Tokens a row is sure to hold after a commit of ``n`` tokens: whole pages
        of ``n + margin_tokens`` rows, less the margin (KVCache's own rounding)."""
        kv = self._kv
        rows = min(n + kv.margin_tokens, kv.padded_seq_len)
        pages = -(-rows * kv.bytes_per_token_buffer // kv.page_size)
        backed = pages * kv.page_size // kv.bytes_per_token_buffer
        return max(n, min(kv.max_seq_len, backed - kv.margin_tokens))

    def _commit_from_device(self, cache_seqlens: torch.Tensor) -> None:
        """Called from a running compiled step with the lengths after it: commits
        them unless prepare_step already did (no sync in that case). Synchronous
        (no prefetch): the step's writes follow right after."""
        layer0 = self.layers[self._first_layer]
        if self._announced and layer0.cache_seqlens._version == self._announced_version:
            return  # prepare_step backed this step
        lens = cache_seqlens.tolist()
        if lens and max(lens) <= self._max_cache_len:
            self._commit(lens)

    def _trim(self, lens: list[int]) -> None:
        """Decommits what rows do not need after a shrink (rows past the batch: all).
        KVCache joins a pending prefetch first, so prefetched pages go too."""
        for b in range(self._max_batch_size):
            keep = lens[b] if b < len(lens) else 0
            if self._kv.committed_tokens(b) > keep:
                self._kv.decommit(b, keep)
            self._cap[b] = max(0, self._kv.committed_tokens(b) - self._kv.margin_tokens)

    def _sync_host(self, *, resolve: bool = False, in_step: bool = False) -> None:
        """Brings host lengths up to date after compiled steps (vkv mode).

        An in-place update of ``cache_seqlens`` made by Python-level code bumps
        its version counter (eager steps, compiled steps without CUDA graphs);
        a CUDA graph *replay* runs no host code and bumps nothing.
        :meth:`prepare_step` announces the next step's tokens:

        * exactly one bump since: that step ran; the host adds the tokens (no sync);
        * no bump, called from the eager step itself (``in_step``): the step has
          not run, the host lengths are exact (no sync);
        * no bump otherwise: the step may have run as a replay, or not at all;
          read back from the device (a sync), as is any other unexplained change.

        ``resolve`` is accepted for the callers that decide commits; the rule
        above is exact in every case, so it no longer changes anything.
        """
        if self._mode != "vkv" or self._kv is None:
            return
        v = self.layers[self._first_layer].cache_seqlens._version
        if self._announced:
            if v == self._announced_version + 1:
                n = self._announced
                for layer in self.layers:
                    layer._len += n
                    layer._row_lens = [r + n for r in layer._row_lens]
            elif not (in_step and v == self._announced_version):
                self._read_back()
            self._announced = 0
            self._mark_synced()
        elif v != self._synced_version:
            self._read_back()
            self._mark_synced()

    def _mark_synced(self) -> None:
        """Host lengths equal the device's as of now."""
        if self._kv is not None:
            self._synced_version = self.layers[self._first_layer].cache_seqlens._version

    def _read_back(self) -> None:
        layer0 = self.layers[self._first_layer]
        both = torch.cat([layer0.cache_seqlens[: self._batch].long(), layer0._len_t.view(1)]).tolist()  # one sync
        rows, n = both[:-1], int(both[-1])
        for layer in self.layers:
            layer._len = n
            layer._row_lens = list(rows)

    def prepare_step(self, num_new_tokens: int = 1) -> None:
        """The pre-step commit hook: backs the rows the next forward writes.

        Call it before each compiled (or CUDA-graph) step with the number of new
        tokens per row; ``generate()`` calls it for you through
        ``get_mask_sizes``. Eager steps commit by themselves, and calling it
        twice for one step is harmless. No-op before the first (eager) step and
        in padded mode. Raises :class:`torch_vkv.OutOfPagesError` (nothing
        changed) when the budget cannot back the step.

        The commit is synchronous (the rows are mapped when this returns) and,
        with ``prefetch=True`` (the default), also starts a background commit
        of the page the *following* step will need (:meth:`KVCache.step_async`),
        so a step that crosses a page boundary does not wait for the driver.
        """
        self._prepare(check_int("num_new_tokens", num_new_tokens, low=0), strict=True)

    def _prepare(self, n: int, *, strict: bool) -> None:
        if self._mode != "vkv" or self._kv is None:
            return
        self._sync_host(resolve=True)
        rows = self.layers[self._first_layer]._row_lens
        lens = [r + n for r in rows]
        if lens and max(lens) > self._max_cache_len:
            if not strict:  # a mask-size query, maybe not a real step: the step itself will raise
                return
            fail("tokens in the cache after this step", f"at most max_cache_len={self._max_cache_len}", max(lens))
        self._commit(lens, prefetch=True)
        self._announced = n
        self._announced_version = self.layers[self._first_layer].cache_seqlens._version

    # -- Cache API -------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> Any:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_query_offset(self, layer_idx: int = 0) -> Any:
        """Position of the first new query. In vkv mode a 0-d device tensor (as
        ``StaticCache`` does), which also tells :func:`vkv_mask` which cache it serves."""
        if self._mode == "vkv" and layer_idx < len(self.layers):
            if not _is_compiling():
                self._sync_host()
            return self.layers[layer_idx]._len_t
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return self._max_cache_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers < 5.16 name
        return self._max_cache_len

    def reset(self) -> None:
        """Forgets every token and returns the pages; addresses stay the same."""
        if self._kv is not None:
            self._kv.synchronize()
            self._trim([])
            for layer in self.layers:
                layer.cache_seqlens.zero_()
                layer._len_t.zero_()
        for layer in self.layers:
            layer._len = 0
            layer._row_lens = []
        self._mode = None
        self._batch = 0
        self._announced = 0
        self._mark_synced()

    def crop(self, max_length: int) -> None:
        """Drops tokens from the end: ``crop(-n)`` removes ``n`` tokens, ``crop(n)``
        with ``n > 0`` keeps the first ``n`` (the older transformers meaning),
        ``crop(0)`` does nothing (as ``DynamicCache``). Pages past the new
        lengths are decommitted."""
        max_length = check_int("max_length", max_length)
        if max_length == 0 or not self.is_initialized:
            return
        self._sync_host(resolve=True)
        cur = self.layers[self._first_layer]._len
        remove = -max_length if max_length < 0 else max(0, cur - max_length)
        remove = min(remove, cur)
        if remove == 0:
            return
        for layer in self.layers:
            layer._len -= remove
            layer._len_t.sub_(remove)
            if self._mode == "vkv":
                layer._row_lens = [max(0, r - remove) for r in layer._row_lens]
                layer.cache_seqlens[: self._batch].copy_(torch.tensor(layer._row_lens, dtype=torch.int32))
        self._mark_synced()
        self._trim(self._row_lens_host())

    def _row_lens_host(self) -> list[int]:
        layer = self.layers[self._first_layer]
        return list(layer._row_lens) if self._mode == "vkv" else [layer._len] * self._batch

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` becomes old row ``beam_idx[i]`` (beam search)."""
        if not self.is_initialized:
            return
        self._gather([int(i) for i in torch.as_tensor(beam_idx).tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated ``repeats`` times in place (row i -> rows i*r .. i*r+r-1)."""
        repeats = check_int("repeats", repeats, low=1)
        if not self.is_initialized:
            return
        self._gather([i for i in range(self._batch) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps only the rows ``indices`` (in that order)."""
        if not self.is_initialized:
            return
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._gather([int(i) for i in idx.tolist()])

    def _gather(self, index: list[int]) -> None:
        """New row ``i`` = old row ``index[i]``, for every layer (copies only valid rows)."""
        self._sync_host(resolve=True)
        old_b = self._batch
        for i in index:
            if not -old_b <= i < old_b:
                fail("row index", f"an int in [0, {old_b})", i)
        index = [i % old_b for i in index]
        new_b = len(index)
        if new_b > self._max_batch_size:
            fail("batch size after the batch operation", f"at most max_batch_size={self._max_batch_size}", new_b)
        if index == list(range(old_b)):
            return
        old_lens = self._row_lens_host()
        new_lens = [old_lens[i] for i in index]
        self._commit(new_lens)
        dev = self._kv.device
        for layer in self.layers:
            for buf in (layer._k_buf, layer._v_buf):
                if len(set(old_lens)) == 1:  # one gather for the whole batch
                    n = old_lens[0]
                    if n:
                        buf[:new_b, :n] = buf[torch.tensor(index, device=dev), :n]
                else:  # ragged rows (vkv after left padding): row by row
                    saved = {i: buf[i, : old_lens[i]].clone() for i in set(index)}
                    for b, i in enumerate(index):
                        buf[b, : old_lens[i]] = saved[i]
            if self._mode == "vkv":
                layer._row_lens = list(new_lens)
                layer.cache_seqlens.zero_()
                layer.cache_seqlens[:new_b].copy_(torch.tensor(new_lens, dtype=torch.int32))
        self._batch = new_b
        self._mark_synced()
        self._trim(new_lens)

    # -- stats -----------------------------------------------------------------------
    def memory_stats(self) -> dict[str, Any]:
        """Memory of the KV, as :meth:`torch_vkv.KVCache.memory_stats` reports it.

        ``reserved_bytes`` (virtual), ``committed_bytes`` (physical: the tokens
        stored rounded up to whole pages per layer, K/V and row), ``used_bytes``
        (``tokens`` x bytes per token), ``page_size``, ``tokens_per_page``,
        commit counters, ...; plus ``tokens`` (tokens stored, all rows: left
        padding counts in padded mode, not in vkv mode) and ``seq_length``
        (``get_seq_length()``). Byte counts are 0 before the cache is built.
        """
        if self._kv is None:
            stats: dict[str, Any] = {k: 0 for k in ("reserved_bytes", "committed_bytes", "used_bytes", "cached_bytes")}
        else:
            stats = self._kv.memory_stats()
        self._sync_host()
        rows = self._row_lens_host() if self._mode is not None else []
        stats["tokens"] = sum(rows)
        stats["seq_length"] = self.layers[self._first_layer]._len if self._mode is not None else 0
        if self._kv is not None:
            # Exact from the host lengths (KVCache's own count skips steps that
            # stay inside committed pages: _commit does not call it for them).
            stats["used_bytes"] = stats["tokens"] * self._kv.bytes_per_token
        return stats

    def close(self) -> None:
        """Releases all memory now (the cache is unusable afterwards)."""
        if self._kv is not None:
            self._kv.close()

    def __repr__(self) -> str:
        return (
            f"VirtualKVCache(num_layers={self._num_layers}, max_batch_size={self._max_batch_size}, "
            f"max_cache_len={self._max_cache_len}, mode={self._mode!r}, seq_length="
            f"{self.layers[0]._len if self.layers else 0})"
        )


# ----------------------------------------------------------------------------
# the "vkv" attention implementation and its mask function
# ----------------------------------------------------------------------------


def vkv_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> Optional[torch.Tensor]:
    """Mask function of ``"vkv"`` (registered with ``AttentionMaskInterface``).

    With a :class:`VirtualKVCache` (its ``get_query_offset`` is a device tensor)
    the cache masks by ``cache_seqlens`` and the attention only needs to know
    which *new* tokens are padding: this returns the last ``q_length`` columns
    of the 2-D padding mask, ``[batch, q_length]`` bool, whose shape does not
    grow, so compiled steps see static shapes. With another cache it returns
    the 2-D mask over all ``kv_length`` keys (for the plain fallback), or ``None``.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    m = attention_mask.to(torch.bool)
    if isinstance(q_offset, torch.Tensor):
        return m[:, -q_length:]
    return m[:, -kv_length:] if isinstance(kv_length, int) and 0 < kv_length <= m.shape[1] else m


def _fallback_sdpa(query, key, value, attention_mask, scaling):
    """vkv attention with another cache (DynamicCache, none): plain SDPA with a
    bottom-right causal mask and the 2-D padding mask over all keys."""
    B, _, Sq, _ = query.shape
    Sk = key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] < Sk:
        raise ValueError(
            f"attn_implementation='vkv' with a cache other than VirtualKVCache: expected a padding mask over all "
            f"{Sk} keys, got {tuple(attention_mask.shape)}"
        )
    q_pos = torch.arange(Sk - Sq, Sk, device=query.device)
    mask = (torch.arange(Sk, device=query.device)[None, :] <= q_pos[:, None])[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -Sk:].bool()
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    # A query with no visible key (a padding query) gives NaN; its output is never
    # used, but NaN must not spread through later layers' arithmetic.
    out = torch.nan_to_num(out, nan=0.0)
    return out.transpose(1, 2).contiguous(), None


def vkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"vkv"`` attention implementation.

    Args:
        query: ``[B, num_heads, S_q, head_dim]``.
        key, value: what :meth:`VirtualKVLayer.update` returned in vkv mode, the
            full-capacity views ``[max_batch_size, num_kv_heads, max_cache_len, head_dim]``.
        attention_mask: ``[B, S_q]`` bool from :func:`vkv_mask` (False = left
            padding among the new tokens) or ``None``.

    Returns ``(out [B, S_q, num_heads, head_dim], None)``. No mask is built and
    nothing past ``cache_seqlens`` is read.
    """
    if dropout:
        raise NotImplementedError("attn_implementation='vkv' is for inference: dropout must be 0")
    layer = getattr(key, "_vkv_layer", None)
    if layer is None:
        return _fallback_sdpa(query, key, value, attention_mask, scaling)
    window = kwargs.get("sliding_window")
    if window is not None:
        # No sliding windows here: fine while every row fits in the window.
        longest = layer._parent._max_cache_len if _is_compiling() else max(layer._row_lens, default=0)
        if longest > window:
            what = "max_cache_len (compiled steps)" if _is_compiling() else "tokens in a row"
            raise NotImplementedError(
                f"attn_implementation='vkv' does not implement sliding windows: expected {what} <= "
                f"sliding_window={window}, got {longest}"
            )
    B, Hq, Sq, D = query.shape
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    # The marked buffers themselves, not [:B] slices: see VirtualKVLayer._bind.
    # Request r reads row r; rows >= B are never touched.
    k_cache = layer._k_buf
    v_cache = layer._v_buf
    seqlens = layer.cache_seqlens[:B]
    q = query.transpose(1, 2)  # [B, S_q, H, D]
    if Sq == 1:
        out = _attend(q.reshape(B, Hq, D), k_cache, v_cache, seqlens, None, scale, 1)
        return out.view(B, 1, Hq, D), None
    if not _is_compiling() and attention_mask is not None and not bool(attention_mask.all()):
        return _prefill_left_padded(layer, q, attention_mask, scale)
    cu = torch.arange(B + 1, dtype=torch.int32, device=q.device) * Sq
    out = _attend(q.reshape(B * Sq, Hq, D), k_cache, v_cache, seqlens, cu, scale, Sq)
    return out.view(B, Sq, Hq, D), None


def _prefill_left_padded(layer: VirtualKVLayer, q: torch.Tensor, mask: torch.Tensor, scale: float):
    """Squeezes the left padding of this step out of the layer's rows, then attends
    with the real queries only. Eager only (host reads of the mask)."""
    p = layer._parent
    B, Sq, Hq, D = q.shape
    m = mask[:, -Sq:].to(torch.bool)
    counts = m.sum(1).tolist()
    expected = torch.arange(Sq, device=m.device)[None, :] >= (Sq - m.sum(1, keepdim=True))
    if not torch.equal(m, expected):
        raise ValueError(
            "attn_implementation='vkv' supports left padding only: expected each row's new tokens as "
            "[pad..., real...] in attention_mask, got a mask with padding after real tokens"
        )
    lens = list(layer._row_lens)
    for b, real in enumerate(counts):
        pad = Sq - real
        if pad == 0:
            continue
        start = lens[b] - Sq
        for buf in (layer._k_buf, layer._v_buf):
            if real:
                buf[b, start : start + real] = buf[b, start + pad : start + Sq].clone()
        lens[b] -= pad
    layer._row_lens = lens
    layer.cache_seqlens[:B].copy_(torch.tensor(lens, dtype=torch.int32))
    if layer.layer_idx == p._first_layer:
        p._mark_synced()
    if layer.layer_idx == p._num_layers - 1:
        p._trim(lens)  # every layer is squeezed now: return the padding's pages
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
    cu = cu.to(q.device)
    q_real = q[m]  # [total_real, H, D]
    out_real = _attend(q_real, layer._k_buf, layer._v_buf, layer.cache_seqlens[:B], cu, scale,
                       max(max(counts), 1))  # fmt: skip
    out = q.new_zeros(B, Sq, Hq, D)
    out[m] = out_real
    return out, None


_REGISTERED = False


def register() -> None:
    """Registers ``"vkv"`` with transformers' ``AttentionInterface`` (and its mask
    function with ``AttentionMaskInterface``). Idempotent; runs on import."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover
        AttentionMaskInterface = None
    AttentionInterface.register(ATTN_NAME, vkv_attention_forward)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(ATTN_NAME, vkv_mask)
    _REGISTERED = True


register()
