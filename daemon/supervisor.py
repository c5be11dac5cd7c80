"""The supervisor: the Ray driver that owns the daemon's lifecycle.

start: GPU health -> CUDA_VISIBLE_DEVICES -> ray.init -> leftover `*.cxi.tmp` renamed
`*.cxi.partial` -> one actor per healthy GPU (or CPU actors) -> metrics endpoint -> READY=1.
Then every `metrics.interval_s`: gather every actor's stats at once, fold them into
`Accounting` (restarts, losses, runs), update metrics, and send WATCHDOG=1 only while frames
move: every actor answers and is healthy, or is restarting for less than
`health.restart_grace_s`. stop: STOPPING=1, all actors drain and stop in parallel, each wait
bounded, final totals logged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray

from .accounting import Accounting, merge_sent, read_tally_file
from .actor import PipelineActor, actor_options
from .config import Config
from .gpu_health import check_gpus, check_node_task, format_table, healthy_visible_devices
from .log import RateLimitedLog, get_logger, route_worker_logs
from .metrics import Metrics
from .monitor import PREFIX as MONITOR_PREFIX, MonitorState, gpu_readings, monitor_app
from .sdnotify import SdNotifier
from .worker import sent_path, tally_path
from .security import exposure_warnings

log = get_logger("peaknet.supervisor")
SENDER_FINAL_S = 10.0  # a dead actor's results sender sends what its pipe held, then counts (~ms)


def _last_line(exc: BaseException) -> str:
    """The final line of a remote traceback: the error itself."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


class StartupError(RuntimeError):
    """The daemon cannot start (no usable device, Ray unreachable); exit code 2."""


@dataclass
class _ActorState:
    handle: Any
    index: int
    node: str = ""
    incarnation: str = ""  # as started; later ones are in `last`
    last: dict = field(default_factory=dict)
    alive: bool = False
    down_since: Optional[float] = None  # monotonic time it stopped answering


def rename_leftovers(cxi_dir: str) -> int:
    """`*.cxi.tmp` files left by a daemon that died become `*.cxi.partial`; how many."""
    if not cxi_dir or not os.path.isdir(cxi_dir):
        return 0
    n = 0
    for tmp in Path(cxi_dir).glob("*.cxi.tmp"):
        try:
            os.replace(tmp, tmp.with_name(tmp.name[: -len(".tmp")] + ".partial"))
            n += 1
        except OSError:
            pass
    return n


class Supervisor:
    """See the module docstring."""

    def __init__(self, cfg: Config, notifier: SdNotifier | None = None):
        self.cfg = cfg
        self.notifier = notifier or SdNotifier()
        self.metrics = Metrics()
        self.accounting = Accounting(cfg.ingest.run_end_grace_s)
        self.monitor = (MonitorState(cfg.monitor, cfg.pipeline.frame_shape, cfg.output.hit_threshold,
                                     cfg.metrics.interval_s) if cfg.monitor.enabled else None)
        if self.monitor is not None:
            self.metrics.mount(MONITOR_PREFIX, monitor_app(self.monitor))
        self.actors: list[_ActorState] = []
        self.metrics_port: int | None = None
        self._server = None
        self._last_loop = time.monotonic()
        self._rate = (time.monotonic(), 0)
        self._frames_moving = True
        self._health_log = RateLimitedLog(30.0)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.tally_dir = tempfile.mkdtemp(prefix="peaknet-tally-", dir=shm)

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Start Ray and the actors; a StartupError leaves nothing of this supervisor behind."""
        try:
            self._start()
        except StartupError:
            shutil.rmtree(self.tally_dir, ignore_errors=True)  # nothing was counted yet
            raise

    def _start(self) -> None:
        for warning in exposure_warnings(self.cfg):  # issue 11: open non-loopback binds
            log.warning("insecure_endpoint", detail=warning)
        use_gpu, placements = self._plan_actors()
        leftovers = rename_leftovers(self.cfg.output.cxi_dir)
        if leftovers:
            log.warning("cxi_leftovers_renamed", files=leftovers, cxi_dir=self.cfg.output.cxi_dir,
                        detail="*.cxi.tmp of a daemon that did not stop cleanly are now *.cxi.partial")
        remote_cls = ray.remote(PipelineActor)
        for i, node in enumerate(placements):
            options = actor_options(self.cfg, use_gpu, spread=False)
            if node:
                options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                    node_id=node, soft=True)
            handle = remote_cls.options(**options).remote(self.cfg, i, True, self.tally_dir)
            self.actors.append(_ActorState(handle, i, node))
        endpoints: list[str] = []
        for state in self.actors:
            try:
                info = ray.get(state.handle.ready.remote(), timeout=600)  # includes compile + warm-up
            except ray.exceptions.RayActorError as exc:
                raise StartupError(f"pipeline actor {state.index} failed to start: {_last_line(exc)}") from None
            except ray.exceptions.RuntimeEnvSetupError as exc:  # the actor's GLIBC_TUNABLES (actor_options)
                raise StartupError(f"pipeline actor {state.index}: Ray could not set up its process environment "
                                   f"(ingest.streaming_copy_bytes: 0 in {self.cfg.source} starts it without one): "
                                   f"{_last_line(exc)}") from None
            state.alive, state.incarnation = True, info["incarnation"]
            self.accounting.observe([{"index": state.index, "incarnation": info["incarnation"], "runs": [],
                                      "controls": []}], time.monotonic())
            endpoints += info["endpoints"]
            log.info("actor_ready", actor=state.index, **info)
        self._serve_metrics()
        self.notifier.ready()
        self.notifier.status(f"{len(self.actors)} actors up ({'GPU' if use_gpu else 'CPU'})")
        log.info("daemon_ready", actors=len(self.actors), device="gpu" if use_gpu else "cpu",
                 endpoints=sorted(set(endpoints)), metrics_port=self.metrics_port)

    def _plan_actors(self) -> tuple[bool, list[str]]:
        """Check GPUs, start or join Ray, decide how many actors go where (node ids)."""
        cfg = self.cfg
        if not cfg.ray.address:
            n_gpus = self._local_gpus()
            kwargs: dict[str, Any] = {"address": "local", "namespace": cfg.ray.namespace, "include_dashboard": False,
                                      "num_gpus": n_gpus, "log_to_driver": True}
            if cfg.ray.num_cpus:
                kwargs["num_cpus"] = cfg.ray.num_cpus
            ray.init(**kwargs)
            route_worker_logs(cfg.logging)
            count = n_gpus if n_gpus else cfg.gpus.cpu_actors
            if n_gpus and cfg.gpus.max_actors:
                count = min(count, cfg.gpus.max_actors)
            return bool(n_gpus), [""] * count
        ray.init(address=cfg.ray.address, namespace=cfg.ray.namespace)
        route_worker_logs(cfg.logging)
        return self._cluster_placements()

    def _local_gpus(self) -> int:
        """Check this node's GPUs; export the healthy ones the user allowed as
        CUDA_VISIBLE_DEVICES (before Ray starts, so Ray and the actors see only those)."""
        gcfg = self.cfg.gpus
        if not gcfg.validate:
            import torch
            return torch.cuda.device_count()
        reports = check_gpus(gcfg)
        if reports:
            log.info("gpu_health", table=format_table(reports))
        for r in reports:
            if not r.healthy:
                log.error("gpu_unhealthy", gpu=r.index, problems=r.problems)
        visible = healthy_visible_devices(reports, os.environ.get("CUDA_VISIBLE_DEVICES"))
        usable = len([t for t in visible.split(",") if t])  # NVML sees every GPU; count the allowed
        if usable:
            os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's numbering = NVML's
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
            log.info("gpus_selected", cuda_visible_devices=visible, usable=usable,
                     healthy=sum(r.healthy for r in reports), total=len(reports))
        return self._check_minimum(usable, len(reports))

    def _check_minimum(self, healthy: int, total: int) -> int:
        gcfg = self.cfg.gpus
        if healthy >= max(gcfg.min_gpus, 1):
            return healthy
        if healthy < gcfg.min_gpus:
            raise StartupError(f"{healthy} healthy GPUs of {total}, the config asks for at least {gcfg.min_gpus} "
                               f"(gpus.min_gpus in {self.cfg.source})")
        if not gcfg.cpu_fallback:
            raise StartupError(f"no healthy GPU found ({total} present) and gpus.cpu_fallback is false "
                               f"in {self.cfg.source}")
        log.warning("no_gpu_cpu_fallback", gpus_present=total, cpu_actors=gcfg.cpu_actors,
                    detail="no healthy GPU: running on the CPU")
        return 0

    def _cluster_placements(self) -> tuple[bool, list[str]]:
        """Run the health check as a task on every node, then place actors per node."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        task = ray.remote(check_node_task)
        refs = []
        for node in nodes:
            strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            refs.append(task.options(scheduling_strategy=strategy, num_cpus=0,
                                     num_gpus=node["Resources"].get("GPU", 0)).remote(self.cfg.gpus))
        placements: list[str] = []
        total_healthy = total = 0
        for node, ref in zip(nodes, refs):
            hostname, node_id, reports = ray.get(ref, timeout=300)
            healthy = sum(1 for r in reports if r["healthy"])
            total_healthy += healthy
            total += len(reports)
            log.info("node_health", node=node_id, host=hostname, gpus=len(reports), healthy=healthy)
            placements += [node_id] * healthy
        if self.cfg.gpus.max_actors:
            placements = placements[: self.cfg.gpus.max_actors]
        if self._check_minimum(total_healthy, total):
            return True, placements
        node_ids = [n["NodeID"] for n in nodes]
        return False, [node_ids[i % len(node_ids)] for i in range(self.cfg.gpus.cpu_actors)]

    def _serve_metrics(self) -> None:
        m = self.cfg.metrics
        if not m.enabled:
            return
        self._server, self.metrics_port = self.metrics.serve(m.host, m.port, healthy=self.healthy,
                                                            ready=self.ready)
        log.info("metrics_serving", url=f"http://{m.host}:{self.metrics_port}/metrics")
        if self.monitor is not None:
            log.info("monitor_serving", url=f"http://{m.host}:{self.metrics_port}{MONITOR_PREFIX}/")

    def healthy(self) -> bool:
        return time.monotonic() - self._last_loop < 5 * self.cfg.metrics.interval_s + 10

    def ready(self) -> bool:
        """Frames can move: every actor answers and none is stalled or has a dead worker."""
        return bool(self.actors) and all(a.alive for a in self.actors) and self._frames_moving

    # ------------------------------------------------------------------ steady state
    def run(self, stop: threading.Event) -> None:
        """Supervise until `stop` is set."""
        interval = self.cfg.metrics.interval_s
        watchdog = self.notifier.watchdog_interval()
        period = min(interval, watchdog) if watchdog else interval
        while not stop.wait(period):
            self.poll()

    def poll(self) -> list[dict]:
        """One supervision round: every actor's stats at once, accounting, metrics, watchdog."""
        now = self._last_loop = time.monotonic()
        refs = {a.index: a.handle.stats.remote() for a in self.actors}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=max(self.cfg.metrics.interval_s * 2, 5))
        stats = []
        for state in self.actors:
            try:
                s = ray.get(refs[state.index], timeout=0)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                self._actor_down(state, exc, now)
                continue
            self._actor_up(state, s, now)
            stats.append(s)
        self._account(stats)
        self._watchdog(stats, now)
        return stats

    def _actor_down(self, state: _ActorState, exc: Exception, now: float) -> None:
        if state.alive:
            log.error("actor_unavailable", actor=state.index, error=type(exc).__name__)
        state.alive = False
        if state.down_since is None:
            state.down_since = now
        if isinstance(exc, ray.exceptions.RayActorError):  # its process is gone: what it did is final
            self._end_incarnation(state, now)

    def _actor_up(self, state: _ActorState, s: dict, now: float) -> None:
        previous = state.last.get("incarnation", state.incarnation)
        if previous != s["incarnation"]:
            if self.accounting.current(state.index) == previous:
                self._end_incarnation(state, now)
            log.error("actor_restarted", actor=state.index, restarts=self.accounting.restarts[state.index],
                      pid=s["pid"], incarnation=s["incarnation"])
        elif not state.alive:
            log.info("actor_back", actor=state.index, pid=s["pid"])
        state.last, state.alive, state.down_since = s, True, None

    def _end_incarnation(self, state: _ActorState, now: float) -> None:
        """The actor's current incarnation died: account it from its tally file."""
        incarnation = self.accounting.current(state.index)
        if incarnation is None:
            return
        final = read_tally(self.tally_dir, state.index, incarnation)
        lost = self.accounting.end(state.index, incarnation, final, now)
        log.error("actor_incarnation_ended", actor=state.index, incarnation=incarnation, frames_lost=lost,
                  from_tally_file=final is not None)

    def _watchdog(self, stats: list[dict], now: float) -> None:
        """WATCHDOG=1 while frames can move; an actor restarting keeps it going for a while."""
        unhealthy = [s for s in stats if not s.get("health", {}).get("healthy", True)]
        for s in unhealthy:
            if self._health_log.should_log(f"actor{s['index']}"):
                log.error("actor_unhealthy", actor=s["index"], problems=s["health"]["problems"])
        down = [a for a in self.actors if not a.alive]
        restarting = all(a.down_since is not None and now - a.down_since < self.cfg.health.restart_grace_s
                         for a in down)
        self._frames_moving = not unhealthy and not down
        if not unhealthy and restarting:
            self.notifier.watchdog()

    def _account(self, stats: list[dict], final: bool = False) -> None:
        now = time.monotonic()
        outcomes = self.accounting.observe(stats, now) + (self.accounting.settle_all() if final else [])
        for outcome in outcomes:
            files = [] if final else self._close_run(outcome.run)  # at shutdown actors closed theirs
            log_fn = log.warning if outcome.missing else log.info
            log_fn("run_complete", source=outcome.source, run=outcome.run, count=outcome.count,
                   processed=outcome.processed, missing=outcome.missing, timed_out=outcome.timed_out,
                   settled_by=outcome.how, files=files)
        self.metrics.update(self.accounting.totals(), stats, actors_alive=sum(a.alive for a in self.actors))
        self.metrics.update_gpus()
        if self.monitor is not None:
            self.monitor.update(stats, missing_total=self.accounting.missing, gpus=gpu_readings(self.metrics.registry))
        processed = self.total_processed()
        t0, n0 = self._rate
        if now > t0:
            rate = (processed - n0) / (now - t0)
            self.metrics.set_rate(rate)
            self.notifier.status(f"{rate:.1f} frames/s, {processed} processed, "
                                 f"{sum(a.alive for a in self.actors)}/{len(self.actors)} actors")
        self._rate = (now, processed)

    def _close_run(self, run: Any) -> list[str]:
        """Every actor closes its CXI file of `run` (in parallel); the completed files."""
        refs = [a.handle.close_run.remote(run) for a in self.actors if a.alive]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=60)
        files: list[str] = []
        for ref in ready:
            try:
                files += ray.get(ref, timeout=0)
            except (ray.exceptions.RayError, TimeoutError):
                pass
        return files

    def total_processed(self) -> int:
        return int(self.accounting.totals()["processed"])

    # ------------------------------------------------------------------ stop
    def shutdown(self) -> dict:
        """Stop every actor at once (each drains its sockets and finishes what it received),
        within `shutdown.timeout_s` plus a margin for Ray; log the totals."""
        self.notifier.stopping()
        log.info("daemon_stopping", actors=len(self.actors))
        timeout = self.cfg.shutdown.timeout_s
        refs = {a.index: a.handle.stop.remote() for a in self.actors if a.alive}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout + 5)
        finals, now = [], time.monotonic()
        for state in self.actors:
            if state.index not in refs:
                continue
            try:
                final = ray.get(refs[state.index], timeout=0)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.error("actor_stop_failed", actor=state.index, error=type(exc).__name__,
                          detail="counted from its tally file")
                self._end_incarnation(state, now)
                continue
            finals.append(final)
        self._account(finals, final=True)
        totals = self.metrics.totals()
        log.info("daemon_stopped", **totals)
        if self._server is not None:
            self._server.shutdown()
        ray.shutdown()
        shutil.rmtree(self.tally_dir, ignore_errors=True)
        return totals


def read_tally(tally_dir: str, index: int, incarnation: str, wait_s: float = SENDER_FINAL_S) -> Optional[dict]:
    """What a dead incarnation left: its worker's tally file, merged with its results sender's
    final count (None when there is neither, e.g. on another node). The sender outlives the
    worker by the time it takes to send what the pipe held, so its count is waited for."""
    worker = read_tally_file(tally_path(tally_dir, index, incarnation))
    sent_file = sent_path(tally_dir, index, incarnation)
    sent = read_tally_file(sent_file)
    sender = (worker or {}).get("results_sender")
    if sent is None and sender:
        deadline = time.monotonic() + wait_s
        while sent is None and time.monotonic() < deadline and _running(sender):
            time.sleep(0.02)
            sent = read_tally_file(sent_file)
        sent = sent or read_tally_file(sent_file)  # written just before it exited
        if sent is None:
            log.error("results_sender_count_missing", actor=index, incarnation=incarnation,
                      detail=f"no final count from the results sender within {wait_s:.0f} s; "
                             "the worker's tally is used")
    return merge_sent(worker, sent)


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this node (a zombie has finished)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False
