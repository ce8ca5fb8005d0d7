"""What a schedule sweep minimises, computed at each evaluation point of a training run.

- `gap`: the weighted loss gap on the run's evaluation grid under one **fixed reference weighting**
      sum_k pi_k w_ref(sigma_k) (J_k - J*_k),  w_ref = min(1/J*, w_max_ref),  pi uniform in ln sigma
  (the paper's weight without the focus term, default truncation w_max_ref = 1/(1e-3 J*(inf)), over
  [0.002, 80]; `OptimalLossSchedule(b=0)` at its defaults). The loop's own `eval/total_gap` is weighted by
  each run's schedule, so it changes with the very w_max and focus a sweep varies and differs for the
  EDM2 baseline: it cannot rank runs. The fixed weighting can: it is the relative gap (J - J*)/J*
  where J* is not tiny, capped where it is.
- `fd`: the Fréchet distance between samples of the checkpoint (EDM Heun) and the data, in the features
  of `lossfloor.train.metrics.feature_extractor` (pixels on small data; Inception (FID) or DINOv2
  (FD_DINOv2) from a local network file). The data's statistics are computed once per objective.

Core module: torch, numpy and scipy only (a Ray Tune trial builds one and calls it per evaluation).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from lossfloor.errors import InputError
from lossfloor.train.evaluation import quadrature_weights
from lossfloor.train.schedules import JStarCurve, OptimalLoss, OptimalLossSchedule

OBJECTIVES = ("gap", "fd")
REFERENCE_SCHEDULE = OptimalLossSchedule(b=0.0)  # the fixed weighting of the `gap` objective


def gap_key(sigma: float) -> str:
    """The loop's metric name of the per-sigma gap (lossfloor.train.loop._eval_metrics)."""
    return f"eval/gap/sigma_{sigma:.4g}"


def reference_weights(curve: JStarCurve, sigmas) -> np.ndarray:
    """(K,) pi_k w_ref(sigma_k): the fixed weighting of the `gap` objective on the grid `sigmas`."""
    ref = OptimalLoss(REFERENCE_SCHEDULE, curve)
    s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    w = ref.weight(s).to(torch.float64).numpy()
    return quadrature_weights(np.asarray(sigmas, dtype=np.float64), ref.reference_density) * w


class GapObjective:
    """sum_k pi_k w_ref(sigma_k) gap_k from an evaluation's metrics (module docstring)."""

    name = "gap"

    def __init__(self, curve: JStarCurve, sigmas):
        self.sigmas = tuple(float(s) for s in sigmas)
        self.coef = reference_weights(curve, self.sigmas)

    def __call__(self, metrics: dict, checkpoint=None) -> float:
        missing = [gap_key(s) for s in self.sigmas if gap_key(s) not in metrics]
        if missing:
            raise InputError(f"objective gap: the evaluation has no {missing[0]} (train with a J* table)")
        gaps = np.array([metrics[gap_key(s)] for s in self.sigmas], dtype=np.float64)
        return float(np.sum(self.coef * gaps))


class FDObjective:
    """Fréchet distance of `n` EDM Heun samples of a checkpoint to the data, in `features` (a
    `feature_extractor` spec: "pixels", "inception:PATH", "dinov2:PATH"): `lossfloor evaluate`'s protocol
    and code (`lossfloor.train.quality`: samples seeded per index, uint8, feature sums) on fewer samples;
    labels of a conditional model follow the data's class frequencies."""

    name = "fd"

    def __init__(self, data, *, features: str = "pixels", n: int = 512, num_steps: int = 32, seed: int = 0,
                 max_reference: int = 50_000, device="cpu"):
        from lossfloor.train.metrics import feature_extractor

        if not (isinstance(n, int) and n >= 2):
            raise InputError(f"fd samples: expected an integer >= 2, like 512, got {n!r}")
        self.data, self.n, self.num_steps, self.seed, self.device = data, n, num_steps, seed, str(device)
        self.max_reference = max_reference
        self.extractor = feature_extractor(features, device=device)
        self._reference = None

    def reference(self):
        """The data's `ReferenceStats` (at most max_reference samples), computed once."""
        from lossfloor.data import Dataset
        from lossfloor.train.quality import reference_statistics

        if self._reference is None:
            d = self.data
            samples = np.asarray(getattr(d, "samples", d))[: self.max_reference]
            labels = getattr(d, "labels", None)
            part = Dataset(samples=samples, labels=None if labels is None else np.asarray(labels)[: self.max_reference],
                           fingerprint=getattr(d, "fingerprint", ""), source=str(getattr(d, "source", "data")),
                           normalisation=getattr(d, "normalisation", "none"))
            self._reference = reference_statistics(part, {"fd": self.extractor})
        return self._reference

    def __call__(self, metrics: dict, checkpoint=None) -> float:
        from lossfloor.train.quality import SamplerSettings, SampleSpec, block_sums, fd_metrics

        if checkpoint is None:
            raise InputError("objective fd: needs the checkpoint of the evaluation (checkpoint at every evaluation)")
        den, shape, label_dim = load_denoiser(checkpoint, device=self.device)
        ref = self.reference()
        probs = ref.class_probs() if label_dim else None
        if probs is not None and len(probs) < label_dim:
            probs = probs + (0.0,) * (label_dim - len(probs))
        spec = SampleSpec(shape=tuple(shape), seed=self.seed, class_probs=probs,
                          sampler=SamplerSettings(num_steps=self.num_steps))
        sums = block_sums(den, {"fd": self.extractor}, spec, start=0, stop=self.n, device=self.device)
        return fd_metrics(sums, ref)["fd"]


def load_denoiser(checkpoint: str | os.PathLike, *, device="cpu"):
    """(denoiser, sample shape, label_dim) of a training checkpoint: its evaluated EMA when the config
    has eval_ema, else the raw weights; eval mode, the run's precision where the device allows it."""
    from lossfloor.train.checkpoint import load_checkpoint

    return denoiser_from_state(load_checkpoint(checkpoint, map_location="cpu"), device=device)


def denoiser_from_state(state: dict, *, device="cpu", weights: dict | None = None):
    """`load_denoiser` of a loaded checkpoint state; `weights`: other weights of its network (an EMA)."""
    from lossfloor.models import build_unet
    from lossfloor.train.config import TrainConfig, resolve
    from lossfloor.train.losses import Denoiser

    cfg = TrainConfig.from_dict(state["config"])
    R = resolve(cfg)
    unet = R.unet
    net = build_unet(unet, device=device, seed=cfg.seed)
    if weights is None and cfg.eval_ema is not None:  # the same weights the run's evaluation used
        ema = state["ema"]
        weights = next(w for s, w in zip(ema["sigma_rels"], ema["states"]) if math.isclose(s, cfg.eval_ema))
    if weights is None:
        weights = state["net"]
    net.load_state_dict(weights)
    net.eval()
    precision = cfg.precision if str(device).startswith("cuda") or cfg.precision != "fp16" else "none"  # fp16: CUDA
    shape = (unet.img_channels, unet.img_resolution, unet.img_resolution)
    return Denoiser(net, R.preconditioning(), None, precision), shape, unet.label_dim


__all__ = ["OBJECTIVES", "REFERENCE_SCHEDULE", "FDObjective", "GapObjective", "denoiser_from_state", "gap_key",
           "load_denoiser", "reference_weights"]
