"""GPU selection before Ray starts: unhealthy GPUs are left out of CUDA_VISIBLE_DEVICES, a
user-set value is respected, and too few GPUs is a startup error (or the CPU fallback)."""

import pytest

from peaknet_daemon import supervisor as sup
from peaknet_daemon.config import config_from_dict
from peaknet_daemon.gpu_health import GpuReport


def reports(*healthy: bool) -> list[GpuReport]:
    return [GpuReport(i, f"GPU-{i}", "H200", ok, [] if ok else ["volatile uncorrected ECC errors: 3"])
            for i, ok in enumerate(healthy)]


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    return monkeypatch


def plan(monkeypatch, found, **gpus):
    monkeypatch.setattr(sup, "check_gpus", lambda cfg: found)
    return sup.Supervisor(config_from_dict({"gpus": gpus}, "test.yaml"))._local_gpus()


def test_an_unhealthy_gpu_is_excluded_and_the_daemon_uses_the_rest(env):
    import os
    assert plan(env, reports(True, False, True, True)) == 3
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,2,3"
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_a_user_set_value_is_respected_and_filtered(env):
    import os
    env.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert plan(env, reports(True, False, True, True)) == 1  # GPU 1 is sick, 0 and 2 not allowed
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_too_few_healthy_gpus_is_a_startup_error_naming_the_key(env):
    with pytest.raises(sup.StartupError, match=r"1 healthy GPUs of 2.*gpus.min_gpus in test.yaml"):
        plan(env, reports(True, False), min_gpus=2)


def test_no_healthy_gpu_falls_back_to_cpu_or_fails(env):
    assert plan(env, reports(False), cpu_fallback=True) == 0
    with pytest.raises(sup.StartupError, match="cpu_fallback is false"):
        plan(env, reports(False), cpu_fallback=False)
