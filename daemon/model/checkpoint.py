"""Saving and loading model weights, with errors that say exactly what did not fit.

Weights are loaded strictly: a checkpoint for another architecture would otherwise load partly
and give a silently useless finder. The error names the file, lists the missing, unexpected and
mis-shaped keys, and reads the architecture the checkpoint was made for off its tensor shapes,
naming the config keys (and values) that would make it fit.

Accepted: safetensors files, and torch files (loaded with weights_only=True, so no code runs)
holding a bare state dict or a trainer checkpoint with the state dict under a key such as
`model_state_dict`, `state_dict` or `model`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "peaknet-atto.safetensors"
_PREFIXES = ("_orig_mod.", "module.", "model.")  # torch.compile, DataParallel/DDP, trainer wrappers
_CONTAINERS = ("model_state_dict", "state_dict", "model", "model_state", "net", "weights")
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
    for _ in range(3):  # e.g. {"model_state_dict": {...}, "optimizer": ...}, possibly nested once more
        if not isinstance(data, Mapping) or all(isinstance(v, torch.Tensor) for v in data.values()):
            break
        inner = next((data[k] for k in _CONTAINERS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, Mapping) or not data:
        raise CheckpointError(f"{path}: not a state_dict (got {type(data).__name__})")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found; top-level keys: {', '.join(map(str, list(data)[:_SHOW]))} "
                              f"(the state dict is looked for under {', '.join(_CONTAINERS)})")
    return dict(data)


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
    return f"{len(keys)} {title}: {shown}"


def _count(state: Mapping[str, Any], prefix: str) -> int:
    """How many distinct integer indices follow `prefix` in the keys (e.g. blocks per stage)."""
    idx = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return len([i for i in idx if i.isdigit()])


def infer_architecture(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model config keys a state dict was made for, read off its names and shapes; None when
    it is neither the original PeakNet nor this project's v1 net."""
    try:
        if "head_segmask.weight" in state:  # the original PeakNet
            stages = "backbone.encoder.stages."
            return {"architecture": "original",
                    "backbone_hidden_sizes": [int(state[f"backbone.hidden_states_norms.stage{i + 1}.weight"].shape[0])
                                              for i in range(4)],
                    "backbone_depths": [_count(state, f"{stages}{i}.layers.") for i in range(4)],
                    "bifpn_num_blocks": _count(state, "bifpn.blocks."),
                    "bifpn_num_features": int(state["backbone_to_bifpn.0.weight"].shape[0]),
                    "seg_out_channels": int(state["head_segmask.weight"].shape[1]),
                    "uses_learned_upsample": "head_upsample_layer.0.weight" in state,
                    "num_classes": int(state["head_segmask.weight"].shape[0])}
        if "head.out.weight" in state:  # v1
            return {"architecture": "v1",
                    "backbone_hidden_sizes": [int(state[f"encoder.stages.{i}.0.dwconv.weight"].shape[0])
                                              for i in range(4)],
                    "backbone_depths": [_count(state, f"encoder.stages.{i}.") for i in range(4)],
                    "bifpn_num_blocks": _count(state, "bifpn.blocks."),
                    "bifpn_num_features": int(state["bifpn.proj.0.0.weight"].shape[0]),
                    "num_classes": int(state["head.out.weight"].shape[0]) // 16}
    except (KeyError, AttributeError, IndexError):
        return None
    return None


def _fix_hint(state: Mapping[str, Any], current: Mapping[str, Any] | None) -> str:
    arch = infer_architecture(state)
    if arch is None:
        return "the checkpoint is neither the original PeakNet nor this project's v1 net"
    if current is None:
        keys = arch
    else:
        keys = {k: v for k, v in arch.items() if current.get(k) != v}
    if not keys:
        return f"the checkpoint looks like architecture {arch['architecture']!r} with the configured sizes"
    return "it was made for these config keys: " + ", ".join(f"model.{k}: {v}" for k, v in keys.items())


def load_checkpoint(module: nn.Module, path: str | os.PathLike, arch: Mapping[str, Any] | None = None) -> nn.Module:
    """Load weights into `module` strictly; returns the module. Raises CheckpointError.

    `arch`: the configured architecture keys (model.architecture, model.backbone_hidden_sizes, ...);
    on a mismatch the error names those the checkpoint needs changed (all of them without `arch`).
    """
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
        parts.append(_fix_hint(state, arch))
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
