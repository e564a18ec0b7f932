"""``python -m torch_vkv demo``: generate with a small Llama and compare KV memory.

Builds a small Llama-architecture model with random weights from a config (no
downloads; ``--model PATH`` loads a local checkpoint instead), generates the
same greedy continuation of a left-padded batch with ``VirtualKVCache``,
``DynamicCache`` and ``StaticCache``, and prints what each holds for KV::

    VirtualKVCache  committed  = pages backing the tokens used (+ page rounding)
    DynamicCache    allocated  = the tokens used (reallocated as it grows)
    StaticCache     allocated  = max_cache_len for every row, from the start

Without transformers it runs a self-contained decode loop through
:class:`torch_vkv.KVCache` instead, and says so.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional, Sequence

import torch

from torch_vkv._checks import device_arg, local_dir_arg, page_size_arg, positive_int_arg

__all__ = ["main"]


def _fmt(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.2f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.2f} GiB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torch_vkv demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="PATH", type=local_dir_arg,
                   help="a local transformers checkpoint (default: random small Llama)")
    p.add_argument("--device", default=None, type=device_arg, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch", type=positive_int_arg, default=4, help="prompts in the batch (default 4)")
    p.add_argument("--prompt-len", type=positive_int_arg, default=48, help="longest prompt, tokens (default 48)")
    p.add_argument("--new-tokens", type=positive_int_arg, default=64, help="tokens to generate (default 64)")
    p.add_argument("--max-cache-len", type=positive_int_arg, default=None,
                   help="cache capacity per row (default 2048 on the CPU, 32768 on CUDA)")  # fmt: skip
    p.add_argument("--layout", choices=("per_layer", "interleaved"), default=None,
                   help="VirtualKVCache layout (default per_layer on the CPU; interleaved on CUDA, where a "
                   "2 MiB page would otherwise hold thousands of one small layer's tokens)")  # fmt: skip
    p.add_argument("--attn", default="vkv", help="attention implementation for VirtualKVCache (default vkv)")
    p.add_argument("--page-size", type=page_size_arg, default=16 << 10,
                   help="host page bytes on the CPU (default 16 KiB; CUDA uses the driver's 2 MiB)")  # fmt: skip
    p.add_argument("--threads", type=positive_int_arg, default=1,
                   help="CPU threads for torch (default 1: the model is small, and extra threads spin "
                   "against other processes)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-transformers", action="store_true", help="run the KVCache-only fallback loop")
    return p


class _UsageError(ValueError):
    """An argument found bad only once used (``--attn``, a ``--model`` folder that is no checkpoint): exit 2."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.max_cache_len is None:
        args.max_cache_len = 2048 if device.type == "cpu" else 32768
    if args.layout is None:
        args.layout = "per_layer" if device.type == "cpu" else "interleaved"
    if args.prompt_len + args.new_tokens > args.max_cache_len:
        parser.error(f"--prompt-len + --new-tokens must fit in --max-cache-len: expected <= {args.max_cache_len}, "
                     f"got {args.prompt_len + args.new_tokens}")  # fmt: skip
    torch.manual_seed(args.seed)
    try:
        if args.no_transformers:
            print("--no-transformers: running the KVCache-only decode loop\n")
            return _kvcache_only(args, device)
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: running the KVCache-only decode loop instead "
                  "(pip install 'torch_vkv[hf]' for the Hugging Face demo)\n")  # fmt: skip
            return _kvcache_only(args, device)
        return _hf_demo(args, device)
    except _UsageError as e:
        parser.error(str(e))


# ------------------------------------------------------------------------------
# with transformers
# ------------------------------------------------------------------------------


def _progress(total: int, desc: str) -> Any:
    """A generate() streamer that advances a tqdm bar by one per new token."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class _Bar(BaseStreamer):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc=desc, unit="tok", leave=True)
            self.first = True

        def put(self, value: torch.Tensor) -> None:
            if self.first:  # the prompt
                self.first = False
                return
            self.bar.update(1)

        def end(self) -> None:
            self.bar.close()

    return _Bar()


def _small_llama(device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()  # small: random init is quick


def _kv_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache's layer tensors."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _hf_demo(args: argparse.Namespace, device: torch.device) -> int:
    from transformers import DynamicCache, StaticCache

    from torch_vkv.hf import VirtualKVCache

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.model:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:  # no config.json, an unknown model_type, no weights
            raise _UsageError(f"argument --model: expected a transformers causal LM checkpoint, got {args.model!r} "
                              f"({e})") from None  # fmt: skip
        model = model.to(device).eval()
        source = args.model
    else:
        model = _small_llama(device, dtype)
        source = "random small Llama (4 layers, hidden 256, 8 heads, 2 KV heads)"
    cfg = model.config
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    pad = model.generation_config.pad_token_id
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    try:
        model.set_attn_implementation(args.attn)  # before any cache is built
    except (ImportError, ValueError) as e:
        raise _UsageError(f"argument --attn: expected an attention implementation this process can run "
                          f"(vkv, sdpa, eager, ...), got {args.attn!r} ({e})") from None  # fmt: skip
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, min(cfg.vocab_size, 32000), (B, P), generator=g)
    mask = torch.ones_like(ids)
    lens = [max(1, P - (P * i) // (2 * B)) for i in range(B)]  # left-padded prompts of several lengths
    for i, n in enumerate(lens):
        mask[i, : P - n] = 0
    ids = ids.masked_fill(mask == 0, pad).to(device)
    mask = mask.to(device)
    print(f"model: {source} on {device} ({dtype})")
    print(f"batch {B}, prompts {min(lens)}-{max(lens)} tokens (left padded to {P}), {N} new tokens, "
          f"max_cache_len {args.max_cache_len}\n")  # fmt: skip

    compiled = device.type == "cuda"  # generate()'s automatic compilation: CUDA graphs

    def run(cache: Any, impl: str, desc: str, compile_: bool):
        model.set_attn_implementation(impl)
        warm = 0.0
        if compile_:  # compile and capture once on this cache, then time a fresh run on it
            t = time.perf_counter()
            _generate(model, ids, mask, cache, min(N, 8), None, compile_)
            torch.cuda.synchronize()
            warm = time.perf_counter() - t
            cache.reset()
        t = time.perf_counter()
        out = _generate(model, ids, mask, cache, N, _progress(N, desc), compile_)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t, warm

    kw = {"page_size": args.page_size} if device.type == "cpu" else {}
    try:  # device and dtype given: its KVCache is built now, so a capacity too large for the address space
        vcache = VirtualKVCache(cfg, B, args.max_cache_len, layout=args.layout, device=device, dtype=model.dtype, **kw)
    except ValueError as e:  # is a usage error here, not a traceback from inside generate()
        raise _UsageError(f"argument --max-cache-len: {e}") from None
    out_v, t_v, w_v = run(vcache, args.attn, f"VirtualKVCache ({args.attn})", compiled and args.attn == "vkv")
    dcache = DynamicCache(config=cfg)
    out_d, t_d, _ = run(dcache, "sdpa", "DynamicCache (sdpa)", False)
    scache = StaticCache(config=cfg, max_cache_len=args.max_cache_len)
    out_s, t_s, w_s = run(scache, "sdpa", "StaticCache (sdpa)", compiled)

    stats = vcache.memory_stats()
    mode = lambda w: f"compiled, CUDA graphs; warm-up {w:.1f} s not timed" if w else "eager"  # noqa: E731
    rows = [
        ("VirtualKVCache", "committed", stats["committed_bytes"], t_v,
         f"{mode(w_v)}; virtual {_fmt(stats['reserved_bytes'])}, page {_fmt(stats['page_size'])}"),
        ("DynamicCache", "allocated", _kv_bytes(dcache), t_d, "eager; grows by reallocation"),
        ("StaticCache", "allocated", _kv_bytes(scache), t_s, f"{mode(w_s)}; max_cache_len for every row"),
    ]  # fmt: skip
    print(f"\nKV memory after the same run ({stats['tokens']} tokens stored by VirtualKVCache):")
    for name, what, nbytes, secs, note in rows:
        print(f"  {name:<15} {what:<10} {_fmt(nbytes):>12}   {N * B / secs:8.1f} new tok/s   ({note})")
    kv = vcache.kv_cache
    buffers_per_row = 2 * kv.num_layers if kv.layout == "per_layer" else 1
    bound = _kv_bytes(dcache) + kv.page_size * buffers_per_row * B
    print(f"  (VirtualKVCache: layout {kv.layout}, at most DynamicCache + one page per buffer and row = "
          f"{_fmt(bound)}; it stores no left padding)")  # fmt: skip
    outs = {"VirtualKVCache": out_v, "DynamicCache": out_d, "StaticCache": out_s}
    if dtype == torch.float32 and device.type == "cpu":
        _print_exact(outs, P)
    else:
        _print_agreement(model, outs, mask, P)
    vcache.close()
    return 0


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any, n: int, streamer: Any, compile_: bool):
    from torch_vkv.hf import generate_kwargs

    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, **generate_kwargs(cache), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, streamer=streamer, disable_compile=not compile_,
        )  # fmt: skip


def _print_exact(outs: dict, prompt_len: int) -> None:
    """CPU, float32: the three caches must give the very same tokens."""
    names = list(outs)
    ref = outs[names[1]]  # DynamicCache, transformers' default
    diffs = []
    for name in (names[0], names[2]):
        if not torch.equal(outs[name], ref):
            row, col = (outs[name] != ref).nonzero()[0].tolist()
            diffs.append(f"{name} differs from DynamicCache at row {row}, new token {col - prompt_len}")
    if not diffs:
        print("\nsame tokens from all three caches: yes (exact equality, float32 on the CPU)")
    else:
        print("\nsame tokens from all three caches: no: " + "; ".join(diffs)
              + " (float32 on the CPU should agree exactly: please report this)")  # fmt: skip


# Near-tie rule of the GPU tests (docs/hf.md): float16 logits within ATOL * max(1, max|logit|).
_NEAR_TIE = {torch.float16: 6e-2, torch.bfloat16: 6e-2, torch.float32: 1e-2}


def _print_agreement(model: Any, outs: dict, mask: torch.Tensor, prompt_len: int) -> None:
    """GPU (or a non-float32 model): each cache's tokens against a float32 copy
    of the model, teacher-forced on that cache's own tokens. A token agrees if
    it is the reference's argmax, or within a near tie of it (kernels in
    float16 round differently, so near ties may flip; the history then differs,
    which is why each cache is judged on its own tokens)."""
    import copy

    dtype = next(model.parameters()).dtype
    tol = _NEAR_TIE.get(dtype, 6e-2)
    ref = copy.deepcopy(model).float()
    ref.set_attn_implementation("sdpa")
    print(f"\nagreement with a float32 reference ({dtype} model): a token agrees if it is the reference's "
          f"argmax, or within a near tie (top logit - its logit <= {tol:g} * max(1, max |logit|))")  # fmt: skip
    for name, out in outs.items():
        full = torch.cat([mask, torch.ones_like(out[:, prompt_len:])], 1)
        pos = (full.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = ref(out, attention_mask=full, position_ids=pos, use_cache=False).logits.float()
        pred = logits[:, prompt_len - 1 : -1]
        chosen = pred.gather(-1, out[:, prompt_len:, None]).squeeze(-1)
        top = pred.max(-1).values
        scale = max(1.0, float(top.abs().max()))
        exact = chosen == top
        near = ~exact & (top - chosen <= tol * scale)
        off = int((~exact & ~near).sum())
        verdict = "agrees" if off == 0 else f"{off} token(s) outside the tolerance"
        print(f"  {name:<15} {int(exact.sum())}/{exact.numel()} argmax, {int(near.sum())} near ties: {verdict}")
    del ref


# ------------------------------------------------------------------------------
# without transformers: a decode loop through KVCache
# ------------------------------------------------------------------------------


def _kvcache_only(args: argparse.Namespace, device: torch.device) -> int:
    """A 4-layer attention-only toy model decoding token by token through KVCache:
    commit (``step``), write K/V at the new position (``append_kv``), attend over
    the valid rows (``attention``)."""
    from torch_vkv import KVCache, append_kv, attention

    L, H, H_kv, D, V = 4, 8, 2, 32, 2048
    B, P, N, S = args.batch, args.prompt_len, args.new_tokens, args.max_cache_len
    dtype = torch.float32
    emb = torch.randn(V, H * D, device=device) * 0.1
    wq = [torch.randn(H * D, H * D, device=device) / (H * D) ** 0.5 for _ in range(L)]
    wk = [torch.randn(H * D, H_kv * D, device=device) / (H * D) ** 0.5 for _ in range(L)]
    wv = [torch.randn(H * D, H_kv * D, device=device) / (H * D) ** 0.5 for _ in range(L)]
    kw = {"page_size": args.page_size} if device.type == "cpu" else {}
    try:
        cache = KVCache(L, H_kv, D, max_batch_size=B, max_seq_len=S, dtype=dtype, device=device, **kw)
    except ValueError as e:  # a capacity too large for the address space
        raise _UsageError(f"argument --max-cache-len: {e}") from None
    slots = [cache.alloc() for _ in range(B)]
    lens = [max(1, P - (P * i) // (2 * B)) for i in range(B)]
    tokens = [torch.randint(3, V, (n,)).tolist() for n in lens]
    total = [n + N for n in lens]  # tokens each row ends with
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    steps = range(max(total) - 1)
    t0 = time.perf_counter()
    for t in tqdm(steps, desc="KVCache decode loop", unit="step") if tqdm else steps:
        # Every row feeds its token t (prompt, then generated): a token-by-token prefill, then decode.
        active = [b for b in range(B) if t < total[b] - 1]
        cache.step({slots[b]: t + 1 for b in active})  # commit first: rows [0, t+1) are backed
        x = emb[torch.tensor([tokens[b][t] for b in active], device=device)]
        rows = torch.tensor([slots[b] for b in active], dtype=torch.int32, device=device)  # cache row of each request
        cache_seqlens = torch.full((len(active),), t + 1, dtype=torch.int32, device=device)  # new token included
        for layer in range(L):
            kc, vc = cache.key(layer), cache.value(layer)
            k_new = (x @ wk[layer]).view(-1, H_kv, D)
            v_new = (x @ wv[layer]).view(-1, H_kv, D)
            append_kv(kc, vc, k_new, v_new, cache_seqlens, slots=rows)  # writes row t of each request
            q = (x @ wq[layer]).view(-1, H, D)
            x = x + attention(q, kc, vc, cache_seqlens, slots=rows).reshape(-1, H * D)
        nxt = (x @ emb.T).argmax(-1).tolist()
        for i, b in enumerate(active):
            if t + 1 >= len(tokens[b]):
                tokens[b].append(nxt[i])
    secs = time.perf_counter() - t0
    stats = cache.memory_stats()
    itemsize = torch.empty((), dtype=dtype).element_size()
    static = 2 * L * B * S * H_kv * D * itemsize
    used = sum(n - 1 for n in total) * cache.bytes_per_token
    print(f"\n{B} rows, {sum(total)} tokens, {secs:.2f} s")
    print(f"  KVCache committed       {_fmt(stats['committed_bytes']):>12}  (page {_fmt(stats['page_size'])})")
    print(f"  tokens x bytes/token    {_fmt(used):>12}  (what a growing cache would hold)")
    print(f"  static allocation       {_fmt(static):>12}  (max_seq_len {S} for every row)")
    cache.close()
    return 0
