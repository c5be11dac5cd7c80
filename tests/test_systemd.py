"""The unit file: systemd-analyze verify finds nothing, and the contract keys are there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "peaknet-daemon.service"
EXEC = "/opt/peaknet/venv/bin/peaknet-daemon"


def unit_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def test_contract_keys():
    k = unit_keys()
    assert k["Type"] == ["notify"] and k["NotifyAccess"] == ["all"]
    assert k["ExecStart"] == [f"{EXEC} --config /etc/peaknet/daemon.yaml"]
    assert k["WatchdogSec"] == ["60"] and k["Restart"] == ["on-failure"] and k["KillMode"] == ["mixed"]
    assert k["TimeoutStopSec"] == ["120"] and k["LimitMEMLOCK"] == ["infinity"]
    assert k["User"] == ["peaknet"] and k["Group"] == ["peaknet"]
    assert k["ProtectSystem"] == ["strict"] and k["ReadWritePaths"] == ["/var/lib/peaknet /var/log/peaknet"]
    for flag in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "ProtectKernelTunables",
                 "ProtectControlGroups", "RestrictSUIDSGID"):
        assert k[flag] == ["yes"], flag
    assert "RAY_AUTH_MODE=token" in k["Environment"]  # Ray's token auth stays on
    assert "RAY_DEDUP_LOGS=0" in k["Environment"]  # every rejection detail reaches the journal


def test_env_example_is_key_value():
    text = (ROOT / "systemd" / "peaknet.env.example").read_text()
    pairs = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert pairs and all("=" in ln and " " not in ln.split("=", 1)[0] for ln in pairs)
    assert "RAY_USAGE_STATS_ENABLED=0" in pairs and not any(p.startswith("RAY_AUTH_MODE=") for p in pairs)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart exists; point it at a stand-in, everything else unchanged
    exe = tmp_path / "peaknet-daemon"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(f"ExecStart={EXEC} ", f"ExecStart={exe} "))
    assert str(exe) in unit.read_text()
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "notice"}
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, env=env)
    # unknown keys and bad values are only warnings, so any output about the unit is a failure
    problems = [ln for ln in (out.stdout + out.stderr).splitlines() if UNIT.name in ln]
    assert out.returncode == 0 and problems == [], out.stdout + out.stderr
    # the check itself can fail: a typo is reported
    bad = tmp_path / "bad.service"
    bad.write_text(f"[Service]\nExecStart={exe}\nProtectSystem=wrong\n")
    out = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "bad.service" in out.stdout + out.stderr
