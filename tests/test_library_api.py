"""The original design's library API on an embedded CPU Ray: `create_pipeline_actors`, batches
put into the object store by `RayDataProducerManager`, and
`actor.process_batch_from_ray_object_store.remote(refs)`. The peaks must be exactly those of the
plain reference loop `run_sequential` on the same frames."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray  # noqa: E402

import peaknet_daemon  # noqa: E402
from peaknet_daemon.config import config_from_dict  # noqa: E402
from peaknet_daemon.pipeline import run_sequential  # noqa: E402
from peaknet_producers.ray_producers import PipelineInput, RayDataProducerManager  # noqa: E402

SHAPE = [2, 64, 64]
CONFIG = {
    "model": {"preset": "classical", "classical": {"snr_threshold": 6.0, "min_pixels": 2}},
    "pipeline": {"frame_shape": SHAPE, "dtype": "float32", "batch_size": 4, "buffers": 2, "device": "cpu"},
    "output": {"hit_threshold": 1},
}
BATCH = 6  # frames per object: more than one pipeline batch, the second one padded
# The two actors hold both of Ray's CPUs for their lifetime; producer tasks take none, or they
# would wait forever for a CPU.
PRODUCER_CPUS = 0


@pytest.fixture(scope="module")
def actors():
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
    try:
        handles = peaknet_daemon.create_pipeline_actors(num_actors=2, config=CONFIG)
        yield handles
    finally:
        ray.shutdown()


def reference(frames: np.ndarray) -> list:
    return run_sequential(config_from_dict(CONFIG), list(frames))


def assert_same_peaks(results: list[dict], frames: np.ndarray) -> None:
    expected = reference(frames)
    assert len(results) == len(expected) == len(frames)
    for got, want in zip(results, expected):
        assert got["n_peaks"] == want.n_peaks
        assert got["hit"] == (want.n_peaks >= 1)
        assert set(got["peaks"]) == {"panel", "y", "x", "intensity", "npix"}
        for column in got["peaks"]:
            np.testing.assert_array_equal(got["peaks"][column], getattr(want, column), err_msg=column)


def test_simple_producer_batches_give_the_reference_peaks(actors):
    refs = RayDataProducerManager().launch_producers(
        num_producers=2, batches_per_producer=1, batch_size=BATCH, tensor_shape=SHAPE, kind="bragg",
        num_cpus=PRODUCER_CPUS)
    out = ray.get(actors[0].process_batch_from_ray_object_store.remote(refs))
    assert len(out) == len(refs) == 2
    batches = ray.get(refs)
    assert all(isinstance(b, torch.Tensor) and tuple(b.shape) == (BATCH, *SHAPE) for b in batches)
    for results, batch in zip(out, batches):
        assert [r["seq"] for r in results] == list(range(BATCH))
        assert_same_peaks(results, batch.numpy())
    assert sum(r["n_peaks"] for results in out for r in results) > len(refs) * BATCH  # Bragg frames have peaks


def test_structured_producer_batches_keep_their_metadata(actors):
    refs = RayDataProducerManager().launch_producers(
        num_producers=1, batches_per_producer=2, batch_size=BATCH, tensor_shape=SHAPE, structured=True,
        kind="bragg", seed=7, num_cpus=PRODUCER_CPUS)
    out = ray.get(actors[1].process_batch_from_ray_object_store.remote(refs))
    items = ray.get(refs)
    assert len(out) == len(items) == 2
    for results, item in zip(out, items):
        assert isinstance(item, PipelineInput)
        assert_same_peaks(results, item.image_data.numpy())
        for r in results:
            assert r["meta"]["batch_id"] == item.batch_id
            assert r["meta"]["n_peaks"] == item.metadata["n_peaks"]


def test_both_actors_agree_and_accept_plain_values(actors):
    """Values work as well as ObjectRefs, a single (P, H, W) frame is a batch of one, and both
    actors find the same peaks."""
    frames = ray.get(RayDataProducerManager().launch_producers(
        1, 1, 3, SHAPE, kind="bragg", seed=3, num_cpus=PRODUCER_CPUS)[0])
    a, b = ray.get([actor.process_batch_from_ray_object_store.remote([frames, frames[0]]) for actor in actors])
    assert [len(x) for x in a] == [3, 1]
    assert_same_peaks(a[0], frames.numpy())
    assert_same_peaks(a[1], frames.numpy()[:1])
    assert [r["n_peaks"] for r in a[0]] == [r["n_peaks"] for r in b[0]]
    assert {r["worker"] for r in a[0]} != {r["worker"] for r in b[0]}


def test_wrong_shaped_batch_is_a_clear_error(actors):
    wrong = torch.zeros(2, 2, 64, 32)
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(actors[0].process_batch_from_ray_object_store.remote([ray.put(wrong)]))
    assert isinstance(info.value, ValueError)
    assert "(2, 64, 32)" in str(info.value) and "(2, 64, 64)" in str(info.value)
    # the actor is still usable afterwards
    frames = torch.zeros(1, *SHAPE)
    (results,) = ray.get(actors[0].process_batch_from_ray_object_store.remote([frames]))
    assert len(results) == 1 and results[0]["n_peaks"] == 0
