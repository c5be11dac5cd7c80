"""Frame producers for peaknet-daemon: random tensors, simulated Bragg frames with ground truth,
replay and recording of runs (`peaknet-producer`), and the Ray object-store producers.

Modules import lazily (ray and torch only in `ray_producers`); start from `sender.run_producer`,
`bragg.BraggSimulator`, `replay.replay_items`, `record.record_stream`."""
