"""Config: YAML -> validated objects; every error names the key, the value and the file."""

import pytest

from peaknet_daemon.config import ConfigError, PRESETS, config_from_dict, load_config, with_overrides


def write(tmp_path, text):
    path = tmp_path / "daemon.yaml"
    path.write_text(text)
    return path


def test_presets_fill_the_model_and_explicit_keys_win(tmp_path):
    cfg = load_config(write(tmp_path, "model: {preset: peaknet-small, bifpn_blocks: 3}\n"))
    assert cfg.model.dims == PRESETS["peaknet-small"]["dims"] == [96, 192, 384, 768]
    assert cfg.model.depths == [3, 3, 9, 3] and cfg.model.bifpn_features == 256
    assert cfg.model.bifpn_blocks == 3
    assert config_from_dict({"model": {"preset": "classical"}}).model.kind == "classical"


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
    assert atto.model.dims == PRESETS["peaknet-atto"]["dims"] and atto.pipeline.batch_size == 8
    assert atto.model.checkpoint == "x.safetensors"
    with pytest.raises(ConfigError, match="pipeline.buffers"):
        with_overrides(cfg, {"pipeline.buffers": 0})
