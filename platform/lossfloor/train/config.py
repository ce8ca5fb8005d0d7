"""`TrainConfig`: one frozen, keyword-only dataclass that fully determines a training run.

Counts are in images (`*_n_img`), like EDM2. Fields left None take the preset's value (edm2.md §3) or
the documented default; `resolve(config)` fills them in. `to_dict` / `from_dict` give a plain JSON-able
dict (checkpoints store it; a YAML/CLI front end can build configs from it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass

from lossfloor.diffusion import PRECONDITIONINGS
from lossfloor.diffusion.grids import SIGMA_MAX, SIGMA_MIN, is_sigma
from lossfloor.errors import InputError
from lossfloor.hashing import config_hash
from lossfloor.models import Preset, get_preset
from lossfloor.train.ema import check_sigma_rel
from lossfloor.train.losses import PRECISIONS
from lossfloor.train.schedules import (
    SCHEDULES,
    EDM2Schedule,
    FMSchedule,
    NCSNSchedule,
    OptimalLossSchedule,
    VPSchedule,
)

PROCESSES = PRECONDITIONINGS  # preconditioning table the denoiser is built with (lossfloor.diffusion)
# The schedule a process trains with by default: its own recipe's sigma distribution and native loss
DEFAULT_SCHEDULE = {"edm": EDM2Schedule, "fm": FMSchedule, "ncsn": NCSNSchedule, "ddpm-eps": VPSchedule,
                    "vp-v": VPSchedule}
FLOP_CONVENTIONS = ("gemm", "edm2")  # lossfloor.models.counting.gmac_per_eval conventions

# Fields that may differ between a checkpoint and the config that resumes it (they change when and
# what is recorded, never the parameters).
RESUME_MUTABLE = ("duration_n_img", "eval_every_n_img", "checkpoint_every_n_img", "keep_checkpoints",
                  "snapshot_every_n_img", "log_every_n_img", "eval_batch", "run")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run (EDM2 recipe, edm2.md §4-§5, with a pluggable schedule, paper §4)."""

    # Model and process
    preset: str | Preset = "tiny"  # lossfloor.models preset name ("tiny", "img512-xs", ...) or a Preset
    process: str = "edm"  # the parametrisation, a preconditioning table of lossfloor.diffusion: "edm" (EDM,
    #                       sigma_data from the preset), "fm" (flow matching), "ncsn" (VE, -eps), "ddpm-eps"
    #                       (VP, eps) or "vp-v" (VP, v)
    schedule: EDM2Schedule | FMSchedule | NCSNSchedule | VPSchedule | OptimalLossSchedule | None = None
    #   None: the process's own (DEFAULT_SCHEDULE: edm2 for "edm", fm for "fm", ncsn for "ncsn", vp for
    #   "ddpm-eps" and "vp-v")
    jstar: str | None = None  # J* parquet table (lossfloor estimate); needed by OptimalLossSchedule,
    #                           and gives every loss its gap J - J*
    conditional: bool = True  # use class labels when the preset has label_dim > 0
    latents: str = "mean"  # "mean": train on the samples as given; "posterior": samples are [mean, std] of
    #                        EDM2 latents (2C channels) and x0 ~ N(mean, std²) is drawn at every step, as
    #                        EDM2 does; the J* table must be of the same kind (`lossfloor estimate --latents`)

    # Optimisation (None = the preset's value)
    batch_n_img: int | None = None  # global batch (images per optimizer step), split over ranks
    duration_n_img: int | None = None  # training length in images
    lr_ref: float | None = None  # lr = lr_ref / sqrt(max(t / t_ref, 1)) x min(n_img / warmup, 1)
    t_ref_iters: int | None = None  # t_ref, in optimizer steps
    warmup_n_img: int | None = None  # linear lr warm-up length in images (0 = none)
    accum_rounds: int = 1  # gradient accumulation rounds per step and rank
    precision: str = "none"  # "none" (fp32), "bf16" or "fp16" autocast of the network F

    # EMA (power-function, edm2.md §5)
    ema_stds: tuple[float, ...] = (0.05, 0.10)  # sigma_rel of the tracked EMAs
    snapshot_every_n_img: int | None = None  # EMA snapshots for post-hoc EMA; None = none

    # Evaluation (fixed sigma grid, fixed noise, fixed data; see lossfloor.train.evaluation)
    eval_every_n_img: int | None = None  # None = 16 evaluations over the run (and always at the end)
    eval_sigmas: tuple[float, ...] | None = None  # None = 16 sigmas log-spaced over [0.002, 80]
    eval_n_samples: int = 256  # size of the fixed evaluation subset
    eval_holdout: bool = False  # keep the evaluation subset out of training; off by default: J* is of the
    #                             whole (training) set, so a held-out subset's J - J* would add its
    #                             generalisation error to the gap (paper §3 measures on training data)
    eval_batch: int = 256  # forward batch of the evaluation (memory only; no effect on results)
    eval_ema: float | None = None  # evaluate this tracked EMA (one of ema_stds); None = raw weights

    # Checkpoints and logging
    checkpoint_every_n_img: int | None = None  # None = at every evaluation; always at the end
    keep_checkpoints: int = 2  # newest checkpoints kept (older ones deleted); 0 = keep all
    log_every_n_img: int | None = None  # a train-log row (the mean over the steps since the previous
    #                                     row) every this many images; None = every step for runs of up
    #                                     to 1000 steps, else about 1000 rows
    flop_convention: str = "gemm"  # "gemm" (FlopCounterMode) or "edm2" (+ weight normalisation)

    seed: int = 0  # all randomness derives from (seed, stream, step)
    run: str | None = None  # run name; None = "<preset>-<process>-<schedule>-<hash of this config>"

    # ---------------------------------------------------------------------------------------------

    def __post_init__(self):
        if isinstance(self.preset, str):
            get_preset(self.preset)  # InputError naming the valid presets
        elif not isinstance(self.preset, Preset):
            raise InputError(f"preset: expected a preset name like 'tiny' or a Preset, got {type(self.preset).__name__}")
        if self.process not in PROCESSES:
            raise InputError(f"process: expected one of {', '.join(PROCESSES)}, like 'edm', got {self.process!r}")
        if self.schedule is not None and not isinstance(self.schedule, tuple(SCHEDULES.values())):
            names = ", ".join(f"{c.__name__}()" for c in SCHEDULES.values())
            raise InputError(f"schedule: expected one of {names}, got {self.schedule!r}")
        if isinstance(self.schedule, OptimalLossSchedule) and self.jstar is None:
            raise InputError("jstar: the optimal-loss schedule needs a J* table, e.g. jstar='jstar.parquet'")
        if self.jstar is not None and not isinstance(self.jstar, str):
            object.__setattr__(self, "jstar", str(self.jstar))  # a Path is fine
        if self.latents not in ("mean", "posterior"):
            raise InputError(f"latents: expected 'mean' or 'posterior', got {self.latents!r}")
        for name in ("conditional", "eval_holdout"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name in ("batch_n_img", "duration_n_img", "t_ref_iters", "snapshot_every_n_img", "eval_every_n_img",
                     "checkpoint_every_n_img", "log_every_n_img"):
            _int(self, name, 1, optional=True)
        _int(self, "warmup_n_img", 0, optional=True)
        for name in ("accum_rounds", "eval_n_samples", "eval_batch"):
            _int(self, name, 1)
        _int(self, "keep_checkpoints", 0)
        _int(self, "seed", 0)
        if self.lr_ref is not None and not (_real(self.lr_ref) and self.lr_ref > 0):
            raise InputError(f"lr_ref: expected a positive learning rate like 0.01, got {self.lr_ref!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision: expected one of {', '.join(PRECISIONS)}, like 'bf16', got {self.precision!r}")
        if self.flop_convention not in FLOP_CONVENTIONS:
            raise InputError(f"flop_convention: expected one of {', '.join(FLOP_CONVENTIONS)}, got {self.flop_convention!r}")
        stds = self.ema_stds
        if isinstance(stds, (str, bytes)) or not hasattr(stds, "__iter__"):
            raise InputError(f"ema_stds: expected a list of relative widths like [0.05, 0.1], got {stds!r}")
        object.__setattr__(self, "ema_stds", tuple(check_sigma_rel(s, "ema_stds") for s in stds))
        if self.eval_ema is not None and not any(math.isclose(self.eval_ema, s) for s in self.ema_stds):
            raise InputError(f"eval_ema: expected one of ema_stds {list(self.ema_stds)} or null, got {self.eval_ema!r}")
        if self.eval_sigmas is not None:
            sig = self.eval_sigmas
            if isinstance(sig, (str, bytes)) or not hasattr(sig, "__iter__") or not len(sig) or not all(
                    is_sigma(s) for s in sig):
                raise InputError(f"eval_sigmas: expected numbers in [{SIGMA_MIN:g}, {SIGMA_MAX:g}] like "
                                 f"[0.01, 0.1, 1, 10], got {sig!r}")
            object.__setattr__(self, "eval_sigmas", tuple(sorted({float(s) for s in sig})))
        if self.run is not None and not (isinstance(self.run, str) and self.run.strip()):
            raise InputError(f"run: expected a non-empty name like 'tiny-edm-baseline', got {self.run!r}")

    # ---------------------------------------------------------------------------------------------

    @property
    def preset_obj(self) -> Preset:
        return get_preset(self.preset) if isinstance(self.preset, str) else self.preset

    def to_dict(self) -> dict:
        """A plain dict (JSON-able): the schedule as {"kind": ..., fields...}, a Preset object by name
        plus its fields under "preset_fields"."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.preset, Preset):
            d["preset"] = self.preset.name
            d["preset_fields"] = json.loads(json.dumps(dataclasses.asdict(self.preset)))
        sched = self.schedule
        d["schedule"] = None if sched is None else {"kind": sched.kind, **dataclasses.asdict(sched)}
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of to_dict; unknown fields or schedule kinds raise InputError."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        preset_fields = d.pop("preset_fields", None)
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"train config: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        if preset_fields is not None:
            from lossfloor.models import UNetConfig

            unet = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in preset_fields["unet"].items()})
            pf = {k: tuple(v) if isinstance(v, list) else v for k, v in preset_fields.items() if k != "unet"}
            d["preset"] = Preset(unet=unet, **pf)
        sched = d.get("schedule")
        if isinstance(sched, dict):
            sched = dict(sched)
            kind = sched.pop("kind", None)
            if kind not in SCHEDULES:
                raise InputError(f"schedule.kind: expected one of {', '.join(SCHEDULES)}, got {kind!r}")
            try:
                d["schedule"] = SCHEDULES[kind](**sched)
            except TypeError as e:
                raise InputError(f"schedule: {e}") from None
        for k in ("ema_stds", "eval_sigmas"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)

    def config_hash(self) -> str:
        """sha256 (12 hex digits) of the config, without the run name and the recording-only fields."""
        return config_hash({k: v for k, v in self.to_dict().items() if k not in RESUME_MUTABLE})


@dataclass(frozen=True, kw_only=True)
class Resolved:
    """A TrainConfig with every default filled in (what the loop runs)."""

    config: TrainConfig
    preset: Preset
    schedule: EDM2Schedule | FMSchedule | NCSNSchedule | VPSchedule | OptimalLossSchedule
    batch_n_img: int
    duration_n_img: int
    lr_ref: float
    t_ref_iters: int
    warmup_n_img: int
    eval_every_n_img: int
    checkpoint_every_n_img: int
    log_every_n_img: int
    eval_sigmas: tuple[float, ...]
    run: str

    @property
    def unet(self):
        """The network the run trains: the preset's, without labels when the run is unconditional."""
        return self.preset.unet if self.config.conditional else dataclasses.replace(self.preset.unet, label_dim=0)

    def preconditioning(self):
        """The run's D(x; σ) = c_skip x + c_out F(c_in x; c_noise) table (EDM at the preset's σ_data, or the
        process's fixed row)."""
        from lossfloor.diffusion import get_preconditioning

        edm = self.config.process == "edm"
        return get_preconditioning(self.config.process, sigma_data=self.preset.sigma_data if edm else None)


def check_budget(R: Resolved, *, workers: int = 1, images_flag: str = "--images", batch_flag: str = "--batch") -> None:
    """A run of whole batches, each split evenly over `workers`: the loop trains whole batches, so a
    duration between two multiples of the batch would train the next one (100 images in batches of 32
    trained 128). InputError naming the flags."""
    images, batch = R.duration_n_img, R.batch_n_img
    if images < batch:
        raise InputError(f"{images_flag}: {images} is less than one batch ({batch} images); "
                         f"give {images_flag} >= {batch_flag}")
    if images % batch:
        lower, upper = images // batch * batch, (images // batch + 1) * batch
        raise InputError(f"{images_flag}: {images} is not a whole number of batches of {batch} images; "
                         f"give {lower} or {upper}")
    if batch % workers:
        raise InputError(f"{batch_flag}: {batch} must split evenly over {workers} workers")


def check_eval_grid(R: Resolved, table, *, flag: str = "eval_sigmas", table_name: str | None = None) -> None:
    """Every evaluation σ inside the J* table's grid (`lossfloor.floor.table.outside_grid`): the gap J − J*
    is a reported number, and J* beyond the grid is not known (held flat, a table at σ = 0.002 alone read
    J* = 0 at σ = 1 and 10, a gap of 100 % of the loss). table: a `JStarX0`. InputError naming `flag`
    (the default grid too, when `flag` was not given), the table and its range."""
    from lossfloor.floor.table import outside_grid

    bad = outside_grid(R.eval_sigmas, table.sigma)
    if not bad:
        return
    lo, hi = float(table.sigma[0]), float(table.sigma[-1])
    name = table_name or f"J* table {table.source}"
    fix = f"give {flag} within [{lo:g}, {hi:g}] or estimate J* over the evaluation σ"
    if R.config.eval_sigmas is None:
        raise InputError(f"{flag}: the default evaluation grid ({len(R.eval_sigmas)} σ in [{R.eval_sigmas[0]:g}, "
                         f"{R.eval_sigmas[-1]:g}]) reaches beyond the σ grid [{lo:g}, {hi:g}] of {name}; {fix}")
    raise InputError(f"{flag}: σ = {', '.join(f'{s:g}' for s in bad)} outside the σ grid [{lo:g}, {hi:g}] of "
                     f"{name}; {fix}")


def resume_view(config: TrainConfig) -> dict:
    """What a resumed run must share with its checkpoint: `config.to_dict()` with the defaults `resolve`
    fills in (batch, lr_ref, t_ref, warm-up, schedule, evaluation σ) as their values, so a value left to
    the preset and the same value given equal each other; the RESUME_MUTABLE fields left out."""
    R = resolve(config)
    d = config.to_dict()
    for name in ("batch_n_img", "lr_ref", "t_ref_iters", "warmup_n_img"):
        d[name] = getattr(R, name)
    d["eval_sigmas"] = list(R.eval_sigmas)
    d["schedule"] = {"kind": R.schedule.kind, **dataclasses.asdict(R.schedule)}
    return {k: v for k, v in d.items() if k not in RESUME_MUTABLE}


EVAL_SIGMA_DEFAULT = (0.002, 80.0, 16)  # log grid (min, max, count) of the default evaluation
LOG_ROWS = 1000  # default number of train-log rows per run


def resolve(config: TrainConfig) -> Resolved:
    """Fill every None of `config` with the preset's value or the documented default."""
    from lossfloor.diffusion import log_grid

    p = config.preset_obj
    batch = config.batch_n_img or p.batch_n_img
    duration = config.duration_n_img or p.duration_n_img
    every = config.eval_every_n_img or max(batch, math.ceil(duration / 16 / batch) * batch)
    schedule = config.schedule or DEFAULT_SCHEDULE[config.process]()
    sigmas = config.eval_sigmas or tuple(float(s) for s in log_grid(*EVAL_SIGMA_DEFAULT))
    run = config.run or f"{p.name}-{config.process}-{schedule.kind}-{config.config_hash()}"
    return Resolved(
        config=config, preset=p, schedule=schedule, batch_n_img=batch, duration_n_img=duration,
        lr_ref=config.lr_ref or p.lr_ref, t_ref_iters=config.t_ref_iters or p.t_ref_iters,
        warmup_n_img=p.warmup_n_img if config.warmup_n_img is None else config.warmup_n_img,
        eval_every_n_img=every, checkpoint_every_n_img=config.checkpoint_every_n_img or every,
        log_every_n_img=config.log_every_n_img or max(batch, math.ceil(duration / LOG_ROWS / batch) * batch),
        eval_sigmas=sigmas, run=run,
    )


def learning_rate(n_img: int, *, lr_ref: float, t_ref_iters: int, batch_n_img: int, warmup_n_img: int) -> float:
    """lr = lr_ref / sqrt(max(t / t_ref, 1)) x min(n_img / warmup, 1), t = n_img / batch (edm2.md §5).

    n_img counts the images of the step being taken, so the first step has a non-zero rate.
    """
    lr = lr_ref / math.sqrt(max(n_img / batch_n_img / t_ref_iters, 1.0))
    if warmup_n_img > 0:
        lr *= min(n_img / warmup_n_img, 1.0)
    return lr


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(cfg, name: str, minimum: int, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum):
        example = {"batch_n_img": 2048, "seed": 0, "accum_rounds": 1, "keep_checkpoints": 2}.get(name, 1_000_000)
        raise InputError(f"{name}: expected an integer >= {minimum}, like {example}, got {v!r}")
    object.__setattr__(cfg, name, int(v))


def check_source(config: TrainConfig, source, *, ranks: int = 1, names: dict | None = None):
    """What the loop would reject about data source SRC, from its header (no samples read): shape (2C
    channels for posterior latents), labels of a class-conditional preset, the evaluation subset, the
    batch split over ranks. Returns the source's SourceInfo.

    names: how errors name "data", "preset", "eval_n_samples", "batch_n_img", "conditional=False" and "auto"
    (a preset sized for the data) (a CLI passes its flags).
    """
    from lossfloor.data import open_source

    n = {"data": "data", "preset": "preset", "eval_n_samples": "eval_n_samples", "batch_n_img": "batch_n_img",
         "conditional=False": "conditional=False", "auto": "preset=lossfloor.models.sized_preset(shape)",
         **(names or {})}
    R = resolve(config)
    info = open_source(source, config.latents).info()  # InputError for a missing / unknown source
    unet = R.preset.unet
    channels = (2 if config.latents == "posterior" else 1) * unet.img_channels  # posterior: [mean, std]
    expected = (channels, unet.img_resolution, unet.img_resolution)
    if tuple(info.sample_shape) != expected:
        raise InputError(f"{n['data']} {source}: samples of shape {tuple(info.sample_shape)}, but {n['preset']} "
                         f"{R.preset.name} expects {expected}; {n['auto']} sizes a small U-Net for the data")
    if config.conditional and unet.label_dim > 0 and not info.has_labels:
        raise InputError(f"{n['data']} {source}: {n['preset']} {R.preset.name} is class-conditional but the data "
                         f"has no labels; pass labelled data or set {n['conditional=False']}")
    if config.eval_n_samples >= info.count:
        raise InputError(f"{n['eval_n_samples']}: {config.eval_n_samples} must be less than the {info.count} "
                         f"samples of the data (some must remain for training); e.g. {max(1, info.count // 8)}")
    ranks = max(ranks, 1)
    if R.batch_n_img % (ranks * config.accum_rounds):
        raise InputError(f"{n['batch_n_img']}: {R.batch_n_img} must split evenly over {ranks} worker(s) x "
                         f"{config.accum_rounds} accumulation round(s)")
    return info
