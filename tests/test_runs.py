"""Run accounting over several actors, restarts, runs without an end, and shutdown."""

from peaknet_daemon.runs import RunTracker


def stats(index, incarnation, runs, controls=()):
    """runs: [source, run, processed, min seq, max seq] rows, as a worker reports them."""
    return {"index": index, "incarnation": incarnation, "runs": runs, "controls": list(controls)}


END = {"type": "end", "source": "p0", "run": 1, "count": 10}


def test_run_completes_when_actors_together_processed_count():
    t = RunTracker(grace_s=5)
    assert t.update([stats(0, "a", [["p0", 1, 4, 0, 8]], [END]), stats(1, "b", [["p0", 1, 5, 1, 9]])], now=0) == []
    assert t.pending() == [("p0", 1)]
    (done,) = t.update([stats(0, "a", [["p0", 1, 4, 0, 8]], [END]), stats(1, "b", [["p0", 1, 6, 1, 9]])], now=1)
    assert (done.count, done.processed, done.missing, done.timed_out, done.how) == (10, 10, 0, False, "end")
    assert t.update([stats(1, "b", [["p0", 1, 6, 1, 9]])], now=2) == []  # reported once
    assert t.settle_all() == []


def test_shortfall_counted_as_missing_after_grace():
    t = RunTracker(grace_s=5)
    t.update([stats(0, "a", [["p0", 1, 7, 0, 9]], [END])], now=0)
    assert t.update([stats(0, "a", [["p0", 1, 7, 0, 9]], [END])], now=4.9) == []
    (done,) = t.update([stats(0, "a", [["p0", 1, 7, 0, 9]], [END])], now=5.0)
    assert (done.missing, done.timed_out) == (3, True)


def test_frames_of_a_dead_incarnation_still_count():
    t = RunTracker(grace_s=5)
    t.update([stats(0, "old", [["p0", 1, 6, 0, 5]])], now=0)
    (done,) = t.update([stats(0, "new", [["p0", 1, 4, 6, 9]], [END])], now=1)
    assert done.processed == 10 and done.missing == 0


def test_a_run_without_end_is_settled_by_seq_gaps_once_the_source_moves_on():
    t = RunTracker(grace_s=5)
    t.update([stats(0, "a", [["p0", 1, 8, 0, 9]])], now=0)  # seqs 0..9, 8 processed: 2 gaps
    t.update([stats(0, "a", [["p0", 1, 8, 0, 9], ["p0", 2, 1, 0, 0]])], now=1)
    assert t.update([stats(0, "a", [["p0", 1, 8, 0, 9], ["p0", 2, 3, 0, 2]])], now=5.9) == []
    (done,) = t.update([stats(0, "a", [["p0", 1, 8, 0, 9], ["p0", 2, 3, 0, 2]])], now=6)
    assert (done.run, done.count, done.processed, done.missing, done.how) == (1, 10, 8, 2, "next_run")
    (last,) = t.settle_all()
    assert (last.run, last.missing, last.how) == (2, 0, "shutdown")


def test_shutdown_settles_an_ended_run_short_of_its_count():
    t = RunTracker(grace_s=60)
    t.update([stats(0, "a", [["p0", 1, 9, 0, 9]], [END])], now=0)
    (done,) = t.settle_all()
    assert (done.count, done.processed, done.missing, done.how) == (10, 9, 1, "shutdown")


def test_a_dead_incarnation_counts_what_its_results_sender_sent():
    """The worker's tally was written before its last results went into the sender's pipe;
    the sender's final count (3 more) is what reached the consumer."""
    from peaknet_daemon.accounting import Accounting, merge_sent
    worker = {**stats(0, "old", [["p0", 1, 10, 0, 9]]), "received": 15, "processed": 10, "peaks": 50,
              "hits": 4, "in_flight": 5, "results_sender": 4242}
    sent = {"final": True, "processed": 13, "peaks": 60, "hits": 5, "runs": [["p0", 1, 13, 0, 12]],
            "results_dropped": {}}
    acc = Accounting(grace_s=5)
    acc.observe([{**worker, "processed": 9, "runs": [["p0", 1, 9, 0, 8]]}], now=0)  # last poll
    assert acc.end(0, "old", merge_sent(worker, sent), now=1) == 2  # 15 received, 13 sent
    new = {**stats(0, "new", [["p0", 1, 5, 15, 19]], [{**END, "count": 20}]), "processed": 5}
    assert acc.observe([new], now=2) == []
    (done,) = acc.observe([new], now=7)  # the grace after the end
    assert (done.processed, done.missing) == (18, 2)  # seqs 13 and 14 died with the old incarnation
    totals = acc.totals()
    assert (totals["processed"], totals["lost_in_restart"], totals["hits"]) == (13 + 5, 2, 5)
    assert merge_sent(worker, {**sent, "final": False}) is worker  # only a final count stands
