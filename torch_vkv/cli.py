"""Command line: ``python -m torch_vkv {info,demo,serve,bench}``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

BENCHMARKS = ("alloc", "kernels", "hf", "serve")


def info() -> int:
    """Prints the backends, their page granularity and the devices."""
    import torch

    import torch_vkv
    from torch_vkv._ext import core
    from torch_vkv.pool import DEFAULT_HOST_PAGE_SIZE

    C = core()
    print(f"torch_vkv {torch_vkv.__version__}  (core: {C.__file__})")
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"backend host: memfd + mmap, page size {DEFAULT_HOST_PAGE_SIZE >> 20} MiB by default "
          f"(any multiple of the OS page, {os.sysconf('SC_PAGE_SIZE')} bytes)")
    if not torch.cuda.is_available():
        print("backend cuda: unavailable (no CUDA device visible to torch)")
        return 0
    if not C.cuda_driver_available():
        print("backend cuda: unavailable (libcuda.so.1 could not be loaded)")
        return 0
    for i in range(torch.cuda.device_count()):
        torch.cuda.init()
        backend = C.cuda_backend(i)
        free, total = C.device_memory_info(i)
        print(
            f"backend cuda:{i}: {torch.cuda.get_device_name(i)}, page granularity "
            f"{backend.page_size >> 20} MiB, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_vkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends, page granularity, devices")
    sub.add_parser("demo", help="generate with a small model and compare KV memory (try --help)", add_help=False)
    sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the engine (try serve --help)", add_help=False)
    # add_help=False: `bench NAME --help` reaches the benchmark's own parser.
    bench = sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCHMARKS)} (try bench NAME --help)", add_help=False)
    bench.add_argument("name", choices=BENCHMARKS, help="the benchmark; `bench NAME --help` shows its options")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] in ([], ["-h"], ["--help"]):  # its parser has no --help of its own
        bench.print_help()
        return 0 if argv[1:2] else 2
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"info takes no arguments, got {rest}")
        return info()
    if args.command == "demo":
        from torch_vkv.demo import main as demo_main

        return demo_main(rest)
    if args.command == "serve":
        from torch_vkv.serving.server import main as serve_main

        return serve_main(rest)
    module = importlib.import_module(f"torch_vkv.bench.{args.name}")
    return module.main(rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
