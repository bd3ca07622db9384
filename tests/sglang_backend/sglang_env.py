"""Whether the SGLang backend tests can run here, and why not; the torchvision stub.

SGLang 0.5.23 imports torchvision transitively (multimodal code) and PyPI's torchvision is a
CUDA build that fails against the CPU torch, so on a machine without one a meta-path finder
makes `torchvision` a mock module (SGLang's own tests stub kernels the same way). Nothing the
storage backend touches uses it."""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from unittest import mock

REQUIRED = os.environ.get("KVSTORE_REQUIRE_SGLANG") == "1"  # CI: a missing piece fails, never skips


def missing_reason() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        reason = "SGLang is not installed (see requirements/sglang-0.5.23-cpu.txt for the CPU recipe)"
    else:
        return None
    if REQUIRED:
        raise RuntimeError(f"KVSTORE_REQUIRE_SGLANG=1 but {reason}")
    return reason


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__, module.__file__ = [], spec, None
        module.__version__ = "0.28.0"  # transformers compares it; the release paired with torch 2.13
        return module

    def exec_module(self, module):
        pass


def install_torchvision_stub() -> None:
    if importlib.util.find_spec("torchvision") is None:
        sys.meta_path.insert(0, _TorchvisionStub())
