"""The live monitor: a page at /monitor for the people at the beamline (hit rate, peaks per
frame, virtual powder, the latest hits with their peaks, per-actor figures).

- `HitSampler` (sampler.py): the actor side, a bounded, rate-limited side channel of result
  summaries and hit frames, drained by the actor's stats();
- `MonitorState` (state.py): the supervisor side, fed from each stats poll;
- `monitor_app` (app.py): the WSGI app the metrics server routes /monitor* to;
- images.py: panel tiling, colour scaling and a dependency-free PNG writer;
- static/: the page, and uPlot (MIT, vendored from npm; see static/VENDORED.md).
"""

from .app import PREFIX, monitor_app
from .sampler import HitSampler
from .state import MonitorState, gpu_readings

__all__ = ["PREFIX", "HitSampler", "MonitorState", "gpu_readings", "monitor_app"]
