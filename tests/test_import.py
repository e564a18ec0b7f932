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
