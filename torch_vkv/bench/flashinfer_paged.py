"""FlashInfer's own paged cache: the paged anchor rows of ``bench kernels``.

The strongest paged kernels we know, run the way a paged serving system runs them:
pages of :data:`BLOCK` tokens scattered at random in ordinary (``cudaMalloc``)
memory, the page table in FlashInfer's CSR form. Decode through
``BatchDecodeWithPagedKVCacheWrapper(..., "NHD", use_tensor_cores=True)``, prefill
through ``BatchPrefillWithPagedKVCacheWrapper`` (``backend="fa3"`` on Hopper, else
``"fa2"``). Planned once, outside the timed calls. Rows are labelled
``flashinfer_paged`` / memory ``paged``; beside them the ``flashinfer`` backend of
:func:`torch_vkv.attention` runs the same kernels family on the virtual cache.
:func:`annotate` gives every decode and prefill row its speed against the anchor of
its shape (the report's ``x_flashinfer_paged`` column).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["BLOCK", "anchor", "anchor_layers", "annotate"]

#: Tokens per page of the anchor (vLLM's and FlashInfer's common default).
BLOCK = 16


def _page_table(B: int, S: int, device: torch.device, seed: int = 0) -> tuple:
    """(indptr, scattered indices, last_page_len, num_pages) for B requests of S tokens."""
    pages = -(-S // BLOCK)
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(B * pages, generator=g).to(torch.int32)
    indptr = (torch.arange(B + 1) * pages).to(torch.int32)
    last = torch.full((B,), S - (pages - 1) * BLOCK, dtype=torch.int32)
    return indptr.to(device), indices.to(device), last.to(device), B * pages


def _build(kind: str, q: torch.Tensor, B: int, S: int, H_kv: int, D: int) -> Callable[[], torch.Tensor]:
    from torch_vkv.attention import deps

    fi = deps.flashinfer_module()
    if fi is None:
        raise RuntimeError("flashinfer is not importable")
    dev, H = q.device, q.shape[1]
    indptr, indices, last, n_pages = _page_table(B, S, dev)
    k = torch.randn((n_pages, BLOCK, H_kv, D), dtype=q.dtype, device=dev)
    v = torch.randn_like(k)
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    if kind == "decode":
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
        w.plan(indptr, indices, last, H, H_kv, D, BLOCK, q_data_type=q.dtype, kv_data_type=q.dtype)
    else:
        backend = "fa3" if deps.cuda_capability(dev.index or 0)[0] == 9 else "fa2"
        w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
        # B requests of S keys, the last q.shape[0] // B of each new (B = 1: a whole prompt).
        qo = torch.arange(B + 1, dtype=torch.int32, device=dev) * (q.shape[0] // B)
        w.plan(qo, indptr, indices, last, H, H_kv, D, BLOCK, causal=True, q_data_type=q.dtype, kv_data_type=q.dtype)
    return lambda: w.run(q, (k, v))


def skipped_rows(available: bool) -> list:
    """One report row saying why the FlashInfer rows are missing (none when it is importable)."""
    return [] if available else [dict(section="decode", backend="flashinfer", note="skipped: flashinfer not importable")]


def anchor(record: Callable, kind: str, q: torch.Tensor, B: int, S: int, H_kv: int, D: int) -> None:
    """Time FlashInfer paged ``kind`` ('decode' or 'prefill') through ``record(backend, memory, block, fn)``.

    Nothing when FlashInfer is not importable (:func:`skipped_rows` says so once); a
    build failure is recorded as the row's error note, like a failing kernel.
    """
    from torch_vkv.attention import available_backends

    if "flashinfer" not in available_backends(q.device):
        return
    try:
        fn = _build(kind, q, B, S, H_kv, D)
    except Exception as e:  # shown in the row's note, the run goes on
        err = e

        def fn():
            raise err

    record("flashinfer_paged", "paged", BLOCK, fn)



def anchor_layers(kind: str, q: torch.Tensor, B: int, S: int, H_kv: int, D: int, layers: int) -> list:
    """``layers`` calls of the anchor, each over a pool of its own (the layers of a step graph);
    empty when FlashInfer is not importable, a build failure raised by its call (as :func:`anchor`)."""
    calls: list = []
    for _ in range(layers):
        anchor(lambda backend, memory, block, fn: calls.append(fn), kind, q, B, S, H_kv, D)
    return calls

def annotate(rows: list) -> None:
    """Give every timed ``decode``, ``prefill`` and ``step`` row ``x_flashinfer_paged``: the anchor's time over
    the row's (above 1: faster than FlashInfer's paged kernel), against the anchor row of the same
    section, model, batch and context, timed the same way (``timer``: a CUDA-graph replay is never
    compared with an eager call). Rows without a timed anchor (FlashInfer not importable) get none."""
    shape = lambda r: (r.get("section"), r.get("model"), r.get("batch"), r.get("context"))  # noqa: E731
    anchors = {shape(r): r for r in rows if r.get("backend") == "flashinfer_paged" and r.get("us")}
    for r in rows:
        a = anchors.get(shape(r))
        if r.get("section") in ("decode", "prefill", "step") and r.get("us") and a is not None and a.get("timer") == r.get("timer"):
            r["x_flashinfer_paged"] = round(a["us"] / r["us"], 3)
