"""The supervisor: the Ray driver that owns the daemon's lifecycle.

start: GPU health -> CUDA_VISIBLE_DEVICES -> ray.init -> one actor per healthy GPU (or CPU
actors) -> metrics endpoint -> READY=1. Then every `metrics.interval_s`: gather actor stats,
update metrics, count restarts, complete runs, send WATCHDOG=1 while actors answer. stop:
STOPPING=1, every actor finishes what it received and closes its sinks, final totals logged.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from .actor import PipelineActor, actor_options
from .config import Config
from .gpu_health import check_gpus, check_node_task, format_table, healthy_visible_devices
from .log import get_logger
from .metrics import Metrics
from .runs import RunTracker
from .sdnotify import SdNotifier
from .security import exposure_warnings

log = get_logger("peaknet.supervisor")


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
    incarnation: str = ""
    last: dict = field(default_factory=dict)
    alive: bool = False
    restarts: int = 0


class Supervisor:
    """See the module docstring."""

    def __init__(self, cfg: Config, notifier: SdNotifier | None = None):
        self.cfg = cfg
        self.notifier = notifier or SdNotifier()
        self.metrics = Metrics()
        self.runs = RunTracker(cfg.ingest.run_end_grace_s)
        self.actors: list[_ActorState] = []
        self.metrics_port: int | None = None
        self._server = None
        self._last_loop = time.monotonic()
        self._rate = (time.monotonic(), 0)
        self._missing = 0
        self._lost_in_restart = 0

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        for warning in exposure_warnings(self.cfg):  # issue 11: open non-loopback binds
            log.warning("insecure_endpoint", detail=warning)
        use_gpu, placements = self._plan_actors()
        remote_cls = ray.remote(PipelineActor)
        for i, node in enumerate(placements):
            options = actor_options(self.cfg, use_gpu, spread=False)
            if node:
                options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                    node_id=node, soft=True)
            handle = remote_cls.options(**options).remote(self.cfg, i)
            self.actors.append(_ActorState(handle, i, node))
        endpoints: list[str] = []
        for state in self.actors:
            try:
                info = ray.get(state.handle.ready.remote(), timeout=600)  # includes compile + warm-up
            except ray.exceptions.RayActorError as exc:
                raise StartupError(f"pipeline actor {state.index} failed to start: {_last_line(exc)}") from None
            state.incarnation, state.alive = info["incarnation"], True
            endpoints += info["endpoints"]
            log.info("actor_ready", **info)
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
            count = n_gpus if n_gpus else cfg.gpus.cpu_actors
            if n_gpus and cfg.gpus.max_actors:
                count = min(count, cfg.gpus.max_actors)
            return bool(n_gpus), [""] * count
        ray.init(address=cfg.ray.address, namespace=cfg.ray.namespace)
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

    def healthy(self) -> bool:
        return time.monotonic() - self._last_loop < 5 * self.cfg.metrics.interval_s + 10

    def ready(self) -> bool:
        return bool(self.actors) and all(a.alive for a in self.actors)

    # ------------------------------------------------------------------ steady state
    def run(self, stop: threading.Event) -> None:
        """Supervise until `stop` is set."""
        interval = self.cfg.metrics.interval_s
        watchdog = self.notifier.watchdog_interval()
        period = min(interval, watchdog) if watchdog else interval
        while not stop.wait(period):
            self.poll()

    def poll(self) -> list[dict]:
        """One supervision round: stats, metrics, restarts, runs, watchdog."""
        self._last_loop = time.monotonic()
        refs = {a.index: a.handle.stats.remote() for a in self.actors}
        stats = []
        for state in self.actors:
            try:
                s = ray.get(refs[state.index], timeout=max(self.cfg.metrics.interval_s * 2, 5))
            except (ray.exceptions.RayError, TimeoutError) as exc:
                if state.alive:
                    log.error("actor_unavailable", actor=state.index, error=type(exc).__name__)
                state.alive = False
                continue
            self._note_incarnation(state, s)
            stats.append(s)
        self._account(stats)
        if stats and len(stats) == len(self.actors):
            self.notifier.watchdog()
        return stats

    def _note_incarnation(self, state: _ActorState, s: dict) -> None:
        if state.incarnation and s["incarnation"] != state.incarnation:
            last = state.last
            lost = max(last.get("received", 0) - last.get("processed", 0) - sum(last.get("rejected", {}).values()), 0)
            state.restarts += 1
            self._lost_in_restart += lost
            log.error("actor_restarted", actor=state.index, restarts=state.restarts, pid=s["pid"],
                      frames_in_flight_lost_at_least=lost,
                      detail="frames received after the last stats poll are counted as missing at run end")
        if not state.alive:
            log.info("actor_back", actor=state.index, pid=s["pid"])
        state.incarnation, state.last, state.alive = s["incarnation"], s, True

    def _account(self, stats: list[dict], final: bool = False) -> None:
        now = time.monotonic()
        outcomes = self.runs.update(stats, now) + (self.runs.settle_all() if final else [])
        for outcome in outcomes:
            self._missing += outcome.missing
            files = [] if final else self._close_run(outcome.run)  # at shutdown actors closed theirs
            log_fn = log.warning if outcome.missing else log.info
            log_fn("run_complete", source=outcome.source, run=outcome.run, count=outcome.count,
                   processed=outcome.processed, missing=outcome.missing, timed_out=outcome.timed_out,
                   settled_by=outcome.how, files=files)
        for s in stats:
            s["restarts"] = self.actors[s["index"]].restarts
        self.metrics.update_from_stats(stats, missing_total=self._missing,
                                       lost_in_restart_total=self._lost_in_restart,
                                       actors_alive=sum(a.alive for a in self.actors))
        self.metrics.update_gpus()
        processed = self.total_processed()
        t0, n0 = self._rate
        if now > t0:
            rate = (processed - n0) / (now - t0)
            self.metrics.set_rate(rate)
            self.notifier.status(f"{rate:.1f} frames/s, {processed} processed, "
                                 f"{sum(a.alive for a in self.actors)}/{len(self.actors)} actors")
        self._rate = (now, processed)

    def _close_run(self, run: Any) -> list[str]:
        """Every actor closes its CXI file of `run`; the completed files."""
        files: list[str] = []
        for state in self.actors:
            try:
                files += ray.get(state.handle.close_run.remote(run), timeout=60)
            except (ray.exceptions.RayError, TimeoutError):
                pass
        return files

    def total_processed(self) -> int:
        return sum(self.runs.processed().values())

    # ------------------------------------------------------------------ stop
    def shutdown(self) -> dict:
        """Stop every actor cleanly (each finishes what it received) and log the totals."""
        self.notifier.stopping()
        log.info("daemon_stopping", actors=len(self.actors))
        refs = [(a, a.handle.stop.remote()) for a in self.actors if a.alive]
        finals = []
        for state, ref in refs:
            try:
                final = ray.get(ref, timeout=120)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.error("actor_stop_failed", actor=state.index, error=str(exc))
                continue
            self._note_incarnation(state, final)
            finals.append(final)
        self._account(finals, final=True)
        totals = self.metrics.totals()
        log.info("daemon_stopped", **totals)
        if self._server is not None:
            self._server.shutdown()
        ray.shutdown()
        return totals
