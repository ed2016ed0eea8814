"""Build for refusal-fast.

The pybind11 extension ``refusal_fast._C`` is built from ``csrc/`` through CMake
(``CMakeLists.txt``). CPU C++ is always built; the optional CUDA sources only when
``REFUSAL_FAST_BUILD_CUDA=1`` is set and a CUDA compiler is present. Set
``REFUSAL_FAST_NO_EXT=1`` to skip the extension entirely (the package then runs on
its pure-torch/Triton paths; ``refusal_fast.backend_info()`` says so).

The Triton kernels in ``kernels/`` install as the subpackage ``refusal_fast.kernels`` (mapped in
pyproject.toml, which holds the project metadata).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("REFUSAL_FAST_BUILD_CUDA", "0") == "1"
        import pybind11

        cfg = [
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DREFUSAL_FAST_CUDA={'ON' if cuda else 'OFF'}",
        ]
        subprocess.check_call(["cmake", str(ROOT), *cfg], cwd=build_dir)
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)


ext_modules = [] if os.environ.get("REFUSAL_FAST_NO_EXT") == "1" else [CMakeExtension("refusal_fast._C")]

# Metadata, dependencies, packages (``kernels/`` installs as ``refusal_fast.kernels``) and the
# console script live in pyproject.toml; this file only adds the CMake-built extension.
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
