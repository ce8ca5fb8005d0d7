"""Regenerate the golden numbers (only on purpose: say why in the commit message).

    .venv/bin/python tests/golden/make_golden.py

- train_tiny.json: the `tiny` preset's first 8 training steps (no warm-up) on the bundled digits at seed 0 (batch 32,
  fp32, one thread): the per-step objective and x0 loss, and the final evaluation's total loss;
- jstar_digits.json: the exact J*(σ) of the bundled digits on 6 σ (queries_per_sample 2, seed 0), with
  its standard error and interval.
A uniform shift anywhere in the training loop, the preconditioning, the network or the estimator moves
these numbers; tests/test_golden.py checks them to tight tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TRAIN = dict(preset="tiny", batch_n_img=32, duration_n_img=32 * 8, warmup_n_img=0, log_every_n_img=32, eval_n_samples=64,
             eval_sigmas=(0.05, 0.5, 5.0), seed=0)
JSTAR_SIGMAS = [0.05, 0.2, 0.5, 1.0, 3.0, 20.0]
JSTAR = dict(estimator="exact", queries_per_sample=2, seed=0)


def train_numbers() -> dict:
    from lossfloor.data import load
    from lossfloor.train import TrainConfig, train

    res = train(TrainConfig(**TRAIN), load("bundled:digits"))
    total = [r["loss"] for r in res.loss_curve if r["sigma"] is None][-1]
    return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in TRAIN.items()},
            "loss": [r["loss"] for r in res.train_log], "loss_x0": [r["loss_x0"] for r in res.train_log],
            "final_eval_total": total}


def jstar_numbers() -> dict:
    from lossfloor.data import load
    from lossfloor.floor import EstimatorConfig, estimate

    est = estimate(load("bundled:digits").samples, np.array(JSTAR_SIGMAS), EstimatorConfig(**JSTAR), progress=False)
    return {"config": JSTAR, "sigma": JSTAR_SIGMAS, "j_star": est.j_star.tolist(), "stderr": est.stderr.tolist(),
            "ci_low": est.ci_low.tolist(), "ci_high": est.ci_high.tolist(), "total_variance": est.total_variance}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, fn in (("train_tiny.json", train_numbers), ("jstar_digits.json", jstar_numbers)):
        (HERE / name).write_text(json.dumps(fn(), indent=1) + "\n")
        print("wrote", HERE / name)
