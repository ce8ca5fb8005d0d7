"""Every estimate and training run names its data set as an MLflow dataset input (the UI's Dataset column):
digest = the data fingerprint's first 36 hex digits (MLflow's limit), the whole fingerprint in a tag."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lossfloor.data import load
from lossfloor.floor import EstimatorConfig, build_table, estimate
from lossfloor.tracking import client, log_estimate, log_training
from lossfloor.tracking.datasets import DIGEST_CHARS, FINGERPRINT_TAG


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _inputs(uri: str, run_id: str) -> list:
    return client(uri).get_run(run_id).inputs.dataset_inputs


def _check(inp, fingerprint: str, source: str, context: str) -> None:
    assert inp.dataset.digest == fingerprint[:DIGEST_CHARS] and len(inp.dataset.digest) == 36
    assert inp.dataset.name == source and json.loads(inp.dataset.source) == {"data": source}
    assert json.loads(inp.dataset.profile) == {"fingerprint": fingerprint}
    tags = {t.key: t.value for t in inp.tags}
    assert tags == {FINGERPRINT_TAG: fingerprint, "mlflow.data.context": context}


def test_an_estimate_run_has_its_data_set_as_input(uri):
    digits = load("bundled:digits")
    est = estimate(digits.samples[:64], [0.1, 1.0], EstimatorConfig(estimator="exact", queries_per_sample=1),
                   progress=False)
    table = build_table(est, fingerprint=digits.fingerprint)
    run_id = log_estimate(table, params={"data": "bundled:digits"}, tracking_uri=uri)
    (inp,) = _inputs(uri, run_id)
    _check(inp, digits.fingerprint, "bundled:digits", "estimate")
    # the same data again: the same dataset (one row per name and digest), a second input
    again = log_estimate(table, params={"data": "bundled:digits"}, tracking_uri=uri)
    assert _inputs(uri, again)[0].dataset.digest == inp.dataset.digest


def test_a_training_run_has_its_data_set_as_input(uri, tmp_path):
    from lossfloor.train import TrainConfig, train

    digits = load("bundled:digits")
    cfg = TrainConfig(preset="tiny", batch_n_img=32, duration_n_img=32, warmup_n_img=0, eval_n_samples=32,
                      eval_sigmas=(0.5,), seed=0)
    train(cfg, digits, checkpoint_dir=tmp_path / "run")
    run_id = log_training(tmp_path / "run", params={"data": "bundled:digits"}, tracking_uri=uri)
    (inp,) = _inputs(uri, run_id)
    _check(inp, digits.fingerprint, "bundled:digits", "training")


def test_no_fingerprint_no_input(uri):
    x = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    est = estimate(x, [1.0], EstimatorConfig(estimator="exact", queries_per_sample=1), progress=False)
    run_id = log_estimate(build_table(est, fingerprint=""), params={}, tracking_uri=uri)
    assert _inputs(uri, run_id) == []
