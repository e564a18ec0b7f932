"""``VirtualKVCache``: a ``transformers.Cache`` over one :class:`torch_vkv.KVCache`.

Every batch row owns a contiguous virtual range of ``max_cache_len`` tokens in
every layer; physical pages are committed as the row grows, so memory follows
the tokens used (like ``DynamicCache``) while addresses never move (like
``StaticCache``)::

    row 0  |#########=====..........................|   # written K/V
    row 1  |#####=========..........................|   = committed, not written yet
    row 2  |##############=====.....................|   . reserved only (no memory)
            ^ token 0                   max_cache_len ^

Who does what, once per step:

* the **cache** begins each eager step in its first layer's ``update``: it
  settles the lengths, squeezes the left padding out (only real tokens are
  written, using the padding mask the ``"vkv"`` mask function handed it),
  commits the pages, and counts the tokens in :class:`SequenceLengths`, the
  one owner of every row's length;
* each **layer** writes its K/V where the lengths say;
* the ``"vkv"`` **attention** only reads (:mod:`torch_vkv.hf.attention`).

Compiled steps cannot commit, so :meth:`VirtualKVCache.prepare_step` commits
before them (``generate()`` calls it through ``get_mask_sizes``); the safety
net for loops that forget it is :mod:`torch_vkv.hf.commit_op`.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import numpy as np
import torch

from torch_vkv._checks import check_int, fail, is_int
from torch_vkv._lifetime import repr_before_init
from torch_vkv.cache import KVCache
from torch_vkv.hf import batch_ops, commit_op, windows
from torch_vkv.hf.arguments import check_cache_arguments, check_reservation_fits
from torch_vkv.hf.compat import check_vkv_support, layer_windows, model_shape, text_config  # noqa: F401
from torch_vkv.hf.layer import VirtualKVLayer, interleaved_base
from torch_vkv.hf.lengths import SequenceLengths, StepPlan, padding_counts
from torch_vkv.hf.step_owner import StepOwner

from transformers.cache_utils import Cache

__all__ = ["VirtualKVCache"]

ATTN_NAME = "vkv"


class VirtualKVCache(Cache):
    """A ``transformers.Cache`` in contiguous virtual memory, pages committed on demand.

    Args:
        config: the model's ``PretrainedConfig`` (pass ``model.config``: the
            cache reads ``config._attn_implementation`` to pick its mode).
        max_batch_size: most rows at once (beam search: batch x num_beams).
        max_cache_len: most tokens per row (prompt, padding and new tokens).
        device: default: the device of the first ``key_states`` (the KV cache
            is then built lazily, like ``DynamicCache``).
        dtype: a floating-point dtype; default: that of the first ``key_states``.
        memory_budget: bytes of physical memory the KV may commit (``None``:
            up to a static allocation's size, plus the spare page per buffer a
            beam-search reorder cycle holds for a moment).
        layout: ``"per_layer"`` or ``"interleaved"`` (see :data:`torch_vkv.LAYOUTS`).
        page_size: host backend only: bytes per page (default 2 MiB).
        margin_tokens: rows committed past each reservation (see :class:`KVCache`).
        prefetch: commit the next page in the background one step ahead
            (:meth:`KVCache.step_async`); ``False``: synchronous commits only
            (e.g. before capturing CUDA graphs by hand in the default
            ``capture_error_mode="global"``, which forbids driver calls from
            other threads).

    Every argument is checked here (``ValueError``/``TypeError`` naming what
    was expected); the model's heads and layer count are checked against the
    config at each step. Same observable behaviour as ``DynamicCache`` in
    ``generate()`` and in hand-written loops (``get_seq_length``, ``crop``,
    ``reorder_cache``, ``batch_repeat_interleave``, ``batch_select_indices``,
    ``reset``, ``get_mask_sizes``); memory: :meth:`memory_stats`. ``crop``,
    ``reorder_cache``, ``batch_*`` and ``reset`` act on every layer at once (the
    layers share one :class:`KVCache`). The cache cannot be copied or pickled
    (``TypeError``): it owns address space and pages.
    """

    #: Private switch: batch operations copy rows instead of remapping pages (the
    #: old path, for comparisons; ``bench hf --beam``).
    _copy_batch_ops = False

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
        self._kv: Optional[KVCache] = None
        self._closed = False
        self._config = config
        self._num_layers, self._num_kv_heads, self._head_dim = model_shape(config)
        # Each layer's sliding window: the attention applies it (also where the model puts it only in
        # the mask, PhiMoE), and per_layer vkv caches give back the pages behind it.
        self._layer_windows = layer_windows(config, self._num_layers)
        args = check_cache_arguments(
            (self._num_layers, self._num_kv_heads, self._head_dim), max_batch_size, max_cache_len, device=device,
            dtype=dtype, memory_budget=memory_budget, layout=layout, page_size=page_size,
            margin_tokens=margin_tokens, prefetch=prefetch,
        )  # fmt: skip
        self._max_batch_size, self._max_cache_len = args.max_batch_size, args.max_cache_len
        self._dtype, self._device, self._prefetch = args.dtype, args.device, args.prefetch
        self._kv_kwargs = dict(memory_budget=args.memory_budget, layout=layout, page_size=args.page_size,
                               margin_tokens=args.margin_tokens)  # fmt: skip
        self._layout = layout
        self._lengths: Optional[SequenceLengths] = None
        self._mode: Optional[str] = None  # None until the first update: "padded" or "vkv"
        self._step: Optional[StepPlan] = None
        self._pending_padding: Optional[torch.Tensor] = None  # [B, S] bool from the "vkv" mask function
        self._batch_copied_bytes = 0  # bytes batch operations wrote into the cache (memory_stats)
        self._op_key: Optional[torch.Tensor] = None  # commit_op's key, with the KV cache
        self._owner = StepOwner()  # the thread of the eager step in progress
        self._ref = weakref.ref(self)
        super().__init__(layers=[VirtualKVLayer(self, i) for i in range(self._num_layers)])
        if self._device is not None and self._dtype is not None:
            self._build_kv(self._device, self._dtype)

    # -- no copies ---------------------------------------------------------------------
    def __copy__(self) -> "VirtualKVCache":
        raise TypeError(f"{type(self).__name__} cannot be copied: it owns virtual address space and pages; build another")

    def __deepcopy__(self, memo: Any) -> "VirtualKVCache":
        raise TypeError(f"{type(self).__name__} cannot be deep-copied: it owns virtual address space and pages; build "
                        "another (and copy rows you need with layer.keys / layer.values)")  # fmt: skip

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"{type(self).__name__} cannot be pickled: it owns virtual address space and pages; save "
                        "the rows you need (layer.keys / layer.values are copies in vkv mode)")  # fmt: skip

    # -- properties transformers reads -----------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    @property
    def batch_size(self) -> int:
        """Rows in use (the batch of the current sequence), ``-1`` before the first update."""
        return self._lengths.batch if self._mode is not None else -1

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
    def lengths(self) -> Optional[SequenceLengths]:
        """The owner of every row's length (``None`` until the KV cache is built)."""
        return self._lengths

    @property
    def mode(self) -> Optional[str]:
        """``"padded"``, ``"vkv"`` or ``None`` (nothing stored since the last reset)."""
        return self._mode

    @property
    def layout(self) -> str:
        return self._layout

    @property
    def closed(self) -> bool:
        return self._closed

    def _config_mode(self) -> str:
        """The mode the config's attention implementation asks for now."""
        impl = getattr(text_config(self._config), "_attn_implementation", None)
        if impl is None:
            impl = getattr(self._config, "_attn_implementation", None)
        return "vkv" if impl == ATTN_NAME else "padded"

    def _planned_mode(self) -> str:
        return self._mode if self._mode is not None else self._config_mode()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed: build a new cache")  # a subclass's own name

    # -- set-up ----------------------------------------------------------------------------
    def _build_kv(self, device: torch.device, dtype: torch.dtype) -> None:
        self._check_open()
        # In this cache's words (max_cache_len) rather than KVCache's (max_seq_len), and before anything is built.
        check_reservation_fits((self._num_layers, self._num_kv_heads, self._head_dim), self._max_batch_size,
                               self._max_cache_len, torch.empty((), dtype=dtype).element_size())  # fmt: skip
        kw = dict(self._kv_kwargs)
        if device.type != "cpu":
            if kw["page_size"] is not None:
                fail("page_size", "None on CUDA (the driver's 2 MiB granularity is used)", kw["page_size"])
            kw.pop("page_size")
        elif kw["page_size"] is None:
            kw.pop("page_size")
        if self._planned_mode() == "vkv" and kw["layout"] == "per_layer":
            # Only the vkv attention never reads behind a window; eager/sdpa read every row.
            kw["sliding_window"] = list(self._layer_windows)
        # Normal tensors even under inference_mode: the cache outlives the call that builds it.
        with torch.inference_mode(False):
            kv = KVCache(
                self._num_layers, self._num_kv_heads, self._head_dim,
                max_batch_size=self._max_batch_size, max_seq_len=self._max_cache_len, dtype=dtype,
                device=device, **kw,
            )  # fmt: skip
            if kw["memory_budget"] is None:  # a static allocation's size must cover beam search
                kv.pool.set_max_bytes(kv.reserved_bytes + batch_ops.staging_bytes(kv))
            # Row i of the batch is slot i, always: views stay plain slices.
            for i in range(self._max_batch_size):
                slot = kv.alloc()
                assert slot == i, (slot, i)
            base = interleaved_base(kv) if kv.layout == "interleaved" else None
            self._lengths = SequenceLengths(self._max_batch_size, kv.device)
            self._lengths.seq_length_t._vkv_cache = self._ref  # how vkv_mask finds this cache
            self._op_key = commit_op.register_cache(self, kv.device)
        self._kv = kv
        for layer in self.layers:
            layer._bind(kv.key(layer.layer_idx), kv.value(layer.layer_idx), base)

    def _ensure_kv(self, key_states: torch.Tensor) -> None:
        if self._kv is None:
            self._check_heads(key_states)
            self._build_kv(self._device or key_states.device, self._dtype or key_states.dtype)

    def early_initialization(self, batch_size, num_heads, head_dim, dtype, device) -> None:
        """Builds the KV cache now (transformers calls this before a compiled prefill)."""
        heads = set(num_heads) if isinstance(num_heads, (list, tuple)) else {num_heads}
        dims = set(head_dim) if isinstance(head_dim, (list, tuple)) else {head_dim}
        if heads != {self._num_kv_heads} or dims != {self._head_dim}:
            fail("model", f"num_kv_heads={self._num_kv_heads}, head_dim={self._head_dim} in every layer (the "
                 "cache's config)", f"num_kv_heads={sorted(heads)}, head_dim={sorted(dims)}")  # fmt: skip
        if self._kv is None:
            self._build_kv(self._device or torch.device(device), self._dtype or dtype)

    def _check_heads(self, key_states: torch.Tensor) -> None:
        if key_states.shape[1] != self._num_kv_heads or key_states.shape[3] != self._head_dim:
            fail("key_states", f"[batch, {self._num_kv_heads}, new_tokens, {self._head_dim}] (num_kv_heads and "
                 "head_dim of the config the cache was built for)", tuple(key_states.shape))  # fmt: skip

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._check_open()
        if not isinstance(key_states, torch.Tensor) or not isinstance(value_states, torch.Tensor):
            fail("key_states/value_states", "tensors", (type(key_states), type(value_states)), TypeError)
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            fail("key_states/value_states", "[batch, num_kv_heads, new_tokens, head_dim] tensors of one shape",
                 (tuple(key_states.shape), tuple(value_states.shape)))  # fmt: skip
        self._check_heads(key_states)
        if not key_states.is_floating_point() or not value_states.is_floating_point():
            fail("key_states/value_states dtype", "floating-point", (key_states.dtype, value_states.dtype), TypeError)
        # The attention takes the cache's K/V with the model's queries: another dtype or device
        # fails there, in torch's or a kernel's words, after the step was written.
        dtype = self._kv.dtype if self._kv is not None else self._dtype
        if dtype is not None and (key_states.dtype != dtype or value_states.dtype != dtype):
            fail("key_states.dtype", f"{dtype} (the cache's dtype: build it with the model's dtype, or dtype=None)",
                 key_states.dtype if key_states.dtype != dtype else value_states.dtype, TypeError)  # fmt: skip
        device, kd = (self._kv.device if self._kv is not None else self._device), key_states.device
        if device is not None and (kd.type != device.type or device.index not in (None, kd.index)):  # "cuda": any
            fail("key_states.device", f"{device} (the cache's device: build it on the model's device, or "
                 "device=None)", key_states.device)  # fmt: skip

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends ``key_states``/``value_states`` ``[B, num_kv_heads, S_new, head_dim]`` to layer ``layer_idx``."""
        self._check_open()
        if not is_int(layer_idx) or not 0 <= layer_idx < self._num_layers:  # NumPy ints too; True is no layer
            fail("layer_idx", f"an int in [0, {self._num_layers}) (the cache was built for a config with "
                 f"{self._num_layers} layers)", layer_idx)  # fmt: skip
        return self.layers[int(layer_idx)].update(key_states, value_states, *args, **kwargs)

    # -- steps -------------------------------------------------------------------------------
    @torch.compiler.disable  # host work (commits, lengths): a compiled prefill runs it eagerly, graph break
    def _eager_step(self, layer_idx: int, key_states: torch.Tensor) -> StepPlan:
        # One thread at a time, overlapping steps of two threads refused (torch_vkv/hf/step_owner.py).
        return self._owner.run(layer_idx, self._begin_or_join_step, layer_idx, key_states)

    def _begin_or_join_step(self, layer_idx: int, key_states: torch.Tensor) -> StepPlan:
        """The step ``key_states`` belongs to. Layer 0 begins it: fixes mode and
        batch on the first step, settles the lengths, plans the padding squeeze,
        commits, counts the tokens. Other layers join it."""
        B, _, S, _ = key_states.shape
        if layer_idx != 0:
            step = self._step
            if step is None or (step.batch, step.num_tokens) != (B, S):
                had = None if step is None else (step.batch, step.num_tokens)
                fail(f"key_states of layer {layer_idx}", "the batch and new tokens of layer 0's update in this step",
                     f"batch {B}, {S} new tokens; layer 0 had (batch, new tokens) = {had}")  # fmt: skip
            return step
        self._ensure_kv(key_states)
        if self._mode is None:
            if B > self._max_batch_size:
                fail("batch size", f"at most max_batch_size={self._max_batch_size}", B)
            if self._planned_mode() == "vkv":  # ALiBi, chunks past max_cache_len: refused before anything is stored
                check_vkv_support(self._config, self._max_cache_len)
            self._mode = self._planned_mode()
            self._lengths.start(B, on_device=self._mode == "vkv")
        lengths = self._lengths
        if B != lengths.batch:
            fail("batch size of key_states", f"{lengths.batch} (the cache's current batch)", B)
        if self._mode == "vkv" and self._config_mode() != "vkv":
            # Full-capacity views would reach eager/sdpa attention, which reads all of them.
            raise RuntimeError(
                "VirtualKVCache holds this sequence in the 'vkv' layout, but the model's attn_implementation "
                f"is now {getattr(self._config, '_attn_implementation', None)!r}: expected 'vkv' until cache.reset()"
            )
        mask, self._pending_padding = self._pending_padding, None
        lengths.settle(in_step=True)
        rows, seq = lengths.rows(), lengths.seq_length()
        counts = [S] * B
        real = padding_counts(mask, B, S) if self._mode == "vkv" and S > 1 else None
        if real is not None:
            counts = real
        new_rows = [r + c for r, c in zip(rows, counts)]
        if max(new_rows, default=0) > self._max_cache_len or seq + S > self._max_cache_len:
            fail("tokens in the cache", f"at most max_cache_len={self._max_cache_len}", max(seq + S, *new_rows))
        self._commit(new_rows, prefetch=True, start=rows)  # OutOfPagesError: nothing changed
        lengths.advance(counts, S)
        step = StepPlan.build(B, S, seq, padded=self._mode == "padded", mask=mask, real=real, rows=new_rows,
                              device=key_states.device)  # fmt: skip
        self._step = step
        return step

    def _compiled_step_lengths(self, layer_idx: int, batch: int, num_tokens: int) -> torch.Tensor:
        """Traced code: the lengths a compiled step's writes use (new tokens
        included). Layer 0 advances them and runs the safety net."""
        if self._mode != "vkv":
            raise RuntimeError(
                "VirtualKVCache: compiled steps need attn_implementation='vkv' and an eager first step "
                f"(prefill) to set the cache up; got mode {self._mode!r}"
            )
        lengths = self._lengths
        if layer_idx != 0:
            return lengths.cache_seqlens[:batch]
        # The safety net runs first, on the lengths before the step, and the step's add
        # waits for its zero: when it refuses the step, nothing has changed.
        ready = commit_op.ensure_committed(lengths.cache_seqlens[:batch], lengths.seq_length_t, self._op_key,
                                           num_tokens)  # fmt: skip
        return lengths.advance_on_device(batch, num_tokens, after=ready)

    def _on_compiled_step(self, cache_seqlens: torch.Tensor, seq_length_t: torch.Tensor, capturing: bool,
                          num_tokens: int) -> None:  # fmt: skip
        """Run time of a compiled step of ``num_tokens`` new tokens a row (from
        :func:`commit_op.ensure_committed`, with the lengths before the step), before
        its lengths change and before any K/V write. Raises ``ValueError`` for a step
        the cache cannot take, as an eager step would: nothing has changed then."""
        lengths = self._lengths
        if self._closed or lengths is None:
            return
        if capturing:
            lengths.report_capture()
            return
        if cache_seqlens.shape[0] != lengths.batch:
            # The device would advance only these rows while the host counts every row, and
            # rows past the batch would start from nothing.
            fail("batch size of key_states", f"{lengths.batch} (the cache's current batch)", cache_seqlens.shape[0])
        if lengths.report_compiled_step(num_tokens):
            return  # prepare_step backed this step
        both = torch.cat([cache_seqlens.long(), seq_length_t.view(1)]).tolist()  # a sync
        rows, seq = [int(r) + num_tokens for r in both[:-1]], int(both[-1]) + num_tokens
        if rows and max(rows) > self._max_cache_len:
            # Its writes would be dropped (out of the rows) and its attention would read garbage.
            fail("tokens in the cache after this step", f"at most max_cache_len={self._max_cache_len}", max(rows))
        self._commit(rows, start=[r - num_tokens for r in rows])
        lengths.set_host(rows, seq)  # what the step's add makes of the device lengths

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
        of the page the *following* step will need (:meth:`KVCache.step_async`).
        """
        self._check_open()
        self._prepare(check_int("num_new_tokens", num_new_tokens, low=0), strict=True)

    def _prepare(self, n: int, *, strict: bool) -> None:
        if self._mode != "vkv" or self._kv is None:
            return
        rows = self._lengths.rows()
        lens = [r + n for r in rows]
        if lens and max(lens) > self._max_cache_len:
            if not strict:  # a mask-size query, maybe not a real step: the step itself will raise
                return
            fail("tokens in the cache after this step", f"at most max_cache_len={self._max_cache_len}", max(lens))
        self._commit(lens, prefetch=True, start=rows)
        self._lengths.announce(n)

    def _set_padding(self, mask: torch.Tensor) -> None:
        """From the "vkv" mask function: ``[B, S]`` bool, which of the next eager
        step's new tokens are real (the first layer's update squeezes the rest out)."""
        self._pending_padding = mask

    # -- commits -------------------------------------------------------------------------------
    def _commit(self, rows: list[int], *, prefetch: bool = False, start: Optional[list[int]] = None) -> None:
        """Backs rows ``[0, rows[b])`` of every row b in every layer (never
        shrinks), synchronously. Every call reaches :meth:`KVCache.step` (its
        array path costs microseconds when nothing is to commit), so the
        KVCache's own counts (``used_bytes``) follow the tokens.

        ``prefetch=True`` (the pre-step hook and eager steps; not from inside a
        running compiled step) uses :meth:`KVCache.step_async`: the same
        synchronous commit plus a background commit of what one more token
        needs, so the step that crosses a page finds it mapped.

        ``start``: each row's length before the step this commit backs; with
        sliding-window layers, what :func:`windows.step_need` tells the KVCache."""
        need = np.zeros(self._max_batch_size, dtype=np.int64)
        need[: len(rows)] = rows
        if start is not None and self._kv.trims_windows:
            need = windows.step_need(self._kv, need, start)
            if not need.any():
                return
        if prefetch and self._prefetch:
            self._kv.step_async(need, lookahead_tokens=1)
        else:
            self._kv.step(need)

    # -- Cache API ---------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> Any:
        """Tokens seen per row (left padding included), like ``DynamicCache``: an
        int, or a 0-d device tensor while compiling (no recompile as it grows)."""
        self._check_open()
        if self._mode is None or self._lengths is None:
            return 0
        if torch.compiler.is_compiling() and self._mode == "vkv":
            return self._lengths.seq_length_t
        return self._lengths.seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for mask building. In vkv mode this is also
        the pre-step hook: outside a compiled region it commits the pages the
        next ``query_length`` tokens need (see :meth:`prepare_step`)."""
        self._check_open()
        if self._mode == "vkv":
            if torch.compiler.is_compiling():
                return self._max_cache_len, 0  # constant: no recompiles; the vkv mask ignores it
            if layer_idx == 0:
                self._prepare(query_length, strict=False)
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> Any:
        """Position of the first new query. With ``"vkv"``, a 0-d device tensor
        (as ``StaticCache`` does) or, before the first step, an int; both tell
        :func:`~torch_vkv.hf.vkv_mask` which cache it serves."""
        self._check_open()
        if self._planned_mode() != "vkv" or (self._mode is None and torch.compiler.is_compiling()):
            return self.get_seq_length()
        if self._mode == "vkv":
            return self._lengths.seq_length_t
        return _QueryOffset(self.get_seq_length(), self._ref)

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        self._check_open()
        return self._max_cache_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers < 5.16 name
        self._check_open()
        return self._max_cache_len

    def reset(self) -> None:
        """Forgets every token and returns the pages; addresses stay the same."""
        self._check_open()
        if self._kv is not None:
            self._kv.synchronize()
            batch_ops.shrink(self, [])
            self._lengths.start(0, on_device=False)
        self._mode = None
        self._step = None
        self._pending_padding = None
        self._owner.clear()

    def crop(self, max_length: int) -> None:
        """Drops tokens from the end: ``crop(-n)`` removes ``n`` tokens, ``crop(n)``
        with ``n > 0`` keeps the first ``n`` (the older transformers meaning),
        ``crop(0)`` does nothing (as ``DynamicCache``). Pages past the new
        lengths are decommitted."""
        self._check_open()
        max_length = check_int("max_length", max_length)
        if max_length == 0 or self._mode is None:
            return
        cur = self._lengths.seq_length()
        remove = min(-max_length if max_length < 0 else max(0, cur - max_length), cur)
        if remove == 0:
            return
        rows = [max(0, r - remove) for r in self._lengths.rows()]
        windows.check_keep(self._kv, rows, "crop")  # before anything changes
        self._lengths.set(rows, cur - remove)
        batch_ops.shrink(self, rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` becomes old row ``beam_idx[i]`` (beam search): full pages are
        remapped, at most the partly filled last page of each changed row is
        copied (:mod:`torch_vkv.hf.batch_ops`)."""
        self._check_open()
        if self._mode is not None:
            self._gather(batch_ops.row_index("beam_idx", beam_idx, self._lengths.batch, allow_mask=False))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated ``repeats`` times in place (row i -> rows i*r .. i*r+r-1);
        the repeats share the row's full pages."""
        self._check_open()
        repeats = check_int("repeats", repeats, low=1)
        if self._mode is not None:
            self._gather([i for i in range(self._lengths.batch) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps only the rows ``indices`` (in that order); rows dropped give their pages back."""
        self._check_open()
        if self._mode is None:
            return
        self._gather(batch_ops.row_index("indices", indices, self._lengths.batch, allow_mask=True))

    def _gather(self, index: list[int]) -> None:
        """New row ``i`` = old row ``index[i]``, every layer (:func:`torch_vkv.hf.batch_ops.gather`)."""
        batch_ops.gather(self, index)

    # -- stats and lifetime ---------------------------------------------------------------------
    def memory_stats(self) -> dict[str, Any]:
        """Memory of the KV, as :meth:`torch_vkv.KVCache.memory_stats` reports it.

        ``reserved_bytes`` (virtual), ``committed_bytes`` (physical: the tokens
        stored rounded up to whole pages per layer, K/V and row), ``used_bytes``
        (tokens backed for the rows x bytes per token), ``page_size``,
        ``tokens_per_page``, commit counters, ...; plus ``tokens`` (tokens
        stored, all rows: left padding counts in padded mode, not in vkv mode)
        and ``seq_length`` (``get_seq_length()``), and ``batch_copied_bytes``
        (bytes the batch operations copied so far: partial pages, or whole rows
        where they copy; see :mod:`torch_vkv.hf.batch_ops`). Byte counts are 0
        before the cache is built.
        """
        self._check_open()
        if self._kv is None:
            stats: dict[str, Any] = {k: 0 for k in ("reserved_bytes", "committed_bytes", "used_bytes", "cached_bytes")}
        else:
            stats = self._kv.memory_stats()
        built = self._mode is not None
        stats["tokens"] = sum(self._lengths.rows()) if built else 0
        stats["seq_length"] = self._lengths.seq_length() if built else 0
        stats["batch_copied_bytes"] = self._batch_copied_bytes
        return stats

    def close(self) -> None:
        """Releases all memory now. Afterwards every method, ``layer.keys`` and
        ``layer.values`` included, raises ``RuntimeError``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for layer in self.layers:
            layer._unbind()
        self._step = self._pending_padding = None
        if self._kv is not None:
            self._kv.close()

    @repr_before_init
    def __repr__(self) -> str:
        name = type(self).__name__  # a subclass's repr names the subclass
        if self._closed:
            return f"{name}(closed, num_layers={self._num_layers})"
        seq = self._lengths.seq_length() if self._mode is not None else 0
        return (f"{name}(num_layers={self._num_layers}, max_batch_size={self._max_batch_size}, max_cache_len="
                f"{self._max_cache_len}, layout={self._layout!r}, mode={self._mode!r}, seq_length={seq})")


class _QueryOffset(int):
    """``get_query_offset()`` before the first vkv step: an int that also names its cache."""

    _vkv_cache: Any

    def __new__(cls, value: int, cache_ref: Any) -> "_QueryOffset":
        obj = super().__new__(cls, value)
        obj._vkv_cache = cache_ref
        return obj
