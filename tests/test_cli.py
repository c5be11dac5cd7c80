"""The command line as the README shows it: `peaknet-daemon --version`, `--check --config`,
config errors (exit 2, naming key, value and file), no GPU without CPU fallback (exit 2), and
`peaknet-gpu-check` on this GPU-less machine."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import peaknet_daemon
from peaknet_daemon import cli
from peaknet_daemon.config import PRESETS, GpusConfig
from peaknet_daemon.gpu_health import check_gpus

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def daemon(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`peaknet-daemon ARGS` in a subprocess (a hang fails the test instead of blocking it)."""
    return subprocess.run([sys.executable, "-m", "peaknet_daemon.cli", *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peaknet_daemon.gpu_health", *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "daemon.yaml"
    path.write_text(text)
    return path


def test_version():
    out = daemon("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"peaknet-daemon {peaknet_daemon.__version__}"


@pytest.mark.parametrize("name", ["demo-cpu.yaml", "beamline-gpu.yaml"])
def test_check_prints_the_resolved_config(name):
    """`--check` validates without starting anything and prints YAML that loads back, with the
    preset's sizes filled in and the file's own values kept."""
    path = REPO / "configs" / name
    out = daemon("--check", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"# {path}: valid\n")
    resolved = yaml.safe_load(out.stdout)
    given = yaml.safe_load(path.read_text())
    preset = PRESETS[given["model"]["preset"]]
    for key in ("architecture", "backbone_hidden_sizes", "backbone_depths", "bifpn_num_blocks"):
        assert resolved["model"][key] == preset[key]
    assert resolved["pipeline"]["frame_shape"] == given["pipeline"]["frame_shape"]
    assert resolved["gpus"] == {**resolved["gpus"], **given["gpus"]}
    assert set(resolved) == {"model", "pipeline", "ray", "gpus", "ingest", "output", "detector", "metrics",
                             "monitor",
                             "health", "shutdown", "security", "logging"}


def test_check_without_config_uses_builtin_defaults(capsys):
    assert cli.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# <built-in defaults>: valid")
    assert yaml.safe_load(out)["pipeline"]["batch_size"] == 16


@pytest.mark.parametrize("text, key, value", [
    ("pipeline: {batchsize: 4}\n", "pipeline.batchsize", "4"),
    ("pipeline: {buffers: \"three\"}\n", "pipeline.buffers", "'three'"),
    ("pipeline: {buffers: 1}\n", "pipeline.buffers", "1"),
    ("ingest: {sockets: [{endpoint: x, mod: bind}]}\n", "ingest.sockets[0].mod", "'bind'"),
    ("model: {preset: peaknet-huge}\n", "model.preset", "'peaknet-huge'"),
    ("output: {save_frames: some}\n", "output.save_frames", "'some'"),
], ids=["typo", "wrong-type", "out-of-range", "nested-socket-key", "unknown-preset", "bad-choice"])
def test_bad_config_exits_2_naming_key_value_and_file(tmp_path, capsys, text, key, value):
    path = write_yaml(tmp_path, text)
    assert cli.main(["--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert f"'{key}' = {value}" in err
    assert str(path) in err


def test_bad_config_messages_say_what_is_wrong(tmp_path, capsys):
    cases = {
        "pipeline: {batchsize: 4}\n": "unknown key (known: batch_size,",
        "pipeline: {buffers: \"three\"}\n": "must be an integer",
        "pipeline: {buffers: 1}\n": "must be >= 2",
        "ingest: {sockets: [{endpoint: x, mod: bind}]}\n": "known: endpoint, mode,",
    }
    for text, problem in cases.items():
        assert cli.main(["--config", str(write_yaml(tmp_path, text))]) == 2
        assert problem in capsys.readouterr().err, text


def test_missing_file_exits_2(tmp_path):
    path = tmp_path / "nowhere.yaml"
    out = daemon("--config", str(path))
    assert out.returncode == 2
    assert str(path) in out.stderr and "cannot read" in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_yaml_exits_2(tmp_path):
    path = write_yaml(tmp_path, "pipeline: {batch_size: 4\nmodel: [\n")
    out = daemon("--check", "--config", str(path))
    assert out.returncode == 2
    assert str(path) in out.stderr and "not valid YAML" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_of_a_bad_config_exits_2(tmp_path):
    """`--check` is what operators run before a restart: it must fail like the daemon would."""
    out = daemon("--check", "--config", str(write_yaml(tmp_path, "pipeline: {buffers: 1}\n")))
    assert out.returncode == 2 and out.stdout == ""
    assert "pipeline.buffers" in out.stderr


# The no-GPU behaviour is what this (CI, development) machine shows; on a GPU node it differs.
without_gpu = pytest.mark.skipif(bool(check_gpus(GpusConfig(), run_probe=False)), reason="NVML sees a GPU here")
NO_METRICS = "metrics: {enabled: false}\nlogging: {format: json}\n"


def tally_dirs() -> set:
    """The supervisors' tally folders (supervisor.py: in /dev/shm, else the temp folder)."""
    return {p for d in ("/dev/shm", tempfile.gettempdir()) for p in Path(d).glob("peaknet-tally-*")}


@without_gpu
def test_no_gpu_without_cpu_fallback_exits_2(tmp_path):
    path = write_yaml(tmp_path, "gpus: {cpu_fallback: false}\n" + NO_METRICS)
    before = tally_dirs()
    out = daemon("--config", str(path))
    assert out.returncode == 2, out.stderr
    assert tally_dirs() <= before  # a failed start leaves no tally folder behind
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("peaknet-daemon: no healthy GPU found")
    assert "gpus.cpu_fallback is false" in last and str(path) in last
    assert "startup_failed" in out.stderr  # also in the structured log
    assert "Traceback" not in out.stderr


@without_gpu
def test_fewer_gpus_than_min_gpus_exits_2(tmp_path):
    path = write_yaml(tmp_path, "gpus: {min_gpus: 1}\n" + NO_METRICS)
    out = daemon("--config", str(path))
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "0 healthy GPUs" in last and "gpus.min_gpus" in last and str(path) in last


@without_gpu
def test_gpu_check_reports_no_gpu():
    out = gpu_check()
    assert out.returncode == 1, out.stderr  # a health check that found nothing to check fails
    assert out.stdout.strip().startswith("no NVIDIA GPU found (no NVML library, no driver, or no device)")
    assert "--allow-none" in out.stdout
    assert gpu_check("--allow-none").returncode == 0
    assert gpu_check("--allow-none", "--min-gpus", "1").returncode == 1


@without_gpu
def test_gpu_check_json_is_an_empty_list():
    out = gpu_check("--json", "--min-gpus", "0", "--allow-none")
    assert out.returncode == 0 and yaml.safe_load(out.stdout) == []


def test_an_ingest_port_already_in_use_exits_2_naming_it(tmp_path):
    import socket
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    cfg = write_yaml(tmp_path, f"""
pipeline: {{frame_shape: [1, 32, 32], device: cpu}}
model: {{preset: classical}}
ray: {{num_cpus: 1}}
ingest: {{sockets: [{{endpoint: "tcp://127.0.0.1:{port}", mode: bind}}]}}
metrics: {{enabled: false}}
""")
    try:
        proc = daemon("--config", str(cfg), timeout=120)
    finally:
        blocker.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot bind ingest socket tcp://127.0.0.1:{port}" in proc.stderr


def test_ray_log_dedup_is_off_for_the_daemon():
    """Set before ray is imported (Ray reads it at import), unless the user chose otherwise."""
    code = ("from peaknet_daemon import cli; cli.ray_environment(); "
            "from ray._private import ray_constants as c; print(c.RAY_DEDUP_LOGS)")
    env = {k: v for k, v in ENV.items() if k != "RAY_DEDUP_LOGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    out = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_DEDUP_LOGS": "1"}, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
