"""``ModelRunner``: runs a Hugging Face causal LM over one flattened ragged batch.

The model runs through transformers' own modeling code, unchanged: the engine
registers an attention implementation (:data:`ATTN_NAME`) with
``transformers.AttentionInterface`` and switches the model to it. Each forward
gets ``input_ids`` / ``position_ids`` of shape ``[1, total_tokens]`` (every
request's new tokens back to back, no padding), ``use_cache=False``, and the
iteration's metadata as one extra keyword argument (:data:`CTX_KWARG`), which
transformers forwards to the attention function of every layer. There, the new
tokens' K/V (after RoPE) are written with :func:`torch_vkv.append_kv` and the
queries attend with :func:`torch_vkv.attention`, like
``flash_attn_with_kvcache``. No mask is built: no mask function is registered
for the name, so transformers' mask factory returns ``None`` without looking at
the positions (no host sync). Logits are computed only for the rows that
sample (``logits_to_keep`` = their indices).

On CUDA, decode-only iterations replay CUDA graphs captured for a few padded
batch sizes over static buffers (tokens, positions, ``cache_seqlens``, slots);
padding rows point at a scratch slot, so they never touch a request's cache.

``compile=True`` runs decode-only forwards through ``torch.compile`` (inductor,
one graph, the batch dimension dynamic) before the graphs are captured: in
eager mode a decode step of a Llama-family model is about 40 small kernels a
layer (RMSNorm's reduction and casts, RoPE's slices and concatenations, the
SiLU gate, residual adds), which inductor fuses into a few. Prefill chunks stay
eager: their time is in the matmuls and attention, and their shapes change
every iteration.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from torch_vkv import append_kv, attach_host_values, attention  # the public entry points (functions)
from torch_vkv._checks import Described, check_checkpoint_path, fail
from torch_vkv.attention.inputs import window_from_module_kwargs
from torch_vkv.serving.kv import KVManager
from torch_vkv.serving.scheduler import ScheduledBatch

__all__ = ["ATTN_NAME", "CTX_KWARG", "ModelRunner", "attach", "decode_layer", "detach", "serving_attention_forward"]

#: Name of the attention implementation the engine switches models to.
ATTN_NAME = "vkv_serving"
#: Keyword argument of the model's forward that carries a :class:`BatchContext`.
CTX_KWARG = "vkv_serving_batch"


@dataclass
class BatchContext:
    """Metadata of one forward, shared by every layer.

    ``cache_seqlens``: int32 ``[R]`` (new tokens included); ``cu_seqlens_q``:
    int32 ``[R + 1]`` or ``None`` for a decode-only batch; ``slots``: int32
    ``[R]``; ``block_table``: the paged cache's or ``None``; ``max_seqlen_q``:
    host int; ``runner_key``: a compiled runner's key (see :func:`decode_layer`).
    """

    keys: list
    values: list
    cache_seqlens: torch.Tensor
    cu_seqlens_q: Optional[torch.Tensor]
    slots: torch.Tensor
    block_table: Optional[torch.Tensor]
    max_seqlen_q: int
    backend: str
    runner_key: Optional[torch.Tensor] = None


def serving_attention_forward(
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
    """The :data:`ATTN_NAME` attention: append this step's K/V, then attend over the cache.

    Args:
        query: ``[1, num_heads, total_tokens, head_dim]``.
        key, value: the new tokens' ``[1, num_kv_heads, total_tokens, head_dim]`` (after RoPE).

        kwargs: the batch context (:data:`CTX_KWARG`); the layer's ``sliding_window``
            (transformers' ``W``: a query sees ``W`` keys, itself included) and
            ``softcap`` (Gemma 2), as the model's attention module passes them.

    Returns ``([1, total_tokens, num_heads, head_dim], None)``. A sliding layer
    attends with ``window_left = W - 1`` whatever the KV layout: the virtual
    ``per_layer`` cache has given back the pages behind the window, the other
    layouts keep them but are not read there either.
    """
    ctx: Optional[BatchContext] = kwargs.get(CTX_KWARG)
    if isinstance(ctx, _Probe):  # check_kwargs_reach_attention: the context arrived; nothing to compute
        return torch.zeros_like(query).transpose(1, 2), None
    if ctx is None:
        if getattr(_probing, "on", False):
            raise _KwargsDropped
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} runs only inside torch_vkv.serving.Engine: expected the "
            f"{CTX_KWARG!r} keyword argument, got none (set the model's attn_implementation back to use it alone)"
        )
    if dropout:
        raise NotImplementedError(f"attn_implementation={ATTN_NAME!r} is for inference: dropout must be 0")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:  # not caught by check_servable
        raise NotImplementedError(f"attn_implementation={ATTN_NAME!r} does not compute attention sinks: expected "
                                  f"none, got them from {type(module).__name__}")  # fmt: skip
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [T, H, D]
    k_new = key[0].transpose(0, 1)
    v_new = value[0].transpose(0, 1)
    window = window_from_module_kwargs(kwargs)
    if ctx.runner_key is not None and torch.compiler.is_compiling():
        out = decode_layer(q, k_new, v_new, ctx.cache_seqlens, ctx.slots, ctx.block_table, ctx.runner_key, layer,
                           ctx.backend, scaling, window.get("window_left", -1), window.get("softcap", 0.0))  # fmt: skip
        return out.unsqueeze(0), None
    k_cache, v_cache = ctx.keys[layer], ctx.values[layer]
    append_kv(k_cache, v_cache, k_new, v_new, ctx.cache_seqlens, cu_seqlens_q=ctx.cu_seqlens_q, slots=ctx.slots,
              block_table=ctx.block_table)  # fmt: skip
    out = attention(q, k_cache, v_cache, ctx.cache_seqlens, cu_seqlens_q=ctx.cu_seqlens_q, slots=ctx.slots,
                    scale=scaling, backend=ctx.backend, block_table=ctx.block_table, max_seqlen_q=ctx.max_seqlen_q,
                    **window)  # fmt: skip
    return out.unsqueeze(0), None


@torch.library.custom_op("torch_vkv_serving::decode_layer", mutates_args=())
def decode_layer(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache_seqlens: torch.Tensor,
                 slots: torch.Tensor, block_table: Optional[torch.Tensor], runner_key: torch.Tensor, layer: int,
                 backend: str, scale: Optional[float], window_left: int, softcap: float) -> torch.Tensor:  # fmt: skip
    """One layer of a compiled decode step: append the new K/V, attend over the cache.

    A compiled step does not take the cache's K/V tensors as inputs: in the
    interleaved layout and the paged pool every layer's keys and values are
    views of one buffer, and AOTAutograd turns in-place writes to aliasing
    inputs into writes to a "synthetic base", which copied the buffer, or
    assumed its size, and wrote the wrong memory under CUDA graphs. This op
    finds the runner's K/V by ``runner_key`` (:mod:`torch_vkv._keyed`) and does
    what the eager path does; to the compiler it is a pure function of its
    inputs (it is the only reader and writer of the cache in the graph, and
    its result is used, so it is never dropped or reordered past a use).

    Shapes as :func:`serving_attention_forward`'s after its transposes: ``q``
    ``[R, num_heads, head_dim]``, ``k_new`` / ``v_new`` ``[R, num_kv_heads, head_dim]``.
    ``window_left`` ``-1`` and ``softcap`` ``0`` mean none. Returns ``[R, num_heads, head_dim]``.
    """
    from torch_vkv import _keyed

    runner = _keyed.lookup(runner_key)
    if runner is None or not runner._keys:
        raise RuntimeError("a compiled decode step of a torch_vkv.serving engine ran after its engine was closed")
    k_cache, v_cache = runner._keys[layer], runner._values[layer]
    append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, slots=slots, block_table=block_table)
    window = ({"window_left": window_left} if window_left >= 0 else {}) | ({"softcap": softcap} if softcap else {})
    out = attention(q, k_cache, v_cache, cache_seqlens, slots=slots, scale=scale, backend=backend,
                    block_table=block_table, max_seqlen_q=1, **window)  # fmt: skip
    return out.contiguous()


@decode_layer.register_fake
def _(q, k_new, v_new, cache_seqlens, slots, block_table, runner_key, layer, backend, scale, window_left, softcap):
    return q.new_empty(q.shape)


_REGISTERED = False
# Models switched to ATTN_NAME by open engines: model -> [its attention implementation before, engines].
_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def register() -> None:
    """Registers :data:`ATTN_NAME` with ``transformers.AttentionInterface`` (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, serving_attention_forward)
        _REGISTERED = True


def check_servable(model: torch.nn.Module, max_seq_len: int) -> None:
    """Refuses, before anything runs, a model whose attention :data:`ATTN_NAME` would not compute
    as the model does, where serving it gave other tokens (or an obscure error) mid-request:

    * a learned absolute position table shorter than ``max_seq_len`` (GPT-2, OPT): ``ValueError``
      (a position past it is an index error; on CUDA a device-side assert that ends the context);
    * ALiBi biases (Falcon ``alibi=True``) and chunked attention over more than one chunk (Llama 4):
      :func:`~torch_vkv.hf.compat.check_vkv_support`;
    * attention sinks (gpt-oss: a ``sinks`` parameter in its attention modules): ``NotImplementedError``.
    """
    from torch_vkv.hf.compat import check_vkv_support, position_limit

    limit = position_limit(model)
    if limit is not None and max_seq_len > limit:
        fail("max_seq_len", f"at most {limit} (the model's learned position table has no row past it)", max_seq_len)
    check_vkv_support(model.config, max_seq_len, "max_seq_len", who="Engine")
    for name, module in model.named_modules():
        if any(isinstance(getattr(module, a, None), torch.Tensor) for a in ("sinks", "s_aux")):
            raise NotImplementedError(f"Engine does not compute attention sinks: expected attention modules without "
                                      f"them, got {type(module).__name__} ({name}) with a sinks tensor")  # fmt: skip


class _Probe:
    """The batch context of :func:`check_kwargs_reach_attention`'s forward."""


class _KwargsDropped(Exception):
    """A layer's attention got no :data:`CTX_KWARG` during the probe."""


_probing = threading.local()


def check_kwargs_reach_attention(model: torch.nn.Module, device: torch.device) -> None:
    """Refuses (``ValueError``) a model, attached to :data:`ATTN_NAME`, whose layers do not pass the
    forward's keyword arguments on to the attention (StableLM in transformers 5): every step hands the
    batch context over that way, so serving it failed at the first step with an error that said the
    attention ran outside an Engine. One forward of one token, whose attention computes nothing."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    _probing.on = True
    try:
        with torch.inference_mode():
            model(input_ids=ids, position_ids=ids, use_cache=False, **{CTX_KWARG: _Probe()})
    except _KwargsDropped:
        fail("model", "a transformers causal LM whose layers pass the forward's keyword arguments on to the "
             f"attention (the engine hands each step's batch to it as {CTX_KWARG!r})",
             Described(f"{type(model).__name__}, whose attention got no {CTX_KWARG!r}"))  # fmt: skip
    finally:
        _probing.on = False


def attach(model: torch.nn.Module) -> None:
    """Switches ``model`` to :data:`ATTN_NAME` for one more engine. Several engines
    may serve one model at once: the implementation it had before the first
    is kept, and only :func:`detach` of the last puts it back (one engine's
    close must not switch the attention of a model another engine still runs)."""
    register()
    entry = _ATTACHED.get(model)
    if entry is None:
        entry = _ATTACHED[model] = [getattr(model.config, "_attn_implementation", None), 0]
    model.set_attn_implementation(ATTN_NAME)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        # transformers leaves a model that does not call its attention through AttentionInterface on
        # its own implementation (with a logged warning): served packed, it would attend across requests.
        if entry[1] == 0:
            del _ATTACHED[model]
        fail("model", "a transformers model that calls its attention through AttentionInterface "
             "(model.set_attn_implementation)", Described(f"{type(model).__name__}, which keeps "
             f"attn_implementation={model.config._attn_implementation!r}"))  # fmt: skip
    entry[1] += 1


def detach(model: torch.nn.Module) -> None:
    """Undoes one :func:`attach`: the last engine's puts back the model's implementation
    from before the first (unless the caller has switched it to another since)."""
    entry = _ATTACHED.get(model)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _ATTACHED[model]
        if entry[0] is not None and getattr(model.config, "_attn_implementation", None) == ATTN_NAME:
            model.set_attn_implementation(entry[0])


def load_causal_lm(source: Any, dtype: Optional[torch.dtype]) -> torch.nn.Module:
    """A transformers causal LM from a local checkpoint folder (``dtype=None``: the checkpoint's own)."""
    from transformers import AutoModelForCausalLM

    check_checkpoint_path("model", source)
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto")


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Padded batch sizes with a CUDA graph: 1, 2, 4, 8, then multiples of 16 (and the maximum)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


def _check_backend(backend: str, kv: KVManager) -> str:
    """``backend`` if it can serve ``kv`` in this process; else ``ValueError`` now (an unusable one
    failed every step, with the requests stuck in the queue)."""
    if backend == "auto":
        return backend
    from torch_vkv.attention import available_backends

    usable = available_backends(kv.device)
    if backend not in usable:
        fail("attention_backend", f"'auto' or a backend that can serve kv={kv.kind!r} on {kv.device} in this "
             f"process, one of {tuple(usable)}", backend)  # fmt: skip
    return backend


class ModelRunner:
    """Turns a :class:`ScheduledBatch` into logits of its sampling rows.

    Args:
        model: a transformers causal LM, already on the device, in eval mode,
            switched to :data:`ATTN_NAME`.
        kv: the KV manager.
        max_batch_size: most requests in a batch; ``chunk_size``: most tokens.
        backend: ``torch_vkv.attention``'s ``backend``.
        cuda_graphs: capture decode-only steps (CUDA only).
        compile: run decode-only steps through ``torch.compile`` (see the module docstring).
        scratch_slot: the slot padding rows of graphed steps write to
            (required with ``cuda_graphs``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv: KVManager,
        *,
        max_batch_size: int,
        chunk_size: int,
        backend: str = "auto",
        cuda_graphs: bool = False,
        compile: bool = False,
        scratch_slot: Optional[int] = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = kv.device
        self.backend = _check_backend(backend, kv)
        self.max_batch_size = max_batch_size
        self._keys = [kv.key(l) for l in range(kv.num_layers)]
        self._values = [kv.value(l) for l in range(kv.num_layers)]
        self._pin = self.device.type == "cuda"
        max_tokens = max(chunk_size, max_batch_size)
        # Host staging: int64 tokens | positions | sample rows; int32 seqlens | slots | cu. Each part
        # starts 16-byte aligned: Triton specialises kernels on pointer alignment, and offsets that
        # moved with the batch size would compile a variant (about a second) mid-step for new sizes.
        self._h64 = torch.zeros(3 * _align(max_tokens, 2), dtype=torch.int64, pin_memory=self._pin)
        self._h32 = torch.zeros(3 * _align(max_batch_size + 1, 4), dtype=torch.int32, pin_memory=self._pin)
        # The copies out of _h64/_h32 are queued (non_blocking): the next step waits for this event before
        # it writes them again. Most steps sync anyway (the sampled tokens), but one whose batch samples
        # nothing (non-final prefill chunks only) does not, and the host could run a step ahead.
        self._staged: Optional[torch.cuda.Event] = None
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._scratch = scratch_slot
        #: Host seconds spent building batches' metadata (inputs, lengths, slots, copies queued).
        self.prepare_seconds = 0.0
        #: Decode-only forwards: ``_forward`` itself or its compiled twin (one per runner, see :meth:`_decode`).
        self._decode_fn = torch.compile(self._forward, fullgraph=True) if compile else self._forward
        self.compiled = compile
        self._key: Optional[torch.Tensor] = None
        if compile:
            from torch_vkv import _keyed

            self._key = _keyed.register(self, self.device)
        if cuda_graphs and self.device.type == "cuda":
            if scratch_slot is None:
                raise ValueError("scratch_slot: expected a slot for the padding rows of CUDA graphs, got None")
            with torch.cuda.device(self.device):  # the capture's side streams on the cache's GPU, whatever is current
                self._capture()

    # ------------------------------------------------------------- forward
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        out = self.model(input_ids=ids[None], position_ids=pos[None], use_cache=False, logits_to_keep=rows,
                         **{CTX_KWARG: ctx})  # fmt: skip
        return out.logits[0]

    def _decode(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        if self.compiled:
            # Dynamo guards on storage offsets, and the staging views' offsets move with the batch
            # size: give the compiled step tensors of their own (the graphs' buffers already are).
            ids, pos, rows = (t if t.storage_offset() == 0 else t.clone() for t in (ids, pos, rows))
            if ctx.slots.storage_offset():
                ctx.slots = ctx.slots.clone()
            if ids.shape[0] > 1:
                # One compiled graph for every batch size > 1, from the first call: unmarked, dynamo
                # compiles the first size statically and recompiles at the second (size 1 is always
                # its own graph: dynamo specialises dimensions of size 1).
                for t in (ids, pos, rows, ctx.cache_seqlens, ctx.slots):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            try:
                with _without_alias_check():
                    return self._decode_fn(ids, pos, rows, ctx)
            except _compile_failures() as exc:
                # Tracing or compiling failed (an unsupported model, no C++ compiler for a CPU
                # build, ...), before the step ran: serve on, eagerly, rather than fail the batch.
                cause = getattr(exc, "inner_exception", None) or exc  # a backend's own error, when it raised one
                first = (str(cause).strip().splitlines() or [""])[0][:300]
                if not isinstance(exc, torch._dynamo.exc.TorchDynamoException):  # "Hard failure due to fullgraph=True"
                    first = f"torch._dynamo.config.recompile_limit={torch._dynamo.config.recompile_limit} reached"
                warnings.warn(f"Engine(compile=True): torch.compile of the decode step failed ({type(cause).__name__}: "
                              f"{first}); decode steps run eagerly from now on", RuntimeWarning, stacklevel=2)  # fmt: skip
                self.compiled, self._decode_fn = False, self._forward
        return self._decode_fn(ids, pos, rows, ctx)

    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Runs ``batch``; returns (logits ``[S, vocab]``, indices into
        ``batch.requests`` of the ``S`` requests that sample this step)."""
        t0 = time.perf_counter()
        reqs, news = batch.requests, batch.num_new_tokens
        R = len(reqs)
        if batch.decode_only:
            bs = next((b for b in self._graphs if b >= R), None) if self._graphs else None
            if bs is not None:
                return self._replay(batch, bs, t0), list(range(R))
            tokens = [r.token_ids[-1] for r in reqs]
            lens = [r.num_tokens for r in reqs]
            positions = [n - 1 for n in lens]
            sample = list(range(R))
            cu = None
            max_q = 1
        else:
            tokens, positions, lens, sample, cu = [], [], [], [], [0]
            for i, (r, n) in enumerate(zip(reqs, news)):
                c = r.num_computed_tokens
                tokens += r.token_ids[c : c + n]
                positions += range(c, c + n)
                lens.append(c + n)
                cu.append(cu[-1] + n)
                if c + n == r.num_tokens:
                    sample.append(i)
            max_q = max(news)
        T, S = len(tokens), len(sample)
        t2, r4 = _align(T, 2), _align(R + 1, 4)  # 16-byte aligned parts (see __init__)
        if self._staged is not None:
            self._staged.synchronize()  # the last step's copies out of the staging buffers are done
        h64 = self._h64[: 2 * t2 + S].numpy()
        h64[:T] = tokens
        h64[t2 : t2 + T] = positions
        h64[2 * t2 :] = [cu[i + 1] - 1 for i in sample] if cu is not None else sample
        h32 = self._h32[: 2 * r4 + (R + 1 if cu is not None else 0)].numpy()
        h32[:R] = lens
        h32[r4 : r4 + R] = [r.slot for r in reqs]
        if cu is not None:
            h32[2 * r4 :] = cu
        d64 = self._h64[: h64.shape[0]].to(self.device, non_blocking=True)
        d32 = self._h32[: h32.shape[0]].to(self.device, non_blocking=True)
        if self._pin:
            self._staged = torch.cuda.Event()
            self._staged.record(torch.cuda.current_stream(self.device))
        lens_d, slots_d, cu_d = d32[:R], d32[r4 : r4 + R], d32[2 * r4 :] if cu is not None else None
        if cu is not None:  # a backend that plans prefill on the host reads these, not the device (no sync)
            attach_host_values(lens_d, lens)
            attach_host_values(slots_d, h32[r4 : r4 + R].tolist())
            attach_host_values(cu_d, cu)
        ctx = BatchContext(
            self._keys, self._values, lens_d, cu_d, slots_d, self.kv.block_table, max_q, self.backend,
            self._key if cu is None else None,
        )  # fmt: skip
        self.prepare_seconds += time.perf_counter() - t0
        forward = self._decode if cu is None else self._forward
        return forward(d64[:T], d64[t2 : t2 + T], d64[2 * t2 :], ctx), sample

    # --------------------------------------------------------- CUDA graphs
    @torch.inference_mode()
    def _capture(self) -> None:
        B = self.max_batch_size
        dev = self.device
        self._g_ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self._g_pos = torch.zeros(B, dtype=torch.int64, device=dev)
        self._g_rows = torch.arange(B, dtype=torch.int64, device=dev)
        self._g_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self._g_slots = torch.full((B,), self._scratch, dtype=torch.int32, device=dev)
        self._g_host = torch.zeros(4 * B, dtype=torch.int64, pin_memory=True)
        self.kv.synchronize()  # no background commit may run into the capture
        pool = None
        sizes = graph_batch_sizes(B)
        if self.compiled and B > 1:  # a batch of 1 replays the graph of 2: no second compile for size 1
            sizes = [b for b in sizes if b > 1]
        for bs in reversed(sizes):
            ctx = BatchContext(self._keys, self._values, self._g_lens[:bs], None, self._g_slots[:bs],
                               self.kv.block_table, 1, self.backend, self._key)  # fmt: skip
            args = (self._g_ids[:bs], self._g_pos[:bs], self._g_rows[:bs], ctx)
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up: compiles kernels, outside the capture
                self._decode(*args)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the KV committer thread's driver calls are not part of the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self._decode(*args)
            pool = graph.pool()
            self._graphs[bs] = (graph, out)
        self._graphs = dict(sorted(self._graphs.items()))
        torch.cuda.synchronize(dev)

    def _replay(self, batch: ScheduledBatch, bs: int, t0: float) -> torch.Tensor:
        reqs = batch.requests
        R = len(reqs)
        staged = self._g_host[: 4 * bs]
        h = staged.numpy().reshape(4, bs)
        h[0, :R] = [r.token_ids[-1] for r in reqs]
        h[1, :R] = [r.num_tokens - 1 for r in reqs]
        h[2, :R] = [r.num_tokens for r in reqs]
        h[3, :R] = [r.slot for r in reqs]
        # Padding rows: token 0 at position 0 of the scratch slot, one key.
        h[0, R:] = 0
        h[1, R:] = 0
        h[2, R:] = 1
        h[3, R:] = self._scratch
        d = staged.to(self.device, non_blocking=True).view(4, bs)
        self._g_ids[:bs].copy_(d[0])
        self._g_pos[:bs].copy_(d[1])
        self._g_lens[:bs].copy_(d[2])
        self._g_slots[:bs].copy_(d[3])
        graph, out = self._graphs[bs]
        self.prepare_seconds += time.perf_counter() - t0
        graph.replay()
        return out[:R]

    @property
    def graph_sizes(self) -> list[int]:
        """Batch sizes with a captured CUDA graph (empty on the CPU or without graphs)."""
        return list(self._graphs)

    def close(self) -> None:
        self._graphs.clear()
        self._keys = self._values = []


def _without_alias_check() -> Any:
    """AOTAutograd's check that custom ops return no alias of their inputs, off around a compiled
    step. Torch runs it at a compiled graph's first call as a dispatch mode, under which the eager
    ``flex_attention`` in :func:`decode_layer` (a vmap over the mask) fails on the CPU ("could not
    find kernel for custom_function_call"): that failed the step. :func:`decode_layer` returns a
    fresh tensor, so the check has nothing to find."""
    from torch._functorch import config

    if not hasattr(config, "check_custom_op_aliasing"):  # a torch without the check
        return contextlib.nullcontext()
    return config.patch(check_custom_op_aliasing=False)


def _compile_failures() -> tuple:
    """What a compiled decode step raises when compiling fails, before the step runs: dynamo's
    errors, and ``FailOnRecompileLimitHit`` (no ``TorchDynamoException``) that a ``fullgraph``
    compile raises past dynamo's recompile limit. Every engine of a process runs
    :meth:`ModelRunner._forward`'s one code object, so that limit counts the graphs of all their
    models, cache kinds and batch shapes (two each: batches of 1 and the rest). Looked up when
    raised: importing the engine does not load dynamo."""
    exc = torch._dynamo.exc
    return (exc.TorchDynamoException, getattr(exc, "FailOnRecompileLimitHit", ()))


def _align(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple
