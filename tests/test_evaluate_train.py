"""tools/evaluate.py (metrics with ignored peaks and position error, OM's peakfinder8 through its
own venv) and tools/train.py (resume round trip) on tiny inputs, CPU only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peaknet_daemon.evaluation import AccuracyTally, PeakList, selection_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import evaluate  # noqa: E402
import train  # noqa: E402


def _pl(yx, snr=None) -> PeakList:
    yx = np.asarray(yx, float).reshape(-1, 2)
    return PeakList(np.zeros(len(yx), int), yx[:, 0], yx[:, 1], None, None if snr is None else np.asarray(snr, float))


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def test_position_rms_per_bin():
    tally = AccuracyTally()
    truth = _pl([[10, 10], [30, 30], [50, 50]], snr=[4.0, 6.0, 20.0])
    found = _pl([[10.3, 10.4], [30.0, 30.6], [50.0, 50.0]])  # errors 0.5, 0.6, 0.0 px
    tally.add(found, truth)
    s = tally.summary()
    assert s["bins"]["3-5"]["rms_px"] == pytest.approx(0.5)
    assert s["bins"]["5-10"]["rms_px"] == pytest.approx(0.6)
    assert s["cumulative"][">=5"]["rms_px"] == pytest.approx(math.sqrt((0.36 + 0.0) / 2))
    assert math.isnan(s["bins"]["2-3"]["rms_px"])  # no match there


def test_found_peaks_on_ignored_reflections_cost_nothing():
    truth = _pl([[10, 10]], snr=[8.0])
    ignore = _pl([[40, 40]], snr=[1.2])
    found = _pl([[10, 10], [40.5, 40], [80, 80]])
    with_ign, without = AccuracyTally(), AccuracyTally()
    with_ign.add(found, truth, ignore=ignore)
    without.add(found, truth)
    a, b = with_ign.summary(), without.summary()
    assert a["ignored"] == 1 and a["spurious"] == 1 and a["found"] == 2
    assert b["spurious"] == 2 and b["found"] == 3
    assert a["overall"]["precision"] == pytest.approx(1 / 2) and b["overall"]["precision"] == pytest.approx(1 / 3)


def test_selection_score_charges_noise_on_empty_frames():
    """Per-bin rows share spurious peaks by true-peak count, so a frame set with no true peaks
    would score noise as perfect there; the selection score must not."""
    quiet, noisy = AccuracyTally(), AccuracyTally()
    for t in (quiet, noisy):
        t.add(_pl([[10, 10]]), _pl([[10, 10]], snr=[6.0]))
    noisy.add(_pl([[5, 5], [20, 20], [60, 60]]), _pl(np.zeros((0, 2)), snr=[]))
    quiet.add(_pl(np.zeros((0, 2))), _pl(np.zeros((0, 2)), snr=[]))
    assert selection_score(quiet.summary()) == pytest.approx(1.0)
    assert selection_score(noisy.summary()) == pytest.approx(2 * 0.25 * 1 / 1.25)


def test_summary_table_lists_skipped_finders():
    tally = AccuracyTally()
    tally.add(_pl([[10, 10]]), _pl([[10, 10]], snr=[6.0]))
    s = {**tally.summary(), "seconds_per_frame": 0.0123}
    table = evaluate.summary_table({"lattice": {"om": s, "peaknet-small": {"skipped": "no weights"}}})
    assert "| lattice | om | " in table and "12.3 |" in table and "skipped: no weights" in table


# ------------------------------------------------------------------------------------------------
# OM's peakfinder8 (its own venv: `make .venv-om`, built by `make test`)
# ------------------------------------------------------------------------------------------------

def _spot_family(seed: int = 0) -> evaluate.Family:
    """Two frames of 2 panels: flat Poisson background, bright 2-D Gaussian spots at known places."""
    from peaknet_producers.bragg import SimFrame

    rng = np.random.default_rng(seed)
    frames = []
    shape = (2, 64, 80)
    for _ in range(2):
        exp = np.full(shape, 4.0)
        cols = {"panel": [], "y": [], "x": [], "snr": []}
        yy, xx = np.mgrid[:64, :80]
        for p in range(2):
            for y, x in ((12.3, 15.6), (40.7, 50.2), (25.5, 66.1)):
                y, x = y + rng.uniform(-1, 1), x + rng.uniform(-1, 1)
                exp[p] += 300 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 0.9 ** 2))
                for k, v in zip(cols, (p, y, x, 150.0)):
                    cols[k].append(v)
        data = rng.poisson(exp).astype(np.float32)
        peaks = {k: np.asarray(v) for k, v in cols.items()}
        frames.append(SimFrame(data=data, peaks=peaks, mask=np.zeros(shape, bool), meta={"hit": True}))
    radius = np.broadcast_to(np.hypot(*np.mgrid[:64, :80] - 30.0), shape).astype(np.float32)
    bad = np.zeros(shape, np.uint8)
    return evaluate.Family("spots", frames, [bad, bad], [radius, radius])


def test_om_peakfinder8_finds_the_spots_on_the_right_panel():
    fam = _spot_family()
    grid = [{"minimum_snr": 5.0, "min_pixel_count": 2, "max_pixel_count": 40, "local_bg_radius": 4,
             "adc_threshold": 0.0},
            {"minimum_snr": 5.0, "min_pixel_count": 2, "max_pixel_count": 40, "local_bg_radius": 4,
             "adc_threshold": 1e6}]  # nothing passes this ADC threshold
    runs = evaluate.om_peaks(fam, grid)
    assert [r["params"]["adc_threshold"] for r in runs] == [0.0, 1e6]
    s = evaluate.score(runs[0]["found"], fam.frames)
    assert s["overall"]["recall"] == 1.0 and s["overall"]["precision"] == 1.0
    assert s["overall"]["rms_px"] < 0.2  # OM's fs/ss are pixel-centre coordinates, as ours
    assert all(len(f) == 0 for f in runs[1]["found"])
    assert runs[0]["seconds_per_frame"] > 0
    # The OM bug per_panel works around: on one multi-ASIC slab, a second-panel peak at the same
    # panel-local place as a first-panel peak is merged with another one.
    slab = evaluate.om_peaks(fam, [{**grid[0], "per_panel": False}])[0]
    assert evaluate.score(slab["found"], fam.frames)["overall"]["recall"] < 1.0
    best, table = evaluate.tune_om(fam, grid)
    assert best["adc_threshold"] == 0.0 and len(table) == 2 and table[0]["score"] > table[1]["score"]


def test_om_missing_venv_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="make .venv-om"):
        evaluate.om_peaks(_spot_family(), [{}], om_python=tmp_path / "nope" / "python")


# ------------------------------------------------------------------------------------------------
# train.py: resume round trip
# ------------------------------------------------------------------------------------------------

def test_train_resumes_from_its_own_checkpoint(tmp_path):
    out = tmp_path / "atto.safetensors"
    common = ["--preset", "peaknet-atto", "--device", "cpu", "--crop", "32", "32", "--panels-per-sim", "2",
              "--batch", "2", "--pool", "8", "--workers", "0", "--val-frames", "2", "--val-every", "1000",
              "--log-every", "1", "--minutes", "3", "--sample-frames", "1", "--out", str(out)]
    torch.manual_seed(0)
    assert train.main(common + ["--max-steps", "2"]) == 0
    ckpt = train.load_resume(train.resume_path(out))
    assert ckpt["step"] == 2 and ckpt["run_index"] == 0 and out.is_file()
    first_opt_step = ckpt["optimizer"]["state"][0]["step"]
    assert float(first_opt_step) == 2.0
    assert train.main(common + ["--max-steps", "5", "--resume"]) == 0
    again = train.load_resume(train.resume_path(out))
    assert again["step"] == 5 and again["run_index"] == 1
    assert float(again["optimizer"]["state"][0]["step"]) == 5.0  # the optimiser state came along
    assert again["trained_s"] >= ckpt["trained_s"]
    log = json.loads(out.with_suffix(".train.json").read_text())
    assert [r["start_step"] for r in log["runs"]] == [0, 2] and [r["end_step"] for r in log["runs"]] == [2, 5]
    assert [r["step"] for r in log["steps"]] == [1, 2, 3, 4, 5]
    assert "threshold" in log["best"] and log["best"]["steps"] == 5
    assert 0.0 <= log["best"]["sample_precision"] <= 1.0  # the sweep counted the sample run too
    # the weights changed in the second run, and evaluate.py reads the recommended operating point
    assert not all(torch.equal(ckpt["model"][k], again["model"][k]) for k in ckpt["model"])
    assert evaluate.recommended(out)["threshold"] == log["best"]["threshold"]


# ------------------------------------------------------------------------------------------------
# bench_train.py: the step benchmark
# ------------------------------------------------------------------------------------------------

def test_bench_train_times_real_training_steps(tmp_path):
    import bench_train

    row = bench_train.time_steps("peaknet-atto", 2, "eager", 3, torch.device("cpu"), h=32, w=32)
    assert row["steps"] == 3 and row["panels_per_s"] > 0 and row["ms_per_step"] > 0
    assert math.isfinite(row["loss"])
    out = tmp_path / "rows.json"
    assert bench_train.main(["--device", "cpu", "--presets", "peaknet-atto", "--batches", "2",
                             "--modes", "eager,no-such-mode", "--steps", "1", "--size", "32", "32",
                             "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["mode"] == "eager" and rows[0]["steps"] == 1
    assert "no-such-mode" in rows[1]["error"]  # a failing mode is reported, the run goes on


def test_bench_train_data_side_counts_panels(tmp_path):
    import bench_train

    out = tmp_path / "data.json"
    assert bench_train.main(["--data-draws", "1,3", "--data-seconds", "0.5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["data"]
    assert [r["noise_draws"] for r in rows] == [1, 3]
    assert all(r["panels"] >= 4 and r["panels_per_s"] > 0 for r in rows)


def test_operating_point_keeps_the_sample_run_precise():
    """The sweep's pick: the best validation score among thresholds that keep precision >= 0.97
    on the sample run; without the sample run, the best score outright."""
    def summary(precision: float, recall: float) -> dict:
        return {"overall": {"precision": precision}, "cumulative": {">=3": {"recall": recall}}}

    sweep = {(0.5, 1): summary(0.97, 0.95), (0.8, 1): summary(0.99, 0.90)}
    sample = {(0.5, 1): summary(0.94, 0.95), (0.8, 1): summary(0.98, 0.93)}
    assert train.pick_operating_point(sweep, None) == (0.5, 1)
    assert train.pick_operating_point(sweep, sample) == (0.8, 1)
    nowhere = {k: summary(0.9, 0.9) for k in sample}
    assert train.pick_operating_point(sweep, nowhere) == (0.5, 1)  # none keeps it: best score


def test_sample_run_valset_holds_its_truth():
    val = train.sample_run_valset(2, torch.device("cpu"))
    assert val.images.shape == (32, 1, 352, 384)  # two epix10k2M frames of 16 panels
    from peaknet_producers import sample
    from peaknet_producers.truth import read_truth

    truth = read_truth(sample.SAMPLE_TRUTH)
    assert sum(len(t) for t in val.truths) == truth[0]["n_peaks"] + truth[1]["n_peaks"]


def test_sim_panels_repeat_an_expectation_with_new_noise():
    it = iter(train.SimPanels((2, 64, 64), 5, (2.0, 40.0), frames_per_config=1, bragg_fraction=0.0, noise_draws=2))
    (x1, y1), (x2, y2), (x3, _) = next(it), next(it), next(it)
    assert torch.equal(y1, y2) and not torch.equal(x1, x2)  # one expectation, two noise draws
    assert x3.shape == x1.shape  # then the next config


def test_checkpoints_are_scored_where_the_sample_run_stays_precise(monkeypatch):
    """A checkpoint's score is taken at the lowest threshold that keeps the sample run's
    precision >= 0.97, so one that marks noise on quiet frames pays for it in recall."""
    sample_val, val, asked = object(), object(), []

    def fake_validate(model, which, thresholds, batch, amp, min_pixels=1):
        asked.append((which, tuple(thresholds)))
        def summary(t):  # precision rises with the threshold, recall falls
            p = 0.90 + 0.1 * t if which is sample_val else 0.99
            return {"overall": {"precision": p, "recall": 1 - t / 2, "f1": 0.9},
                    "cumulative": {">=3": {"recall": 1 - t / 2, "f1": 0.9}, ">=5": {"f1": 0.9, "rms_px": 0.2}},
                    "bins": {"3-5": {"f1": 0.8}}}
        return {t: summary(t) for t in thresholds}

    monkeypatch.setattr(train, "validate", fake_validate)
    score, row = train.checkpoint_score(None, val, sample_val, 8, False)
    assert row["threshold"] == 0.7 and row["sample_precision"] >= 0.97  # 0.90 + 0.1 t >= 0.97 from t = 0.7
    assert asked[-1] == (val, (0.7,)) and score == pytest.approx(2 * 0.99 * 0.65 / (0.99 + 0.65))
    score_plain, row_plain = train.checkpoint_score(None, val, None, 8, False)
    assert row_plain["threshold"] == 0.5 and score_plain > score  # without the sample run: 0.5
