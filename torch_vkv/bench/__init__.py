"""Benchmarks: ``python -m torch_vkv bench {alloc,kernels,hf}``.

Each benchmark module has ``main(argv) -> int``, times on the device with
events, and writes JSON plus a markdown table through :mod:`.report`.
"""
