"""`lossfloor evaluate --engine ray`: blocks over Ray actors give the local engine's statistics, bit for bit,
for 1 and 3 workers (a block's samples come from (seed, index), its batches from its bounds, and the
driver adds the blocks' float64 sums in block order)."""

import warnings

import numpy as np
import pytest
import torch

from lossfloor.data import load
from lossfloor.jobs import evaluate as job
from lossfloor.jobs.engine import Engine
from lossfloor.train.metrics import feature_extractors
from lossfloor.train.quality import SamplerSettings, read_reference, reference_statistics, write_reference

pytestmark = pytest.mark.usefixtures("local_ray")


class Shrink(torch.nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x / (1 + t.view(-1, 1, 1, 1) ** 2)


def test_one_and_three_workers_give_the_local_statistics(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Shrink()), str(tmp_path / "m.pt"))
    stats = tmp_path / "d.npz"
    write_reference(reference_statistics(load("bundled:digits"), feature_extractors("pixels:2")), stats)
    results = {}
    for name, engine in (("local", Engine()), ("ray1", Engine(kind="ray", workers=1, cpus_per_worker=0.5)),
                         ("ray3", Engine(kind="ray", workers=3, cpus_per_worker=0.5))):
        spec = job.EvaluateSpec(model=str(tmp_path / "m.pt"), prediction="x0", reference_stats=str(stats),
                                features="pixels:2", out=str(tmp_path / name), n_samples=40, seeds=2, batch=8,
                                settings=SamplerSettings(num_steps=3), engine=engine)
        results[name] = (job.evaluate(spec), [read_reference(tmp_path / name / f"samples-seed{s}.stats.npz")
                                              for s in (0, 1)])
    local, local_stats = results["local"]
    for name in ("ray1", "ray3"):
        got, got_stats = results[name]
        assert got["fd"] == local["fd"]
        for a, b in zip(got_stats, local_stats):
            np.testing.assert_array_equal(a.stats["fd"][1], b.stats["fd"][1])
            np.testing.assert_array_equal(a.stats["fd"][2], b.stats["fd"][2])


def test_a_latent_model_on_ray_gives_the_local_statistics(tmp_path):
    """Each actor loads the VAE from its folder and decodes its blocks: the local engine's numbers."""
    from diffusers import AutoencoderKL

    from lossfloor.data import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Shrink()), str(tmp_path / "m.pt"))
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(tmp_path / "vae", safe_serialization=True)
    images = np.random.default_rng(0).uniform(-1, 1, (32, 3, 16, 16)).astype(np.float32)
    stats = tmp_path / "rgb.npz"
    write_reference(reference_statistics(Dataset(samples=images, labels=None, fingerprint="rgb", source="rgb",
                                                 normalisation="none"), feature_extractors("pixels:8")), stats)
    results = {}
    for name, engine in (("local", Engine()), ("ray2", Engine(kind="ray", workers=2, cpus_per_worker=0.5))):
        spec = job.EvaluateSpec(model=str(tmp_path / "m.pt"), prediction="x0", reference_stats=str(stats),
                                features="pixels:8", out=str(tmp_path / name), n_samples=24, seeds=1, batch=8,
                                settings=SamplerSettings(num_steps=2), vae=str(tmp_path / "vae"), engine=engine)
        results[name] = (job.evaluate(spec), read_reference(tmp_path / name / "samples-seed0.stats.npz"))
    (local, local_stats), (ray, ray_stats) = results["local"], results["ray2"]
    assert ray["fd"] == local["fd"] and ray["vae"] == str(tmp_path / "vae")
    np.testing.assert_array_equal(ray_stats.stats["fd"][1], local_stats.stats["fd"][1])
    np.testing.assert_array_equal(ray_stats.stats["fd"][2], local_stats.stats["fd"][2])
