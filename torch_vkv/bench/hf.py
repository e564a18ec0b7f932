"""``python -m torch_vkv bench hf``: ``generate()`` with VirtualKVCache vs DynamicCache vs StaticCache.

Llama-3-8B config with random bf16 weights (built on the ``meta`` device, then
``to_empty`` + ``normal_``: no download, about a second). For each batch,
prompt length and number of new tokens, four variants generate the same
greedy continuation:

================  ==============================================================
``dynamic``       ``DynamicCache``, sdpa, eager (transformers' default)
``static``        ``StaticCache``, sdpa, generate()'s automatic compilation
                  (``mode="reduce-overhead"``: CUDA graphs)
``vkv``           ``VirtualKVCache``, ``attn_implementation="vkv"``, eager
``vkv_compiled``  ``VirtualKVCache``, ``"vkv"``, generate()'s automatic
                  compilation (CUDA graphs; commits run before each step)
``vkv_interleaved_compiled``  the same in the interleaved layout (pages of
                  all layers of a token: commits 2 x num_layers times finer)
================  ==============================================================

Compiled caches run at two capacities, side by side (``capacity`` column):
``server`` (``--max-cache-len``, 8192, as a server sizes its rows) and
``exact`` (prompt + new tokens, where StaticCache allocates no more than it
uses).

Per row: new tokens/s end to end and in decode (prefill time subtracted, from a
one-token run), peak memory as torch sees it (``max_memory_allocated``; note
that torch does not count the virtual cache's storage, which reaches it through
DLPack, so for VirtualKVCache read ``kv_committed``) and as the driver sees it (``total - free`` polled
every 5 ms), and the KV bytes each cache holds at the end. Compiled variants
are warmed up (compile + capture) on the same cache object, which is then
``reset()``: addresses stay, so the timed run reuses the graphs.

``--quick``: batch 8, prompt 1024, 128 new tokens (under ~3 minutes on an H100).
``--workload gemma3``: a Gemma-3-like model's KV memory over time instead
(:mod:`torch_vkv.bench.gemma3`).
``--beam``: beam search instead (:mod:`torch_vkv.bench.hf_beam`).
Full: batch {1, 8, 32} x prompt {1024, 4096, 8192} x new tokens {256, 1024};
select a subset with ``--batch``, ``--prompt``, ``--new-tokens``, ``--variants``.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from typing import Any, Optional, Sequence

import torch

from torch_vkv._checks import device_arg, out_dir_arg, report_name_arg
from torch_vkv._checks import positive_int_arg
from torch_vkv.bench.report import write_report
from torch_vkv.bench.serve_profile import profile_lines, start_profiler, summarize_profile
from torch_vkv.bench.timing import sync

__all__ = ["main"]

VARIANTS = ("dynamic", "static", "vkv", "vkv_compiled", "vkv_interleaved_compiled")
COMPILED = ("static", "vkv_compiled", "vkv_interleaved_compiled")

# meta-llama/Meta-Llama-3-8B config.json (architecture only)
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, pad_token_id=128001,
    hidden_act="silu", tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torch_vkv bench hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one configuration: batch 8, prompt 1024, 128 new tokens")
    p.add_argument("--batch", type=positive_int_arg, nargs="+", help="batch sizes (full default: 1 8 32)")
    p.add_argument("--prompt", type=positive_int_arg, nargs="+", help="prompt lengths (full default: 1024 4096 8192)")
    p.add_argument("--new-tokens", type=positive_int_arg, nargs="+", help="new tokens (full default: 256 1024)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument(
        "--max-cache-len", type=positive_int_arg, default=8192,
        help="capacity of StaticCache and VirtualKVCache rows, as a server sizes them for the longest "
        "request it accepts (default 8192, Llama-3-8B's context; raised to prompt + new tokens when shorter)",
    )  # fmt: skip
    p.add_argument(
        "--capacities", nargs="+", choices=("server", "exact"), default=["server", "exact"],
        help="max_cache_len of the compiled caches: 'server' (--max-cache-len) and/or 'exact' (prompt + new "
        "tokens); both by default, side by side",
    )  # fmt: skip
    p.add_argument("--layers", type=positive_int_arg, default=None, help="override num_hidden_layers (faster runs)")
    p.add_argument("--tiny", action="store_true", help="a tiny config instead of Llama-3-8B (CPU smoke test)")
    p.add_argument("--device", default=None, type=device_arg, help="default: cuda when available, else cpu")
    p.add_argument("--out", "--out-dir", dest="out_dir", default=None, type=out_dir_arg,
                   help="default: $TORCH_VKV_BENCH_DIR or ./bench_out")
    p.add_argument("--name", default="hf", type=report_name_arg,
                   help="report name (default hf; hf_gemma3 with --workload gemma3, hf_beam with --beam)")
    p.add_argument("--workload", choices=("llama", "gemma3"), default="llama",
                   help="llama: the cache variants above (default); gemma3: a Gemma-3-like model's KV memory over "
                   "time, VirtualKVCache vs DynamicCache vs StaticCache (torch_vkv/bench/gemma3.py)")  # fmt: skip
    p.add_argument("--beam", action="store_true", help="beam search instead: pages remapped vs rows copied vs "
                   "DynamicCache (default batch 1, prompt 2048, 256 new tokens; with --tiny prompt 64, 8 new "
                   "tokens; see torch_vkv.bench.hf_beam)")
    p.add_argument("--num-beams", type=positive_int_arg, default=4, help="beams with --beam (default 4)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over each variant's timed generate(): kernel time per new token vs the "
                   "wall time, and the kernels that took the longest (it slows the host side: take tok/s from a "
                   "run without it)")  # fmt: skip
    return p


def _build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_kw = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        cfg_kw["num_hidden_layers"] = args.layers
    cfg = LlamaConfig(**cfg_kw)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    # to_empty left the rotary inverse frequencies (a non-persistent buffer) uninitialised.
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(device)
    model.generation_config.pad_token_id = cfg.pad_token_id
    return model.eval()


class _DriverPeak:
    """Polls ``total - free`` device memory (the driver's view) every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "_DriverPeak":
        if self.device.type == "cuda":
            self._sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        free, total = torch.cuda.mem_get_info(self.device)
        self.peak = max(self.peak, total - free)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._sample()


def _kv_bytes(cache: Any) -> int:
    from torch_vkv.hf import VirtualKVCache

    if isinstance(cache, VirtualKVCache):
        return int(cache.memory_stats()["committed_bytes"])
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _generate(model, ids, cache, new_tokens: int, *, compiled: bool):
    from torch_vkv.hf import generate_kwargs

    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), **generate_kwargs(cache), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, disable_compile=not compiled,
        )  # fmt: skip


def _make_cache(variant: str, model, batch: int, max_len: int, device: torch.device):
    from transformers import DynamicCache, StaticCache

    from torch_vkv.hf import VirtualKVCache

    if variant == "dynamic":
        return DynamicCache(config=model.config)
    if variant == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    kw = {"page_size": 64 << 10} if device.type == "cpu" else {}
    layout = "interleaved" if "interleaved" in variant else "per_layer"
    return VirtualKVCache(model.config, batch, max_len, device=device, dtype=model.dtype, layout=layout, **kw)


def _run_variant(variant, model, ids, new_tokens, device, prefill_s, capacity: int, kind: str,
                 profile: bool = False) -> dict[str, Any]:  # fmt: skip
    batch, prompt = ids.shape
    impl = "vkv" if variant.startswith("vkv") else "sdpa"
    compiled = variant in COMPILED
    model.set_attn_implementation(impl)
    cache = _make_cache(variant, model, batch, capacity, device)
    row: dict[str, Any] = {"variant": variant, "capacity": kind, "max_cache_len": capacity, "batch": batch,
                           "prompt": prompt, "new_tokens": new_tokens}  # fmt: skip
    try:
        warm = 0.0
        if compiled:  # compile + capture on this cache object, then reset it (addresses stay)
            # A fresh compile per variant and shape: across many configurations the
            # shared compiled forward would otherwise hit dynamo's recompile limit and
            # silently run eagerly.
            torch._dynamo.reset()
            t = time.perf_counter()
            _generate(model, ids, cache, min(8, new_tokens), compiled=True)
            sync(device)
            warm = time.perf_counter() - t
            cache.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        prof = start_profiler(device) if profile else None
        with _DriverPeak(device) as drv:
            sync(device)
            t = time.perf_counter()
            out = _generate(model, ids, cache, new_tokens, compiled=compiled)
            sync(device)
            secs = time.perf_counter() - t
        if prof is not None:
            row["profile"] = summarize_profile(prof, busy_s=secs, host_s=None, num_iterations=new_tokens)
        row.update(
            tok_s=batch * new_tokens / secs,
            decode_tok_s=batch * (new_tokens - 1) / max(secs - prefill_s, 1e-9),
            seconds=secs,
            warmup_s=warm,
            torch_peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            driver_peak_gib=drv.peak / 2**30 if device.type == "cuda" else None,
            kv_bytes=_kv_bytes(cache),
        )
        if variant.startswith("vkv"):
            row["page_size"] = cache.memory_stats()["page_size"]
            row["kv_buffers"] = 1 if cache.layout == "interleaved" else 2 * model.config.num_hidden_layers
        row["_tokens"] = out[:, prompt:].cpu()
    except torch.OutOfMemoryError as e:
        row["error"] = f"OOM: {str(e).splitlines()[0][:80]}"
    finally:
        if hasattr(cache, "close"):
            cache.close()
        del cache
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        import transformers  # noqa: F401

        import torch_vkv.hf  # noqa: F401  (registers "vkv")
    except ImportError as e:
        print(f"bench hf needs transformers: {e}")
        return 2
    if args.workload == "gemma3":
        from torch_vkv.bench.gemma3 import run

        return run(args, list(argv) if argv is not None else [])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        print("bench hf: no CUDA device; use --tiny for a CPU smoke run of the benchmark code")
        return 2
    if args.quick:
        batches, prompts, news = [8], [1024], [128]
    else:
        batches, prompts, news = [1, 8, 32], [1024, 4096, 8192], [256, 1024]
    batches = args.batch or batches
    prompts = args.prompt or prompts
    news = args.new_tokens or news
    if args.tiny:  # a smoke run: small shapes, each once
        prompts = sorted({min(p, 64) for p in prompts}) if not args.prompt else prompts
        news = sorted({min(n, 16) for n in news}) if not args.new_tokens else news
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: extra threads only spin against other processes
    t0 = time.perf_counter()
    model = _build_model(args, device, dtype)
    print(f"model built in {time.perf_counter() - t0:.1f} s ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params)")

    if args.beam:
        from torch_vkv.bench.hf_beam import run_beam

        return run_beam(args, model, device, ("python -m torch_vkv bench hf " + " ".join(argv or [])).strip())

    rows: list[dict[str, Any]] = []
    checks: list[str] = []
    for batch in batches:
        for prompt in prompts:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=g).to(device)
            for new in news:
                # Prefill time (one new token, DynamicCache, sdpa): subtracted for decode tok/s.
                prefill_s = _prefill_seconds(model, ids, device)
                group = []
                caps = {"server": max(args.max_cache_len, prompt + new), "exact": prompt + new}
                for variant in args.variants:
                    # Capacity matters to the caches that hold it (static, compiled vkv):
                    # both, side by side; the others run once.
                    kinds = args.capacities if variant in COMPILED else args.capacities[:1]
                    for kind in kinds:
                        row = _run_variant(variant, model, ids, new, device, prefill_s, caps[kind], kind,
                                           profile=args.profile)  # fmt: skip
                        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "_tokens"})
                        group.append(row)
                checks += _check_group(group, model, batch)
                ref = next((r for r in group if "_tokens" in r), None)
                ref_tokens = ref["_tokens"] if ref is not None else None
                for r in group:
                    if "_tokens" in r:
                        r["same_tokens_as_" + ref["variant"]] = float((r["_tokens"] == ref_tokens).float().mean())
                for r in group:
                    r.pop("_tokens", None)
                rows.extend(group)

    cmd = "python -m torch_vkv bench hf " + " ".join(argv or [])
    summary = "\n".join(
        [f"Capacity 'server': max_cache_len = max({args.max_cache_len}, prompt + new), as a server sizes rows; "
         "'exact': prompt + new tokens. Compiled caches run at both, side by side.",
         "Targets: vkv_interleaved_compiled >= 0.95x vkv_compiled tok/s and vkv_compiled >= 0.98x static tok/s "
         "(same capacity); at capacity 'exact' "
         "vkv_interleaved_compiled >= 1.2x static tok/s with KV <= DynamicCache's + one page per buffer and "
         "sequence (interleaved: one buffer); every VirtualKVCache KV <= that bound.",
         "",
         "torch_peak_gib counts VirtualKVCache's whole *virtual* reservation (torch sees a VMM tensor's full "
         "size); driver_peak_gib (total - free, polled) and kv_bytes (committed) show what is backed. "
         "decode_tok_s subtracts the DynamicCache prefill time, so it also carries VirtualKVCache's prefill "
         "page commits.", ""] + [f"- {c}" for c in checks]
    )  # fmt: skip
    columns = ["variant", "capacity", "max_cache_len", "batch", "prompt", "new_tokens", "tok_s", "decode_tok_s", "seconds", "warmup_s",
               "torch_peak_gib", "driver_peak_gib", "kv_bytes", "error"]  # fmt: skip
    columns += sorted({k for r in rows for k in r if k.startswith("same_tokens")})
    if args.profile:  # one step per new token: "per iteration" is per decode step (the prefill spread over them)
        summary += "\n\n" + "\n".join(profile_lines(rows, labels=("variant", "capacity")))
    write_report(args.name, rows, args.out_dir, command=cmd.strip(), columns=columns, summary=summary)
    return 0


def _prefill_seconds(model, ids, device: torch.device) -> float:
    """Seconds of a one-new-token generate() (the prefill), DynamicCache + sdpa; 0 if it runs out of memory."""
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    try:
        _generate(model, ids, DynamicCache(config=model.config), 1, compiled=False)  # warm
        sync(device)
        t = time.perf_counter()
        _generate(model, ids, DynamicCache(config=model.config), 1, compiled=False)
        sync(device)
        return time.perf_counter() - t
    except torch.OutOfMemoryError:
        return 0.0
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _check_group(group: list[dict[str, Any]], model, batch: int) -> list[str]:
    """Target checks for one (batch, prompt, new tokens) configuration, per capacity."""
    out = []
    g = group[0]
    dyn = next((r for r in group if r["variant"] == "dynamic" and "error" not in r), None)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    for kind in ("server", "exact"):
        by = {r["variant"]: r for r in group if r["capacity"] == kind and "error" not in r}
        cfg = f"batch {g['batch']}, prompt {g['prompt']}, new {g['new_tokens']}, capacity {kind}"
        inter, per_layer, static = by.get("vkv_interleaved_compiled"), by.get("vkv_compiled"), by.get("static")
        if inter and per_layer:
            ratio = inter["tok_s"] / per_layer["tok_s"]
            out.append(f"{cfg}: vkv_interleaved_compiled / vkv_compiled tok/s = {ratio:.3f} ({verdict(ratio >= 0.95)} >= 0.95)")
        if per_layer and static:
            ratio = per_layer["tok_s"] / static["tok_s"]
            out.append(f"{cfg}: vkv_compiled / static tok/s = {ratio:.3f} ({verdict(ratio >= 0.98)} >= 0.98)")
        if inter and static and kind == "exact":
            ratio = inter["tok_s"] / static["tok_s"]
            out.append(f"{cfg}: vkv_interleaved_compiled / static tok/s = {ratio:.3f} ({verdict(ratio >= 1.2)} >= 1.2)")
        if dyn is None:
            continue
        for v in ("vkv", "vkv_compiled", "vkv_interleaved_compiled"):
            if v in by:
                bound = dyn["kv_bytes"] + by[v]["page_size"] * by[v]["kv_buffers"] * batch
                extra = f", {by[v]['kv_bytes'] / max(static['kv_bytes'], 1):.2f}x static's" if static else ""
                out.append(f"{cfg}: {v} KV {by[v]['kv_bytes'] / 2**20:.1f} MiB <= dynamic + 1 page/buffer/seq "
                           f"{bound / 2**20:.1f} MiB: {verdict(by[v]['kv_bytes'] <= bound)}{extra}")  # fmt: skip
    return out
