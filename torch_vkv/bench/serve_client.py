"""Load client for any OpenAI-compatible server: ``python -m torch_vkv bench serve --url http://HOST:PORT``.

Sends a workload (:mod:`.workloads`: a trace's lengths or nano-vllm's uniform
lengths, Poisson arrivals) to ``POST /v1/completions`` with streaming, so time
to first token (TTFT) and inter-token latency (ITL) are measured at the client,
as a user sees them. Prompts are random token ids of the trace's lengths (a
list of ids is a valid OpenAI ``prompt``; vLLM, SGLang and ``torch_vkv serve``
accept it) and every request asks for its trace output length with
``ignore_eos`` (an extension vLLM and SGLang accept; ``--no-ignore-eos`` drops it).

Per request: TTFT, ITL (between streamed chunks), TPOT ((e2e - TTFT) /
(output tokens - 1)), end-to-end latency and latency per output token; the
report (JSON with every request, and a markdown table) gives mean, p50, p90
and p99 of each, throughput, and goodput (requests meeting ``--ttft-slo`` and
``--tpot-slo``). :class:`RequestResult` and :func:`summarize` do not depend on
HTTP: an in-process benchmark can fill them from the engine's metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch_vkv._checks import positive_int_arg as _positive
from torch_vkv._checks import out_dir_arg
from torch_vkv.bench.workloads import TRACES, WORKLOADS, RequestSpec, make_requests, workload_lengths

__all__ = ["RequestResult", "build_parser", "main", "run_workload", "summarize"]

SMOKE = {"num_requests": 8, "max_prompt_tokens": 64, "max_output_tokens": 16}


@dataclass
class RequestResult:
    """What one request measured (seconds; ``start_s`` from the run's start)."""

    index: int
    prompt_tokens: int
    expected_output_tokens: int
    start_s: float = 0.0
    ok: bool = False
    error: Optional[str] = None
    output_tokens: int = 0
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    #: Arrival to first scheduled (in process only: a server does not say): the part of TTFT spent waiting.
    queue_s: Optional[float] = None

    @property
    def tpot_s(self) -> Optional[float]:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        return d


def _pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation, as numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: Sequence[RequestResult], duration_s: float, *, ttft_slo_s: Optional[float] = None,
              tpot_slo_s: Optional[float] = None) -> dict[str, Any]:  # fmt: skip
    """One row of numbers for a run: counts, throughput, and mean/p50/p90/p99
    of TTFT, TPOT, ITL, e2e latency and e2e latency per output token (and of
    the queueing part of TTFT, ``queue_*``, when the results have it)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    row: dict[str, Any] = {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else math.nan,
        "output_tokens_per_s": out_tokens / duration_s if duration_s > 0 else math.nan,
        "total_tokens_per_s": (in_tokens + out_tokens) / duration_s if duration_s > 0 else math.nan,
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
    }  # fmt: skip
    series = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [x for r in ok for x in r.itl_s],
        "e2e": [r.e2e_s for r in ok if r.e2e_s is not None],
        "norm_latency": [r.e2e_s / r.output_tokens for r in ok if r.e2e_s is not None and r.output_tokens > 0],
    }
    queue = [r.queue_s for r in ok if r.queue_s is not None]
    if queue:
        series["queue"] = queue
    for name, values in series.items():
        row[f"{name}_mean_s"] = sum(values) / len(values) if values else math.nan
        for q in (50, 90, 99):
            row[f"{name}_p{q}_s"] = _pct(values, q)
    if ttft_slo_s is not None or tpot_slo_s is not None:
        good = [r for r in ok if (ttft_slo_s is None or (r.ttft_s is not None and r.ttft_s <= ttft_slo_s))
                and (tpot_slo_s is None or r.tpot_s is None or r.tpot_s <= tpot_slo_s)]  # fmt: skip
        row["goodput_requests_per_s"] = len(good) / duration_s if duration_s > 0 else math.nan
        row["goodput_fraction"] = len(good) / len(results) if results else math.nan
        row["ttft_slo_s"], row["tpot_slo_s"] = ttft_slo_s, tpot_slo_s
    return row


async def _send(client: Any, model: str, spec: RequestSpec, prompt: list[int], t0: float, *, ignore_eos: bool,
                extra: dict) -> RequestResult:  # fmt: skip
    res = RequestResult(spec.index, spec.prompt_tokens, spec.output_tokens)
    delay = t0 + spec.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {"model": model, "prompt": prompt, "max_tokens": spec.output_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    if ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    res.start_s = start - t0
    last = None
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    res.error = json.dumps(ev["error"])[:300]
                    return res
                now = time.perf_counter()
                if ev.get("usage"):
                    res.output_tokens = int(ev["usage"].get("completion_tokens", 0))
                for c in ev.get("choices") or ():
                    if c.get("finish_reason"):
                        res.finish_reason = c["finish_reason"]
                    if not c.get("text") and not c.get("finish_reason"):
                        continue
                    chunks += 1
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
        res.e2e_s = time.perf_counter() - start
        if res.output_tokens == 0:
            res.output_tokens = chunks  # a server that sends no usage: one token a chunk
        res.ok = res.ttft_s is not None
        if not res.ok:
            res.error = "no output"
    except Exception as exc:  # a transport error fails this request, not the run
        res.error = f"{type(exc).__name__}: {exc}"
    return res


#: Goodput's targets when ``--ttft-slo`` / ``--tpot-slo`` are not given (those of the in-process runs).
DEFAULT_TTFT_SLO_S, DEFAULT_TPOT_SLO_S = 2.0, 0.1

#: Prompt ids are drawn below this when neither ``--vocab-size`` nor the server's model card (``vocab_size``,
#: which torch_vkv's server lists) says the model's vocabulary.
DEFAULT_VOCAB_SIZE = 32000


async def run_workload(url: str, specs: Sequence[RequestSpec], *, model: Optional[str] = None,
                       vocab_size: Optional[int] = None,
                       ignore_eos: bool = True, seed: int = 0, timeout_s: float = 3600.0,
                       extra_body: Optional[dict] = None) -> tuple[list[RequestResult], float, str]:  # fmt: skip
    """Sends ``specs`` to the server at ``url``; returns the results (in
    ``specs`` order), the run's duration and the model name used.

    ``model`` ``None``: the first of the server's ``/v1/models``. ``vocab_size``
    ``None``: the model card's ``vocab_size`` when the server lists one (torch_vkv's
    does), else :data:`DEFAULT_VOCAB_SIZE`; prompts are random ids below it."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout_s, limits=limits) as client:
        cards: list = []
        if model is None or vocab_size is None:
            try:
                r = await client.get("/v1/models")
                r.raise_for_status()
                cards = [c for c in r.json()["data"] if isinstance(c, dict)]
                model = model if model is not None else cards[0]["id"]
            except (httpx.HTTPError, ValueError, LookupError, TypeError) as e:
                if model is None:
                    raise ConnectionError(f"{url.rstrip('/')}/v1/models: expected an OpenAI-compatible server's model "
                                          f"list (is it up? --model skips this), got {type(e).__name__}: {e}") from None
        if vocab_size is None:
            listed = next((c.get("vocab_size") for c in cards if c.get("id") == model), None)
            vocab_size = listed if isinstance(listed, int) and listed > 0 else DEFAULT_VOCAB_SIZE
        rng = random.Random(seed)
        prompts = [[rng.randrange(vocab_size) for _ in range(s.prompt_tokens)] for s in specs]
        t0 = time.perf_counter()
        tasks = [_send(client, model, s, p, t0, ignore_eos=ignore_eos, extra=extra_body or {})
                 for s, p in zip(specs, prompts)]  # fmt: skip
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return list(results), duration, model


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"expected a URL such as http://127.0.0.1:8000, got {text!r}")
    return text


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests/s (a number or inf), got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a rate > 0, got {text!r}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v < math.inf:  # NaN too: an SLO or timeout that no request could meet or that means nothing
        raise argparse.ArgumentTypeError(f"expected seconds > 0 (a finite number), got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torch_vkv bench serve",
                                description="Serving benchmark over the OpenAI protocol (streaming).")  # fmt: skip
    p.add_argument("--url", default=None, type=_url, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--trace", choices=WORKLOADS, default="arxiv_summarization",
                   help=f"request lengths: a trace ({', '.join(TRACES)}) or 'uniform' (nano-vllm: [100, 1024])")
    p.add_argument("--num-requests", type=_positive, default=None, help="default 100 (--smoke: 8)")
    p.add_argument("--request-rate", type=_rate, default=math.inf, help="Poisson arrivals, requests/s (default inf: "
                   "all at t=0)")  # fmt: skip
    p.add_argument("--max-prompt-tokens", type=_positive, default=None, help="clip prompt lengths (small servers)")
    p.add_argument("--max-output-tokens", type=_positive, default=None, help="clip output lengths")
    p.add_argument("--vocab-size", type=_positive, default=None,
                   help=f"random prompt ids are below this (default: the server's model card's vocab_size, "
                        f"else {DEFAULT_VOCAB_SIZE})")  # fmt: skip
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (strict OpenAI servers)")
    # None: 2 s / 0.1 s (in process, --smoke on a CPU: 60 s each), set where the mode is known
    p.add_argument("--ttft-slo", type=_seconds, default=None, help="goodput: TTFT target in seconds (default 2)")
    p.add_argument("--tpot-slo", type=_seconds, default=None, help="goodput: TPOT target in seconds (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=_seconds, default=3600.0, help="seconds per request")
    p.add_argument("--smoke", action="store_true",
                   help=f"a tiny run: {SMOKE['num_requests']} requests, lengths clipped to "
                        f"{SMOKE['max_prompt_tokens']}/{SMOKE['max_output_tokens']}")  # fmt: skip
    p.add_argument("--out", default=None, type=out_dir_arg,
                   help="report folder (default $TORCH_VKV_BENCH_DIR or ./bench_out)")
    return p


def main(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> int:
    from torch_vkv.bench.report import write_report

    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.url is None:
        parser.error("--url is required by the load client")
    n = args.num_requests or (SMOKE["num_requests"] if args.smoke else 100)
    max_p = args.max_prompt_tokens or (SMOKE["max_prompt_tokens"] if args.smoke else None)
    max_o = args.max_output_tokens or (SMOKE["max_output_tokens"] if args.smoke else None)
    specs = make_requests(workload_lengths(args.trace, n, args.seed), request_rate=args.request_rate,
                          seed=args.seed, max_prompt_tokens=max_p, max_output_tokens=max_o)  # fmt: skip
    try:
        results, duration, model = asyncio.run(run_workload(
            args.url, specs, model=args.model, vocab_size=args.vocab_size, ignore_eos=not args.no_ignore_eos,
            seed=args.seed, timeout_s=args.timeout))  # fmt: skip
    except ConnectionError as e:
        raise SystemExit(f"bench serve: {e}") from None
    row = summarize(results, duration, ttft_slo_s=args.ttft_slo or DEFAULT_TTFT_SLO_S,
                    tpot_slo_s=args.tpot_slo or DEFAULT_TPOT_SLO_S)  # fmt: skip
    row = {"url": args.url, "model": model, "trace": args.trace, "request_rate": args.request_rate, **row}
    command = "python -m torch_vkv bench serve " + " ".join(sys.argv[3:] if argv is None else argv)
    columns = ["trace", "request_rate", "completed", "failed", "duration_s", "output_tokens_per_s",
               "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s",
               "e2e_p50_s", "e2e_p99_s", "norm_latency_p50_s", "norm_latency_p99_s"]  # fmt: skip
    if "goodput_requests_per_s" in row:
        columns.append("goodput_requests_per_s")
    errors = sorted({r.error for r in results if r.error})
    summary = f"{len(specs)} requests to {args.url} ({model}), trace {args.trace}, rate {args.request_rate}/s"
    if errors:
        summary += "\n\nerrors: " + "; ".join(errors[:5])
    md = write_report("serve_client", [row], args.out, command=command, columns=columns, summary=summary)
    path = Path(md).with_suffix(".json")
    report = json.loads(path.read_text())
    report["requests"] = [dict(s.to_dict(), **r.to_dict()) for s, r in zip(specs, results)]
    path.write_text(json.dumps(report, indent=1))
    return 0 if not errors else 1
