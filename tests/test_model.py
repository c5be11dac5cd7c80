"""PeakNet v1 (the shipped peaknet-atto) shapes, finders from config, and checkpoint round trips.
The original architecture has its own tests in test_model_original.py."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from peaknet_daemon.config import PRESETS, ModelConfig, PipelineConfig, config_from_dict
from peaknet_daemon.model import (CheckpointError, Finder, PeakNetFinder, PeakNetV1, build_finder, build_net,
                                  load_checkpoint, resolve_checkpoint, save_checkpoint)

from peaknet_daemon.model.finder import arch_of

CPU = torch.device("cpu")


def net_for(preset: str, **keys: object) -> torch.nn.Module:
    return build_net(config_from_dict({"model": {"preset": preset, **keys}}).model).eval()


@pytest.fixture(scope="module")
def atto() -> PeakNetV1:
    """One shared atto net (building one costs ~1 s on the CI machine); tests must not mutate it."""
    torch.manual_seed(0)
    return net_for("peaknet-atto")


def cfg_for(preset: str, **pipeline: object):
    return config_from_dict({"model": {"preset": preset},
                             "pipeline": {"frame_shape": [2, 64, 96], **pipeline}})


def test_peaknet_output_shapes(atto: PeakNetV1) -> None:
    with torch.inference_mode():
        out = atto(torch.randn(1, 1, 64, 96))
    assert out.shape == (1, PRESETS["peaknet-atto"]["num_classes"], 64, 96)
    assert torch.isfinite(out).all()
    torch.manual_seed(0)
    small = net_for("peaknet-small")
    n = sum(p.numel() for p in small.parameters())
    assert n == 33_164_768  # the original PeakNet-small (names and shapes: test_model_original.py)
    with torch.inference_mode():
        out = small(torch.randn(1, 1, 64, 96))
    assert out.shape == (1, PRESETS["peaknet-small"]["num_classes"], 64, 96)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(37, 50), (65, 33), (100, 129)])
def test_peaknet_arbitrary_sizes(atto: PeakNetV1, hw: tuple[int, int]) -> None:
    with torch.inference_mode():
        out = atto(torch.randn(2, 1, *hw))
    assert out.shape == (2, 2, *hw)


def test_peaknet_pads_bottom_right_and_crops_back(atto: PeakNetV1) -> None:
    """An odd-sized image is the top-left corner of its zero-padded multiple-of-32 version."""
    x = torch.randn(1, 1, 50, 37)
    with torch.inference_mode():
        odd = atto(x)
        padded = atto(torch.nn.functional.pad(x, (0, 64 - 37, 0, 64 - 50)))
    torch.testing.assert_close(odd, padded[..., :50, :37])
    assert not torch.allclose(odd, padded[..., 14:, 27:])


def test_peaknet_channels_last_and_bf16_autocast(atto: PeakNetV1) -> None:
    net = copy.deepcopy(atto)
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        ref = net(x)
        cl = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


@pytest.mark.parametrize("preset", ["peaknet-atto", "classical"])
def test_build_finder_outputs(preset: str) -> None:
    cfg = cfg_for(preset, precision="bf16", channels_last=True)
    finder = build_finder(cfg.model, cfg.pipeline, CPU)
    assert isinstance(finder, Finder) and not finder.training
    images = torch.rand(2, 1, 64, 96) * 100
    mask, signal = finder(images)
    assert mask.shape == (2, 64, 96) and mask.dtype == torch.bool
    assert signal.shape == (2, 64, 96) and signal.dtype == torch.float32
    if preset == "classical":
        assert (finder.min_pixels, finder.max_pixels) == (cfg.model.classical.min_pixels,
                                                          cfg.model.classical.max_pixels)
    else:
        assert (finder.min_pixels, finder.max_pixels) == (cfg.pipeline.min_pixels, cfg.pipeline.max_pixels)
        torch.testing.assert_close(signal, images[:, 0])


def test_finder_threshold_controls_mask() -> None:
    cfg = cfg_for("peaknet-atto")
    images = torch.rand(1, 1, 32, 32)
    finder = build_finder(dataclasses.replace(cfg.model, threshold=0.0), cfg.pipeline, CPU)
    assert finder(images)[0].all()
    finder.threshold = 1.0
    assert not finder(images)[0].any()


def test_finder_is_invariant_to_image_scale(atto: PeakNetV1) -> None:
    """Instance normalisation: an affine change of the raw values gives the same mask."""
    finder = PeakNetFinder(atto, 2, 0.5, None, False, 1, 10)
    images = torch.rand(2, 1, 32, 48)
    m1, _ = finder(images)
    m2, _ = finder(images * 1000 + 50)
    assert (m1 == m2).float().mean() > 0.999


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(atto: PeakNetV1, tmp_path: Path, suffix: str) -> None:
    a = copy.deepcopy(atto)
    with torch.no_grad():  # make BatchNorm statistics non-trivial so buffers are tested too
        for m in a.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / f"w{suffix}"
    save_checkpoint(a, path)
    torch.manual_seed(6)
    b = net_for("peaknet-atto")
    x = torch.randn(1, 1, 48, 40)
    with torch.inference_mode():
        assert not torch.equal(a(x), b(x))
        load_checkpoint(b, path)
        assert torch.equal(a(x), b(x))


def test_checkpoint_wrapped_dict_and_prefix(atto: PeakNetV1, tmp_path: Path) -> None:
    a = atto
    state = {f"_orig_mod.{k}": v for k, v in a.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "c.pt")
    b = net_for("peaknet-atto")
    load_checkpoint(b, tmp_path / "c.pt")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_checkpoint_mismatch_lists_keys(atto: PeakNetV1, tmp_path: Path) -> None:
    state = dict(atto.state_dict())
    state.pop("head.out.weight")
    state["extra.weight"] = torch.zeros(3)
    state["encoder.downsample.0.0.weight"] = torch.zeros(7, 1, 4, 4)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(copy.deepcopy(atto), path)
    msg = str(err.value)
    assert str(path) in msg
    assert "1 missing keys: head.out.weight" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "encoder.downsample.0.0.weight (7, 1, 4, 4)" in msg
    assert isinstance(err.value, ValueError)


def test_checkpoint_for_another_preset_is_refused(atto: PeakNetV1, tmp_path: Path) -> None:
    other = net_for("peaknet-atto", backbone_depths=[2, 2, 4, 2], bifpn_num_blocks=2)
    save_checkpoint(other, tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys.*unexpected keys") as err:
        load_checkpoint(copy.deepcopy(atto), tmp_path / "o.safetensors")
    assert ", ..." in str(err.value)  # long lists are cut
    assert str(err.value).endswith("model.architecture: v1, model.backbone_hidden_sizes: [40, 80, 160, 320], "
                                   "model.backbone_depths: [2, 2, 4, 2], model.bifpn_num_blocks: 2, "
                                   "model.bifpn_num_features: 64, model.num_classes: 2")
    cfg = config_from_dict({"model": {"preset": "peaknet-atto"}}).model
    with pytest.raises(CheckpointError) as err:  # with the configured keys: only those that differ
        load_checkpoint(copy.deepcopy(atto), tmp_path / "o.safetensors", arch_of(cfg))
    assert str(err.value).endswith("config keys: model.backbone_depths: [2, 2, 4, 2], model.bifpn_num_blocks: 2")


def test_resolve_checkpoint(atto: PeakNetV1, tmp_path: Path) -> None:
    assert resolve_checkpoint("") is None
    assert resolve_checkpoint(str(tmp_path / "x.pt")) == tmp_path / "x.pt"
    try:
        default = resolve_checkpoint("default")
    except CheckpointError as exc:
        assert "peaknet-atto.safetensors" in str(exc)
    else:
        assert default is not None and default.name == "peaknet-atto.safetensors" and default.is_file()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(atto, tmp_path / "absent.safetensors")


def test_build_finder_loads_checkpoint(atto: PeakNetV1, tmp_path: Path) -> None:
    net = atto
    save_checkpoint(net, tmp_path / "w.safetensors")
    cfg = cfg_for("peaknet-atto")
    model = dataclasses.replace(cfg.model, checkpoint=str(tmp_path / "w.safetensors"))
    finder = build_finder(model, cfg.pipeline, CPU)
    for k, v in net.state_dict().items():
        assert torch.equal(v, finder.net.state_dict()[k])


def test_model_config_defaults_are_atto() -> None:
    m = ModelConfig()
    assert (m.architecture, m.backbone_hidden_sizes) == (PRESETS["peaknet-atto"]["architecture"],
                                                         PRESETS["peaknet-atto"]["backbone_hidden_sizes"])
    assert m.normalisation == "instance"  # what the shipped weights were trained with
    assert PipelineConfig().min_pixels >= 1


def test_a_net_without_checkpoint_is_the_same_draw_in_every_process_and_leaves_the_rng_alone():
    """Benchmarks run random-weight nets; what such a net marks (and extraction costs) depends
    on the draw, so every build must draw the same weights, whatever the caller's random state."""
    from peaknet_daemon.config import config_from_dict
    from peaknet_daemon.model.finder import build_peaknet

    model = config_from_dict({"model": {"preset": "peaknet-atto", "checkpoint": ""}}).model
    torch.manual_seed(123)
    first = build_peaknet(model).state_dict()
    after = torch.rand(3)
    torch.manual_seed(456)
    second = build_peaknet(model).state_dict()
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the caller's random sequence went on undisturbed
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
