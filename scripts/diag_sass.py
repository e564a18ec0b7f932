"""Our Triton prefill kernel compiled for Hopper without a GPU: registers, spills, and whether ptxas keeps
the tensor-core MMAs (wgmma) asynchronous. A diagnostic that costs no device time.

    python scripts/diag_sass.py [--kernels triton_kernels,.ab/variant/triton_kernels] [--launch 128,128,8,3] [--gluon]
    python scripts/diag_sass.py --launch= --gluon-against .ab/triton_kernels  # did a change move the default's code?

Triton compiles for a target named on the command line (``GPUTarget("cuda", 90, 32)``) with the ``ptxas``
its wheel ships, so any machine with the ``triton`` package compiles the same SASS as the H200 for the same
Triton version. For the device's version on a CPU machine: ``pip download --no-deps triton==3.6.0`` and
``pip install --no-deps --target /tmp/t36 <wheel>``, then run this script with ``PYTHONPATH=/tmp/t36``.

Rows, per kernel folder and launch (``block_m, block_n, num_warps, num_stages``; Llama heads: head_dim 128,
bf16, causal, tensor descriptors): registers a thread, bytes spilled, shared memory, and ptxas's C7511
warning ("wgmma.mma_async instructions are serialized", then every MMA of the kernel waits for the one
before it); per loop of the SASS: its MMA instructions (``HGMMA``), the waits for them
(``WARPGROUP.DEPBAR``), exponentials (``MUFU.EX2``) and local-memory spills (``STL``/``LDL``).
Writes ``$OUT/diag_sass.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(path: str, name: str):
    """The package at ``path`` (a ``triton_kernels/`` folder) under the module name ``name``."""
    root = Path(path)
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"diag_sass.py: expected a triton_kernels folder at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def compile_prefill(package, block_m: int, block_n: int, num_warps: int, num_stages: int, head_dim: int = 128):
    """``_prefill_kernel`` of ``package`` compiled for sm90 (causal, bf16, contiguous cache, descriptors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = sys.modules[package.__name__ + ".prefill"]._prefill_kernel
    signature = {name: "i32" for name in fn.arg_names}  # lengths, strides, bounds
    signature.update({name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")})
    signature.update({name: "*i32" for name in ("seqlens_ptr", "cu_q_ptr", "slots_ptr", "bt_ptr")})
    signature.update({name: "fp32" for name in ("qk_mul", "cap_out")})
    descriptor = f"tensordesc<bf16[1,{block_n},1,{head_dim}]>"
    signature.update(k_desc=descriptor, v_desc=descriptor)
    constants = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=True, WINDOW=False,
                     SOFTCAP=False, HAS_SLOTS=False, PAGED=False, PAGE_SIZE=1, DOT_F32=False, USE_TMA=True)  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def _instructions(sass: str) -> list[tuple[int, str]]:
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def loops(sass: str, max_len: int = 1500) -> list[dict]:
    """Per innermost loop (a backward branch spanning at most ``max_len`` instructions) its counts."""
    ins = _instructions(sass)
    rows = []
    for addr, text in ins:
        m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
        if len(body) > max_len or len(body) < 20:  # not the spin-waits on barriers
            continue
        count = {key: sum(key in t for t in body) for key in ("HGMMA", "WARPGROUP.DEPBAR", "MUFU.EX2", "STL", "LDL")}
        rows.append({"start": hex(int(m.group(1), 16)), "instructions": len(body), **count})
    return rows


def assemble(kernel) -> tuple[str, str]:
    """``(ptxas's report, the SASS)`` of a compiled kernel's PTX, with the ptxas Triton compiled with."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = Path(get_ptxas(90).path)  # the one Triton compiled with (newer Tritons ship two)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                                capture_output=True, text=True, check=True).stderr  # fmt: skip
        sass = subprocess.run([str(ptxas.parent / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    return report, sass


def normalized(sass: str) -> list[str]:
    """The SASS's instructions with registers, predicates and addresses blanked: two compilations that
    differ only in register names or code placement give the same lines."""
    out = []
    for _, text in _instructions(sass):
        text = re.sub(r"0x[0-9a-f]+", "X", text)
        text = re.sub(r"\bU?R[0-9]+\b", "R", re.sub(r"\bU?P[0-9]\b", "P", text.replace(".reuse", "")))
        out.append(re.sub(r" +", " ", text).strip())
    return out


def changed_lines(before: list[str], after: list[str]) -> int:
    """Lines removed plus lines added from ``before`` to ``after`` (a line diff)."""
    return sum(1 for line in difflib.unified_diff(before, after, n=0, lineterm="")
               if line[:1] in "+-" and not line.startswith(("+++", "---")))  # fmt: skip


def analyse(kernel) -> dict:
    """ptxas's report (registers, spills, C7511) and the SASS loops of a compiled kernel."""
    report, sass = assemble(kernel)
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
        "shared_bytes": kernel.metadata.shared,
        "wgmma_serialized": "C7511" in report,
        "loops": loops(sass),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=str(ROOT / "triton_kernels"), help="comma list of triton_kernels folders")
    p.add_argument("--launch", default="128,128,8,3", help="';'-separated BLOCK_M,BLOCK_N,WARPS,STAGES")
    p.add_argument("--gluon", action="store_true", help="also the Gluon kernel (prefill_hopper.py), with and "
                   "without ping-pong: each consumer's loop should hold its MMAs, their waits and the exponentials")
    p.add_argument("--gluon-against", default="", help="a triton_kernels folder: how many SASS lines of the Gluon "
                   "kernel's default launch (of the first --kernels folder) differ from that folder's (registers and "
                   "addresses aside); 0 means a variant left the default's code alone (one unused barrier once "
                   "cost it 5%%)")
    args = p.parse_args()
    launches = []
    for item in (t for t in args.launch.split(";") if t.strip()):
        parts = item.split(",")
        if len(parts) != 4 or not all(x.strip().isdigit() for x in parts):
            raise SystemExit(f"--launch: expected BLOCK_M,BLOCK_N,WARPS,STAGES, got {item!r}")
        launches.append(tuple(int(x) for x in parts))
    import triton

    print(f"Triton {triton.__version__}, target sm90")
    rows = []
    for i, folder in enumerate(k for k in args.kernels.split(",") if k):
        package = _load(folder, f"tk_sass_{i}")
        for launch in launches:
            row = {"kernels": folder, "launch": launch, **analyse(compile_prefill(package, *launch))}
            rows.append(row)
            print(f"{folder} {launch}: {row['registers']} registers, {row['spill_bytes']} bytes spilled, "
                  f"{row['shared_bytes']} bytes shared, wgmma serialized: {row['wgmma_serialized']}")  # fmt: skip
            for loop in row["loops"]:
                print("   loop", " ".join(f"{k}={v}" for k, v in loop.items()))
    if args.gluon:
        from torch_vkv.triton_kernels import prefill_hopper

        for pingpong in (False, True):
            row = {"kernels": "prefill_hopper.py", "pingpong": pingpong,
                   **analyse(prefill_hopper.compile_kernel_for_sm90(pingpong=pingpong))}  # fmt: skip
            rows.append(row)
            print(f"prefill_hopper.py pingpong={pingpong}: {row['registers']} registers at launch (setmaxnreg "
                  f"raises the consumers'), {row['spill_bytes']} bytes spilled, {row['shared_bytes']} bytes shared")
            for loop in row["loops"]:
                print("   loop", " ".join(f"{k}={v}" for k, v in loop.items()))
    if args.gluon_against:  # the first --kernels folder's Gluon kernel against this one's, both loaded from their paths
        first = args.kernels.split(",")[0]
        ours, theirs = (importlib.import_module(_load(folder, name).__name__ + ".prefill_hopper") for folder, name in
                        ((first, "tk_sass_ours"), (args.gluon_against, "tk_sass_against")))  # fmt: skip
        before, after = (normalized(assemble(m.compile_kernel_for_sm90())[1]) for m in (theirs, ours))
        row = {"kernels": first, "against": args.gluon_against, "instructions": len(after),
               "instructions_against": len(before), "changed_lines": changed_lines(before, after)}  # fmt: skip
        rows.append(row)
        print(f"{row['kernels']}/prefill_hopper.py against {args.gluon_against}: {row['changed_lines']} SASS lines changed "
              f"({row['instructions']} instructions, {row['instructions_against']} there; registers and "
              f"addresses aside)")  # fmt: skip
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "diag_sass.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
