"""GPU health check: NVML counters plus a small torch probe per GPU, before Ray gets the GPUs.

A GPU with uncorrected ECC errors, pending page retirement or failed row remapping, running
too hot, short of free memory, or failing a matmul / copy round trip is left out of
CUDA_VISIBLE_DEVICES, so the daemon starts on the GPUs that work instead of crash-looping on
one that does not. Checks a driver does not support are skipped, never failures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, Callable, Sequence

import structlog

from .config import GpusConfig, LoggingConfig, load_config
from .log import configure_logging, get_logger

log = get_logger(__name__)

GIB = 2**30
# A probe returns the problems it found on one GPU, given its NVML uuid and physical index;
# None means it could not test this GPU (hidden from CUDA), which is not a problem.
Probe = Callable[[str, int], "list[str] | None"]


@dataclass
class GpuReport:
    """One GPU's health: `healthy` is False when `problems` is not empty."""

    index: int
    uuid: str
    name: str
    healthy: bool
    problems: list[str] = field(default_factory=list)
    temperature_c: float | None = None
    free_memory_gb: float | None = None
    total_memory_gb: float | None = None
    ecc_uncorrected_volatile: int | None = None
    retired_pages: int | None = None
    probe: str = "not run"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GpuReport":
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# NVML checks
# ----------------------------------------------------------------------------------------------

def _import_nvml() -> ModuleType | None:
    try:
        import pynvml  # from the nvidia-ml-py distribution
    except ImportError:
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Checks:
    """Runs one NVML query, turning 'not supported' into None and other errors into problems."""

    def __init__(self, nvml: ModuleType, problems: list[str]):
        self.nvml, self.problems = nvml, problems
        skip = [getattr(nvml, n, None) for n in ("NVMLError_NotSupported", "NVMLError_NoPermission",
                                                  "NVMLError_FunctionNotFound")]
        self._skip = tuple(e for e in skip if isinstance(e, type))

    def query(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._skip:
            return None
        except self.nvml.NVMLError as exc:
            self.problems.append(f"{what}: NVML error {_text(exc)}")
            return None


def _nvml_report(nvml: ModuleType, index: int, cfg: GpusConfig) -> GpuReport:
    problems: list[str] = []
    q = _Checks(nvml, problems)
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        return GpuReport(index, "", "?", False, [f"handle: NVML error {_text(exc)}"])
    uuid = _text(q.query("uuid", lambda: nvml.nvmlDeviceGetUUID(handle)) or "")
    name = _text(q.query("name", lambda: nvml.nvmlDeviceGetName(handle)) or "?")
    rep = GpuReport(index, uuid, name, True, problems)

    ecc = q.query("ecc", lambda: nvml.nvmlDeviceGetTotalEccErrors(
        handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC))
    if ecc is not None:
        rep.ecc_uncorrected_volatile = int(ecc)
        if ecc > 0:
            problems.append(f"{int(ecc)} uncorrected ECC errors since driver load")

    pending = q.query("retired pages", lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))
    if pending is not None and int(pending) == int(getattr(nvml, "NVML_FEATURE_ENABLED", 1)):
        problems.append("page retirement pending (reset the GPU)")
    pages = q.query("retired pages", lambda: nvml.nvmlDeviceGetRetiredPages(
        handle, nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR))
    if pages is not None:
        rep.retired_pages = len(pages)

    rows = q.query("remapped rows", lambda: nvml.nvmlDeviceGetRemappedRows(handle))
    if rows is not None:
        _corr, _unc, is_pending, failed = rows
        if failed:
            problems.append("row remapping failed")
        if is_pending:
            problems.append("row remapping pending (reset the GPU)")

    temp = q.query("temperature", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    if temp is not None:
        rep.temperature_c = float(temp)
        if temp > cfg.max_temperature_c:
            problems.append(f"temperature {temp} C > {cfg.max_temperature_c:g} C")

    mem = q.query("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    if mem is not None:
        rep.free_memory_gb = mem.free / GIB
        rep.total_memory_gb = mem.total / GIB
        if rep.free_memory_gb < cfg.min_free_memory_gb:
            problems.append(f"free memory {rep.free_memory_gb:.1f} GB < {cfg.min_free_memory_gb:g} GB")
    return rep


# ----------------------------------------------------------------------------------------------
# torch probe
# ----------------------------------------------------------------------------------------------

class TorchProbe:
    """Allocates, multiplies and round-trips data on one GPU. CUDA ordinals are matched to NVML
    by UUID, since CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER renumber devices."""

    def __init__(self, alloc_mb: int = 64, n: int = 256):
        self.alloc_mb, self.n = alloc_mb, n
        self._ordinals: dict[str, int] | None = None
        self._unusable = ""

    def _map(self) -> dict[str, int]:
        if self._ordinals is None:
            self._ordinals = {}
            try:
                import torch
                if not torch.cuda.is_available():
                    self._unusable = "torch cannot use CUDA (no CUDA build or driver)"
                    return self._ordinals
                for i in range(torch.cuda.device_count()):
                    uuid = str(getattr(torch.cuda.get_device_properties(i), "uuid", ""))
                    self._ordinals["GPU-" + uuid if uuid and not uuid.startswith("GPU-") else uuid or str(i)] = i
            except Exception as exc:  # a broken driver shows up here first
                self._unusable = f"torch CUDA init failed: {type(exc).__name__}: {exc}"
        return self._ordinals

    def __call__(self, uuid: str, index: int) -> list[str] | None:
        ordinals = self._map()
        if self._unusable:
            return [self._unusable]
        ordinal = ordinals.get(uuid)
        if ordinal is None:
            return None  # hidden by CUDA_VISIBLE_DEVICES: not ours to test
        return self._run(ordinal)

    def _run(self, ordinal: int) -> list[str]:
        import torch
        dev = torch.device("cuda", ordinal)
        try:
            block = torch.empty(self.alloc_mb * 2**20, dtype=torch.uint8, device=dev)
            block.fill_(0xA5)
            gen = torch.Generator().manual_seed(ordinal)
            a = torch.randn(self.n, self.n, generator=gen, dtype=torch.float64)
            b = torch.randn(self.n, self.n, generator=gen, dtype=torch.float64)
            got = (a.to(dev) @ b.to(dev)).cpu()
            problems = []
            if not torch.allclose(got, a @ b, rtol=1e-9, atol=1e-9):
                problems.append("matmul differs from the CPU result")
            bits = torch.randint(-2**31, 2**31 - 1, (4 * 2**20,), generator=gen, dtype=torch.int32)
            if not torch.equal(bits.to(dev).cpu(), bits):
                problems.append("H2D/D2H round trip is not bit-exact")
            if int(block.sum(dtype=torch.int64)) != 0xA5 * block.numel():
                problems.append("device memory fill read back wrong")
            torch.cuda.synchronize(dev)
            del block
            return problems
        except Exception as exc:
            return [f"torch probe failed: {type(exc).__name__}: {exc}"[:300]]


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def check_gpus(cfg: GpusConfig, nvml: ModuleType | None = None, probe: Probe | None = None,
               run_probe: bool = True) -> list[GpuReport]:
    """Check every GPU NVML sees (physical, PCI-bus order). No NVML library, no driver or no GPU
    gives an empty list; this never raises."""
    nvml = nvml if nvml is not None else _import_nvml()
    if nvml is None:
        return []
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded, or anything odd
        log.debug("nvml unavailable", error=str(exc))
        return []
    reports: list[GpuReport] = []
    try:
        count = int(nvml.nvmlDeviceGetCount())
        for i in range(count):
            try:
                reports.append(_nvml_report(nvml, i, cfg))
            except Exception as exc:
                reports.append(GpuReport(i, "", "?", False, [f"check failed: {type(exc).__name__}: {exc}"]))
    except Exception as exc:
        log.warning("nvml device enumeration failed", error=str(exc))
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    if run_probe:
        probe = probe if probe is not None else TorchProbe()
        for rep in reports:
            if rep.problems:
                rep.probe = "skipped (already unhealthy)"
                continue
            try:
                found = probe(rep.uuid, rep.index)
            except Exception as exc:
                found = [f"torch probe failed: {type(exc).__name__}: {exc}"]
            if found is None:
                rep.probe = "skipped (not visible to CUDA)"
            else:
                rep.problems.extend(found)
                rep.probe = "ok" if not found else "failed"
    for rep in reports:
        rep.healthy = not rep.problems
    return reports


_NONE_VALUES = ("", "-1", "none", "nodevfiles", "void")


def _match(token: str, reports: Sequence[GpuReport]) -> GpuReport | None:
    if token.isdigit():
        return next((r for r in reports if r.index == int(token)), None)
    wanted = token if token.startswith("GPU-") else "GPU-" + token
    hits = [r for r in reports if r.uuid and r.uuid.startswith(wanted)]
    return hits[0] if len(hits) == 1 else None


def healthy_visible_devices(reports: Sequence[GpuReport], env_value: str | None,
                            use_uuids: bool = False) -> str:
    """The CUDA_VISIBLE_DEVICES value for the daemon: the healthy GPUs among those the user
    allowed. With no user value, all healthy GPUs by physical index (pair it with
    CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML's order) or UUID. With a user value, its tokens are kept in
    its order and form, minus unhealthy GPUs; like CUDA, parsing stops at the first token that
    names no GPU. MIG instance tokens pass through (NVML checks their parent only)."""
    if env_value is None:
        return ",".join(r.uuid if use_uuids and r.uuid else str(r.index) for r in reports if r.healthy)
    if env_value.strip().lower() in _NONE_VALUES:
        return ""
    kept: list[str] = []
    for token in (t.strip() for t in env_value.split(",")):
        if token.startswith("MIG-"):
            kept.append(token)
            continue
        rep = _match(token, reports)
        if rep is None:
            break
        if rep.healthy and token not in kept:
            kept.append(token)
    return ",".join(kept)


def format_table(reports: Sequence[GpuReport]) -> str:
    """A fixed-width table, one GPU a line, for people and logs."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = f"{'GPU':>3}  {'name':<24} {'uuid':<14} {'temp C':>6} {'free GB':>8}  {'status':<9} problems"
    lines = [head]
    for r in reports:
        lines.append(f"{r.index:>3}  {r.name[:24]:<24} {r.uuid[:14]:<14} {num(r.temperature_c, '.0f'):>6} "
                     f"{num(r.free_memory_gb, '.1f'):>8}  {'healthy' if r.healthy else 'UNHEALTHY':<9} "
                     f"{'; '.join(r.problems) or '-'}")
    return "\n".join(lines)


def check_node_task(cfg: GpusConfig | dict | None = None, timeout_s: float = 120.0) -> tuple[str, str, list[dict]]:
    """Body of a Ray task run once per node: (hostname, Ray node id, reports as dicts).

    The check runs in a fresh subprocess so CUDA is initialised there with every GPU visible
    (a Ray worker may have CUDA set up already, with CUDA_VISIBLE_DEVICES narrowed by Ray), and a
    hung driver costs a timeout instead of the worker."""
    if isinstance(cfg, dict):
        cfg = GpusConfig(**cfg)
    cfg = cfg or GpusConfig()
    node_id = ""
    ray = sys.modules.get("ray")  # inside a Ray task it is imported; elsewhere leave it be
    try:
        if ray is not None and ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    env = dict(os.environ)
    if node_id:
        env.pop("CUDA_VISIBLE_DEVICES", None)  # set by Ray for this task, not by the operator
    cmd = [sys.executable, "-m", "peaknet_daemon.gpu_health", "--json", "--min-gpus", "0",
           "--max-temperature-c", str(cfg.max_temperature_c), "--min-free-memory-gb", str(cfg.min_free_memory_gb)]
    host = socket.gethostname()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        reports = json.loads(out.stdout or "[]")
    except subprocess.TimeoutExpired:
        reports = [GpuReport(-1, "", "?", False, [f"health check timed out after {timeout_s:g} s"]).to_dict()]
    except (OSError, ValueError) as exc:
        reports = [GpuReport(-1, "", "?", False, [f"health check failed: {exc}"]).to_dict()]
    return host, node_id, reports


def main(argv: Sequence[str] | None = None) -> int:
    """`peaknet-gpu-check`: print the GPU table; exit 0 when at least --min-gpus are healthy.
    Finding no GPU at all is a failure (exit 1) unless --allow-none."""
    ap = argparse.ArgumentParser(prog="peaknet-gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="daemon YAML; its gpus section sets thresholds and min_gpus")
    ap.add_argument("--min-gpus", type=int, default=None, help="healthy GPUs needed for exit 0")
    ap.add_argument("--json", action="store_true", help="print the reports as JSON")
    ap.add_argument("--max-temperature-c", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--min-free-memory-gb", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-probe", action="store_true", help="NVML checks only, no torch probe")
    ap.add_argument("--allow-none", action="store_true", help="exit 0 on a machine without GPUs (CPU nodes)")
    args = ap.parse_args(argv)
    if not structlog.is_configured():
        configure_logging(LoggingConfig(level="warning"))  # stderr: stdout may carry --json
    cfg = load_config(args.config).gpus if args.config else GpusConfig()
    overrides = {k: v for k, v in (("max_temperature_c", args.max_temperature_c),
                                   ("min_free_memory_gb", args.min_free_memory_gb)) if v is not None}
    if overrides:
        cfg = GpusConfig(**{**asdict(cfg), **overrides})
    min_gpus = cfg.min_gpus if args.min_gpus is None else args.min_gpus
    reports = check_gpus(cfg, run_probe=not args.no_probe)
    healthy = sum(r.healthy for r in reports)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    elif not reports:
        print("no NVIDIA GPU found (no NVML library, no driver, or no device)"
              + ("" if args.allow_none else "; pass --allow-none where that is expected"))
    else:
        print(format_table(reports))
        print(f"{healthy} of {len(reports)} GPUs healthy (need {min_gpus})")
    if not reports and not args.allow_none:
        return 1
    return 0 if healthy >= min_gpus else 1


if __name__ == "__main__":
    sys.exit(main())
