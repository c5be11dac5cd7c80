"""The Ray object-store producers on an embedded CPU Ray."""

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

from peaknet_producers.ray_producers import PipelineInput, RayDataProducerManager  # noqa: E402


@pytest.fixture(scope="module")
def ray_cpu():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_simple_producer_puts_batches(ray_cpu):
    m = RayDataProducerManager()
    refs = m.launch_producers(num_producers=2, batches_per_producer=3, batch_size=4, tensor_shape=(2, 16, 24))
    assert len(refs) == 6 and m.get_all_batches() == refs
    batches = ray.get(refs)
    assert all(b.shape == (4, 2, 16, 24) and b.dtype == torch.float32 for b in batches)
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[0], batches[3])
    again = ray.get(RayDataProducerManager().launch_producers(2, 3, 4, (2, 16, 24)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # deterministic per seed


def test_structured_producer_with_bragg_metadata(ray_cpu):
    refs = RayDataProducerManager().launch_producers(1, 1, 3, (1, 32, 32), structured=True, kind="bragg")
    (x,) = ray.get(refs)
    assert isinstance(x, PipelineInput) and x.batch_id == "p0-b0" and len(x) == 3
    assert x.image_data.shape == (3, 1, 32, 32)
    assert x.metadata["seq"] == [0, 1, 2] and len(x.metadata["photon_energy_ev"]) == 3
    assert all(isinstance(n, int) for n in x.metadata["n_peaks"])


def test_pipeline_input_validation():
    one = PipelineInput(torch.zeros(2, 8, 8), {"a": 1}, "b")
    assert one.frames.shape == (1, 2, 8, 8) and len(one) == 1
    with pytest.raises(ValueError):
        PipelineInput(torch.zeros(8, 8))
    with pytest.raises(TypeError):
        PipelineInput([[0.0]])
