"""Read timm-style state dicts (.pt/.pth or .safetensors) and load them with strict checks."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.errors import ExportError


class CheckpointError(ExportError):
    pass


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file. Accepts a bare state dict or the common wrappers
    (``{"state_dict": ...}``, ``{"model": ...}``, ``{"state_dict_ema": ...}``) and strips a
    ``module.`` prefix left by DataParallel."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state: Any  # a state dict, or a wrapper around one, until checked below
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {e.__class__.__name__}: {str(e).splitlines()[0]}. "
            "Is it a complete PyTorch (.pt/.pth) or .safetensors file?"
        ) from e
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """Load ``state`` into ``model`` with strict key and shape checks; the error names the
    missing, unexpected and mis-shaped keys (a few of each) and what to do."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape (checkpoint vs model)", misshaped),
        ):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
        raise CheckpointError(
            f"checkpoint {source} does not fit architecture {arch!r}: "
            + "; ".join(parts)
            + ". Pick the architecture it was trained as (--arch), and --num-classes / "
            "--in-chans if they differ from the defaults."
        )
    model.load_state_dict(state, strict=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
