"""Typed, validated configuration: YAML -> frozen dataclasses.

Every section is a dataclass; `load_config(path)` checks each key against the dataclass fields,
so a typo, a wrong type or an out-of-range value raises `ConfigError` naming the key path, the
value and the file. Model presets are filled in by name (`model.preset`), explicit keys win.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DTYPES = ("uint16", "int16", "int32", "float16", "float32")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and the file."""

    def __init__(self, key: str, value: Any, problem: str, source: str = "<dict>"):
        self.key, self.value, self.problem, self.source = key, value, problem, source
        super().__init__(f"{source}: config key '{key}' = {value!r}: {problem}")


def _range(lo: float | None = None, hi: float | None = None, **kw: Any) -> dict:
    return {"lo": lo, "hi": hi, **kw}


def _f(default: Any, lo: float | None = None, hi: float | None = None, doc: str = "") -> Any:
    """A dataclass field with an optional inclusive range and a one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=_range(lo, hi, doc=doc))
    return field(default=default, metadata=_range(lo, hi, doc=doc))


# ----------------------------------------------------------------------------------------------
# Model and pipeline (the foundation)
# ----------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # ConvNeXtV2-atto sized encoder, a light BiFPN, in this project's first architecture (v1): the
    # fast default, with shipped weights.
    "peaknet-atto": {"kind": "peaknet", "architecture": "v1", "backbone_hidden_sizes": [40, 80, 160, 320],
                     "backbone_depths": [2, 2, 6, 2], "bifpn_num_blocks": 1, "bifpn_num_features": 64,
                     "num_classes": 2},
    # The original PeakNet-small, exactly (33,164,768 parameters).
    "peaknet-small": {"kind": "peaknet", "architecture": "original", "backbone_hidden_sizes": [96, 192, 384, 768],
                      "backbone_depths": [3, 3, 9, 3], "bifpn_num_blocks": 2, "bifpn_num_features": 256,
                      "seg_out_channels": 256, "uses_learned_upsample": False, "num_classes": 2},
    "classical": {"kind": "classical"},
    # Finds nothing at no cost: measures ingest, transfers and the pipeline alone (benchmarks).
    "ingest-only": {"kind": "none"},
}

# The keys that fix a PeakNet's architecture (named as the original's model config names them).
ARCH_KEYS = ("architecture", "backbone_hidden_sizes", "backbone_depths", "bifpn_num_blocks", "bifpn_num_features",
             "seg_out_channels", "uses_learned_upsample", "num_classes")
# Keys of earlier releases, renamed to the original's names.
RENAMED = {"dims": "backbone_hidden_sizes", "depths": "backbone_depths", "bifpn_blocks": "bifpn_num_blocks",
           "bifpn_features": "bifpn_num_features"}


@dataclass(frozen=True)
class ClassicalConfig:
    """peakfinder8-style thresholds (all in ADU of the raw frame)."""

    snr_threshold: float = _f(5.0, 0.0, doc="minimum (pixel - local mean) / local sigma")
    adc_threshold: float = _f(0.0, doc="minimum background-subtracted value of a peak pixel")
    min_sigma: float = _f(0.5, 0.0, doc="floor of the local noise (ADU): on near-empty backgrounds the "
                                         "measured sigma collapses and single photons would pass")
    min_pixels: int = _f(2, 1, doc="smallest accepted peak, pixels")
    max_pixels: int = _f(50, 1, doc="largest accepted peak, pixels")
    inner_radius: int = _f(3, 1, 64, doc="annulus inner radius for the local background")
    outer_radius: int = _f(6, 2, 128, doc="annulus outer radius for the local background")
    bad_pixel_mask: str = _f("", doc="optional .npy of shape (P,H,W), nonzero = bad")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = _f("peaknet-atto", doc="peaknet-atto, peaknet-small, classical or ingest-only (finds "
                                         "nothing; for benchmarks); fills the keys below")
    kind: Literal["peaknet", "classical", "none"] = _f("peaknet", doc="set by the preset")
    architecture: Literal["original", "v1"] = _f(
        "v1", doc="original = PeakNet as the peaknet package builds it (its checkpoints load); "
                  "v1 = this project's first net (the shipped peaknet-atto weights)")
    backbone_hidden_sizes: list[int] = _f([40, 80, 160, 320], 1, 4096, doc="ConvNeXtV2 stage widths (4)")
    backbone_depths: list[int] = _f([2, 2, 6, 2], 1, 64, doc="ConvNeXtV2 blocks per stage (4)")
    bifpn_num_blocks: int = _f(1, 1, 8, doc="repeated BiFPN blocks")
    bifpn_num_features: int = _f(64, 8, 1024, doc="BiFPN channels")
    seg_out_channels: int = _f(256, 32, 1024, doc="segmentation-head channels, a multiple of 32 (original only)")
    uses_learned_upsample: bool = _f(False, doc="add the head's learned ConvTranspose2d x4 path (original only)")
    num_classes: int = _f(2, 1, 16, doc="segmentation classes (1 = peak)")
    normalisation: Literal["instance", "none", "fixed"] = _f(
        "instance", doc="input scaling before the net: per-image (x-mean)/(std+1e-6), raw values, "
                        "or (x-norm_mean)/norm_std")
    norm_mean: float = _f(0.0, doc="subtracted when normalisation is fixed (ADU)")
    norm_std: float = _f(1.0, 1e-12, doc="divides when normalisation is fixed (ADU)")
    checkpoint: str = _f("", doc="safetensors or .pt (state dict, or a trainer checkpoint holding one); "
                                 "empty = random weights (the same draw in every process, seed 0: for benchmarks); "
                                 "'default' = shipped")
    threshold: float = _f(0.5, 0.0, 1.0, doc="peak-class probability that marks a pixel")
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = _f(16, 1, 4096, doc="frames per batch")
    max_batch_delay_ms: float = _f(20.0, 0.0, 60000.0, doc="release a partial batch after this")
    buffers: int = _f(3, 2, 16, doc="N-way buffering: pinned slots in flight")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", doc="autocast precision of the net")
    channels_last: bool = _f(False, doc="NHWC memory layout for the net (faster on tensor cores)")
    compile: bool = _f(False, doc="torch.compile the net (compiled once at actor start)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _f(
        "default", doc="torch.compile mode")
    max_peaks: int = _f(256, 1, 65535, doc="peaks kept per panel (brightest); overflow counted")
    min_pixels: int = _f(1, 1, doc="smallest component kept as a peak (model path)")
    max_pixels: int = _f(400, 1, doc="largest component kept as a peak (model path)")
    frame_shape: list[int] = _f([16, 352, 384], 1, doc="[panels, H, W] every frame must have")
    dtype: Literal["uint16", "int16", "int32", "float16", "float32"] = _f("float32")
    device: str = _f("auto", doc="auto | cpu | cuda | cuda:N")


# ----------------------------------------------------------------------------------------------
# Daemon sections
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayConfig:
    address: str = _f("", doc="empty = embedded local instance; 'auto' or host:port = join")
    namespace: str = _f("peaknet", doc="Ray namespace of the actors")
    num_cpus: int = _f(0, 0, doc="embedded instance only; 0 = Ray's default")
    max_restarts: int = _f(-1, -1, doc="actor restarts by Ray; -1 = unlimited")


@dataclass(frozen=True)
class GpusConfig:
    validate: bool = _f(True, doc="run the health check before Ray starts")
    min_gpus: int = _f(0, 0, doc="exit 2 with fewer healthy GPUs")
    max_actors: int = _f(0, 0, doc="0 = one per healthy GPU")
    cpu_fallback: bool = _f(True, doc="run on CPU actors when no GPU is healthy")
    cpu_actors: int = _f(1, 1, 256)
    cpu_threads: int = _f(1, 1, 256, doc="CPUs reserved in Ray (and torch threads) per CPU actor")
    max_temperature_c: float = _f(85.0, 0.0, 150.0, doc="hotter GPUs are unhealthy")
    min_free_memory_gb: float = _f(4.0, 0.0, doc="GPUs with less free memory are unhealthy")


@dataclass(frozen=True)
class SocketConfig:
    endpoint: str = _f("tcp://127.0.0.1:5555", doc="ZMQ endpoint of the PULL socket")
    mode: Literal["connect", "bind"] = _f("connect", doc="connect: every actor connects; bind: actor i binds port + i")
    format: str = _f("peaknet/1", doc="wire format of this socket: a name in sources.SOURCES (peaknet/1, "
                                      "lclstreamer-npz, stream2, eiger-v1)")
    rcvhwm: int = _f(64, 1, 1_000_000, doc="ZMQ receive high-water mark, messages")
    max_message_bytes: int = _f(256 * 2**20, 1024, doc="larger messages are rejected")
    threads: int = _f(1, 1, 64, doc="PULL sockets on this endpoint (connect mode), dealt over the ingest "
                                    "processes: a detector that binds then feeds several of them")
    channel: str = _f("", doc="stream2: the image channel (threshold) to analyse, e.g. threshold_1; "
                              "empty = the first channel of each image")


@dataclass(frozen=True)
class IngestConfig:
    sockets: list[SocketConfig] = field(default_factory=lambda: [SocketConfig()])
    run_end_grace_s: float = _f(10.0, 0.0, doc="after 'end', wait this long for missing frames")
    reject_log_interval_s: float = _f(10.0, 0.0, doc="a rejection reason is logged once per interval")
    processes: int = _f(0, 0, 64, doc="ingest processes per actor; 0 = one per socket, at most 4")
    streaming_copy_bytes: int = _f(256 * 1024, 0, doc="copies of at least this many bytes bypass the CPU "
                                                       "caches (glibc's x86 non-temporal threshold, for the "
                                                       "actors and their ingest processes); 0 = glibc's own")


@dataclass(frozen=True)
class OutputConfig:
    results_endpoint: str = _f("", doc="empty = no results stream")
    results_mode: Literal["push", "pub"] = _f("push", doc="push: lossless with backpressure; pub: monitoring, drops")
    results_bind: bool = _f(False, doc="false: actors connect to a consumer that binds; true: actor i binds port + i")
    results_sndhwm: int = _f(10000, 1, doc="results queued per actor before backpressure (in the sender "
                                           "process's pipe, and again in its socket)")
    cxi_dir: str = _f("", doc="empty = no CXI files")
    frames_per_file: int = _f(1000, 1, doc="CXI files rotate after this many events")
    save_frames: Literal["hits", "all", "none"] = _f("hits", doc="which events a CXI file holds (with data); none = all, peaks only")
    hit_threshold: int = _f(10, 0, doc="a frame is a hit with at least this many peaks")
    compression: Literal["gzip", "lzf", "none"] = _f("gzip", doc="of saved frames; CrystFEL reads gzip and none")
    crystfel_endpoint: str = _f("", doc="empty = no CrystFEL live hand-off; else the REP socket indexamajig's "
                                        "--zmq-request asks for hits (bound; actor i binds port + i)")
    crystfel_queue: int = _f(32, 1, 100_000, doc="hits waiting per actor for indexamajig, each a copy of its "
                                                 "frame; when full the oldest is dropped (counted)")
    crystfel_geometry: str = _f("", doc="where the live hand-off's geometry file is written; empty = "
                                        "peaknet-live.geom in cxi_dir")


@dataclass(frozen=True)
class DetectorConfig:
    geometry: str = _f("", doc="CrystFEL geometry file of the detector (its panels in the (P*H, W) slab of the "
                               "frames); checked at start, rewritten for the CXI files and the live hand-off; "
                               "empty = a slab placeholder that cannot index")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = _f(True, doc="serve /metrics, /healthz, /readyz")
    host: str = _f("127.0.0.1", doc="listen address (0.0.0.0 for a remote Prometheus)")
    port: int = _f(9108, 0, 65535, doc="0 = pick a free port (logged)")
    interval_s: float = _f(2.0, 0.1, doc="how often actor stats are gathered")


@dataclass(frozen=True)
class HealthConfig:
    stall_s: float = _f(30.0, 1.0, doc="frames waiting and no batch finished for this long is a stall: "
                                       "/readyz 503, no WATCHDOG=1")
    restart_grace_s: float = _f(600.0, 0.0, doc="WATCHDOG=1 continues while an actor restarts, at most this long")
    max_thread_restarts: int = _f(10, 0, doc="a worker thread that failed more often stays dead (actor unhealthy)")


@dataclass(frozen=True)
class ShutdownConfig:
    timeout_s: float = _f(60.0, 1.0, doc="the whole stop (drain, flush, close); keep it below systemd's "
                                         "TimeoutStopSec")
    drain_s: float = _f(10.0, 0.0, doc="on stop, ingest keeps taking queued messages for at most this long")


@dataclass(frozen=True)
class MonitorConfig:
    """The live page at /monitor on the metrics HTTP server (daemon/monitor/)."""

    enabled: bool = _f(False, doc="serve /monitor (needs metrics.enabled); actors then sample hits for it")
    max_hits_per_s: float = _f(2.0, 0.0, 100.0, doc="hit frames each actor copies out for the page, per second")
    latest_hits: int = _f(4, 1, 32, doc="latest hits shown with their peaks")
    history_s: float = _f(600.0, 10.0, 86400.0, doc="time span of the hit rate and frame rate plots")
    downsample: int = _f(4, 1, 64, doc="hit images and the virtual powder: pixels per side per shown pixel")
    max_results_per_poll: int = _f(50000, 100, 10_000_000,
                                   doc="frame summaries an actor holds between two stats polls; more are "
                                       "dropped from the page's views and counted")
    refresh_s: float = _f(1.0, 0.1, 1.0, doc="how often the page polls the daemon")


@dataclass(frozen=True)
class SecurityConfig:
    curve_server_secret: str = _f("", doc="the daemon's CURVE key pair (.key_secret file, peaknet-keygen); "
                                          "empty = no CURVE")
    curve_authorized_dir: str = _f("", doc="folder of the public keys (*.key) of allowed producers and consumers")


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["auto", "json", "console"] = _f("auto", doc="auto = console on a TTY, else json")
    level: Literal["debug", "info", "warning", "error"] = _f("info", doc="log level")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    gpus: GpusConfig = field(default_factory=GpusConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------

def bind_endpoint(endpoint: str, index: int) -> str:
    """In bind mode actor `index` binds the configured TCP port + index (ingest sockets and sinks)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit():
        raise ValueError(f"bind endpoint needs a numeric port: {endpoint}")
    return f"tcp://{host}:{int(port) + index}"


def _check_value(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, value, f"must be one of {list(typing.get_args(tp))}", source)
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(args[0], value, key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "must be a list", source)
        (item_tp,) = typing.get_args(tp)
        return [_check_value(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer", source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "must be a number", source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string", source)
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_range(f: dataclasses.Field, value: Any, key: str, source: str) -> None:
    lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
    items = value if isinstance(value, list) else [value]
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if lo is not None and v < lo:
            raise ConfigError(key, value, f"must be >= {lo}", source)
        if hi is not None and v > hi:
            raise ConfigError(key, value, f"must be <= {hi}", source)


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<top>", data, "must be a mapping", source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(key, data[unknown[0]], f"unknown key (known: {', '.join(fields)})", source)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        checked = _check_value(hints[name], value, key, source)
        _check_range(fields[name], checked, key, source)
        kwargs[name] = checked
    return cls(**kwargs)


def _apply_preset(model: dict, source: str) -> dict:
    for old, new in RENAMED.items():
        if old in model:
            raise ConfigError(f"model.{old}", model[old], f"renamed to model.{new} (the original PeakNet's name)",
                              source)
    preset = model.get("preset", ModelConfig.preset)
    if preset not in PRESETS:
        raise ConfigError("model.preset", preset, f"unknown preset (known: {', '.join(PRESETS)})", source)
    return {**PRESETS[preset], **model, "preset": preset}


def _cross_check(cfg: Config) -> None:
    src = cfg.source
    if len(cfg.pipeline.frame_shape) != 3:
        raise ConfigError("pipeline.frame_shape", cfg.pipeline.frame_shape, "must be [panels, H, W]", src)
    m = cfg.model
    if m.kind == "peaknet":
        for key in ("backbone_hidden_sizes", "backbone_depths"):
            if len(getattr(m, key)) != 4:
                raise ConfigError(f"model.{key}", getattr(m, key), "peaknet needs 4 stages", src)
        if m.architecture == "original" and m.seg_out_channels % 32:
            raise ConfigError("model.seg_out_channels", m.seg_out_channels,
                              "must be a multiple of 32 (the head's GroupNorm groups)", src)
        if m.architecture == "v1" and m.uses_learned_upsample:
            raise ConfigError("model.uses_learned_upsample", True, "only the original architecture has it", src)
    c = m.classical
    if c.outer_radius <= c.inner_radius:
        raise ConfigError("model.classical.outer_radius", c.outer_radius, "must exceed inner_radius", src)
    if c.max_pixels < c.min_pixels:
        raise ConfigError("model.classical.max_pixels", c.max_pixels, "must be >= min_pixels", src)
    if cfg.pipeline.max_pixels < cfg.pipeline.min_pixels:
        raise ConfigError("pipeline.max_pixels", cfg.pipeline.max_pixels, "must be >= min_pixels", src)
    if not cfg.ingest.sockets:
        raise ConfigError("ingest.sockets", [], "at least one socket is needed", src)
    from .sources import SOURCES, source_class  # the registry of wire formats (sources/__init__.py)
    for i, sock in enumerate(cfg.ingest.sockets):
        if sock.format not in SOURCES:
            raise ConfigError(f"ingest.sockets[{i}].format", sock.format,
                              f"unknown wire format (known: {', '.join(SOURCES)})", src)
        try:
            source_class(sock.format)
        except ImportError as exc:
            raise ConfigError(f"ingest.sockets[{i}].format", sock.format,
                              f"needs a library that is not installed: {exc}", src) from None
        if sock.channel and sock.format != "stream2":
            raise ConfigError(f"ingest.sockets[{i}].channel", sock.channel, "only the stream2 format has "
                              "channels", src)
    if cfg.detector.geometry:
        from .geometry import GeometryError, load_geometry
        try:
            load_geometry(cfg.detector.geometry, cfg.pipeline.frame_shape)
        except GeometryError as exc:
            raise ConfigError("detector.geometry", cfg.detector.geometry, exc.problem, src) from None
    out = cfg.output
    if out.crystfel_endpoint:
        scheme, sep, rest = out.crystfel_endpoint.partition("://")
        port = rest.rpartition(":")[2]
        if not sep or scheme not in ("tcp", "ipc", "inproc") or (scheme == "tcp" and not port.isdigit()):
            raise ConfigError("output.crystfel_endpoint", out.crystfel_endpoint,
                              "must be tcp://HOST:PORT (actor i binds PORT + i), ipc:// or inproc://", src)
        if not out.crystfel_geometry and not out.cxi_dir:
            raise ConfigError("output.crystfel_geometry", "", "the live hand-off writes a geometry file for "
                              "indexamajig: set output.crystfel_geometry or output.cxi_dir", src)
    if cfg.shutdown.drain_s >= cfg.shutdown.timeout_s:
        raise ConfigError("shutdown.drain_s", cfg.shutdown.drain_s, "must be below shutdown.timeout_s", src)
    if cfg.monitor.enabled and not cfg.metrics.enabled:
        raise ConfigError("monitor.enabled", True, "the page is served on the metrics server: "
                          "needs metrics.enabled", src)
    sec = cfg.security
    if bool(sec.curve_server_secret) != bool(sec.curve_authorized_dir):
        raise ConfigError("security.curve_authorized_dir", sec.curve_authorized_dir,
                          "CURVE needs both curve_server_secret and curve_authorized_dir", src)


def config_from_dict(data: dict | None, source: str = "<dict>") -> Config:
    """Build and validate a Config from a plain mapping (as YAML gives)."""
    data = dict(data or {})
    if not isinstance(data.get("model", {}), dict):
        raise ConfigError("model", data["model"], "must be a mapping", source)
    data["model"] = _apply_preset(dict(data.get("model") or {}), source)
    cfg = _build(Config, data, "", source)
    cfg = dataclasses.replace(cfg, source=source)
    _cross_check(cfg)
    return cfg


def load_config(path: str | os.PathLike) -> Config:
    """Read a YAML file into a validated Config; errors name the key and this file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("<file>", str(path), f"cannot read: {exc.strerror}", str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", str(path), f"not valid YAML: {exc}", str(path)) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError("<top>", data, "the file must hold a mapping of sections", str(path))
    return config_from_dict(data, str(path))


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a new validated Config with dotted-key overrides, e.g. {'pipeline.batch_size': 8}."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if "model.preset" in overrides:  # a new preset replaces the old preset's sizes
        explicit = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
        kept = ("checkpoint", "threshold", "classical", "normalisation", "norm_mean", "norm_std")
        data["model"] = {**{k: v for k, v in data["model"].items() if k in kept},
                         **explicit}
    return config_from_dict(data, cfg.source + " (with overrides)")


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what `--check` prints)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, list):
            v = [to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
        out[f.name] = v
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
