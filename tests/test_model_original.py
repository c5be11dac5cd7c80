"""PeakNet as the original `peaknet` package defines it: its checkpoints (tests/fixtures/upstream_peaknet,
made by running the original code) load strictly and give its outputs; peaknet-small is its
PeakNet-small name for name; checkpoint files in the formats trainers write; mismatch errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from peaknet_daemon.config import PRESETS, config_from_dict
from peaknet_daemon.model import (CheckpointError, PeakNet, PeakNetFinder, build_finder, build_net,
                                  infer_architecture, load_checkpoint, save_checkpoint)
from peaknet_daemon.model.finder import arch_of

FIX = Path(__file__).parent / "fixtures" / "upstream_peaknet"
FIXTURES = json.loads((FIX / "fixtures.json").read_text())
NAMES = ["tiny", "tiny-learned-upsample"]
ORIGINAL_KEYS = ("backbone_hidden_sizes", "backbone_depths", "bifpn_num_blocks", "bifpn_num_features",
                 "seg_out_channels", "uses_learned_upsample", "num_classes")
TOL = 1e-4


def model_cfg(name: str, **changes: object):
    """Our model config from the original's config keys, as a user copies them over."""
    orig = FIXTURES[name]["config"]
    keys = {k: orig[k] for k in ORIGINAL_KEYS if k in orig}
    return config_from_dict({"model": {"preset": "peaknet-small", **keys, **changes}}).model


def state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIX / f"{name}.pt", weights_only=True)


def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.load(FIX / f"{name}-input.npy")),
            torch.from_numpy(np.load(FIX / f"{name}-output.npy")))


def run(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net.eval()(x)


def test_small_preset_is_the_original_peaknet_small() -> None:
    expected = FIXTURES["peaknet-small"]
    net = build_net(config_from_dict({"model": {"preset": "peaknet-small"}}).model)
    sd = net.state_dict()
    assert len(sd) == len(expected["state_dict"]) == 296
    assert list(sd) == list(expected["state_dict"])  # same names, same order
    assert {k: list(v.shape) for k, v in sd.items()} == expected["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == expected["params"] == 33_164_768
    orig = expected["config"]
    assert {k: PRESETS["peaknet-small"][k] for k in ORIGINAL_KEYS if k in orig} == \
        {k: orig[k] for k in ORIGINAL_KEYS if k in orig}


@pytest.mark.parametrize("name", NAMES)
def test_original_checkpoint_loads_strictly_and_matches_its_outputs(name: str) -> None:
    net = build_net(model_cfg(name))
    assert isinstance(net, PeakNet)
    assert sum(p.numel() for p in net.parameters()) == FIXTURES[name]["params"]
    net.load_state_dict(state(name), strict=True)
    x, expected = batch(name)
    out = run(net, x)
    assert out.shape == expected.shape == tuple(FIXTURES[name]["output"])
    err = (out - expected).abs().max().item()
    assert err <= TOL, f"max abs diff {err}"
    # ... and a randomly initialised net of the same shape does not (the comparison can fail).
    assert (run(build_net(model_cfg(name)), x) - expected).abs().max() > 100 * TOL


@pytest.mark.parametrize("name", NAMES)
def test_original_checkpoint_through_the_daemons_finder(name: str, tmp_path: Path) -> None:
    """model.checkpoint + model.normalisation: none feeds the raw batch, as the original pipeline."""
    x, expected = batch(name)
    cfg = config_from_dict({"model": {**{k: v for k, v in vars(model_cfg(name)).items() if k != "classical"},
                                      "checkpoint": str(FIX / f"{name}.pt"), "normalisation": "none",
                                      "threshold": 0.5},
                            "pipeline": {"frame_shape": [2, 64, 96]}})
    finder = build_finder(cfg.model, cfg.pipeline, torch.device("cpu"))
    mask, signal = finder(x)
    want = torch.softmax(expected, dim=1)[:, 1] > 0.5
    margin = (torch.softmax(expected, dim=1)[:, 1] - 0.5).abs() > 1e-3  # away from the threshold
    assert torch.equal(mask[margin], want[margin]) and 0 < want.sum() < want.numel()
    torch.testing.assert_close(signal, x[:, 0])


@pytest.mark.parametrize("container", ["bare", "model_state_dict", "state_dict", "model", "ddp-prefix",
                                       "safetensors"])
def test_checkpoint_formats(container: str, tmp_path: Path) -> None:
    name = "tiny-learned-upsample"
    sd = state(name)
    if container == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "w.pt"
        payload = {
            "bare": sd,
            "ddp-prefix": {f"module.{k}": v for k, v in sd.items()},
        }.get(container, {container: sd, "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 7})
        torch.save(payload, path)
    net = load_checkpoint(build_net(model_cfg(name)), path)
    x, expected = batch(name)
    assert (run(net, x) - expected).abs().max() <= TOL


def test_checkpoint_save_round_trip_of_the_original(tmp_path: Path) -> None:
    net = build_net(model_cfg("tiny"))
    net.load_state_dict(state("tiny"))
    for suffix in (".safetensors", ".pt"):
        save_checkpoint(net, tmp_path / f"w{suffix}")
        other = load_checkpoint(build_net(model_cfg("tiny")), tmp_path / f"w{suffix}")
        for k, v in net.state_dict().items():
            assert torch.equal(v, other.state_dict()[k]), k


def test_torch_file_with_code_is_refused(tmp_path: Path) -> None:
    """weights_only=True: a pickle that would run code is an error, not an execution."""
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": state("tiny"), "hook": Path("/tmp")}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(build_net(model_cfg("tiny")), path)


def test_a_file_without_a_state_dict_says_where_it_looked(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match=r"no tensors found; top-level keys: epoch, config .*model_state_dict"):
        load_checkpoint(build_net(model_cfg("tiny")), path)


def test_mismatch_lists_keys_and_names_the_config_keys_that_fit(tmp_path: Path) -> None:
    path = FIX / "tiny-learned-upsample.pt"
    cfg = model_cfg("tiny")  # other depths, BiFPN width and blocks, no learned upsampling
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_net(cfg), path, arch_of(cfg))
    msg = str(err.value)
    assert str(path) in msg
    assert "10 missing keys: backbone.encoder.stages.2.layers.1." in msg
    assert "39 unexpected keys: backbone.encoder.stages.1.layers.1." in msg  # incl. head_upsample_layer.0.*
    assert "shape mismatches: backbone_to_bifpn.0.bias (24,) vs model (32,)" in msg
    hint = msg.split("made for these config keys: ")[1]
    assert "model.backbone_depths: [1, 2, 1, 1]" in hint and "model.bifpn_num_blocks: 2" in hint
    assert "model.bifpn_num_features: 24" in hint and "model.uses_learned_upsample: True" in hint
    assert "num_classes" not in hint and "backbone_hidden_sizes" not in hint  # those already fit
    # Following the hint makes it load.
    fixed = model_cfg("tiny", backbone_depths=[1, 2, 1, 1], bifpn_num_blocks=2, bifpn_num_features=24,
                      uses_learned_upsample=True)
    load_checkpoint(build_net(fixed), path, arch_of(fixed))


def test_the_shipped_v1_weights_into_the_original_architecture_say_so() -> None:
    from peaknet_daemon.model.checkpoint import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.fail(f"{DEFAULT_WEIGHTS} is part of the repo and must exist")
    cfg = config_from_dict({"model": {"preset": "peaknet-small"}}).model
    with pytest.raises(CheckpointError, match=r"model\.architecture: v1, model\.backbone_hidden_sizes: "
                                              r"\[40, 80, 160, 320\]"):
        load_checkpoint(build_net(cfg), DEFAULT_WEIGHTS, arch_of(cfg))


def test_infer_architecture_reads_the_original_keys() -> None:
    for name in NAMES:
        want = {k: v for k, v in vars(model_cfg(name)).items() if k in ORIGINAL_KEYS}
        assert infer_architecture(state(name)) == {"architecture": "original", **want}
    assert infer_architecture({"foo.weight": torch.zeros(1)}) is None


def test_normalisation_modes() -> None:
    net = build_net(model_cfg("tiny"))
    net.load_state_dict(state("tiny"))
    x = torch.rand(2, 1, 64, 96) * 500 + 20

    def probs(mode: str, scale: float = 1.0, **kw: float) -> torch.Tensor:
        finder = PeakNetFinder(net, 2, 0.5, None, False, 1, 10, normalisation=mode, **kw)
        with torch.inference_mode():
            finder(x * scale)  # exercises the path; the logits are compared below
        from peaknet_daemon.model import normalise
        return run(net, normalise(x * scale, mode, kw.get("norm_mean", 0.0), kw.get("norm_std", 1.0)))

    torch.testing.assert_close(probs("none"), run(net, x))
    torch.testing.assert_close(probs("fixed", norm_mean=20.0, norm_std=500.0), run(net, (x - 20) / 500))
    torch.testing.assert_close(probs("instance"), probs("instance", scale=3.0), rtol=1e-4, atol=1e-4)
    assert (probs("none") - probs("instance")).abs().max() > 1e-2
    with pytest.raises(ValueError, match="unknown normalisation"):
        PeakNetFinder(net, 2, 0.5, None, False, 1, 10, normalisation="batch")


def test_original_any_size_channels_last_and_bf16() -> None:
    net = build_net(model_cfg("tiny-learned-upsample"))
    net.load_state_dict(state("tiny-learned-upsample"))
    x = torch.randn(1, 1, 50, 37)
    odd = run(net, x)
    padded = run(net, torch.nn.functional.pad(x, (0, 64 - 37, 0, 64 - 50)))
    assert odd.shape == (1, 2, 50, 37)
    torch.testing.assert_close(odd, padded[..., :50, :37])
    xb, expected = batch("tiny-learned-upsample")
    cl = run(net.to(memory_format=torch.channels_last), xb.contiguous(memory_format=torch.channels_last))
    assert (cl - expected).abs().max() <= TOL
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(xb)
    assert (low.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_original_compiles_and_replays_as_a_cuda_graph(name: str) -> None:
    """torch.compile with CUDA graphs (reduce-overhead) gives the fixture outputs, fp32 and bf16."""
    net = build_net(model_cfg(name))
    net.load_state_dict(state(name))
    net = net.cuda().eval()
    compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True)
    x, expected = batch(name)
    x = x.cuda()
    with torch.inference_mode():
        for _ in range(3):  # record, then replay
            out = compiled(x).clone()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = torch.compile(net, mode="reduce-overhead")(x).float().cpu()
    # cuDNN runs fp32 convolutions in TF32 (10-bit mantissa) by default: 0.13 % of the largest
    # output apart from the CPU's fp32 on the H200 (0.0041 of 3.2), so the bound is relative.
    assert (out.cpu() - expected).abs().max() <= 5e-3 * expected.abs().max()
    assert (low - expected).abs().max() < 0.05 * expected.abs().max()
