"""`tools/fuzz_daemon.py`: a 5,000-message round of malformed and valid messages against a live
CPU daemon; every check of its report must hold."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_round_of_5000_messages(tmp_path):
    report_path = tmp_path / "fuzz.json"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz_daemon.py"), "--messages", "5000",
                          "--seed", "1", "--json", str(report_path)],
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                         timeout=280)
    assert report_path.exists(), out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert not failed, (failed, report)
    assert out.returncode == 0
    assert report["expected_by_reason"] == report["rejected_by_reason"]
    assert len(report["rejected_by_reason"]) >= 12  # the generator reached every kind of reason
    assert report["results"] == sum(report["valid_frames"].values()) > 1000
