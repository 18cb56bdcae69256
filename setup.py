"""pcg build: setup.py drives CMake (which owns the native build) and places
libpcg_ops in the package, where `import pcg` loads it.

    pip install --no-build-isolation -e .     # development
    pip install --no-build-isolation .        # install

Environment knobs: PCG_WITH_CUDA=0 (CPU kernels only), PCG_CUDA_ARCHS (default
"8.0+PTX;9.0a"), PCG_BUILD_TESTS=1 (gtest targets), PCG_BUILD_DIR (CMake
build folder, default build/cmake), MAX_JOBS (parallel compile jobs).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from cmake_args import cmake_args  # noqa: E402


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        build_dir = os.environ.get("PCG_BUILD_DIR", os.path.join(ROOT, "build", "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        cfg = os.environ.get("PCG_BUILD_TYPE", "Release")
        subprocess.check_call(
            ["cmake", "-S", ROOT, "-B", build_dir, f"-DCMAKE_BUILD_TYPE={cfg}", *cmake_args()]
        )
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", build_dir, "-j", jobs])
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(build_dir, "libpcg_ops.so"), dest)


setup(
    name="pcg",
    version="0.1.0",
    description="Piecewise CUDA graphs for Mixture-of-Experts transformers, with expert parallelism",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("pcg.libpcg_ops")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "tqdm>=4.60"],
    extras_require={
        "hf": ["transformers>=5.17"],
        "bench": ["matplotlib>=3.8"],
        "test": ["pytest>=8", "transformers>=5.17"],
    },
    zip_safe=False,
)
