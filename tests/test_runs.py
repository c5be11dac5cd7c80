"""Run accounting over several actors and restarts."""

from peaknet_daemon.runs import RunTracker


def stats(index, incarnation, runs, controls=()):
    return {"index": index, "incarnation": incarnation, "runs": runs, "controls": list(controls)}


END = {"type": "end", "source": "p0", "run": 1, "count": 10}


def test_run_completes_when_actors_together_processed_count():
    t = RunTracker(grace_s=5)
    assert t.update([stats(0, "a", [["p0", 1, 4]], [END]), stats(1, "b", [["p0", 1, 5]])], now=0) == []
    assert t.pending() == [("p0", 1)]
    (done,) = t.update([stats(0, "a", [["p0", 1, 4]], [END]), stats(1, "b", [["p0", 1, 6]])], now=1)
    assert (done.count, done.processed, done.missing, done.timed_out) == (10, 10, 0, False)
    assert t.update([stats(1, "b", [["p0", 1, 6]])], now=2) == []  # reported once


def test_shortfall_counted_as_missing_after_grace():
    t = RunTracker(grace_s=5)
    t.update([stats(0, "a", [["p0", 1, 7]], [END])], now=0)
    assert t.update([stats(0, "a", [["p0", 1, 7]], [END])], now=4.9) == []
    (done,) = t.update([stats(0, "a", [["p0", 1, 7]], [END])], now=5.0)
    assert (done.missing, done.timed_out) == (3, True)


def test_frames_of_a_dead_incarnation_still_count():
    t = RunTracker(grace_s=5)
    t.update([stats(0, "old", [["p0", 1, 6]])], now=0)
    (done,) = t.update([stats(0, "new", [["p0", 1, 4]], [END])], now=1)
    assert done.processed == 10 and done.missing == 0
