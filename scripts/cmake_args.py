"""Print the CMake arguments that build pcg against the torch of this Python.

Used by setup.py and by scripts/dev_build.sh, so both configure identically.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys


def cmake_args() -> list[str]:
    import torch
    import torch.utils

    args = [
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc")
    torch_cuda = torch.version.cuda is not None and nvcc is not None
    want_cuda = torch_cuda and os.environ.get("PCG_WITH_CUDA", "") != "0"
    args.append(f"-DPCG_WITH_CUDA={'ON' if want_cuda else 'OFF'}")
    if torch_cuda:
        # A CUDA build of torch needs the toolkit located even for CPU kernels.
        cuda_root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if not os.path.isdir(os.path.join(cuda_root, "include")):
            cuda_root = cuda_home
        args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}",
                 f"-DCUDAToolkit_ROOT={cuda_root}"]
        # pip CUDA wheels carry headers (cuBLAS, ...) and libnvrtc that a bare
        # toolkit may lack; point torch's cmake at them when present.
        for site in sys.path:
            inc = os.path.join(site, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                args.append(f"-DPCG_EXTRA_CUDA_INCLUDE={inc}")
                nvrtc = sorted(glob.glob(os.path.join(site, "nvidia", "cu13", "lib", "libnvrtc.so*")))
                if nvrtc and not glob.glob(os.path.join(cuda_root, "lib64", "libnvrtc.so*")):
                    args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
                break
        if os.environ.get("PCG_CUDA_ARCHS"):
            args.append(f"-DPCG_CUDA_ARCHS={os.environ['PCG_CUDA_ARCHS']}")
    if os.environ.get("PCG_BUILD_TESTS", "") == "1":
        args.append("-DPCG_BUILD_TESTS=ON")
    if shutil.which("ninja"):
        args.append("-GNinja")
    return args


if __name__ == "__main__":
    print("\n".join(cmake_args()))
