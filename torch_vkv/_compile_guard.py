"""Refuses ``torch.compile`` backends that would copy a whole virtual KV buffer.

A compiled step writes the new keys and values into the cache with a custom op
that mutates the K/V buffers in place. AOTAutograd functionalizes it: the op
runs on a copy of the whole buffer, which is then copied back. Inductor (the
default backend) turns that back into an in-place write; the ``aot_eager``
debugging backends do not, and the copies touch every row of the buffer,
uncommitted pages included, which faults (SIGSEGV on the host backend, an
illegal address on CUDA) and would take the process down. The check runs once,
while dynamo traces the step (:func:`check_backend` is a constant to dynamo), and
raises a ``RuntimeError`` that names the backend instead.
"""

from __future__ import annotations

from typing import Any

from torch_vkv.attention.deps import assume_constant_result

__all__ = ["COPYING_BACKENDS", "check_backend"]

#: torch.compile backends that run functionalized graphs without re-inplacing mutations.
COPYING_BACKENDS = frozenset({"aot_eager", "aot_eager_decomp_partition", "aot_eager_default_partitioner",
                              "aot_eager_decomp_partition_crossref", "aot_ts"})  # fmt: skip


def backend_names() -> set:
    """Names of the backend dynamo is compiling the current frame for (empty when unknown)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    fn: Any = getattr(getattr(tx, "output", None), "compiler_fn", None)
    names, seen = set(), set()
    while fn is not None and id(fn) not in seen:  # debug wrappers keep the original backend
        seen.add(id(fn))
        for attr in ("_compiler_name", "compiler_name", "__name__"):
            value = getattr(fn, attr, None)
            if isinstance(value, str):
                names.add(value)
        fn = getattr(fn, "_torchdynamo_orig_backend", None)
    return names


@assume_constant_result
def check_backend() -> bool:
    """Raises ``RuntimeError`` when the backend being traced for is one of
    :data:`COPYING_BACKENDS`; ``True`` otherwise (also when it cannot tell:
    a custom backend is the caller's to choose)."""
    try:
        names = backend_names()
    except Exception:  # no frame being traced, or dynamo internals moved: nothing to refuse
        return True
    refused = sorted(names & COPYING_BACKENDS)
    if refused:
        raise RuntimeError(
            f"torch.compile(backend={refused[0]!r}) with a virtual KV cache: expected the default 'inductor' "
            "backend (or 'eager'). This backend copies the whole K/V buffer around each in-place write, "
            "uncommitted pages included, which would fault."
        )
    return True
