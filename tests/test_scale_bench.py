"""The scale benchmarks (benchmarks/estimator_scale.py, benchmarks/knn_search.py): the cost model's GEMM
FLOPs against a direct count of the estimators' matrix products, recall@k against a brute-force reference,
and the estimator_scale run end to end at tiny sizes."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import estimator_scale
import knn_search
from _scale_data import SIGMAS, lowrank_mixture, sigma_grid

from lossfloor.floor import estimate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n, d, rows", [(96, 8, 8), (200, 64, 25)])  # L ≥ D (w·X per σ) and L < D (w·Dref)
@pytest.mark.parametrize("est, L", [("exact", None), ("cdol", 16), ("knn", 16)])
def test_cost_model_gemm_flops_equal_a_direct_count(n, d, rows, est, L):
    """Every matrix product the estimator runs, counted by torch's FlopCounterMode from its operands'
    shapes, equals the model's GEMM FLOPs (one query per sample, so M = N). knn's depend on how many
    of a chunk's A rows are distinct (data-dependent): between the model's bounds (a_share 1/s and 1)."""
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    sigmas = np.geomspace(0.1, 10.0, 3)
    cfg = estimator_scale.query_config(n, estimator=est, subset_size=L, rows_per_batch=rows, index="flat")
    with FlopCounterMode(display=False) as counter:
        estimate(x, sigmas, cfg, progress=False)
    model = estimator_scale.cost_model(est, n=n, m=n, L=L or n, d=d, sigmas=len(sigmas), batch=rows)
    assert counter.get_total_flops() > 0
    if est == "knn":  # 3 σ: one chunk; its A rows all shared (1/3) or all different (1)
        low = estimator_scale.cost_model(est, n=n, m=n, L=L, d=d, sigmas=3, batch=rows, a_share=1 / 3)
        assert low["stages"]["gemm"]["flops"] <= counter.get_total_flops() <= model["stages"]["gemm"]["flops"]
        assert counter.get_total_flops() > low["stages"]["gemm"]["flops"] + 0.1 * (
            model["stages"]["gemm"]["flops"] - low["stages"]["gemm"]["flops"])  # the σ's A sets do differ
    else:
        assert model["stages"]["gemm"]["flops"] == counter.get_total_flops()


def test_cost_model_scales_as_stated():
    """Hand counts: exact's GEMMs are 4MND once plus 2MND per σ (N ≥ D); a flat search 2MND per σ."""
    c = estimator_scale.cost_model("exact", n=1000, m=100, L=1000, d=10, sigmas=7, batch=100)
    assert c["stages"]["gemm"]["flops"] == 4 * 100 * 1000 * 10 + 7 * 2 * 100 * 1000 * 10
    k = estimator_scale.cost_model("knn", n=1000, m=100, L=16, d=10, sigmas=7, batch=100, index="flat")
    assert k["stages"]["search"]["flops"] == 7 * 2 * 100 * 1000 * 10
    half = estimator_scale.cost_model("knn", n=1000, m=100, L=16, d=10, sigmas=7, batch=100, search_sigmas=3)
    assert half["stages"]["search"]["flops"] == 3 * 2 * 100 * 1000 * 10
    r = estimator_scale.roofline_seconds(c, flops_per_s=1e9, bytes_per_s=1e20)
    assert math.isclose(r["stages"]["gemm"], c["stages"]["gemm"]["flops"] / 1e9)


def test_recall_at_k_equals_a_brute_force_count():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(60, 5)).astype(np.float32)
    queries = rng.normal(size=(9, 5)).astype(np.float32)
    d2 = ((queries[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    truth = np.argsort(d2, axis=1)[:, :7]
    found = truth.copy()
    found[:, 4:] = (truth[:, 4:] + 1) % 60  # some of these are still true neighbours
    found[0, 6] = -1  # FAISS's "none" never counts
    expected = [len(set(f[f >= 0]) & set(t)) / 7 for f, t in zip(found, truth, strict=True)]
    assert np.allclose(knn_search.recall_at_k(found, truth), expected)
    assert np.allclose(knn_search.recall_at_k(truth, truth), 1.0)
    assert 0 < np.mean(expected) < 1


def test_estimator_scale_runs_end_to_end_on_tiny_sizes(tmp_path, monkeypatch):
    """The `--quick` path at tiny sizes: every estimator timed and split, errors against exact, the growth
    exponent, the cost model at the measured cases and at the ImageNet-512 shape."""
    monkeypatch.setattr(estimator_scale, "photo_patches", lambda n, seed: lowrank_mixture(n, 192, seed=seed))
    monkeypatch.setattr(estimator_scale, "hardware_limits",
                        lambda device: {"gemm_fp32_flops_per_s": 1e10, "copy_bytes_per_s": 1e10, "gemm_size": 0})
    out = tmp_path / "scale.json"
    estimator_scale.main(["--sizes", "150,200", "--synthetic-sizes", "150", "--synthetic-dim", "1024",
                          "--queries", "150", "--sigmas", "4", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [c["n_samples"] for c in res["cases"]] == [150, 200, 150]
    case = res["cases"][1]
    exact = case["runs"]["exact"]["ladder"][0]
    assert exact["seconds"] > 0 and exact["queries_for_1pct"] > 0
    knn = case["runs"]["knn"]["ladder"][0]
    assert knn["L"] == 128 and 0 <= knn["worst_rel_error"] < 1
    split = knn["split"]
    assert split["gemm_s"] > 0 and split["elementwise_s"] > 0 and split["gathers_s"] > 0
    assert knn["model"]["seconds_at_measured_limits"]["total"] > 0
    growth = res["growth_exponent"]["photo-patches"]
    assert growth["exact"]["sizes"] == [150, 200] and growth["exact"]["smallest_L"] is not None
    assert growth["cdol"]["sizes"] == []  # its smallest L (512) is above N
    rows = res["imagenet512_h100_projection"]["rows"]
    assert {r["estimator"] for r in rows} == {"exact", "cdol", "knn"} and all(r["h100_fp32_seconds"] > 0 for r in rows)
    assert np.allclose(res["sigmas"], sigma_grid(4)) and len(SIGMAS) == 16


def test_photo_patches_are_distinct_image_patches():
    from _scale_data import photo_patches

    x = photo_patches(500, seed=3)
    assert x.shape == (500, 192) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert len(np.unique(x, axis=0)) == 500
    assert np.array_equal(x, photo_patches(500, seed=3))
