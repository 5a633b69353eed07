"""Shared fixtures. Model folders made here are built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# gRPC off unless a test turns it on with a free port: the default 8001 would make parallel
# servers (and a developer's own) collide.
os.environ["SERESNET_GRPC_PORT"] = "0"

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO / "models" / "fashion-seresnet"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helper modules


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exported")


def _random_onnx(cache: Path, arch: str, fuse: bool = False) -> Path:
    """model.onnx of ``arch`` with random weights (seed 0), exported once per session."""
    from export.fusion import fuse_file
    from export.model_card import input_spec_for
    from export.onnx_export import export_onnx
    from export.pipeline import load_model

    folder = cache / arch
    path = folder / "model.onnx"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        export_onnx(load_model(arch, None, seed=0), input_spec_for(arch), path)
    if fuse:
        fused = folder / "model.se.onnx"
        if not fused.exists():
            fuse_file(path, fused)
        return fused
    return path


@pytest.fixture(scope="session")
def random_seresnet14(export_cache: Path) -> Path:
    return _random_onnx(export_cache, "seresnet14_cifar")


@pytest.fixture(scope="session")
def random_onnx(export_cache: Path):
    """Factory: ``random_onnx(arch, fuse=False)`` -> path of a random-weight export."""
    return lambda arch, fuse=False: _random_onnx(export_cache, arch, fuse)


@pytest.fixture(scope="session")
def fashion():
    """The embedded model's test set (``testkit.fashion.FashionTest``), read once."""
    from testkit.fashion import fashion_test

    return fashion_test()
