"""Which backends run here, and the ``auto`` rule (:func:`select_backend`)."""

from __future__ import annotations

import numpy as np
import torch

from . import deps
from .torch_fa2 import fa2_supported
from .triton_backend import pow2_dim


def available_backends(device="cuda") -> list:
    """Backends that can run on ``device`` in this process (``auto`` excluded); none for a CUDA
    device this process cannot use (no CUDA, or an index past the GPUs it sees)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"available_backends: expected a device such as 'cuda', 'cuda:1' or 'cpu', got {device!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):  # fmt: skip
        return []
    out = []
    if device.type == "cuda" and deps.HAS_TORCH_FA2 and deps.ampere_or_newer(device.index or 0):
        out.append("torch_fa2")  # PyTorch's FA2 raises on GPUs older than Ampere
    if device.type == "cuda" and deps.has_flash_attn():
        out.append("flash_attn")
    if device.type == "cuda" and deps.has_flashinfer():
        out.append("flashinfer")
    if deps.triton_usable(device):
        out.append("triton")
    if deps.flex_module() is not None:
        out.append("flex")
    out.append("sdpa")
    return out


#: What each backend supports beyond plain causal attention (``window_left``, ``softcap``).
FEATURES = {
    "torch_fa2": frozenset({"window_left"}),  # PyTorch's FA2 takes window_size_left, no soft cap
    "flash_attn": frozenset({"window_left", "softcap"}),
    "flashinfer": frozenset({"window_left", "softcap"}),  # window_left / logits_soft_cap of its plan()
    "triton": frozenset({"window_left", "softcap"}),
    "flex": frozenset({"window_left", "softcap"}),
    "sdpa": frozenset({"window_left", "softcap"}),
}


def supports(backend: str, *, window_left: bool = False, softcap: bool = False) -> bool:
    """Whether ``backend`` takes a sliding window / a soft cap."""
    need = {name for name, on in (("window_left", window_left), ("softcap", softcap)) if on}
    return need <= FEATURES[backend]


#: Query rows from which ``auto`` runs an eager CUDA prefill through ``flashinfer`` (see :func:`select_backend`).
FLASHINFER_PREFILL_MIN_TOKENS = 4096


def _flashinfer_prefill_wins(q, k_cache, v_cache, window: bool, host_metadata: bool) -> bool:
    """The measured case where FlashInfer's FA3 prefill beats ``triton`` (see :func:`select_backend`)."""
    if not host_metadata or window or q.shape[0] < FLASHINFER_PREFILL_MIN_TOKENS or torch.compiler.is_compiling():
        return False
    if not deps.has_flashinfer() or deps.cuda_capability(q.device.index or 0)[0] != 9:
        return False
    if torch.cuda.is_current_stream_capturing():  # the op would run triton there anyway
        return False
    from .flashinfer_backend import flashinfer_supported

    return flashinfer_supported(q, k_cache, v_cache, decode=False)


def flashinfer_prefill_runs_fa3(k_cache, cache_seqlens, slots=None) -> bool:
    """Whether a ``flashinfer`` prefill over these keys would run FA3 rather than FlashInfer's FA2:
    the metadata's host copies (:mod:`.host_values`) known, and each request's tile tail committed
    (:func:`.flashinfer_backend.fa3_tail_fits`: a ``KVCache`` with ``margin_tokens=FA3_TILE`` and
    lengths at least ``FA3_TILE - 1`` below ``max_seq_len``). FA2 is the slower prefill on Hopper
    (362-398 against 536-648 TFLOP/s for ``triton`` at 8K-32K, H100, twenty-ninth session), so ``auto``
    takes ``flashinfer`` only where this holds."""
    from .flashinfer_backend import fa3_tail_fits
    from .host_values import host_values

    lengths = host_values(cache_seqlens)
    if lengths is None:
        return False
    slot_list = host_values(slots) if slots is not None else tuple(range(len(lengths)))
    if slot_list is None or len(slot_list) != len(lengths):
        return False
    return fa3_tail_fits(k_cache, list(lengths), list(slot_list), [True] * len(lengths))


def select_backend(q, k_cache, v_cache, *, decode: bool, block_table=None, softcap: bool = False,
                   window: bool = False, host_metadata: bool = False) -> str:  # fmt: skip
    """The ``auto`` rule: the fastest backend measured for the device and the step kind.

    * CPU: ``triton`` under ``TRITON_INTERPRET=1`` is *not* chosen (slow); ``sdpa``.
    * CUDA prefill of at least :data:`FLASHINFER_PREFILL_MIN_TOKENS` query rows,
      eager (not traced by ``torch.compile``, not captured), no sliding window,
      metadata with host copies (``host_metadata``: :mod:`.host_values`; without
      them its plan syncs once per call, 389 TFLOP/s at 8K), on Hopper (sm90)
      with FlashInfer importable and the layout it takes: ``flashinfer`` (FA3 on
      each slot's contiguous rows; :func:`attention` keeps it only where FA3
      runs, :func:`flashinfer_prefill_runs_fa3`). Measured on the H200 (2026-12-04, metadata with
      host copies; ``bench kernels`` and ``scripts/diag_prefill.py``): 659 vs 508
      TFLOP/s for ``triton`` at 8K, 649 vs 539 at 32K, 525 vs 419 at 4K, 578 vs 505
      for 4 requests of 1K new tokens over 4K keys; but 134 vs 315 at 2K, where its
      call's host time (about 0.2 ms) dominates: hence the threshold. Its decode
      trails ``triton`` (per layer of a 32-layer step graph, 2026-12-04: 32.5 vs
      24.2 us at batch 1, 16K; 137.3 vs 125.2 at batch 32, 4K; FlashInfer's own
      kernel is level with ours, the page-table write and the output masking
      around it are not): never chosen for decode.
    * CUDA decode (``cu_seqlens_q=None``): ``triton`` split-KV (flash-decoding
      over every request/head/split; FA2's varlen kernel does not split KV and
      reaches ~41% of copy bandwidth), else ``flash_attn``, else ``torch_fa2``.
    * CUDA prefill / mixed batch: ``triton`` (274-454 TFLOP/s for 2K-128K tokens
      against 189-356 for ``torch_fa2``), else ``flash_attn`` (not measured
      here), else ``torch_fa2``.
    * Paged (``block_table`` given) on CUDA: ``triton`` (its paged twin), else
      ``flash_attn`` when the page size is a multiple of 256, else ``flex``.
    * Anything the preferred backend cannot take (fp32, odd strides, head_dim
      not a power of two for Triton, a ``softcap`` for ``torch_fa2``: see
      :data:`FEATURES`) falls to the next; ``sdpa`` last. Every backend takes
      ``window_left``.

    Decided from shapes and dtypes only (``window``: a sliding window is asked
    for; ``host_metadata``: the metadata tensors carry host copies), so the
    choice is the same at trace time and at run time, except the ``flashinfer``
    prefill, chosen only outside ``torch.compile`` and capture.
    """
    for name, value in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"select_backend: {name}: expected a torch.Tensor, got {type(value).__name__!r}")
    if not isinstance(decode, (bool, np.bool_)):
        raise TypeError(f"select_backend: decode: expected a bool, got {decode!r}")
    if q.device.type != "cuda":
        return "sdpa"
    tri = deps.HAS_TRITON and pow2_dim(q.shape[2])
    fa = deps.has_flash_attn() and q.dtype in (torch.float16, torch.bfloat16)
    if block_table is not None:
        if tri:
            return "triton"
        if fa and k_cache.shape[1] % 256 == 0:
            return "flash_attn"
        return "flex" if deps.flex_module() is not None else "sdpa"
    if not decode and _flashinfer_prefill_wins(q, k_cache, v_cache, window, host_metadata):
        return "flashinfer"
    fa2 = fa2_supported(q, k_cache, v_cache, None) and supports("torch_fa2", softcap=softcap)
    order = ("triton", "flash_attn", "torch_fa2")  # see the docstring (flashinfer: large eager prefills only)
    ok = {"triton": tri, "flash_attn": fa, "torch_fa2": fa2}
    for name in order:
        if ok[name]:
            return name
    return "sdpa"
