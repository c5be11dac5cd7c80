"""GPU health: NVML checks against a fake pynvml, the CUDA_VISIBLE_DEVICES policy, the CLI."""

from __future__ import annotations

import json
import types
from types import SimpleNamespace

import pytest

from peaknet_daemon import gpu_health
from peaknet_daemon.config import GpusConfig
from peaknet_daemon.gpu_health import GpuReport, check_gpus, format_table, healthy_visible_devices

GIB = 2**30


def fake_nvml(gpus: list[dict], init_error: bool = False) -> types.ModuleType:
    """A pynvml stand-in: each gpu dict overrides healthy defaults; a value "!NotSupported" or
    "!Error" makes the matching query raise NVMLError_NotSupported or a plain NVMLError."""
    m = types.ModuleType("fake_pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    m.NVMLError, m.NVMLError_NotSupported, m.NVMLError_LibraryNotFound = (
        NVMLError, NVMLError_NotSupported, NVMLError_LibraryNotFound)
    m.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, m.NVML_VOLATILE_ECC = 1, 0
    m.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
    m.NVML_FEATURE_ENABLED, m.NVML_TEMPERATURE_GPU = 1, 0
    m.calls = {"init": 0, "shutdown": 0}
    defaults = {"uuid": "GPU-{i}aaa-0000", "name": "NVIDIA H200", "ecc": 0, "pending": 0, "pages": [],
                "rows": (0, 0, False, False), "temp": 40, "free": 100 * GIB, "total": 140 * GIB}
    specs = [{**defaults, **g} for g in gpus]

    def val(h, key):
        v = specs[h][key]
        if v == "!NotSupported":
            raise NVMLError_NotSupported()
        if v == "!Error":
            raise NVMLError("Unknown Error")
        return v

    def init():
        m.calls["init"] += 1
        if init_error:
            raise NVMLError_LibraryNotFound()

    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.__setitem__("shutdown", m.calls["shutdown"] + 1)
    m.nvmlDeviceGetCount = lambda: len(specs)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetUUID = lambda h: val(h, "uuid").format(i=h)
    m.nvmlDeviceGetName = lambda h: val(h, "name")
    m.nvmlDeviceGetTotalEccErrors = lambda h, kind, counter: val(h, "ecc")
    m.nvmlDeviceGetRetiredPagesPendingStatus = lambda h: val(h, "pending")
    m.nvmlDeviceGetRetiredPages = lambda h, cause: val(h, "pages")
    m.nvmlDeviceGetRemappedRows = lambda h: val(h, "rows")
    m.nvmlDeviceGetTemperature = lambda h, sensor: val(h, "temp")
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(free=val(h, "free"), total=val(h, "total"),
                                                         used=val(h, "total") - val(h, "free"))
    return m


def ok_probe(uuid, index):
    return []


CFG = GpusConfig(max_temperature_c=85.0, min_free_memory_gb=4.0)


def test_all_healthy():
    nvml = fake_nvml([{}, {}])
    reps = check_gpus(CFG, nvml=nvml, probe=ok_probe)
    assert [r.healthy for r in reps] == [True, True]
    assert reps[1].uuid == "GPU-1aaa-0000" and reps[0].temperature_c == 40.0
    assert reps[0].free_memory_gb == pytest.approx(100.0) and reps[0].probe == "ok"
    assert nvml.calls == {"init": 1, "shutdown": 1}


def test_ecc_error_makes_unhealthy():
    reps = check_gpus(CFG, nvml=fake_nvml([{}, {"ecc": 3}]), probe=ok_probe)
    assert reps[0].healthy and not reps[1].healthy
    assert "uncorrected ECC" in reps[1].problems[0]
    assert reps[1].probe.startswith("skipped")


def test_temperature_memory_and_remapping():
    reps = check_gpus(CFG, nvml=fake_nvml([{"temp": 91}, {"free": 1 * GIB}, {"rows": (0, 1, False, True)},
                                           {"pending": 1}]), probe=ok_probe)
    assert not any(r.healthy for r in reps)
    assert "temperature 91" in reps[0].problems[0]
    assert "free memory" in reps[1].problems[0]
    assert reps[2].problems == ["row remapping failed"]
    assert "page retirement pending" in reps[3].problems[0]


def test_not_supported_is_tolerated_but_other_nvml_errors_are_not():
    ns = "!NotSupported"
    m2 = fake_nvml([{"ecc": ns, "pending": ns, "pages": ns, "rows": ns, "temp": ns, "free": ns},
                    {"temp": "!Error"}])
    reps = check_gpus(CFG, nvml=m2, probe=ok_probe)
    assert reps[0].healthy and reps[0].problems == []
    assert reps[0].temperature_c is None and reps[0].ecc_uncorrected_volatile is None
    assert not reps[1].healthy and reps[1].problems[0].startswith("temperature: NVML error")


def test_no_nvml_library_gives_empty_list():
    assert check_gpus(CFG, nvml=fake_nvml([{}], init_error=True), probe=ok_probe) == []
    assert check_gpus(CFG, nvml=fake_nvml([]), probe=ok_probe) == []


def test_probe_failure_and_hidden_gpu():
    def probe(uuid, index):
        return None if index == 1 else (["matmul differs from the CPU result"] if index == 2 else [])

    reps = check_gpus(CFG, nvml=fake_nvml([{}, {}, {}]), probe=probe)
    assert [r.healthy for r in reps] == [True, True, False]
    assert reps[1].probe == "skipped (not visible to CUDA)"
    assert reps[2].problems == ["matmul differs from the CPU result"] and reps[2].probe == "failed"


def test_probe_exception_is_a_problem_not_a_crash():
    def probe(uuid, index):
        raise RuntimeError("CUDA error: unspecified launch failure")

    reps = check_gpus(CFG, nvml=fake_nvml([{}]), probe=probe)
    assert not reps[0].healthy and "launch failure" in reps[0].problems[0]


def test_torch_probe_without_cuda_marks_gpu_unusable():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    reps = check_gpus(CFG, nvml=fake_nvml([{}]))  # default TorchProbe
    assert not reps[0].healthy and "torch cannot use CUDA" in reps[0].problems[0]


def reports(health: list[bool]) -> list[GpuReport]:
    return [GpuReport(i, f"GPU-{i}abc-1234", "H200", ok, [] if ok else ["bad"]) for i, ok in enumerate(health)]


def test_visible_devices_unset_lists_healthy():
    reps = reports([True, False, True, True])
    assert healthy_visible_devices(reps, None) == "0,2,3"
    assert healthy_visible_devices(reps, None, use_uuids=True) == "GPU-0abc-1234,GPU-2abc-1234,GPU-3abc-1234"
    assert healthy_visible_devices([], None) == ""


def test_visible_devices_respects_user_value():
    reps = reports([True, True, False, True])
    assert healthy_visible_devices(reps, "2,3") == "3"          # 0 and 1 are never used
    assert healthy_visible_devices(reps, "3,1") == "3,1"        # the user's order is kept
    assert healthy_visible_devices(reps, "GPU-2abc-1234,GPU-3abc") == "GPU-3abc"  # UUIDs and prefixes
    assert healthy_visible_devices(reps, "1,9,3") == "1"        # like CUDA: stop at an invalid entry
    assert healthy_visible_devices(reps, "") == ""              # the user hid every GPU
    assert healthy_visible_devices(reps, "-1") == ""
    assert healthy_visible_devices(reps, "MIG-abc,0") == "MIG-abc,0"


def test_format_table():
    reps = reports([True, False])
    reps[0].temperature_c = 41.0
    text = format_table(reps)
    lines = text.splitlines()
    assert len(lines) == 3 and "healthy" in lines[1] and "UNHEALTHY" in lines[2] and "bad" in lines[2]
    assert " 41 " in lines[1]


@pytest.mark.parametrize("health,min_gpus,allow_none,rc", [
    ([True, False], 1, False, 0), ([True, False], 2, False, 1), ([], 0, False, 1), ([], 0, True, 0),
    ([], 1, True, 1), ([True], 0, True, 0)])
def test_main_exit_codes(monkeypatch, capsys, health, min_gpus, allow_none, rc):
    """A health check that finds no GPU at all fails unless told --allow-none."""
    monkeypatch.setattr(gpu_health, "check_gpus", lambda cfg, run_probe=True: reports(health))
    assert gpu_health.main(["--min-gpus", str(min_gpus), *(["--allow-none"] if allow_none else [])]) == rc
    out = capsys.readouterr().out
    if health:
        assert f"{sum(health)} of {len(health)} GPUs healthy" in out
    else:
        assert "no NVIDIA GPU found" in out


def test_main_json_and_config(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake_check(cfg, run_probe=True):
        seen["cfg"] = cfg
        return reports([True])

    monkeypatch.setattr(gpu_health, "check_gpus", fake_check)
    cfg = tmp_path / "d.yaml"
    cfg.write_text("gpus:\n  min_gpus: 2\n  max_temperature_c: 70\n")
    assert gpu_health.main(["--config", str(cfg), "--json"]) == 1  # 1 healthy < 2 from the config
    data = json.loads(capsys.readouterr().out)
    assert data[0]["uuid"] == "GPU-0abc-1234" and data[0]["healthy"] is True
    assert seen["cfg"].max_temperature_c == 70.0
    assert GpuReport.from_dict(data[0]) == reports([True])[0]


def test_check_node_task_runs_here():
    host, node_id, reps = gpu_health.check_node_task(GpusConfig(), timeout_s=60)
    assert host and node_id == ""  # no Ray here
    # the subprocess's stdout is clean JSON (logs go to stderr): reports, not a failure entry
    assert all("health check" not in "".join(r["problems"]) for r in reps), reps
    assert all(r["index"] >= 0 and r["uuid"] for r in reps)
