"""Saving and loading model weights, with errors that say exactly what did not fit.

Weights are loaded strictly: a checkpoint for another preset would otherwise load partly and
give a silently useless finder. The error names the file and lists the missing, unexpected and
mis-shaped keys so the operator sees which preset the file was made for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "peaknet-atto.safetensors"
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DataParallel/DDP wrappers
_SHOW = 10


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the model."""


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under torch.compile's OptimizedModule, whose keys carry '_orig_mod.'."""
    return getattr(module, "_orig_mod", module)


def save_checkpoint(module: nn.Module, path: str | os.PathLike) -> None:
    """Write the state_dict: safetensors when the name ends .safetensors, else torch.save."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(module).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        data = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt file, pickle with disallowed objects, ...
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from exc
    if isinstance(data, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: not a state_dict (got {type(data).__name__})")
    return dict(data)


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
    return f"{len(keys)} {title}: {shown}"


def load_checkpoint(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights into `module` strictly; returns the module. Raises CheckpointError."""
    path = Path(path)
    state = _strip(_read(path))
    target = _unwrap(module)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(getattr(state[k], 'shape', ()))} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{path}: checkpoint does not match the model"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        raise CheckpointError("; ".join(parts))
    target.load_state_dict(state, strict=True)
    return module


def resolve_checkpoint(name: str) -> Path | None:
    """'' -> None (random weights); 'default' -> the shipped atto weights; else the path."""
    if not name:
        return None
    if name == "default":
        if not DEFAULT_WEIGHTS.is_file():
            raise CheckpointError(
                f"{DEFAULT_WEIGHTS}: the shipped default weights are not installed; "
                "train them (tools) or set model.checkpoint to a file or ''")
        return DEFAULT_WEIGHTS
    return Path(name).expanduser()
