import subprocess
import sys


def test_import_initialises_no_cuda_and_loads_no_extension():
    code = (
        "import sys, torch, torch_vkv\n"
        "assert not torch.cuda.is_initialized(), 'import torch_vkv initialised CUDA'\n"
        "assert 'torch_vkv._C' not in sys.modules, 'import torch_vkv loaded the C++ core'\n"
        "assert 'triton' not in sys.modules, 'import torch_vkv imported triton'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_api_is_exported():
    import torch_vkv

    for name in torch_vkv.__all__:
        assert hasattr(torch_vkv, name), name
    assert issubclass(torch_vkv.OutOfPagesError, torch_vkv.KVCacheCapacityError)
    assert issubclass(torch_vkv.OutOfSlotsError, torch_vkv.KVCacheCapacityError)
    assert issubclass(torch_vkv.KVCacheCapacityError, RuntimeError)


def test_the_serve_extra_installs_what_the_server_imports():
    """README and docs/serving.md install the HTTP server with ``pip install -e ".[serve]"``: that extra must
    bring transformers too (the server loads the checkpoint and its tokenizer with it), not only the web stack,
    and httpx, which ``bench serve --url`` (the load client the README runs against it) sends requests with."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parent.parent / "setup.py").read_text())
    extras = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for kw in node.keywords if kw.arg == "extras_require")  # fmt: skip
    serve = ast.literal_eval(extras)["serve"]
    names = {req.split(">")[0].split("=")[0].split("<")[0] for req in serve}
    assert {"transformers", "fastapi", "uvicorn", "prometheus_client", "httpx"} <= names, serve
