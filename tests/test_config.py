"""Config: YAML -> validated objects; every error names the key, the value and the file."""

import pytest

from peaknet_daemon.config import ConfigError, PRESETS, config_from_dict, load_config, with_overrides


def write(tmp_path, text):
    path = tmp_path / "daemon.yaml"
    path.write_text(text)
    return path


def test_presets_fill_the_model_and_explicit_keys_win(tmp_path):
    cfg = load_config(write(tmp_path, "model: {preset: peaknet-small, bifpn_num_blocks: 3}\n"))
    m = cfg.model
    assert m.backbone_hidden_sizes == PRESETS["peaknet-small"]["backbone_hidden_sizes"] == [96, 192, 384, 768]
    assert m.backbone_depths == [3, 3, 9, 3] and m.bifpn_num_features == 256 and m.seg_out_channels == 256
    assert m.architecture == "original" and m.bifpn_num_blocks == 3
    assert config_from_dict({"model": {"preset": "peaknet-atto"}}).model.architecture == "v1"
    assert config_from_dict({"model": {"preset": "classical"}}).model.kind == "classical"


@pytest.mark.parametrize("model, key, value, problem", [
    ({"dims": [1, 2, 3, 4]}, "model.dims", [1, 2, 3, 4], "renamed to model.backbone_hidden_sizes"),
    ({"bifpn_blocks": 2}, "model.bifpn_blocks", 2, "renamed to model.bifpn_num_blocks"),
    ({"backbone_depths": [3, 3, 9]}, "model.backbone_depths", [3, 3, 9], "4 stages"),
    ({"preset": "peaknet-small", "seg_out_channels": 48}, "model.seg_out_channels", 48, "multiple of 32"),
    ({"uses_learned_upsample": True}, "model.uses_learned_upsample", True, "only the original"),
    ({"architecture": "hf"}, "model.architecture", "hf", "one of"),
    ({"normalisation": "batch"}, "model.normalisation", "batch", "one of"),
    ({"normalisation": "fixed", "norm_std": 0.0}, "model.norm_std", 0.0, ">="),
])
def test_architecture_keys_are_validated(model, key, value, problem):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": model})
    assert err.value.key == key and err.value.value == value and problem in str(err.value)


@pytest.mark.parametrize("text, key, value", [
    ("pipeline: {batchsize: 4}\n", "pipeline.batchsize", 4),
    ("pipeline: {buffers: three}\n", "pipeline.buffers", "three"),
    ("pipeline: {buffers: 1}\n", "pipeline.buffers", 1),
    ("pipeline: {precision: fp8}\n", "pipeline.precision", "fp8"),
    ("pipeline: {compile: 'yes'}\n", "pipeline.compile", "yes"),
    ("ingest: {sockets: [{endpoint: 'tcp://a:1', mod: bind}]}\n", "ingest.sockets[0].mod", "bind"),
    ("model: {preset: peaknet-huge}\n", "model.preset", "peaknet-huge"),
    ("model: {classical: {inner_radius: 6, outer_radius: 4}}\n", "model.classical.outer_radius", 4),
    ("metrics: {port: 70000}\n", "metrics.port", 70000),
    ("outputs: {}\n", "outputs", {}),
])
def test_errors_name_key_value_and_file(tmp_path, text, key, value):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key and err.value.value == value
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a list\n"))


def test_overrides_are_validated_and_a_new_preset_replaces_sizes():
    cfg = config_from_dict({"model": {"preset": "peaknet-small", "checkpoint": "x.safetensors"}})
    atto = with_overrides(cfg, {"model.preset": "peaknet-atto", "pipeline.batch_size": 8})
    assert atto.model.backbone_hidden_sizes == PRESETS["peaknet-atto"]["backbone_hidden_sizes"]
    assert atto.model.architecture == "v1" and atto.pipeline.batch_size == 8
    assert atto.model.checkpoint == "x.safetensors"
    with pytest.raises(ConfigError, match="pipeline.buffers"):
        with_overrides(cfg, {"pipeline.buffers": 0})


def test_a_format_whose_library_is_missing_is_a_config_error_naming_the_socket(monkeypatch):
    from peaknet_daemon import sources
    monkeypatch.setitem(sources.SOURCES, "stream2", "no_such_module:Stream2Source")  # as if cbor2 were absent
    with pytest.raises(ConfigError) as err:
        config_from_dict({"ingest": {"sockets": [{"format": "peaknet/1"}, {"format": "stream2"}]}})
    assert err.value.key == "ingest.sockets[1].format" and "not installed" in str(err.value)
