"""tools/bench_receive.py: the bare receiver the daemon's ingest-only row is compared with."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_receive.py"


@pytest.mark.timeout(120)
def test_every_frame_sent_is_received_and_counted_in_a_row_per_destination(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(TOOL), "--producers", "1,2", "--processes", "2", "--frames", "60",
                          "--frame-shape", "2,64,64", "--dest", "reuse,ring,shm", "--ring-frames", "3",
                          "--json", str(out)], capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [(r["dest"], r["producers"], r["processes"], r["frames_held"]) for r in rows] == [
        ("reuse", 1, 1, 1), ("reuse", 2, 2, 1), ("ring", 1, 1, 3), ("ring", 2, 2, 3), ("shm", 1, 1, 3),
        ("shm", 2, 2, 3)]
    for r in rows:
        assert r["received"] == r["sent"] == 60 * r["producers"]
        assert r["wrong_size"] == 0
        assert r["frame_bytes"] == 2 * 64 * 64 * 4
        assert r["gb_s"] > 0
    assert "dest=ring  K=2 P=2" in run.stdout
