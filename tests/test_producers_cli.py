"""The peaknet-producer CLI as the daemon's tests run it: subprocesses, errors, SIGINT, K sources."""

import signal
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

from peaknet_producers.cli import main
from peaknet_producers.progress import parse_summary
from peaknet_producers.truth import read_truth

from _producer_util import Receiver, free_tcp

CLI = [sys.executable, "-m", "peaknet_producers.cli"]


def _cli(*args, timeout=60):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def _summary(stdout: str) -> dict:
    return parse_summary([l for l in stdout.splitlines() if l.startswith("summary:")][-1])


def test_bragg_subprocess_connect_with_truth(tmp_path):
    ep = free_tcp()
    rx = Receiver(ep)
    rx.start()
    assert rx.ready.wait(10)
    truth = tmp_path / "t.jsonl"
    r = _cli("bragg", "--endpoint", ep, "--connect", "--frames", "12", "--rate", "0", "--source", "p0",
             "--run", "1", "--seed", "0", "--detector", "epix10k2m", "--truth", str(truth))
    rx.finish()
    assert r.returncode == 0, r.stderr
    s = _summary(r.stdout)
    assert int(s["frames"]) == 12 == rx.controls[-1].count == len(rx.frames)
    assert int(s["bytes"]) > 12 * 16 * 352 * 384 * 2 and float(s["gb_per_s"]) > 0
    t = read_truth(truth)
    assert [t[h.seq]["n_peaks"] for h, _ in rx.frames] == [h.meta["n_peaks"] for h, _ in rx.frames]
    assert rx.frames[0][0].shape == (16, 352, 384) and rx.frames[0][0].dtype == "uint16"


def test_random_subprocess_bind():
    ep = free_tcp()
    p = subprocess.Popen([*CLI, "random", "--endpoint", ep, "--bind", "--shape", "2,64,64",
                          "--dtype", "float32", "--frames", "100"], stdout=subprocess.PIPE, text=True)
    rx = Receiver(ep, bind=False)
    rx.start()
    out, _ = p.communicate(timeout=60)
    rx.finish()
    assert p.returncode == 0
    assert rx.controls[-1].count == 100 == len(rx.frames) == int(_summary(out)["frames"])
    assert rx.frames[0][1].dtype == np.float32 and rx.frames[0][1].shape == (2, 64, 64)


def test_unreachable_endpoint_is_one_line_error():
    ep = free_tcp()  # nobody listens there
    r = _cli("random", "--endpoint", ep, "--frames", "3", "--timeout", "1", "--shape", "4,4")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and ep in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv,needle", [
    (["replay", "/nonexistent/run.h5"], "file not found: /nonexistent/run.h5"),
    (["random", "--shape", "0,4"], "shape"),
    (["random", "--endpoint", "bogus://x", "--timeout", "1"], "bogus://x"),
])
def test_bad_input_in_process(capsys, argv, needle):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_wrong_dataset_subprocess(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["a"] = np.zeros((2, 4, 4), np.float32)
    r = _cli("replay", str(tmp_path / "x.h5"), "--dataset", "/entry/data/data", "--timeout", "1")
    assert r.returncode == 1 and "no dataset /entry/data/data" in r.stderr and "Traceback" not in r.stderr


def test_sigint_ends_cleanly_and_sends_end():
    ep = free_tcp()
    got5 = threading.Event()
    rx = Receiver(ep, on_frame=lambda n: got5.set() if n >= 5 else None)
    rx.start()
    assert rx.ready.wait(10)
    p = subprocess.Popen([*CLI, "random", "--endpoint", ep, "--frames", "0", "--rate", "100",
                          "--shape", "8,8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert got5.wait(30)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    rx.finish()
    assert p.returncode == 0, err
    assert rx.controls[-1].type == "end" and rx.controls[-1].count == len(rx.frames) >= 5
    assert int(_summary(out)["frames"]) == len(rx.frames)


def test_k_sources_into_record(tmp_path):
    ep, out = free_tcp(), tmp_path / "rec.h5"
    rec = subprocess.Popen([*CLI, "record", "--endpoint", ep, "--bind", "--ends", "2", "-o", str(out)],
                           stdout=subprocess.PIPE, text=True)
    r = _cli("random", "--endpoint", ep, "--sources", "2", "--frames", "20", "--shape", "1,8,8",
             "--timeout", "20")
    rec_out, _ = rec.communicate(timeout=60)
    assert r.returncode == 0 and rec.returncode == 0
    total = _summary(r.stdout)
    assert total["source"] == "all" and int(total["frames"]) == 40
    assert int(_summary(rec_out)["frames"]) == 40
    with h5py.File(out) as f:
        sources = f["source"].asstr()[()]
        seqs = f["seq"][()]
    for src in ("p0", "p1"):
        assert sorted(seqs[sources == src]) == list(range(20))
