"""Builds kvstore and its pybind11 extension kvstore._C through CMake.

master/, agent/, connectors/ and benchmarks/ live at the top of the repository (DESIGN.md §1)
and are installed as kvstore.master, kvstore.agent, kvstore.connectors and kvstore.benchmarks.
"""
import os
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("KVSTORE_BUILD_JOBS", str(os.cpu_count() or 2))
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('KVSTORE_BUILD_TYPE', 'Release')}",
        ]
        if os.environ.get("KVSTORE_CUDA") == "0":
            configure.append("-DKVSTORE_CUDA=OFF")
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    name="kvstore",
    version="0.1.0",
    description="Distributed KV-cache offload and transfer engine for LLM inference",
    python_requires=">=3.10",
    packages=["kvstore", "kvstore.master", "kvstore.agent", "kvstore.connectors", "kvstore.connectors.vllm",
              "kvstore.connectors.sglang", "kvstore.benchmarks", "kvstore.benchmarks.e2e"],
    package_data={"kvstore.benchmarks.e2e": ["llama31_8b/config.json"], "kvstore.master": ["kvstore_master.proto"]},
    package_dir={
        "kvstore": "kvstore",
        "kvstore.master": "master",
        "kvstore.agent": "agent",
        "kvstore.connectors": "connectors",
        "kvstore.benchmarks": "benchmarks",
    },
    ext_modules=[CMakeExtension("kvstore._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "numpy>=1.26",
        "lmdb==1.7.5",
        "grpcio==1.85.3",
        "protobuf>=7.35.1,<8",
        "PyYAML>=6.0",
        "prometheus-client==0.23.1",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    entry_points={
        "console_scripts": ["kvstore=kvstore.cli:main"],
        # Registers "KVStoreConnector" by name in every vLLM process (guarded: safe to repeat).
        "vllm.general_plugins": ["kvstore_connector = kvstore.connectors.vllm.plugin:register"],
    },
    zip_safe=False,
)
