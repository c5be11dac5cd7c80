"""Large copies bypass the CPU caches: an actor and the ingest processes it starts run with
glibc's non-temporal threshold at `ingest.streaming_copy_bytes` (README, Runtime)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray  # noqa: E402

import peaknet_daemon  # noqa: E402
from peaknet_daemon.actor import glibc_tunables  # noqa: E402
from peaknet_daemon.config import config_from_dict  # noqa: E402

THRESHOLD = "glibc.cpu.x86_non_temporal_threshold"


def cfg(streaming_copy_bytes: int = 262144):
    return config_from_dict({"ingest": {"streaming_copy_bytes": streaming_copy_bytes}}, "<test>")


def test_the_threshold_joins_the_users_tunables_and_never_overrides_theirs():
    assert glibc_tunables(cfg()) == f"{THRESHOLD}=262144"
    assert glibc_tunables(cfg(), "glibc.malloc.arena_max=2") == f"glibc.malloc.arena_max=2:{THRESHOLD}=262144"
    assert glibc_tunables(cfg(), f"{THRESHOLD}=1048576") == f"{THRESHOLD}=1048576"
    assert glibc_tunables(cfg(0), "glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2"
    assert glibc_tunables(cfg(0)) == ""


def environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_an_actor_and_its_ingest_process_start_with_the_threshold(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    config = {"pipeline": {"frame_shape": [1, 32, 32], "dtype": "float32", "batch_size": 2, "device": "cpu"},
              "model": {"preset": "classical"},
              "ingest": {"sockets": [{"endpoint": "tcp://127.0.0.1:1", "mode": "connect"}], "processes": 1,
                         "streaming_copy_bytes": 524288}}
    ray.init(num_cpus=1, include_dashboard=False, address="local", log_to_driver=False)
    try:
        [actor] = peaknet_daemon.create_pipeline_actors(num_actors=1, config=config, ingest=True)
        ready = ray.get(actor.ready.remote(), timeout=150)
        ingest_pid = ray.get(actor.stats.remote(), timeout=30)["workers"]["ingest-0"]["pid"]
        assert ingest_pid and ingest_pid != ready["pid"]
        for pid in (ready["pid"], ingest_pid):
            assert f"GLIBC_TUNABLES={THRESHOLD}=524288".encode() in environ(pid)
        ray.get(actor.stop.remote(), timeout=60)
    finally:
        ray.shutdown()


@pytest.mark.timeout(120)
def test_an_environment_ray_cannot_set_up_is_a_startup_error_naming_the_key(monkeypatch):
    from peaknet_daemon import supervisor as sup
    real = sup.actor_options

    def failing(*args, **kwargs):  # injected: an environment whose setup fails in Ray's agent
        options = real(*args, **kwargs)
        options["runtime_env"] = {"conda": "no-such-env"}
        return options

    monkeypatch.setattr(sup, "actor_options", failing)
    monkeypatch.setattr(sup, "check_gpus", lambda cfg: [])  # no GPU: the CPU fallback
    cfg = config_from_dict({"pipeline": {"frame_shape": [1, 32, 32], "device": "cpu"},
                            "model": {"preset": "classical"}, "ray": {"num_cpus": 1}}, "daemon.yaml")
    supervisor = sup.Supervisor(cfg)
    try:
        with pytest.raises(sup.StartupError, match=r"pipeline actor 0: Ray could not set up .*"
                                                   r"ingest.streaming_copy_bytes: 0 in daemon.yaml"):
            supervisor.start()
        assert not Path(supervisor.tally_dir).exists()  # a failed start leaves nothing behind
    finally:
        ray.shutdown()
        shutil.rmtree(supervisor.tally_dir, ignore_errors=True)
