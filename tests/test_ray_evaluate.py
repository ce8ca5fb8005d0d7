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
