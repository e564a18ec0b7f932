"""Build torch_vkv and its C++ core ``torch_vkv._C``.

The extension needs only pybind11 and a C++17 compiler: the CUDA driver is
opened with ``dlopen("libcuda.so.1")`` at run time and its few prototypes are
declared in ``csrc/driver.h``, so no CUDA toolkit and no libtorch are needed.
"""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "torch_vkv._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["dl", "pthread"],
)

setup(
    name="torch_vkv",
    version="0.1.0",
    description="Virtual-memory KV cache for PyTorch (vAttention): contiguous KV, pages committed on demand",
    python_requires=">=3.10",
    # Every package under torch_vkv/ (attention/, bench/, ...), plus the top-level
    # triton_kernels/ folder installed as torch_vkv.triton_kernels.
    packages=find_packages(include=["torch_vkv", "torch_vkv.*"]) + ["torch_vkv.triton_kernels"],
    package_dir={"torch_vkv.triton_kernels": "triton_kernels"},
    package_data={"torch_vkv": ["py.typed"], "torch_vkv.bench": ["traces/*.csv", "traces/LICENSE-vattention.txt",
                                                                 "traces/README.md"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=5.0"],
        # The server loads the checkpoint and its tokenizer through transformers;
        # its load client (bench serve --url) speaks HTTP through httpx.
        "serve": ["transformers>=5.0", "fastapi", "uvicorn", "prometheus_client", "httpx"],
        "test": ["pytest", "pytest-xdist", "hypothesis", "triton>=3.2", "transformers>=5.0", "fastapi", "uvicorn", "prometheus_client",
                 "openai", "httpx", "tokenizers"],
    },
    zip_safe=False,
)
