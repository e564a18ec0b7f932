"""Which backends run here, and the ``auto`` rule (:func:`select_backend`)."""

from __future__ import annotations

import torch

from . import deps
from .torch_fa2 import fa2_supported
from .triton_backend import pow2_dim


def available_backends(device="cuda") -> list:
    """Backends that can run on ``device`` in this process (``auto`` excluded); none for a CUDA
    device this process cannot use (no CUDA, or an index past the GPUs it sees)."""
    device = torch.device(device)
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):  # fmt: skip
        return []
    out = []
    if device.type == "cuda" and deps.HAS_TORCH_FA2:
        out.append("torch_fa2")
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


def select_backend(q, k_cache, v_cache, *, decode: bool, block_table=None, softcap: bool = False) -> str:
    """The ``auto`` rule: the fastest backend measured for the device and the step kind.

    * CPU: ``triton`` under ``TRITON_INTERPRET=1`` is *not* chosen (slow); ``sdpa``.
    * ``flashinfer`` is never chosen by ``auto``: pass ``backend="flashinfer"``.
      Measured through ``bench kernels`` (H200, 2026-12-02 23:13 UTC, CUDA-graph
      replay) it trails ``triton`` except at batch 128, 16K: decode 180 vs 138 us
      at batch 32, 4K, 76 vs 33 us at batch 1, 16K, 1990 vs 2029 us at batch 128,
      16K; prefill 398 vs 524 TFLOP/s at 8K, 568 vs 548 at 32K (docs/benchmarks.md).
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

    Decided from shapes and dtypes only, so the choice is the same at trace
    time and at run time.
    """
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
    fa2 = fa2_supported(q, k_cache, v_cache, None) and supports("torch_fa2", softcap=softcap)
    order = ("triton", "flash_attn", "torch_fa2")  # see the docstring (flashinfer: explicit only, for now)
    ok = {"triton": tri, "flash_attn": fa, "torch_fa2": fa2}
    for name in order:
        if ok[name]:
            return name
    return "sdpa"
