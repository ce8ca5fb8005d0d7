"""Every model `lossfloor diagnose` reads, as one denoiser D(x_hat, sigma, labels) in VE x0 coordinates.

    model = load_model("runs/tiny")                                   # a lossfloor run folder or checkpoint
    model = load_model("my-ddpm/")                                    # a diffusers folder (model + scheduler)
    model = load_model("oracle.pt", prediction="eps", process="vp")   # TorchScript / torch.export, forward(x, t)

SPEC kinds:
- lossfloor: a training run folder (its newest checkpoint) or a checkpoint-<n_img> folder / its state.pt.
  Weights (`ema`): "auto" (what the run's evaluation used: its eval_ema, else raw), "raw", a tracked
  EMA's sigma_rel ("0.1"), or "posthoc:SIGMA_REL" (reconstructed from the run's EMA snapshots).
- diffusers: a folder with model_index.json (a saved pipeline: the ModelMixin component and the
  scheduler), or a model folder (config.json with _class_name) with scheduler_config.json beside it or
  in scheduler/. DDPMScheduler / DDIMScheduler: x_t = sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t])
  eps, so sigma_t = sqrt((1 - abar_t) / abar_t) and the prediction_type (epsilon | v_prediction | sample)
  is the target eps | vp-v | x0. FlowMatchEulerDiscreteScheduler: x_t = (1 - t) x0 + t eps with
  timestep = the scheduler's `timesteps` at its `sigmas` = t, target eps - x0 ("fm-velocity").
  Between the scheduler's timesteps the (float) timestep is interpolated, linear in ln sigma. A model
  with class embeddings (config num_class_embeds) is class-conditional: it is given the data's labels.
- edm2: an EDM2 network pickle (`network-snapshot-*.pkl` or a post-hoc `edm2-*.pkl`, any `.pkl`), read
  without running code from it into our network (`lossfloor.models.edm2_pickle`): EDM preconditioning at
  its sigma_data, c_noise = ln(sigma)/4; class-conditional snapshots are given the data's labels; its
  weighting is EDM2's (w = 1/c_out^2, ln sigma ~ N(P_mean, P_std^2) of the stored loss).
- TorchScript (torch.jit.save) or torch.export (.pt2) file: forward(x, t) with x = x_t and t the time of
  `process` (ve: x_hat and sigma; vp: x_hat / sqrt(1 + sigma^2) and sigma; fm: x_hat / (1 + sigma) and
  sigma / (1 + sigma)), returning `prediction` (lossfloor.diagnose.predictions).

`weighting` is the model's own training weighting in x0 units where it is known (lossfloor runs: their
schedule; diffusers DDPM/DDIM: diffusers' recipe, t uniform over the training timesteps and the native
MSE, i.e. w = 1/c_out^2), else None.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lossfloor.diagnose.predictions import PREDICTIONS, coefficients, to_x0
from lossfloor.diffusion import PROCESSES, get_process
from lossfloor.errors import InputError
from lossfloor.train.losses import PRECISIONS

DIFFUSERS_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler")
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "vp-v", "sample": "x0"}


@dataclass(frozen=True, kw_only=True)
class Weighting:
    """A training objective sum_k pi_k w(sigma_k) J_k: w in x0 units, pi from a density of ln sigma."""

    name: str
    weight: Callable[[torch.Tensor], torch.Tensor]  # sigma -> w(sigma)
    density: Callable[[torch.Tensor], torch.Tensor]  # sigma -> density of ln sigma (unnormalised)


@dataclass(frozen=True, kw_only=True)
class Model:
    """A model as `evaluate` calls it: denoiser(x_hat (B, ...), sigma (B,), labels) -> D (B, ...)."""

    spec: str  # what the user passed
    name: str  # a short label (run name, folder name, file name)
    kind: str  # "lossfloor" | "edm2" | "diffusers" | "torchscript" | "torch.export"
    prediction: str  # what the network predicts (a lossfloor.diffusion target, or "edm")
    process: str  # the coordinates the network sees: "ve", "vp" or "fm"
    denoiser: Callable
    weighting: Weighting | None = None
    sigma_range: tuple[float, float] | None = None  # where the model is defined (diffusers schedulers)
    label_dim: int = 0  # > 0: class-conditional, needs labels
    sample_shape: tuple[int, ...] | None = None  # (C, H, W) where the files say it (lossfloor runs, EDM2 snapshots)


class ForeignDenoiser(torch.nn.Module):
    """D(x_hat, sigma) of a network F(x_t, t) in `process` coordinates predicting `prediction`.

    F must have x_t's shape: D = c_skip x_hat + c_out F would broadcast a (1, ...), (B, 1, 1, 1) or scalar
    F into a full-size D and a loss of the wrong model, so any other shape is an InputError naming
    --model `spec`.
    """

    def __init__(self, call: Callable, *, spec: str, prediction: str, process: str, precision: str = "none",
                 conditional: bool = False):
        super().__init__()
        self.call, self.spec, self.prediction, self.process = call, spec, prediction, get_process(process)
        self.dtype = PRECISIONS[precision]
        self.conditional = conditional  # call(x_t, t, labels)

    def forward(self, x_hat: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        s = sigma.to(torch.float32).view(-1, *([1] * (x_hat.ndim - 1)))  # (B,) -> (B, 1, ..., 1)
        a, _ = self.process.scales(s)
        t = self.process.t(sigma.to(torch.float32))  # (B,)
        cast = nullcontext() if self.dtype is None else torch.autocast(x_hat.device.type, dtype=self.dtype)
        with cast:
            F = self.call(a * x_hat, t, labels) if self.conditional else self.call(a * x_hat, t)
        if not isinstance(F, torch.Tensor) or F.shape != x_hat.shape:
            got = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
            raise InputError(f"--model {self.spec}: output of shape {got} for an input of shape "
                             f"{tuple(x_hat.shape)}: expected the input's shape (batch and sample shape)")
        return to_x0(self.prediction, F.to(torch.float32), x_hat, s)


def load_model(spec: str, *, prediction: str | None = None, process: str | None = None, ema: str = "auto",
               device="cpu", precision: str = "none") -> Model:
    """The model at `spec` (module docstring); InputError naming --model and what was expected. Its
    denoiser raises InputError, naming --model, σ and the network's exception, where the network fails."""
    model = _load(spec, prediction=prediction, process=process, ema=ema, device=device, precision=precision)
    return replace(model, denoiser=_guarded(model.denoiser, model.spec))


def _guarded(denoiser: Callable, spec: str) -> Callable:
    """`denoiser`, its failures turned into one line naming --model, σ and the exception (no traceback):
    a network that cannot take some σ or input is a fault of the model the user passed."""
    def call(x_hat: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        try:
            return denoiser(x_hat, sigma, labels)
        except InputError:
            raise
        except Exception as e:  # whatever a foreign network raises
            raise InputError(f"--model {spec}: fails at σ = {float(sigma.flatten()[0]):.4g} on an input of shape "
                             f"{tuple(x_hat.shape)} ({_one_line(e)})") from None
    return call


def _one_line(e: Exception) -> str:
    """'Type: message' of an exception, first line; a TorchScript error's last line is the exception its
    code raised (the lines above it are the interpreter's traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return e.__class__.__name__
    if isinstance(e, torch.jit.Error):
        return lines[-1].removeprefix("builtins.")[:200]
    return f"{e.__class__.__name__}: {lines[0][:200]}"


def _load(spec: str, *, prediction: str | None, process: str | None, ema: str, device, precision: str) -> Model:
    path = Path(spec)
    if precision not in PRECISIONS:
        raise InputError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not path.exists():
        raise InputError(f"--model {spec}: not found")
    kind = _kind(path)
    foreign = kind in ("torchscript", "torch.export")
    if not foreign:
        for flag, value in (("--prediction", prediction), ("--process", process)):
            if value is not None:
                raise InputError(f"{flag}: only for a TorchScript / torch.export model (a {kind} model says "
                                 "what it predicts itself)")
    if kind != "lossfloor" and ema != "auto":
        raise InputError(f"--ema: only for a lossfloor run or checkpoint, not a {kind} model")
    if kind == "lossfloor":
        return _lossfloor(path, ema=ema, device=device, precision=precision)
    if kind == "diffusers":
        return _diffusers(path, device=device, precision=precision)
    if kind == "edm2":
        return _edm2(path, device=device, precision=precision)
    if prediction is None:
        raise InputError(f"--prediction: a {kind} model needs it: one of {', '.join(PREDICTIONS)}")
    if prediction not in PREDICTIONS:
        raise InputError(f"--prediction: expected one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    process = process or "ve"
    if process not in PROCESSES:
        raise InputError(f"--process: expected one of {', '.join(PROCESSES)}, got {process!r}")
    net = _load_scripted(path, kind, device)
    den = ForeignDenoiser(net, spec=spec, prediction=prediction, process=process, precision=precision)
    return Model(spec=spec, name=path.name, kind=kind, prediction=prediction, process=process, denoiser=den)


def _kind(path: Path) -> str:
    from lossfloor.train.checkpoint import STATE_FILE, latest_checkpoint

    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "scheduler_config.json").is_file() or (
                path / "scheduler").is_dir() or "_diffusers_version" in _text(path / "config.json"):
            return "diffusers"  # (a diffusers model folder without a scheduler: refused by _diffusers_parts)
        if (path / STATE_FILE).is_file() or latest_checkpoint(path) is not None:
            return "lossfloor"
        raise InputError(f"--model {path}: a folder that is no model (expected a lossfloor run folder or "
                         "checkpoint-<n_img> folder, or a diffusers folder: model_index.json, or config.json with "
                         "scheduler_config.json)")
    if path.name == STATE_FILE:
        return "lossfloor"
    if path.suffix == ".pkl":
        return "edm2"
    return "torch.export" if path.suffix == ".pt2" else "torchscript"


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


class _Held(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _load_scripted(path: Path, kind: str, device):
    """The network in a TorchScript or torch.export file. torch's log records are held while it loads
    (on a corrupt file torch.export.load logs a traceback before it raises: the InputError is the one
    line the user gets) and passed on only when it loads."""
    # torch gives many of its loggers their own handler and no propagation: hold each one's records
    loggers = [logging.getLogger("torch")] + [logger for name, logger in list(logging.root.manager.loggerDict.items())
                                              if name.startswith("torch.") and isinstance(logger, logging.Logger)]
    saved, held = [(logger.handlers, logger.propagate) for logger in loggers], _Held()
    for logger in loggers:
        logger.handlers, logger.propagate = [held], False
    try:
        net = _read_scripted(path, kind)
    except Exception as e:  # torch raises many types for foreign files
        raise InputError(f"--model {path}: not a TorchScript or torch.export file, a lossfloor checkpoint or a "
                         f"diffusers folder ({e.__class__.__name__})") from None
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate
    for record in held.records:
        logging.getLogger(record.name).handle(record)
    return net.to(device)


def _read_scripted(path: Path, kind: str):
    if kind == "torch.export":
        return torch.export.load(str(path)).module()
    net = torch.jit.load(str(path), map_location="cpu")
    net.eval()
    return net


# --- lossfloor runs -------------------------------------------------------------------------------


def _lossfloor(path: Path, *, ema: str, device, precision: str = "none") -> Model:
    from lossfloor.train.checkpoint import STATE_FILE, latest_checkpoint, load_checkpoint
    from lossfloor.train.config import TrainConfig, resolve
    from lossfloor.train.objectives import denoiser_from_state
    from lossfloor.train.schedules import JStarCurve, build_schedule

    ckpt = path if path.name == STATE_FILE or (path / STATE_FILE).is_file() else latest_checkpoint(path)
    state = load_checkpoint(ckpt, map_location="cpu")
    if not isinstance(state, dict) or "config" not in state or "net" not in state:
        raise InputError(f"--model {path}: not a lossfloor training checkpoint")
    cfg = TrainConfig.from_dict(state["config"])
    weights = _ema_weights(ema, state, ckpt)
    den, _, label_dim = denoiser_from_state(state, device=device, weights=weights)
    if precision != "none":  # else the run's own precision (where the device allows it)
        den.precision = precision
    R = resolve(cfg)
    precond = R.preconditioning()
    weighting = None
    try:
        curve = JStarCurve.from_path(cfg.jstar) if cfg.jstar else None
        schedule = build_schedule(R.schedule, precond, P_mean=R.preset.P_mean, P_std=R.preset.P_std, jstar=curve)
        weighting = Weighting(name=f"{R.schedule.kind} (the run's schedule)", weight=schedule.weight,
                              density=schedule.reference_density)
    except InputError:  # an optimal-loss run whose J* table is gone: its weighting is unknown here
        pass
    prediction = precond.target or precond.name
    unet = R.unet
    return Model(spec=str(path), name=R.run, kind="lossfloor", prediction=prediction, process=precond.process,
                 denoiser=den, weighting=weighting, label_dim=label_dim,
                 sample_shape=(unet.img_channels, unet.img_resolution, unet.img_resolution))


def _ema_weights(ema: str, state: dict, ckpt: Path) -> dict | None:
    """The weights `--ema` picks from a checkpoint's state (module docstring; None: "auto", what the run
    evaluated; posthoc: reconstructed at the checkpoint's images from the snapshots up to it). A choice
    the run cannot give is an InputError naming --ema, the run folder and the choices it has."""
    from lossfloor.train.checkpoint import SNAPSHOT_RE, read_snapshots
    from lossfloor.train.ema import SIGMA_REL_MAX, ema_unavailable, parse_ema, posthoc_ema

    run_dir = ckpt.parent if ckpt.is_dir() else ckpt.parent.parent
    tracked = [float(s) for s in state["ema"]["sigma_rels"]]
    snapshots = any(SNAPSHOT_RE.fullmatch(p.name) for p in run_dir.iterdir())
    choices = ["auto", "raw", *(f"{s:g}" for s in tracked)] + (
        [f"posthoc:SIGMA_REL (0 < SIGMA_REL < {SIGMA_REL_MAX:.4f})"] if snapshots else [])
    where = f" (run {run_dir}); choose one of " + ", ".join(f"--ema {c}" for c in choices)
    try:
        choice = parse_ema(ema, auto=True)
    except InputError as e:
        raise InputError(f"{e}{where}") from None
    why = ema_unavailable(choice, tracked=tracked, snapshots=snapshots)
    if why is not None:
        kept = " (ema-*.pt) and the run kept none" if choice.kind == "posthoc" else ""
        raise InputError(f"--ema: {ema} {why}{kept}{where}")
    if choice.kind == "auto":
        return None
    if choice.kind == "raw":
        return state["net"]
    if choice.kind == "posthoc":
        return posthoc_ema(read_snapshots(run_dir), sigma_rel=choice.sigma_rel, n_img=int(state["n_img"]))
    return next(w for s, w in zip(tracked, state["ema"]["states"]) if math.isclose(s, choice.sigma_rel))


# --- EDM2 network pickles ---------------------------------------------------------------------------


def _edm2(path: Path, *, device, precision: str) -> Model:
    from lossfloor.diffusion import get_preconditioning
    from lossfloor.models.edm2_pickle import load_edm2_network
    from lossfloor.train.losses import Denoiser
    from lossfloor.train.schedules import LogNormalSchedule

    edm2 = load_edm2_network(path, device=device)
    precond = get_preconditioning("edm", sigma_data=edm2.sigma_data)
    weighting = None
    if edm2.loss is not None:
        schedule = LogNormalSchedule(*edm2.loss, precond, True)
        weighting = Weighting(name=f"EDM2 (1/c_out^2, ln sigma ~ N({edm2.loss[0]:g}, {edm2.loss[1]:g}^2))",
                              weight=schedule.weight, density=schedule.reference_density)
    den = Denoiser(edm2.net, precond, edm2.head, precision)
    c = edm2.config
    return Model(spec=str(path), name=path.name, kind="edm2", prediction="edm", process="ve", denoiser=den,
                 weighting=weighting, label_dim=c.label_dim, sample_shape=(c.img_channels, c.img_resolution,
                                                                            c.img_resolution))


# --- diffusers ------------------------------------------------------------------------------------


def _diffusers_parts(path: Path) -> tuple[Path, Path]:
    """(model folder, scheduler config folder) of a diffusers folder."""
    index = path / "model_index.json"
    if index.is_file():
        parts = json.loads(index.read_text())
        sched = [k for k, v in parts.items() if isinstance(v, list) and "Scheduler" in str(v[-1])]
        models = [k for k, v in parts.items() if isinstance(v, list) and k not in sched
                  and (path / k / "config.json").is_file()]
        if len(sched) != 1 or len(models) != 1:
            raise InputError(f"--model {index}: expected one model and one scheduler component, got "
                             f"models {models} and schedulers {sched}")
        return path / models[0], path / sched[0]
    sched_dir = path if (path / "scheduler_config.json").is_file() else path / "scheduler"
    if not (sched_dir / "scheduler_config.json").is_file():
        raise InputError(f"--model {path}: no scheduler_config.json (beside config.json or in scheduler/)")
    model_dir = path if (path / "config.json").is_file() else path / "unet"
    if not (model_dir / "config.json").is_file():
        raise InputError(f"--model {path}: no model config.json (in the folder or in unet/)")
    return model_dir, sched_dir


def _diffusers_class(config_file: Path, what: str):
    import diffusers

    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        raise InputError(f"--model {config_file}: not a readable JSON config") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise InputError(f"--model {config_file}: unknown {what} class {name!r}")
    return cls, config


def _diffusers(path: Path, *, device, precision: str) -> Model:
    model_dir, sched_dir = _diffusers_parts(path)
    sched_cls, sched_config = _diffusers_class(sched_dir / "scheduler_config.json", "scheduler")
    if sched_cls.__name__ not in DIFFUSERS_SCHEDULERS:
        raise InputError(f"--model {sched_dir / 'scheduler_config.json'}: scheduler {sched_cls.__name__} is not "
                         f"supported (expected one of {', '.join(DIFFUSERS_SCHEDULERS)})")
    scheduler = sched_cls.from_config(sched_config)
    model_cls, _ = _diffusers_class(model_dir / "config.json", "model")
    try:
        net = model_cls.from_pretrained(str(model_dir), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises many types for incomplete folders
        raise InputError(f"--model {model_dir}: cannot load {model_cls.__name__} ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    net = net.to(device).eval()
    label_dim = int(getattr(net.config, "num_class_embeds", None) or 0)
    if sched_cls.__name__ == "FlowMatchEulerDiscreteScheduler":
        prediction, process = "fm-velocity", "fm"
        t_table = scheduler.sigmas.to(torch.float64).numpy()  # t, descending
        steps = scheduler.timesteps.to(torch.float64).numpy()
        t_table, steps = t_table[: len(steps)][::-1].copy(), steps[::-1].copy()  # ascending t
        t_table = t_table[t_table < 1]  # t = 1 is sigma = inf
        steps = steps[: len(t_table)]
        sigma_range = (float(t_table[0] / (1 - t_table[0])), float(t_table[-1] / (1 - t_table[-1])))

        def timestep(t):  # the process time t of `fm` -> the model's timestep
            return np.interp(t, t_table, steps)
        weighting = None
    else:
        kind = scheduler.config.prediction_type
        if kind not in DIFFUSERS_PREDICTIONS:
            raise InputError(f"--model {sched_dir / 'scheduler_config.json'}: prediction_type {kind!r} is not one "
                             f"of {', '.join(DIFFUSERS_PREDICTIONS)}")
        prediction, process = DIFFUSERS_PREDICTIONS[kind], "vp"
        abar = scheduler.alphas_cumprod.to(torch.float64).numpy()  # (T,)
        sig_table = np.sqrt((1 - abar) / abar)  # sigma_t, increasing in t
        ln_sig, steps = np.log(sig_table), np.arange(len(abar), dtype=np.float64)
        sigma_range = (float(sig_table[0]), float(sig_table[-1]))

        def timestep(t):  # vp: t is sigma itself -> the model's timestep, linear in ln sigma
            return np.interp(np.log(t), ln_sig, steps)
        dt_dlnsig = np.gradient(steps, ln_sig)  # t uniform: the density of ln sigma is dt / d ln sigma

        def density(sigma):
            x = np.log(sigma.to(torch.float64).cpu().numpy())
            return torch.as_tensor(np.interp(x, ln_sig, dt_dlnsig, left=0.0, right=0.0))

        def weight(sigma):  # diffusers' recipe: the native MSE, w = 1 / c_out^2 in x0 units
            return 1 / coefficients(prediction, sigma.to(torch.float64))[1] ** 2

        weighting = Weighting(name=f"diffusers {kind} (t uniform, MSE)", weight=weight, density=density)

    def call(x_t, t, labels=None):
        ts = torch.as_tensor(timestep(t.detach().to(torch.float64).cpu().numpy()), dtype=torch.float32,
                             device=x_t.device)
        out = net(x_t, ts) if labels is None else net(x_t, ts, class_labels=labels.long())
        return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)

    den = ForeignDenoiser(call, spec=str(path), prediction=prediction, process=process, precision=precision,
                          conditional=label_dim > 0)
    return Model(spec=str(path), name=path.name, kind="diffusers", prediction=prediction, process=process,
                 denoiser=den, weighting=weighting, sigma_range=sigma_range, label_dim=label_dim)


__all__ = ["DIFFUSERS_PREDICTIONS", "DIFFUSERS_SCHEDULERS", "ForeignDenoiser", "Model", "Weighting", "load_model"]
