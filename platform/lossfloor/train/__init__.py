"""Training EDM2 models with the EDM2 or the optimal-loss schedule (paper §4; edm2.md §4-§7), in any of the
parametrisations of `lossfloor.diffusion` (EDM, flow matching, NCSN, DDPM-eps, VP-v: `TrainConfig.process`).

    from lossfloor.data import load
    from lossfloor.train import TrainConfig, OptimalLossSchedule, train
    cfg = TrainConfig(preset="tiny", duration_n_img=1 << 16, jstar="jstar.parquet",
                      schedule=OptimalLossSchedule())
    result = train(cfg, load("bundled:digits"), checkpoint_dir="runs/tiny-optimal")

Modules: config (TrainConfig), schedules (EDM2 / FM / NCSN / VP / optimal-loss + gap tracker), losses (denoiser,
x0 and EDM2 losses), ema (power-function EMA, post-hoc reconstruction), evaluation (fixed-grid per-sigma
losses), flops, checkpoint, curves (parquet tables), run_folder (a run's folder read back), loop (train),
sampling (EDM Heun), metrics (Fréchet distance and feature extractors). Imports only torch, numpy, scipy and pyarrow.
"""

from lossfloor.train.checkpoint import latest_checkpoint, load_checkpoint, read_snapshots
from lossfloor.train.config import TrainConfig, learning_rate, resolve
from lossfloor.train.curves import CURVE_SCHEMA, TRAIN_LOG_SCHEMA
from lossfloor.train.ema import (
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    posthoc_ema,
    profile_inner,
    sigma_rel_to_gamma,
)
from lossfloor.train.evaluation import EvalResult, evaluate
from lossfloor.train.flops import FLOP_CONVENTION, forward_flops, training_flops
from lossfloor.train.loop import TrainResult, loss_curve_table, train, train_log_table
from lossfloor.train.losses import Denoiser, training_loss, x0_loss
from lossfloor.train.metrics import (
    FeatureSums,
    NetworkFeatures,
    PixelFeatures,
    compute_statistics,
    feature_extractor,
    feature_extractors,
    feature_statistics,
    frechet_distance,
    frechet_distance_of,
    to_uint8,
)
from lossfloor.train.sampling import edm_sigma_steps, generate, guided, heun_sample, sample_inputs
from lossfloor.train.schedules import (
    EDM2Schedule,
    FMSchedule,
    GapTracker,
    JStarCurve,
    NCSNSchedule,
    OptimalLossSchedule,
    VPSchedule,
    build_schedule,
)

__all__ = [
    "CURVE_SCHEMA",
    "FLOP_CONVENTION",
    "TRAIN_LOG_SCHEMA",
    "Denoiser",
    "EDM2Schedule",
    "EvalResult",
    "FMSchedule",
    "GapTracker",
    "JStarCurve",
    "FeatureSums",
    "NCSNSchedule",
    "NetworkFeatures",
    "OptimalLossSchedule",
    "PixelFeatures",
    "PowerFunctionEMA",
    "TrainConfig",
    "TrainResult",
    "VPSchedule",
    "build_schedule",
    "compute_statistics",
    "edm_sigma_steps",
    "evaluate",
    "feature_extractor",
    "feature_extractors",
    "feature_statistics",
    "forward_flops",
    "frechet_distance",
    "frechet_distance_of",
    "gamma_to_sigma_rel",
    "generate",
    "guided",
    "heun_sample",
    "sample_inputs",
    "to_uint8",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "loss_curve_table",
    "posthoc_coefficients",
    "posthoc_ema",
    "profile_inner",
    "read_snapshots",
    "resolve",
    "sigma_rel_to_gamma",
    "train",
    "train_log_table",
    "training_flops",
    "training_loss",
    "x0_loss",
]
