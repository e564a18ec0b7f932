"""``Engine``: continuous batching on virtual KV (or the paged baseline).

    from torch_vkv.serving import Engine, SamplingParams
    with Engine(model, max_batch_size=64, max_seq_len=8192) as engine:
        outputs = engine.generate(prompts, SamplingParams(max_tokens=128, temperature=0.0))

Each :meth:`Engine.step` is one iteration: the scheduler picks the batch
(decodes first, then prefill chunks, within ``chunk_size`` tokens) and commits
its pages, the runner runs the model once over the flattened ragged batch, the
sampler draws one token for every request whose prompt is fully computed, and
finished requests release their slots. See ``docs/serving.md``.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from collections.abc import Container, Sequence
from typing import Any, Optional, Union

import torch

from torch_vkv._lifetime import Closable, Unique, one_thread, repr_before_init
from torch_vkv._checks import ArgumentTypeError, Described, check_int, fail
from torch_vkv import BACKENDS, LAYOUTS, KVCacheCapacityError
from torch_vkv.pool import DEFAULT_HOST_PAGE_SIZE, resolve_device
from torch_vkv.serving.inputs import check_token_level, prompt_batch, token_id_list
from torch_vkv.serving.kv import KVManager, static_budget
from torch_vkv.serving.outputs import RequestOutput
from torch_vkv.serving.params import SamplingParams, completion_seed
from torch_vkv.serving.prewarm import Prewarmer
from torch_vkv.serving.request import Request, RequestStatus, SequenceGroup
from torch_vkv.serving.runner import (ModelRunner, attach, check_kwargs_reach_attention, check_servable, detach,
                                      load_causal_lm)
from torch_vkv.serving.sampler import Sampler
from torch_vkv.serving.scheduler import Scheduler

__all__ = ["Engine"]

KV_KINDS = ("virtual", "paged")
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Engine(Closable, Unique):
    """A serving engine over a Hugging Face causal LM.

    Args:
        model: a transformers causal LM (``...ForCausalLM``; one whose layers do not pass
            the forward's keyword arguments on to the attention raises ``ValueError``), or a local
            checkpoint folder (``AutoModelForCausalLM``; a path that is not a
            folder raises ``FileNotFoundError`` naming it). The engine
            takes the model over while open: it moves it to ``device`` /
            ``dtype``, puts it in eval mode and switches its attention to
            ``"vkv_serving"``; :meth:`close` of the last engine open on it restores the attention implementation.
        max_batch_size: most requests running at once (slots).
        max_seq_len: most tokens of one request, prompt + output.
        kv: ``"virtual"`` (a :class:`torch_vkv.KVCache`) or ``"paged"`` (the
            block-table baseline, ``block_size`` tokens per block).
        layout: the ``KVCache`` layout (``"per_layer"`` or ``"interleaved"``; virtual only).
        memory_budget: bytes of KV memory. ``None``: a static cache's size
            (``max_batch_size * max_seq_len`` tokens), on CUDA at most 90% of
            the free GPU memory.
        page_size: host backend only: bytes per page (as ``KVCache``).
        block_size: tokens per block (paged only).
        chunk_size: token budget of one iteration (decodes + prefill chunks).
        attention_backend: ``torch_vkv.attention``'s ``backend``.
        cuda_graphs: replay CUDA graphs for decode-only iterations (CUDA only).
        compile: ``torch.compile`` decode-only iterations (inductor fuses the
            model's small kernels; compiles once at start, about a minute for
            an 8B model; engines of the same kind share the compiled code).
        device: default CUDA when present, else the CPU (host backend).
        dtype: float16, bfloat16 or float32 (the attention's); default the model's.
        prefix_caching: reuse the K/V of full prompt blocks across requests
            (blocks of ``KVCache.tokens_per_page`` tokens for virtual, of
            ``block_size`` for paged; see ``docs/serving.md``). Finished
            requests' blocks stay cached until memory is needed, least
            recently used first.
        prewarm: eager allocation (virtual): while the GPU runs a step, back the
            free slots of the next admissions' first chunks (``serving/prewarm.py``).

    Sliding-window and soft-capped families (Mistral, Gemma 2 / 3, Qwen2 / 3
    with ``use_sliding_window``): each layer attends with its own window and
    soft cap, as the model passes them. ``kv="virtual"`` with
    ``layout="per_layer"`` gives back a sliding layer's pages behind its
    window as requests grow (:attr:`sliding_window`, ``KVCache(sliding_window=)``);
    ``layout="interleaved"`` (a page holds every layer of a token) and
    ``kv="paged"`` (a block holds every layer) keep every page and only
    restrict what attention reads. Admission still counts a request's pages as
    if every layer kept all its tokens (an upper bound).
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int,
        max_seq_len: int,
        kv: str = "virtual",
        layout: str = "per_layer",
        memory_budget: Optional[int] = None,
        page_size: Optional[int] = None,
        block_size: int = 16,
        chunk_size: int = 512,
        attention_backend: str = "auto",
        cuda_graphs: bool = True,
        compile: bool = False,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        prefix_caching: bool = True,
        prewarm: bool = True,
    ) -> None:
        self._closed = True  # until construction succeeds
        self.max_batch_size = check_int("max_batch_size", max_batch_size, low=1)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, low=2)
        if kv not in KV_KINDS:
            fail("kv", f"one of {KV_KINDS}", kv)
        if layout not in LAYOUTS:
            fail("layout", f"one of {LAYOUTS}", layout)
        if page_size is not None and kv == "paged":
            fail("page_size", "None with kv='paged' (blocks are block_size tokens)", page_size)
        page_size = None if page_size is None else check_int("page_size", page_size, low=1)  # numpy ints: ints
        memory_budget = None if memory_budget is None else check_int("memory_budget", memory_budget, low=1)
        self.block_size = check_int("block_size", block_size, low=1)
        self.chunk_size = check_int("chunk_size", chunk_size, low=1)
        if attention_backend not in BACKENDS:  # "auto" among them
            fail("attention_backend", f"one of {tuple(BACKENDS)}", attention_backend)
        for name, flag in dict(cuda_graphs=cuda_graphs, compile=compile, prefix_caching=prefix_caching,
                               prewarm=prewarm).items():  # fmt: skip
            if not isinstance(flag, bool):
                fail(name, "a bool", flag, ArgumentTypeError)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            fail("dtype", "a floating-point torch.dtype or None", dtype, ArgumentTypeError)
        self.device = resolve_device(device)  # the pool's rule: None -> CUDA if present, "cuda" -> its index

        if isinstance(model, (str, os.PathLike)):
            model = load_causal_lm(model, dtype)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            fail("model", "a transformers causal LM or a checkpoint path", type(model), ArgumentTypeError)
        check_servable(model, self.max_seq_len)  # before the model moves: a refused engine leaves it as it was
        self.dtype = dtype if dtype is not None else next(model.parameters()).dtype
        if self.dtype not in ATTENTION_DTYPES:  # before the model moves
            fail("dtype", "torch.float16, torch.bfloat16 or torch.float32 (the attention kernels' dtypes)",
                 self.dtype if dtype is not None else Described(f"{self.dtype} (the model's: pass dtype=)"))
        model.to(device=self.device, dtype=self.dtype)
        model.eval()
        self.model = model
        # The HF adapter's reading of a model and its config (imported here: importing the serving
        # package loads no transformers).
        from torch_vkv.hf.cache import layer_windows
        from torch_vkv.hf.compat import eos_ids, model_shape, text_config

        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = int(getattr(emb, "num_embeddings", 0) or text_config(model.config).vocab_size)
        self.eos_token_ids = eos_ids(model)
        num_layers, num_kv_heads, head_dim = model_shape(model.config)

        #: Each layer's sliding window in tokens (``None``: a global layer), from the model's config.
        self.sliding_window = layer_windows(model.config, num_layers)

        graphs = cuda_graphs and self.device.type == "cuda"
        num_slots = self.max_batch_size + (1 if graphs else 0)  # + a scratch slot for graph padding rows
        if memory_budget is None:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            host_page = page_size or DEFAULT_HOST_PAGE_SIZE
            static = static_budget(kv, layout=layout, num_slots=num_slots, max_seq_len=self.max_seq_len,
                                   num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                   itemsize=itemsize, block_size=self.block_size,
                                   page_size=host_page if self.device.type == "cpu" else 2 << 20)  # fmt: skip
            memory_budget = static
            if self.device.type == "cuda":
                memory_budget = min(static, int(0.9 * torch.cuda.mem_get_info(self.device)[0]))
        self.kv = KVManager(
            kv, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_slots=num_slots,
            max_seq_len=self.max_seq_len, dtype=self.dtype, device=self.device, memory_budget=memory_budget,
            layout=layout, page_size=page_size, block_size=self.block_size, sliding_window=self.sliding_window,
            prefix_caching=prefix_caching, parking_slots=self.max_batch_size,
        )  # fmt: skip
        # Off where sliding layers give back the pages a shared prefix would need (KVManager.can_fork).
        self.prefix_caching = self.kv.prefix is not None
        #: Tokens of one prefix-cache block: one page of the layout for virtual
        #: (``KVCache.tokens_per_page`` rounded down), ``block_size`` for paged.
        self.prefix_block_tokens = self.kv.block_tokens
        self.kv_kind, self.layout, self.prewarm = kv, layout, prewarm
        self.memory_budget = memory_budget
        try:
            scratch = None
            if graphs:
                scratch = self.kv.alloc_pinned(1)
            if not self.kv.fits_alone(1):
                beside = " beside the CUDA graphs' scratch slot" if graphs else ""
                fail("memory_budget", f"room for one request{beside} (at least "
                     f"{self.kv.pinned_pages + self.kv.pages_for(1)} pages of {self.kv.page_bytes} bytes)",
                     Described(f"{memory_budget} bytes ({self.kv.total_pages} pages)"))  # fmt: skip
            self.scheduler = Scheduler(self.kv, max_batch_size=self.max_batch_size, chunk_size=self.chunk_size)
            self._prewarmer = Prewarmer(self.kv, self.scheduler, chunk_size=self.chunk_size,
                                        default_tokens=min(self.chunk_size, self.max_seq_len - 1))  # fmt: skip
            attach(model)  # the attention switched to ATTN_NAME until the last engine on the model closes
            self._attached = True
            check_kwargs_reach_attention(model, self.device)
            self.runner = ModelRunner(
                model, self.kv, max_batch_size=self.max_batch_size, chunk_size=self.chunk_size,
                backend=attention_backend, cuda_graphs=graphs, compile=compile, scratch_slot=scratch,
            )  # fmt: skip
        except BaseException:
            self._restore_model()
            self.kv.close()
            raise
        self.sampler = Sampler()
        self._requests: dict[str, Request] = {}
        self._undelivered: list[RequestOutput] = []  # aborted requests, returned by the next step
        self._stalled_steps = 0  # steps in a row that scheduled nothing while requests waited (see step)
        self._next_id = 0
        self._rng = random.Random(int.from_bytes(os.urandom(8), "little"))
        self._num_iterations = self._num_generated = self._num_finished = self._num_computed = 0
        self._host_seconds = 0.0
        self._closed = False

    # -------------------------------------------------------------- requests
    @one_thread
    def add_request(
        self, prompt_token_ids: Sequence[int], params: Optional[SamplingParams] = None, request_id: Optional[str] = None
    ) -> str:
        """Queues a request and returns its id.

        Args:
            prompt_token_ids: the prompt, ``1 .. max_seq_len - 1`` token ids in ``[0, vocab_size)``.
            params: ``SamplingParams`` (default ``SamplingParams()``).
            request_id: a unique string; default a counter.

        Raises ``ValueError`` for an empty prompt, a prompt of ``max_seq_len``
        tokens or more, a token id out of range, a duplicate ``request_id``,
        ``params.n > max_batch_size`` (or ``n > 1`` where sliding layers give
        back pages), or one whose prompt + ``max_tokens`` (at most ``max_seq_len``)
        tokens could not fit in the KV memory budget even alone; nothing is queued then.
        """
        self._check_open()
        prompt, params, request_id = self._validate(prompt_token_ids, params, request_id)
        self._enqueue(prompt, params, request_id)
        return request_id

    def _validate(self, prompt: Any, params: Any, request_id: Any) -> tuple[list[int], SamplingParams, str]:
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            fail("params", "a SamplingParams", type(params), ArgumentTypeError)
        check_token_level(params)  # stop strings: refused, not ignored
        prompt = token_id_list(prompt)
        if not prompt:
            fail("prompt_token_ids", "at least one token", prompt)
        if len(prompt) >= self.max_seq_len:
            fail("prompt_token_ids", f"fewer than max_seq_len={self.max_seq_len} tokens",
                 Described(f"{len(prompt)} tokens"))  # fmt: skip
        for what, ids in (("prompt token id", prompt), ("params.stop_token_ids entry", params.stop_token_ids)):
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)  # a stop id past it never matches
            if bad is not None:
                fail(what, f"an int in [0, {self.vocab_size})", bad)
        # An aborted request's id stays in use until step() returns its final output: a new request
        # under it (an explicit id, or a counter id equal to an earlier explicit one) would take that output.
        undelivered = {o.request_id for o in self._undelivered}  # usually empty
        in_use = lambda rid: rid in self._requests or rid in undelivered  # noqa: E731
        if request_id is None:
            while in_use(str(self._next_id)):
                self._next_id += 1
            request_id = str(self._next_id)
            self._next_id += 1
        elif not isinstance(request_id, str):
            fail("request_id", "a str or None", type(request_id), ArgumentTypeError)
        elif in_use(request_id):
            fail("request_id", "an id not used by an unfinished request (nor by one whose final output the next "
                 "step() returns)", request_id)  # fmt: skip
        if params.n > self.max_batch_size:
            fail("params.n", f"at most max_batch_size={self.max_batch_size} (each completion runs in a slot)", params.n)
        if params.n > 1 and not self.kv.can_fork:
            fail("params.n", "1 for a model whose sliding layers give back pages (kv='virtual', layout='per_layer'; "
                 "n > 1 forks the prompt's pages: use layout='interleaved' or kv='paged')", params.n)  # fmt: skip
        longest = min(len(prompt) + params.max_tokens, self.max_seq_len)
        if not self.kv.fits_alone(longest):
            fail("prompt_token_ids + max_tokens",
                 f"a request that fits in the KV memory budget alone ({self.kv.usable_pages} pages of "
                 f"{self.kv.page_bytes} bytes)",
                 Described(f"{longest} tokens needing {self.kv.pages_for(longest)} pages"))  # fmt: skip
        return prompt, params, request_id

    def _enqueue(self, prompt: list[int], params: SamplingParams, request_id: str) -> None:
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        now = time.monotonic()
        seqs = [
            Request(request_id, prompt, params, seed=completion_seed(seed, i), eos_token_ids=self.eos_token_ids,
                    arrival_time=now, index=i)
            for i in range(params.n)
        ]  # fmt: skip
        if params.n > 1:  # completions 1.. start when completion 0 samples its first token (see step)
            group = SequenceGroup(request_id, seqs)
            for q in seqs:
                q.group = group
        req = seqs[0]
        self._requests[request_id] = req
        self.scheduler.add(req)

    @one_thread
    def abort(self, request_id: str) -> bool:
        """Finishes a request with ``finish_reason="abort"`` and releases its
        slot and pages; the next :meth:`step` returns its final output.
        Returns False (and does nothing) when no unfinished request has that id;
        ``TypeError`` when ``request_id`` is not a str."""
        self._check_open()
        if not isinstance(request_id, str):  # ids are str: an int or list never names one (a list crashed the lookup)
            fail("request_id", "a str", request_id, ArgumentTypeError)
        req = self._requests.get(request_id)
        if req is None:
            return False
        now = time.monotonic()
        for q in req.group.seqs if req.group is not None else [req]:
            if not q.finished:
                self.scheduler.remove(q)
                q.finish_reason = "abort"
                self._finish(q, now)
        self._undelivered.append(req.output())
        return True

    def _abort_unschedulable(self, scheduled: bool) -> None:
        """Aborts (RuntimeWarning) the requests that could never run, so no loop
        spins on them. A guard behind
        :meth:`_validate`'s budget check, for a wrong page estimate: a request
        preempted while it ran alone, or a head of the queue not admitted
        while nothing runs in two steps in a row (one may wait on a fence)."""
        stuck = self.scheduler.take_unschedulable()
        if not scheduled and self.scheduler.waiting and not self.scheduler.running:
            self._stalled_steps += 1
            if self._stalled_steps >= 2:
                stuck.append(self.scheduler.waiting[0])
                self._stalled_steps = 0
        else:
            self._stalled_steps = 0
        for req in stuck:
            warnings.warn(f"Engine: request {req.request_id!r} ({req.num_tokens} tokens so far) cannot be scheduled "
                          f"even with all {self.kv.usable_pages} usable KV pages; aborted", RuntimeWarning,
                          stacklevel=3)  # fmt: skip
            self.abort(req.request_id)

    def has_unfinished_requests(self) -> bool:
        """Whether a request is waiting or running, or an aborted request's
        final output is still to be returned by :meth:`step`."""
        return bool(self._requests) or bool(self._undelivered)

    def _finish(self, seq: Request, now: float) -> None:
        """Marks a sequence finished (its slot already released); the request too once all its completions are."""
        seq.status = RequestStatus.FINISHED
        seq.finished_time = now
        if seq.group is None or seq.group.finished:
            del self._requests[seq.request_id]
            self._num_finished += 1

    # ------------------------------------------------------------------ step
    @one_thread
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Runs one iteration. Returns the requests that got a token or
        finished in it (cumulative outputs), aborted ones included."""
        self._check_open()
        t0 = time.perf_counter()
        now = time.monotonic()
        batch = self.scheduler.schedule(now)
        self._abort_unschedulable(bool(batch.requests))
        if not batch.requests:
            outputs, self._undelivered = self._undelivered, []
            return outputs
        t1 = time.perf_counter()
        logits, rows = self.runner.execute(batch)
        logits = logits[:, : self.vocab_size]  # an lm_head padded past the embeddings: ids it has no row for
        if self.prewarm:
            self._prewarmer.after_launch(batch)  # while the GPU runs the forward
        reqs = [batch.requests[i] for i in rows]
        parents = [r for r in reqs if r.fanout > 1]
        if parents:  # n > 1: the other completions' first tokens come from their first sequence's logits
            row_of = list(range(len(reqs)))
            for r in parents:
                row_of += [reqs.index(r)] * (r.fanout - 1)
                reqs += r.group.seqs[1:]
            logits = logits[torch.tensor(row_of, device=logits.device)]
        tokens = self.sampler.for_requests(logits, reqs).tolist()  # the iteration's one device -> host sync
        t3 = time.perf_counter()
        now = time.monotonic()
        for r, n in zip(batch.requests, batch.num_new_tokens):
            r.num_computed_tokens += n
            self.kv.index(r)
        done = [r for r, t in zip(reqs, tokens) if r.append_token(t, now, self.max_seq_len)]
        for r in parents:
            self._fork_completions(r)
        for r in done:
            self.scheduler.remove(r)
            self._finish(r, now)
        outputs, self._undelivered = self._undelivered, []  # taken only now: a step that raised left them due
        seen: set = set()
        for r in reqs:
            key = id(r.group) if r.group is not None else id(r)
            if key not in seen:
                seen.add(key)
                outputs.append(r.output())
        self._num_generated += len(tokens)
        self._num_computed += batch.num_tokens
        self._num_iterations += 1
        self._host_seconds += (t1 - t0) + (time.perf_counter() - t3)
        self._prewarmer.record(batch, time.perf_counter() - t0)
        return outputs

    def _fork_completions(self, first: Request) -> None:
        """Starts completions ``1 .. n-1`` of ``first``'s request, which just
        sampled their first tokens: each forks ``first``'s slot (the prompt's
        full pages shared, the partial one copied) and decodes from there. One
        that cannot get a slot or a page now waits at the front of the queue
        with its token, to be prefilled again (like a preempted sequence)."""
        first.fanout = 1
        queued = []
        for q in first.group.seqs[1:]:
            q.first_scheduled_time = first.first_scheduled_time
            q.block_keys = first.block_keys
            if q.finish_reason is not None:  # finished by its first token: never runs
                continue
            try:
                slot = self.kv.fork(first.slot, first.num_computed_tokens)
            except KVCacheCapacityError:
                queued.append(q)
                continue
            q.num_computed_tokens = first.num_computed_tokens
            self.scheduler.start(q, slot)
            self.kv.index(q)
        self.scheduler.waiting.extendleft(reversed(queued))

    # -------------------------------------------------------------- generate
    @one_thread
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Serves ``prompts`` (lists of token ids) to the end; returns their
        final outputs in the order of ``prompts``. ``params``: one
        ``SamplingParams`` for all, or one per prompt. Every prompt is checked
        before any is queued. Requests added earlier with :meth:`add_request`
        are served alongside (not returned: the next :meth:`step` returns
        those that finished during the call). An exception
        (``KeyboardInterrupt`` too) aborts this call's unfinished requests."""
        self._check_open()
        rows = prompt_batch(prompts)  # a tensor or array of ids: its rows (1-D: one prompt)
        prompts = prompts if rows is None else rows
        if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Sequence):
            fail("prompts", "a sequence of prompts (sequences of token ids)", type(prompts), ArgumentTypeError)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
            if len(params) != len(prompts):
                fail("params", f"one SamplingParams or a list of {len(prompts)}", Described(f"a list of {len(params)}"))
        else:
            fail("params", "a SamplingParams or a list of them", type(params), ArgumentTypeError)
        checked = [self._validate(prompt, p, None) for prompt, p in zip(prompts, params)]  # distinct ids
        for prompt, p, rid in checked:
            self._enqueue(prompt, p, rid)
        index = {rid: i for i, (_, _, rid) in enumerate(checked)}
        results: list[Optional[RequestOutput]] = [None] * len(checked)
        from tqdm.auto import tqdm

        start, generated0 = time.perf_counter(), self._num_generated
        others: list[RequestOutput] = []  # final outputs of requests not this call's
        try:
            with tqdm(total=len(checked), desc="Generating", unit="req", disable=not use_tqdm,
                      dynamic_ncols=True) as bar:  # fmt: skip
                while any(r is None for r in results):
                    for out in self.step():
                        i = index.get(out.request_id)
                        if i is None:
                            others += [out] if out.finished else []
                        elif out.finished and results[i] is None:
                            results[i] = out
                            bar.update(1)
                    if use_tqdm:
                        generated = self._num_generated - generated0  # every completion's tokens (n > 1 too)
                        bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - start, 1e-9):.1f}",
                                        refresh=False)  # fmt: skip
        finally:  # interrupted (Ctrl-C) or failed: none of this call's requests may keep running unseen
            if not self._closed:
                for rid in [rid for rid in index if rid in self._requests]:
                    self.abort(rid)
                # Their abort outputs are for no one (this call raised): a later generate() would take them
                # for others' and hand them on, call after call.
                self._return_later(others, drop=index)
        return results  # type: ignore[return-value]

    def _return_later(self, outputs: list[RequestOutput], drop: Container[str] = ()) -> None:
        """For a loop over :meth:`step` (``generate``, ``LLM``): the next step returns the final ``outputs`` it
        took of requests it does not own, and none of the requests in ``drop``, which it finished itself."""
        self._undelivered = outputs + [o for o in self._undelivered if o.request_id not in drop]

    # ----------------------------------------------------------------- stats
    @property
    def host_seconds(self) -> float:
        """``stats()["host_seconds"]`` alone, without the rest (which reads
        exact memory counts, waiting for background commits): cheap enough to
        read every iteration."""
        return self._host_seconds + self.runner.prepare_seconds

    @property
    def used_bytes(self) -> int:
        """``stats()["used_bytes"]`` alone (cheap): the K/V bytes of running
        requests' computed tokens."""
        return sum(r.num_computed_tokens for r in self.scheduler.running) * self.kv.bytes_per_token

    @one_thread
    def stats(self) -> dict[str, Any]:
        """``num_running`` (sequences), ``num_waiting``, ``num_preemptions``, ``committed_bytes`` (physical KV memory
        held, freed and parked slots' cached pages included), ``window_committed_bytes`` (the part of it held by
        sliding-window layers; 0 unless ``kv="virtual"``, ``layout="per_layer"`` and the model has sliding layers),
        ``used_bytes`` (K/V of running requests' computed tokens; a shared prefix counts once per request using it),
        ``memory_budget``, ``num_finished``, ``num_iterations``, ``num_generated_tokens`` (of every completion),
        ``num_computed_tokens`` (tokens run through the model: prefill chunks and decodes), ``host_seconds`` (host
        time of scheduling, page commits, batch metadata and output bookkeeping, summed over iterations; the model
        forward and the sampler are excluded), ``kv_grow_seconds`` (the part of it in the KV manager's page commits
        and their waits), ``kv_prewarm_seconds`` (eager allocation for the next request, while the GPU runs: not host
        time), ``prefix_caching``, ``prefix_hit_tokens`` (prompt tokens found in the prefix cache at admission, not
        computed), ``prefix_query_tokens`` (tokens of the admitted prefills, looked up), ``prefix_hit_rate`` (their
        ratio, 0.0 before any) and ``prefix_cached_slots`` (finished requests' slots kept for their blocks)."""
        self._check_open()
        s, p = self.scheduler, self.kv.prefix
        return {
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "num_preemptions": s.num_preemptions,
            "committed_bytes": self.kv.committed_bytes(),
            "window_committed_bytes": self.kv.window_committed_bytes(),
            "used_bytes": self.used_bytes,
            "memory_budget": self.memory_budget,
            "num_finished": self._num_finished,
            "num_iterations": self._num_iterations,
            "num_generated_tokens": self._num_generated,
            "num_computed_tokens": self._num_computed,
            "host_seconds": self.host_seconds,
            "kv_grow_seconds": self.kv.grow_seconds,
            "kv_prewarm_seconds": self.kv.prewarm_seconds,
            "kv": self.kv_kind,
            "prefix_caching": self.prefix_caching,
            "prefix_hit_tokens": p.hit_tokens if p is not None else 0,
            "prefix_query_tokens": p.query_tokens if p is not None else 0,
            "prefix_hit_rate": p.hit_tokens / p.query_tokens if p is not None and p.query_tokens else 0.0,
            "prefix_cached_slots": len(p.parked) if p is not None else 0,
        }

    # ------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the Engine is closed")

    def _restore_model(self) -> None:
        if self.__dict__.pop("_attached", False):  # once, and only if attach() ran
            detach(self.model)

    @one_thread
    def close(self) -> None:
        """Drops every request, frees the KV cache and CUDA graphs, and puts
        the model's attention implementation back (once no other open engine
        serves the model). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.runner.close()
        self._restore_model()
        self.kv.close()
        self._requests.clear()
        self._undelivered.clear()  # else has_unfinished_requests() stayed True, and step() raises now

    @property
    def closed(self) -> bool:
        return self._closed

    _copy_hint = "build another Engine"
    _owns = "holds a model, its KV cache and the requests in flight"

    @repr_before_init
    def __repr__(self) -> str:  # reads counters only
        get = self.__dict__.get  # a constructor that failed part-way leaves some unset
        head = f"Engine(kv={get('kv_kind')!r}" + (f", layout={self.layout!r}" if get("kv_kind") == "virtual" else "")
        head += f", max_batch_size={get('max_batch_size')}, max_seq_len={get('max_seq_len')}"
        if self._closed:
            return f"{head}, closed)"
        s = self.scheduler
        return f"{head}, running={len(s.running)}, waiting={len(s.waiting)}, device={str(self.device)!r})"

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
