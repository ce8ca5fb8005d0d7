"""Golden numbers of a tiny configuration (tests/golden/, written by tests/golden/make_golden.py).

A uniform shift in the training loop, the preconditioning, the network or the estimators passes every
relative test; these absolute numbers do not. Regenerate them only on purpose, with a note in the commit.
Tolerances allow float32 reduction-order differences between CPUs, nothing more.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))

import make_golden  # noqa: E402


@pytest.fixture
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_training_losses_are_the_golden_ones(one_torch_thread):
    golden = json.loads((GOLDEN / "train_tiny.json").read_text())
    now = make_golden.train_numbers()
    assert now["config"] == golden["config"]
    np.testing.assert_allclose(now["loss"], golden["loss"], rtol=2e-5)
    np.testing.assert_allclose(now["loss_x0"], golden["loss_x0"], rtol=2e-5)
    assert now["final_eval_total"] == pytest.approx(golden["final_eval_total"], rel=2e-5)


def test_exact_j_star_of_the_digits_is_the_golden_one(one_torch_thread):
    golden = json.loads((GOLDEN / "jstar_digits.json").read_text())
    now = make_golden.jstar_numbers()
    assert now["sigma"] == golden["sigma"] and now["config"] == golden["config"]
    for name in ("j_star", "stderr", "ci_low", "ci_high"):
        np.testing.assert_allclose(now[name], golden[name], rtol=1e-6, atol=1e-30, err_msg=name)
    assert now["total_variance"] == pytest.approx(golden["total_variance"], rel=1e-12)
