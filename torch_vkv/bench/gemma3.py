"""``python -m torch_vkv bench hf --workload gemma3``: Gemma-3-like generation, KV memory over time.

A Gemma-3-12B-like text model (48 layers, 5 sliding-window layers of 1024
tokens to 1 global layer, 8 KV heads x 256 dims; random bf16 weights built on
the ``meta`` device, then ``to_empty``: no download) generates the same greedy
continuation with three caches, eager ``generate()``:

================  ==============================================================
``dynamic``       ``DynamicCache`` (its sliding layers keep the last window)
``static``        ``StaticCache`` (preallocated; sliding layers: one window)
``vkv``           ``VirtualKVCache``, ``attn_implementation="vkv"``, ``per_layer``:
                  pages committed as tokens arrive, sliding layers' pages
                  behind the window given back at each step
================  ==============================================================

After every decode step the KV bytes each cache holds are recorded (a
``StoppingCriteria`` that never stops): ``dynamic``/``static`` the K/V tensors
the cache layers hold, ``vkv`` the committed pages (``committed_bytes``, with
``window_committed_bytes`` for the sliding layers). Rows: tokens/s, KV bytes at
the end and at the peak; ``<name>_series.json`` holds the per-step series and,
with matplotlib, ``<name>_memory.png`` plots it.

``--tiny`` (CPU smoke runs): 6 layers, hidden 64, a 32-token window.
``--quick``: batch 4, prompt 1024, 1024 new tokens; full: batch 8, prompt
4096, 4096 new tokens; ``--batch`` / ``--prompt`` / ``--new-tokens`` override.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence

import torch

from torch_vkv.bench.models import random_model
from torch_vkv.bench.report import report_dir, write_report
from torch_vkv.bench.timing import sync

__all__ = ["GEMMA3_12B", "TINY_GEMMA3", "VARIANTS", "build_gemma3", "first_divergence", "run"]

VARIANTS = ("vkv", "dynamic", "static")

# google/gemma-3-12b text config (architecture only; rope scaling of the global layers left out)
GEMMA3_12B = dict(
    vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256,
    max_position_embeddings=131072, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 8,
)  # fmt: skip
TINY_GEMMA3 = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, sliding_window=32, query_pre_attn_scalar=32, max_position_embeddings=4096,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, layer_types=["sliding_attention"] * 5 + ["full_attention"],
)  # fmt: skip


def build_gemma3(config_kwargs: dict, *, device: torch.device, dtype: torch.dtype, layers: Optional[int] = None,
                 seed: int = 0) -> torch.nn.Module:  # fmt: skip
    """A ``Gemma3ForCausalLM`` with random weights: built on ``meta``, ``to_empty`` on
    ``device``, parameters ``normal_(0, 0.02)``, norms 0 (Gemma scales by ``1 + w``),
    buffers (rotary frequencies, the embedding scale) recomputed."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kw = dict(config_kwargs)
    if layers:
        kw["num_hidden_layers"] = layers
        kw["layer_types"] = (list(kw["layer_types"]) * layers)[:layers]
    config = Gemma3TextConfig(**kw)
    model = random_model(Gemma3ForCausalLM, config, device=device, dtype=dtype, seed=seed, norm_weight=0.0)
    with torch.no_grad():  # buffers: to_empty left them uninitialised
        model.get_input_embeddings().embed_scale.fill_(config.hidden_size**0.5)
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


def first_divergence(tokens: torch.Tensor, reference: torch.Tensor) -> int:
    """The first step (column of ``[batch, steps]`` tokens) at which any row differs from
    ``reference``; -1 when none does."""
    differs = (tokens != reference).any(0).nonzero()
    return int(differs[0]) if len(differs) else -1


def kv_bytes(cache: Any) -> tuple[int, int]:
    """(KV bytes the cache holds, the part held by sliding layers)."""
    from torch_vkv.hf import VirtualKVCache

    if isinstance(cache, VirtualKVCache):
        s = cache.memory_stats()
        return int(s["committed_bytes"]), int(s.get("window_committed_bytes", 0))
    total = sliding = 0
    for layer in cache.layers:
        n = sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if isinstance(t, torch.Tensor))  # fmt: skip
        total += n
        if getattr(layer, "is_sliding", False):
            sliding += n
    return total, sliding


class _Recorder:
    """A ``StoppingCriteria`` that never stops: records the cache's KV bytes after every step."""

    def __init__(self, cache: Any) -> None:
        self.cache, self.series = cache, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.series.append(kv_bytes(self.cache))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _make_cache(variant: str, model, batch: int, max_len: int, device: torch.device):
    from transformers import DynamicCache, StaticCache

    from torch_vkv.hf import VirtualKVCache

    if variant == "dynamic":
        return DynamicCache(config=model.config)
    if variant == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    kw = {"page_size": 4096} if device.type == "cpu" else {}  # host: small pages, so the window's give-back shows
    return VirtualKVCache(model.config, batch, max_len, device=device, dtype=model.dtype, **kw)


def _run_variant(variant: str, model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> dict[str, Any]:
    from transformers import StoppingCriteriaList

    from torch_vkv.hf import generate_kwargs

    batch, prompt = ids.shape
    model.set_attn_implementation("vkv" if variant == "vkv" else "eager")
    cache = _make_cache(variant, model, batch, prompt + new_tokens, device)
    rec = _Recorder(cache)
    row: dict[str, Any] = {"variant": variant, "batch": batch, "prompt": prompt, "new_tokens": new_tokens}
    try:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **generate_kwargs(cache),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([rec]), disable_compile=True)  # fmt: skip
        sync(device)
        secs = time.perf_counter() - t
        total = [s[0] for s in rec.series]
        row.update(tok_s=batch * new_tokens / secs, seconds=secs, kv_bytes_end=total[-1], kv_bytes_peak=max(total),
                   sliding_kv_bytes_end=rec.series[-1][1])  # fmt: skip
        row["_tokens"] = out[:, prompt:].cpu()
        row["_series"] = rec.series
    except torch.OutOfMemoryError as e:
        row["error"] = f"OOM: {str(e).splitlines()[0][:80]}"
    finally:
        if hasattr(cache, "close"):
            cache.close()
    return row


def _plot(series: dict, path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, pts in series.items():
        ax.plot(range(1, len(pts) + 1), [p[0] / 2**20 for p in pts], label=variant)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV memory held (MiB)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


class _Report:
    """Writes ``<name>.json/.md``, the per-step series and the plot from the rows so far."""

    def __init__(self, args: Any, argv: Sequence[str], cfg: Any, dtype: torch.dtype, batch: int, prompt: int):
        self.args, self.argv, self.cfg, self.dtype, self.batch, self.prompt = args, argv, cfg, dtype, batch, prompt
        self.name = args.name if args.name != "hf" else "hf_gemma3"

    def write(self, rows: list) -> None:
        rows = [dict(r) for r in rows]  # the caller's rows keep their tokens and series
        cfg, name = self.cfg, self.name
        ref = next((r for r in rows if r["variant"] == "dynamic" and "_tokens" in r), None)
        for r in rows:
            if ref is not None and "_tokens" in r:
                same = r["_tokens"] == ref["_tokens"]
                r["same_tokens_as_" + ref["variant"]] = float(same.float().mean())
                r["first_divergence_from_" + ref["variant"]] = first_divergence(r["_tokens"], ref["_tokens"])
        series = {r["variant"]: r.pop("_series") for r in rows if "_series" in r}
        for r in rows:
            r.pop("_tokens", None)
        out = report_dir(self.args.out_dir)
        (out / f"{name}_series.json").write_text(json.dumps(
            {"columns": ["kv_bytes", "sliding_kv_bytes"], "per_step": series}))  # fmt: skip
        sliding = sum(t == "sliding_attention" for t in cfg.layer_types)
        by = {r["variant"]: r for r in rows if "error" not in r}
        lines = [f"Gemma-3-like: {cfg.num_hidden_layers} layers ({sliding} sliding, window {cfg.sliding_window}), "
                 f"{cfg.num_key_value_heads} KV heads x {cfg.head_dim}, {self.dtype}; eager generate(), greedy.",
                 "kv_bytes: K/V tensors held (dynamic, static) or pages committed (vkv), after each step; per-step "
                 f"series in {name}_series.json."]  # fmt: skip
        if "vkv" in by:
            for other in ("dynamic", "static"):
                if other in by:
                    lines.append(f"- vkv / {other}: KV at the end {by['vkv']['kv_bytes_end'] / by[other]['kv_bytes_end']:.2f}x, "
                                 f"peak {by['vkv']['kv_bytes_peak'] / by[other]['kv_bytes_peak']:.2f}x, "
                                 f"tok/s {by['vkv']['tok_s'] / by[other]['tok_s']:.2f}x")  # fmt: skip
        if self.dtype != torch.float32 and any(r.get("first_divergence_from_dynamic", -1) >= 0 for r in rows):
            lines.append(f"- Greedy tokens in {self.dtype} part where a near tie flips (random weights make ties common); "
                         "after that the continuations differ. Token equality is a float32 test "
                         "(tests/test_hf_window.py, tests/test_serving_window.py).")  # fmt: skip
        if _plot(series, out / f"{name}_memory.png", f"{name}: batch {self.batch}, prompt {self.prompt}"):
            lines.append(f"Plot: {name}_memory.png")
        columns = ["variant", "batch", "prompt", "new_tokens", "tok_s", "seconds", "kv_bytes_end", "kv_bytes_peak",
                   "sliding_kv_bytes_end", "error"] + sorted({k for r in rows for k in r if k.startswith(("same_tokens", "first_divergence"))})  # fmt: skip
        cmd = "python -m torch_vkv bench hf " + " ".join(self.argv)
        write_report(name, rows, self.args.out_dir, command=cmd.strip(), columns=columns, summary="\n".join(lines))


def run(args: Any, argv: Sequence[str]) -> int:
    """The workload, from ``bench hf``'s parsed arguments (``tiny``, ``quick``, ``batch``,
    ``prompt``, ``new_tokens``, ``layers``, ``device``, ``out_dir``, ``name``)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not (args.tiny or args.layers):
        print("bench hf --workload gemma3: no CUDA device; use --tiny for a CPU smoke run, or --layers N for "
              "the 12B-like shapes with N layers (KV memory is the same page arithmetic as on a GPU; time is not)")
        return 2
    if args.tiny:
        batch, prompt, new = 2, 40, 48
    elif args.quick:
        batch, prompt, new = 4, 1024, 1024
    else:
        batch, prompt, new = 8, 4096, 4096
    batch = args.batch[0] if args.batch else batch
    prompt = args.prompt[0] if args.prompt else prompt
    new = args.new_tokens[0] if args.new_tokens else new
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: extra threads only spin against other processes
    t0 = time.perf_counter()
    model = build_gemma3(TINY_GEMMA3 if args.tiny else GEMMA3_12B, device=device, dtype=dtype, layers=args.layers)
    cfg = model.config
    print(f"gemma3-like model built in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params)")  # fmt: skip
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    rows: list = []
    report = _Report(args, argv, cfg, dtype, batch, prompt)
    # VARIANTS order: VirtualKVCache first, and the report is rewritten after each variant,
    # so a run cut by a time limit keeps what finished.
    for variant in VARIANTS:
        row = _run_variant(variant, model, ids, new, device)
        print({k: v for k, v in row.items() if not k.startswith("_")})
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report.write(rows)
    return 0
