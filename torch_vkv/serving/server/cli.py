"""The ``serve`` command: ``python -m torch_vkv serve --model PATH [...]``.

:func:`main` parses the arguments, loads the model into an :class:`LLM`,
builds the app and runs it with :func:`serve` (uvicorn) until SIGINT/SIGTERM,
which abort every request in flight, end the streams and close the engine;
the process then exits with 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence
from typing import Any, Optional

from torch_vkv._checks import device_arg, local_dir_arg, port_arg
from torch_vkv._checks import non_negative_int_arg as _non_negative
from torch_vkv._checks import positive_int_arg as _positive
from torch_vkv.serving.llm import LLM
from torch_vkv.serving.server.app import create_app
from torch_vkv.serving.server.loop import DEFAULT_MAX_WAITING, EngineLoop

__all__ = ["DTYPES", "build_parser", "main", "parse_bytes", "serve"]

log = logging.getLogger("torch_vkv.serve")


def serve(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Runs ``app`` with uvicorn until SIGINT/SIGTERM. On a signal, every
    request in flight is aborted at once (their streams end with
    ``finish_reason="abort"``), then connections close, the engine loop stops
    and the engine is closed; returns normally (exit status 0)."""
    import uvicorn

    loop: EngineLoop = app.state.engine_loop

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn would re-raise the signal after its shutdown (exit status
            # 128 + sig); a requested shutdown is a clean exit here.
            loop.abort_all()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="on")  # fmt: skip
    _Server(config).run()


def parse_bytes(text: str) -> int:
    """``argparse`` type: a size in bytes, with an optional unit (``4096``, ``64KiB``, ``8GiB``)."""
    units = {"": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}  # fmt: skip
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    unit = t[len(num) :]
    try:
        if unit not in units:
            raise ValueError
        value = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes (e.g. 4096, 64KiB, 8GiB), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


DTYPES = ("auto", "float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    """The ``serve`` command's arguments."""
    from torch_vkv.attention import BACKENDS
    from torch_vkv.cache import LAYOUTS
    from torch_vkv.serving.engine import KV_KINDS

    p = argparse.ArgumentParser(prog="python -m torch_vkv serve",
                                description="An OpenAI-compatible HTTP server on the torch_vkv engine.")  # fmt: skip
    p.add_argument("--model", required=True, type=local_dir_arg, help="local checkpoint path (transformers causal LM)")
    p.add_argument("--tokenizer", default=None, type=local_dir_arg, help="tokenizer path (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=port_arg, default=8000, help="TCP port (default %(default)s)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--max-waiting", type=_non_negative, default=DEFAULT_MAX_WAITING,
                   help="requests allowed to wait beyond the running ones; more answer 503 (default %(default)s)")
    e = p.add_argument_group("engine")
    e.add_argument("--kv", choices=KV_KINDS, default="virtual",
                   help="KV memory: virtual (torch_vkv) or paged (block table) (default %(default)s)")
    e.add_argument("--layout", choices=LAYOUTS, default="per_layer",
                   help="virtual KV layout (default %(default)s)")
    e.add_argument("--max-batch-size", type=_positive, default=16,
                   help="requests running at once (default %(default)s)")
    e.add_argument("--max-seq-len", type=_positive, default=None,
                   help="default: the model's max_position_embeddings, at most 8192")
    e.add_argument("--memory-budget", type=parse_bytes, default=None, help="KV memory in bytes (4096, 512MiB, 8GiB)")
    e.add_argument("--page-size", type=parse_bytes, default=None, help="host backend page size in bytes")
    e.add_argument("--block-size", type=_positive, default=16, help="tokens per block (--kv paged)")
    e.add_argument("--chunk-size", type=_positive, default=512, help="token budget of one iteration")
    e.add_argument("--attention-backend", choices=tuple(dict.fromkeys(("auto", *BACKENDS))), default="auto",
                   help="attention kernels (default %(default)s: the fastest one installed for each call)")
    e.add_argument("--no-cuda-graphs", action="store_true", help="do not replay CUDA graphs for decodes")
    e.add_argument("--compile", action="store_true",
                   help="torch.compile decode steps (faster decodes; about a minute of compiling at start)")
    e.add_argument("--no-prewarm", action="store_true",
                   help="no eager allocation: free slots get pages only when a request arrives")
    e.add_argument("--device", default=None, type=device_arg, help="default: cuda when present, else cpu")
    e.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model and KV dtype (default %(default)s: the checkpoint's)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="(default %(default)s)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m torch_vkv serve``: loads the model, serves until SIGINT/SIGTERM; returns 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import os

    import torch

    from torch_vkv.errors import KVCacheCapacityError

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    kwargs: dict[str, Any] = {
        "kv": args.kv, "layout": args.layout, "max_batch_size": args.max_batch_size,
        "memory_budget": args.memory_budget, "page_size": args.page_size, "block_size": args.block_size,
        "chunk_size": args.chunk_size, "attention_backend": args.attention_backend,
        "cuda_graphs": not args.no_cuda_graphs, "compile": args.compile, "prewarm": not args.no_prewarm,
        "device": args.device,
        "dtype": None if args.dtype == "auto" else getattr(torch, args.dtype),
    }  # fmt: skip
    if args.max_seq_len is not None:
        kwargs["max_seq_len"] = args.max_seq_len
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"argument --model: expected a transformers checkpoint folder (with a config.json), "
                     f"got {args.model!r}")  # fmt: skip
    try:
        llm = LLM(args.model, tokenizer=args.tokenizer, **kwargs)
    except (ValueError, TypeError, OSError, KVCacheCapacityError) as e:  # an engine option or a folder refused
        parser.error(f"cannot serve with these arguments: {e}")
    app = create_app(llm, served_model_name=args.served_model_name or args.model, max_waiting=args.max_waiting)
    log.info("serving %s on http://%s:%d (max_batch_size=%d, max_seq_len=%d, kv=%s)", app.state.served_model_name,
             args.host, args.port, llm.engine.max_batch_size, llm.engine.max_seq_len, args.kv)  # fmt: skip
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
