"""``bench kernels``' ``window`` section: decode with a sliding window vs full attention.

Every request of the batch at the full context (32K and 128K; 256 in
``--smoke``), the same cache read with ``window_left=N`` (default 4096, the
issue's 4K window) and without: time per call, the K+V bytes each call must
read (``bytes_read``: ``2 * batch * min(context, N + 1) * num_kv_heads *
head_dim * itemsize``) and the bandwidth that makes (``tb_s``, ``pct_copy``).
A kernel that skips the rows behind the window reads ``context / (N + 1)``
times fewer bytes, so its windowed call should be about that much faster.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["window_rows", "window_summary"]


def window_rows(cfg: Any, caches: Any, copy_bw: float, log: Callable[[str], None], window: int, *,
                smoke: bool) -> list:  # fmt: skip
    """``window`` section: decode with ``window_left=window`` vs full attention on the same cache
    (every request at the full context). ``tb_s`` counts the K+V bytes each call must read."""
    from torch_vkv.attention import attention, supports
    from torch_vkv.bench.kernels import MODELS, _available, _close, _time  # loaded: it imports this module

    rows, dev = [], cfg.device
    item = torch.empty((), dtype=cfg.dtype).element_size()
    window = min(window, 63) if smoke else window  # the smoke context is 256: a window that cuts it
    for model in cfg.models:
        H, H_kv, D = MODELS.get(model, (8, 2, 64))
        for S in ([256] if smoke else [32768, 131072]):
            for B in ([1] if smoke else [1, 8]):
                q = torch.randn((B, H, D), dtype=cfg.dtype, device=dev)
                lens = torch.full((B,), S, dtype=torch.int32, device=dev)
                memory = "vm" if caches.KVCache is not None else "malloc"
                k, v, keep = caches.contiguous(memory, B, S, H_kv, D)
                for backend in ("triton", "flash_attn", "torch_fa2", "flex") + (("sdpa",) if smoke else ()):
                    if not _available(backend, dev) or not supports(backend, window_left=True):
                        continue
                    for win in (None, window):
                        read = 2 * B * (S if win is None else min(S, win + 1)) * H_kv * D * item
                        row = dict(section="window", model=model, backend=backend, memory=memory, batch=B,
                                   context=S, bytes_read=read, note=f"window_left={win}")  # fmt: skip
                        fn = lambda b=backend, w=win: attention(q, k, v, lens, backend=b, window_left=w)  # noqa: E731
                        try:
                            us = _time(cfg, fn, cfg.decode_rep_ms)
                        except Exception as e:  # one backend failing must not stop the run
                            row["note"] += f"; error: {type(e).__name__}: {str(e)[:120]}"
                        else:
                            tb = read / (us * 1e-6) / 1e12
                            row.update(us=us, tb_s=tb, pct_copy=100 * tb / copy_bw)
                        log(f"  window {model} B={B} S={S} {backend} {row['note']}: {row.get('us', float('nan')):.1f} us")
                        rows.append(row)
                del k, v
                _close(keep)
    return rows


def window_summary(rows: list) -> str:
    """Markdown lines: per backend, batch and context, the full / windowed time and bytes ratios."""
    win = [r for r in rows if r["section"] == "window" and r.get("us")]
    lines = []
    for r in win:
        if r["note"] == "window_left=None":
            continue
        full = next((f for f in win if f["note"] == "window_left=None" and
                     (f["model"], f["backend"], f["batch"], f["context"]) ==
                     (r["model"], r["backend"], r["batch"], r["context"])), None)  # fmt: skip
        if full is not None:
            lines.append(f"- {r['model']} {r['backend']} B={r['batch']} S={r['context']} {r['note']}: "
                         f"full / windowed time {full['us'] / r['us']:.2f}x, "
                         f"bytes to read {full['bytes_read'] / r['bytes_read']:.1f}x")  # fmt: skip
    return ("\n\nSliding-window decode vs full attention (same cache):\n" + "\n".join(lines)) if lines else ""
