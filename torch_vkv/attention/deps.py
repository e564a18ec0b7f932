"""Optional dependencies of the attention backends, found without importing them.

``import torch_vkv`` imports neither triton, nor flash-attn, nor dynamo: what
is installed is read once here with ``importlib.util.find_spec`` (which imports
nothing), and the packages themselves load on first use. These are facts about
the installation; computing them under ``torch.compile`` would break the graph
(dynamo skips ``find_spec`` and cannot wrap an op's ``FunctionSchema``), so
they are module constants or :func:`assume_constant_result` functions.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FLASH_ATTN_SPEC = importlib.util.find_spec("flash_attn") is not None
HAS_FLASHINFER_SPEC = importlib.util.find_spec("flashinfer") is not None
HAS_TORCH_FA2 = hasattr(torch.ops.aten, "_flash_attention_forward") and "seqused_k" in str(
    torch.ops.aten._flash_attention_forward.default._schema
)


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing dynamo (and with it
    triton) when torch_vkv is imported: the decorator only sets this marker, which
    dynamo reads when it traces a call (torch 2.11 to 2.13)."""
    fn._dynamo_marked_constant = True
    return fn


def triton_kernels():
    """``torch_vkv.triton_kernels`` (imports triton).

    setup.py installs the top-level ``triton_kernels/`` folder under that name
    (``package_dir``), for ``pip install .`` and ``pip install -e .`` alike.
    """
    import torch_vkv.triton_kernels

    return torch_vkv.triton_kernels


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, and on the CPU only under ``TRITON_INTERPRET=1``:
    as it was when the kernels were defined (Triton reads it then), once they are."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    kernels = sys.modules.get("torch_vkv.triton_kernels")
    if kernels is not None:
        return bool(kernels.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_FA_FN = None
_FA_TRIED = False


def flash_attn_fn():
    """``flash_attn.flash_attn_with_kvcache``, or None when flash-attn is absent or broken."""
    global _FA_FN, _FA_TRIED
    if not HAS_FLASH_ATTN_SPEC:
        return None
    if not _FA_TRIED:
        try:
            from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]

            _FA_FN = flash_attn_with_kvcache
        except Exception:  # broken install, or built for another torch
            _FA_FN = None
        _FA_TRIED = True
    return _FA_FN


@assume_constant_result
def has_flash_attn() -> bool:
    """``flash_attn_with_kvcache`` importable (a constant for torch.compile: no import traced)."""
    return flash_attn_fn() is not None


def flex_module():
    """``torch.nn.attention.flex_attention``, or None on a torch without it."""
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:
        return None
    return fa


_FI_MOD = None
_FI_TRIED = False


def flashinfer_module():
    """The ``flashinfer`` package (>= 0.7), or None when it is absent or fails to import."""
    global _FI_MOD, _FI_TRIED
    if not HAS_FLASHINFER_SPEC:
        return None
    if not _FI_TRIED:
        try:
            import flashinfer  # type: ignore[import-not-found]

            _FI_MOD = flashinfer if hasattr(flashinfer, "BatchPrefillWithRaggedKVCacheWrapper") else None
        except Exception:  # broken install, or built for another torch / CUDA
            _FI_MOD = None
        _FI_TRIED = True
    return _FI_MOD


@assume_constant_result
def has_flashinfer() -> bool:
    """FlashInfer importable (a constant for torch.compile: no import traced)."""
    return flashinfer_module() is not None


_CAPABILITY: dict = {}


@assume_constant_result
def ampere_or_newer(index: int) -> bool:
    """Whether CUDA device ``index`` is sm80 or newer (a plain bool for torch.compile: comparing the
    capability tuple in traced code failed in dynamo on torch 2.11, "NotImplementedError" in make_guard)."""
    return cuda_capability(index)[0] >= 8


@assume_constant_result
def cuda_capability(index: int) -> tuple:
    """``(major, minor)`` of CUDA device ``index``; asked on first use (never at import), then kept."""
    if index not in _CAPABILITY:
        _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITY[index]
