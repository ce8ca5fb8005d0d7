"""The training loop: one process, one device (or CPU), optionally one rank of a torch.distributed group.

    result = train(TrainConfig(preset="tiny", duration_n_img=65536), load("bundled:digits"),
                   checkpoint_dir="runs/tiny")

Per step (EDM2 recipe, edm2.md §4-§5; schedule from paper §4):
  1. The global batch is drawn from a generator seeded by (seed, step): data indices from per-epoch
     permutations seeded by (seed, epoch), then sigma ~ p(sigma) and the noise eps. Each rank takes its
     contiguous slice of the global batch, so the numbers do not depend on the number of ranks
     and a resumed run reproduces an uninterrupted one bit for bit. Dropout alone draws
     from the global torch RNG, reseeded per (seed, step, rank).
  2. Loss per sample L = w(sigma) ||D - x0||^2 (or EDM2's w/e^u ||D - x0||^2 + d u), summed over the rank's
     samples in `accum_rounds` rounds and divided by the global batch; gradients all-reduced (summed)
     over ranks when world_size > 1; NaN/inf gradient entries set to 0 (edm2.md §5).
  3. Adam(0.9, 0.99, eps 1e-8), lr = lr_ref / sqrt(max(t/t_ref, 1)) x warm-up; then forced weight
     normalisation of every MPConv weight (once per step; lossfloor.models.force_weight_norm_).
  4. Power-function EMAs updated; the schedule's tracker gets the step's per-bin sums (all-reduced).
  5. At evaluation / snapshot / checkpoint points (counted in images): evaluate on the fixed grid,
     write EMA snapshots and checkpoints (rank 0 only, atomically), call report(metrics, path).

Ray Train runs this function per worker (lossfloor.ray); the loop itself never imports ray or mlflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lossfloor.data.fingerprint import labels_fingerprint
from lossfloor.errors import InputError
from lossfloor.models import (
    UNetConfig,
    build_uncertainty_head,
    build_unet,
    force_weight_norm_,
    params_of,
    set_forced_wn,
)
from lossfloor.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_snapshot,
)
from lossfloor.train.config import Resolved, TrainConfig, check_eval_grid, learning_rate, resolve, resume_view
from lossfloor.train.curves import CURVE_SCHEMA, TRAIN_LOG_SCHEMA, to_table, write_rows
from lossfloor.train.ema import PowerFunctionEMA
from lossfloor.train.evaluation import EvalResult, evaluate
from lossfloor.train.flops import FLOP_CONVENTION, forward_flops, training_flops
from lossfloor.train.losses import Denoiser, training_loss
from lossfloor.train.run_folder import CURVE_FILE, LOG_FILE
from lossfloor.train.schedules import JStarCurve, build_schedule

log = logging.getLogger("lossfloor.train")

STEP_STREAM, DROPOUT_STREAM, SPLIT_STREAM, EPOCH_STREAM = 1, 2, 4, 5  # seed streams (EVAL_STREAM = 3)
POSTERIOR_EVAL_STREAM = 6  # the evaluation subset's one draw from the latents' posterior
CHECKPOINT_FORMAT = "lossfloor-train/1"
PROGRESS_SECONDS = 30.0

Report = Callable[[dict, "Path | None"], None]


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a run produced. Logs cover the whole run, including the part before a resume."""

    run: str
    model: str  # preset name
    params: int  # parameters of F and u (lossfloor.models.params_of)
    forward_flops: float  # FLOPs of one forward of F per image (lossfloor.train.flops)
    n_img: int  # images seen
    step: int  # optimizer steps taken
    train_log: list[dict]  # train_log.parquet rows (lossfloor.train.curves)
    loss_curve: list[dict]  # loss_curve.parquet rows
    evals: list[tuple[int, EvalResult]]  # (n_img, result) of the evaluations made by this call
    checkpoint: Path | None  # the last checkpoint written or loaded
    model_state: dict  # final state dict of F (CPU), for tests and quick use
    ema_states: dict[float, dict]  # final EMA state dicts by sigma_rel (CPU)
    table_meta: dict[str, str]  # the schema metadata of loss_curve.parquet and train_log.parquet


def stream_seed(seed: int, stream: int, *counters: int) -> int:
    """A 63-bit seed for (seed, stream, counters...) (numpy SeedSequence hashing)."""
    a, b = np.random.SeedSequence([int(seed), int(stream), *map(int, counters)]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


class EpochSampler:
    """Global batch indices: epoch e is a permutation of the training indices seeded by (seed, e); the
    k-th image of the run is position k mod N of epoch k // N. A pure function of (seed, step)."""

    def __init__(self, indices: np.ndarray, seed: int):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, EPOCH_STREAM, epoch]))
            self._cache[epoch] = rng.permutation(len(self.indices))
        return self._cache[epoch]

    def batch(self, step: int, batch_n_img: int) -> np.ndarray:
        k = np.arange(step * batch_n_img, (step + 1) * batch_n_img, dtype=np.int64)
        n = len(self.indices)
        epochs, pos = k // n, k % n
        out = np.empty(batch_n_img, dtype=np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self.indices[self._perm(int(e))[pos[m]]]
        return out


def split_indices(n: int, n_eval: int, holdout: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices: eval = the first n_eval of a permutation seeded by (seed, SPLIT_STREAM)."""
    if n_eval > n or (holdout and n_eval >= n):
        raise InputError(f"eval_n_samples: {n_eval} does not fit a data set of {n} samples"
                         f"{' with eval_holdout (some must remain for training)' if holdout else ''}; "
                         f"expected e.g. {max(1, n // 8)}")
    perm = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_STREAM])).permutation(n)
    eval_idx = np.sort(perm[:n_eval])
    train_idx = np.sort(perm[n_eval:]) if holdout else np.arange(n)
    return train_idx, eval_idx


def eval_subset(cfg: TrainConfig, samples: torch.Tensor, labels: torch.Tensor | None):
    """(training indices, evaluation x0, evaluation labels or None) of a run: the fixed evaluation subset
    of `split_indices`; posterior latents: one fixed draw x0 ~ N(mean, std²) per evaluation sample
    (common random numbers). samples, labels: as `_data_arrays` returns them."""
    train_idx, eval_idx = split_indices(len(samples), cfg.eval_n_samples, cfg.eval_holdout, cfg.seed)
    eval_x0 = samples[torch.from_numpy(eval_idx)]
    if cfg.latents == "posterior":
        ge = torch.Generator().manual_seed(stream_seed(cfg.seed, POSTERIOR_EVAL_STREAM, 0))
        eval_x0 = sample_posterior(eval_x0, torch.randn(eval_x0[:, : eval_x0.shape[1] // 2].shape, generator=ge))
    return train_idx, eval_x0, None if labels is None else labels[torch.from_numpy(eval_idx)]


def train(config: TrainConfig, data, *, rank: int = 0, world_size: int = 1, report: Report | None = None,
          checkpoint_dir: str | os.PathLike | None = None, resume: bool | str | os.PathLike = True,
          device: str | torch.device | None = None, stop_n_img: int | None = None) -> TrainResult:
    """Train (or resume) the run `config` on `data`; see the module docstring for one step.

    data: a `lossfloor.data.Dataset` (samples (N, C, H, W) float32, labels (N,) or None) or an array
      of samples. Every rank passes the same data.
    rank, world_size: this process's place in an initialised torch.distributed group (world_size 1:
      no communication). The global batch is split evenly over ranks.
    report: report(metrics, checkpoint_path) is called on every rank at each evaluation and checkpoint
      point and at the end, with flat scalar metrics; checkpoint_path is the folder just written on
      rank 0 and None elsewhere (Ray Train's wrapper calls ray.train.report with it).
    checkpoint_dir: where rank 0 writes checkpoints, EMA snapshots and the parquet tables; None = none.
    resume: True = continue from the newest checkpoint in checkpoint_dir if any; False = start afresh;
      a path = continue from that checkpoint folder. The config must match the checkpoint's except for
      the recording-only fields (config.RESUME_MUTABLE).
    device: default "cuda" when available, else "cpu".
    stop_n_img: stop (with a checkpoint) once this many images are seen, before duration (pre-emption).
    The caller's torch RNG state is left as it was (the loop reseeds the global RNG for dropout).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return _train(config, data, rank=rank, world_size=world_size, report=report, checkpoint_dir=checkpoint_dir,
                      resume=resume, device=device, stop_n_img=stop_n_img)


def _train(config: TrainConfig, data, *, rank, world_size, report, checkpoint_dir, resume, device,
           stop_n_img) -> TrainResult:
    R = resolve(config)
    cfg = R.config
    rank, world_size = _check_world(rank, world_size)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise InputError(f"precision: fp16 autocast needs a CUDA device, got {device}; use 'bf16' or 'none' on the CPU")
    B = R.batch_n_img
    if B % (world_size * cfg.accum_rounds):
        raise InputError(f"batch_n_img: {B} must split evenly over {world_size} rank(s) x {cfg.accum_rounds} "
                         f"accumulation round(s); expected a multiple of {world_size * cfg.accum_rounds}")
    per_rank = B // world_size
    per_round = per_rank // cfg.accum_rounds

    # --- Model, preconditioning, schedule -----------------------------------------------------------
    unet_cfg = R.unet
    posterior = cfg.latents == "posterior"
    samples, labels = _data_arrays(data, unet_cfg, posterior)
    precond = R.preconditioning()
    curve = JStarCurve.from_path(cfg.jstar) if cfg.jstar else None
    if curve is not None:
        labels_fp = labels_fingerprint(labels.numpy()) if labels is not None and curve.table.class_conditional else None
        curve.table.check_data(latents=cfg.latents, conditional=bool(unet_cfg.label_dim), labels=labels_fp,
                               table=f"jstar {cfg.jstar}", data="the training data")
        check_eval_grid(R, curve.table, table_name=f"jstar {cfg.jstar}")
    schedule = build_schedule(R.schedule, precond, P_mean=R.preset.P_mean, P_std=R.preset.P_std, jstar=curve)
    net = build_unet(unet_cfg, device=device, seed=cfg.seed)
    head = build_uncertainty_head(unet_cfg, device=device, seed=cfg.seed) if schedule.uncertainty else None
    modules = [m for m in (net, head) if m is not None]
    for m in modules:
        set_forced_wn(m, False)  # forced weight normalisation once per optimizer step instead
        force_weight_norm_(m)
    denoiser = Denoiser(net, precond, head, cfg.precision)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.0, betas=R.preset.adam_betas, eps=R.preset.adam_eps)
    ema = PowerFunctionEMA(net, cfg.ema_stds)
    train_idx, eval_x0, eval_labels = eval_subset(cfg, samples, labels)
    sampler = EpochSampler(train_idx, cfg.seed)
    fwd_flops = forward_flops(unet_cfg, cfg.flop_convention)
    n_params = params_of(unet_cfg, uncertainty_head=head is not None)  # F, and u(sigma) when trained
    base_row = {"run": R.run, "model": R.preset.name, "params": n_params}

    # --- State, possibly from a checkpoint ----------------------------------------------------------
    n_img, step = 0, 0
    train_log: list[dict] = []
    loss_curve: list[dict] = []
    log_acc = torch.zeros(4, dtype=torch.float64)  # since the last train-log row: objective, x0, gap, images
    started_at = time.time()  # wall clock of the run's first start (kept across resumes), for its records
    ckpt_path, state = _resume_state(resume, checkpoint_dir, device)
    if ckpt_path is not None:
        started_at = float(state.get("started_at", started_at))
        check_resume(state, cfg, ckpt_path)
        if cfg.run is None:  # the same run, whatever spelling of its defaults resumed it (its hash may differ)
            R = dataclasses.replace(R, run=state.get("run", R.run))
            base_row["run"] = R.run
        net.load_state_dict(state["net"])
        if head is not None:
            head.load_state_dict(state["uncertainty"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        schedule.load_state_dict(state["schedule"])
        n_img, step = int(state["n_img"]), int(state["step"])
        train_log, loss_curve = list(state["train_log"]), list(state["loss_curve"])
        log_acc = state["log_acc"].to("cpu", torch.float64).clone()
        log.info("%s: resumed from %s at %d images", R.run, ckpt_path, n_img)
    done_eval = {r["images"] for r in loss_curve}

    def checkpoint_state() -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "run": R.run, "n_img": n_img, "step": step,
            "net": net.state_dict(), "uncertainty": None if head is None else head.state_dict(),
            "optimizer": optimizer.state_dict(), "ema": ema.state_dict(), "schedule": schedule.state_dict(),
            "train_log": train_log, "loss_curve": loss_curve, "log_acc": log_acc, "started_at": started_at,
        }

    def table_meta() -> dict:  # the tables' schema metadata (lossfloor.tracking.train reads it)
        return {"flop_convention": FLOP_CONVENTION, "forward_flops": repr(fwd_flops), "run": R.run,
                "config": json.dumps(cfg.to_dict()), "dataset_fingerprint": getattr(data, "fingerprint", "") or "",
                "class_conditional": "true" if unet_cfg.label_dim else "false",  # which floor its gaps are to
                "started_at": repr(started_at), "written_at": repr(time.time())}

    def tables() -> dict:
        meta = table_meta()
        return {
            CURVE_FILE: lambda p: write_rows(loss_curve, CURVE_SCHEMA, p, meta),
            LOG_FILE: lambda p: write_rows(train_log, TRAIN_LOG_SCHEMA, p, meta),
        }

    def run_eval() -> EvalResult:
        eval_den = denoiser
        if cfg.eval_ema is not None:
            eval_net = build_unet(unet_cfg, device="meta").to_empty(device=device)
            eval_net.load_state_dict(ema.state(cfg.eval_ema))
            eval_den = Denoiser(eval_net, precond, None, cfg.precision)
        eval_den.eval()
        try:
            return evaluate(eval_den, eval_x0, eval_labels, R.eval_sigmas, seed=cfg.seed, weight=schedule.weight,
                            reference_density=schedule.reference_density,
                            j_star=None if curve is None else curve.table, batch=cfg.eval_batch,
                            rank=rank, world_size=world_size, device=device,
                            log_var=None if head is None else denoiser.log_var,  # u: the raw head (EMA: F only)
                            to_native=precond.x0_to_native_loss)
        finally:
            denoiser.train()

    # --- Training ----------------------------------------------------------------------------------
    evals: list[tuple[int, EvalResult]] = []
    sample_shape = (unet_cfg.img_channels, unet_cfg.img_resolution, unet_cfg.img_resolution)
    tracker = schedule.tracker
    t_start, t_progress, n_img_start = time.monotonic(), time.monotonic(), n_img
    last_metrics: dict = {}
    denoiser.train()

    def due(every: int | None) -> bool:
        return bool(every) and n_img // every > (n_img - B) // every

    while n_img < R.duration_n_img and (stop_n_img is None or n_img < stop_n_img):
        # 1. The global batch from (seed, step); this rank's slice
        g = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, STEP_STREAM, step))
        sigma = schedule.sample_sigma(B, g).to(torch.float32)  # (B,)
        noise = torch.randn((B, *sample_shape), generator=g, device=device)  # (B, C, H, W)
        z = torch.randn((B, *sample_shape), generator=g, device=device) if posterior else None
        idx = torch.from_numpy(sampler.batch(step, B))  # (B,)
        torch.manual_seed(stream_seed(cfg.seed, DROPOUT_STREAM, step, rank))

        # 2. Forward/backward in accumulation rounds
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # objective, x0 loss, weighted gap
        stats = None
        for r in range(cfg.accum_rounds):
            sl = slice(rank * per_rank + r * per_round, rank * per_rank + (r + 1) * per_round)
            x0 = samples[idx[sl]].to(device, non_blocking=True)
            if posterior:  # (b, 2C, H, W) [mean, std] -> x0 ~ N(mean, std²), as EDM2 trains on latents
                x0 = sample_posterior(x0, z[sl])
            lab = None if labels is None else labels[idx[sl]].to(device, non_blocking=True)
            s = sigma[sl]
            w = schedule.weight(s)
            L, lx0, _ = training_loss(denoiser, x0, s, noise[sl], lab, w, uncertainty=schedule.uncertainty)
            (L.sum() / B).backward()
            with torch.no_grad():
                js = curve(s) if curve is not None else None
                sums[0] += L.detach().sum().double()
                sums[1] += lx0.detach().sum().double()
                if js is not None:
                    sums[2] += (w * (lx0.detach() - js)).sum().double()
                if tracker is not None:
                    part = tracker.batch_stats(s, lx0.detach(), js, w)
                    stats = part if stats is None else stats + part
        packed = sums if stats is None else torch.cat([sums, stats.flatten()])
        if world_size > 1:
            _allreduce_grads(params)
            dist.all_reduce(packed)
        zero_nonfinite_grads_(params)

        # 3. Adam step at the scheduled learning rate, then forced weight normalisation
        lr = learning_rate(n_img + B, lr_ref=R.lr_ref, t_ref_iters=R.t_ref_iters, batch_n_img=B,
                           warmup_n_img=R.warmup_n_img)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        for m in modules:
            force_weight_norm_(m)
        n_img += B
        step += 1

        # 4. EMA and schedule tracker
        ema.update(net, n_img, B)
        totals = packed[:3].cpu().numpy()
        if tracker is not None:
            tracker.update(packed[3:].view(len(tracker.STATS), -1), B)
        flops = training_flops(fwd_flops, n_img)
        last_metrics = {"step": step, "n_img": n_img, "flops": flops, "lr": lr,
                        "train_loss": float(totals[0] / B), "train_loss_x0": float(totals[1] / B)}
        if curve is not None:
            last_metrics["train_gap"] = float(totals[2] / B)
        log_acc += torch.tensor([*totals, B], dtype=torch.float64)
        if due(R.log_every_n_img) or n_img >= R.duration_n_img:
            mean = (log_acc[:3] / log_acc[3]).tolist()
            train_log.append({**base_row, "step": step, "images": n_img, "flops": flops, "sigma": None,
                              "loss": mean[0], "gap": mean[2] if curve is not None else None,
                              "loss_x0": mean[1], "lr": lr})
            log_acc.zero_()
        if not math.isfinite(last_metrics["train_loss"]):
            log.warning("%s: non-finite training loss at step %d", R.run, step)

        # 5. Evaluation, snapshots, checkpoints, report
        final = n_img >= R.duration_n_img
        stopping = stop_n_img is not None and n_img >= stop_n_img
        metrics = None
        if (due(R.eval_every_n_img) or final) and n_img not in done_eval:
            result = run_eval()
            _check_finite(result, R.run, n_img)
            evals.append((n_img, result))
            loss_curve.extend({**base_row, "step": step, "images": n_img, "flops": flops, **row}
                              for row in result.rows())
            done_eval.add(n_img)
            metrics = {**last_metrics, **_eval_metrics(result)}
        if checkpoint_dir is not None and rank == 0 and cfg.snapshot_every_n_img and (
                due(cfg.snapshot_every_n_img) or final or stopping):
            save_snapshot(checkpoint_dir, ema.snapshot(n_img))
        path = None
        if checkpoint_dir is not None and (due(R.checkpoint_every_n_img) or final or stopping):
            if rank == 0:
                path = save_checkpoint(checkpoint_dir, n_img, checkpoint_state(), files=tables())
                for name, write in tables().items():
                    write(Path(checkpoint_dir) / name)
                prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)
                ckpt_path = path
            metrics = metrics or dict(last_metrics)
        if metrics is not None and report is not None:
            report(metrics, path)
        if rank == 0 and (time.monotonic() - t_progress > PROGRESS_SECONDS or final or stopping):  # one line per run
            t_progress = time.monotonic()
            rate = (n_img - n_img_start) / max(t_progress - t_start, 1e-9)
            eta = (R.duration_n_img - n_img) / max(rate, 1e-9)
            log.info("%s: step %d, %d/%d img (%.1f%%), loss %.4g, %.1f img/s, ETA %.0f s", R.run, step, n_img,
                     R.duration_n_img, 100 * n_img / R.duration_n_img, last_metrics["train_loss"], rate, eta)

    if checkpoint_dir is not None and rank == 0 and ckpt_path is not None and n_img_start == n_img:
        for name, write in tables().items():  # nothing left to train: refresh the tables
            write(Path(checkpoint_dir) / name)
    return TrainResult(
        run=R.run, model=R.preset.name, params=n_params, forward_flops=fwd_flops, n_img=n_img, step=step,
        train_log=train_log, loss_curve=loss_curve, evals=evals, checkpoint=ckpt_path,
        model_state={k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        ema_states={s: {k: v.cpu().clone() for k, v in st.items()} for s, st in zip(ema.sigma_rels, ema.states)},
        table_meta=table_meta(),
    )


# --- Helpers ------------------------------------------------------------------------------------------


def loss_curve_table(result: TrainResult):
    """The loss curve as a pyarrow table (lossfloor.train.curves.CURVE_SCHEMA)."""
    return to_table(result.loss_curve, CURVE_SCHEMA)


def train_log_table(result: TrainResult):
    """The per-step log as a pyarrow table (lossfloor.train.curves.TRAIN_LOG_SCHEMA)."""
    return to_table(result.train_log, TRAIN_LOG_SCHEMA)


def _eval_metrics(result: EvalResult) -> dict:
    m = {"eval/total": result.total}
    if result.total_gap is not None:
        m["eval/total_gap"] = result.total_gap
    if result.total_learned is not None:
        m["eval/total_learned"] = result.total_learned
    for k, s in enumerate(result.sigma):
        m[f"eval/loss/sigma_{s:.4g}"] = float(result.loss[k])
        if result.gap is not None:
            m[f"eval/gap/sigma_{s:.4g}"] = float(result.gap[k])
    return m


def zero_nonfinite_grads_(params) -> None:
    """Set NaN and +-inf gradient entries to 0 in place (edm2.md §5; no gradient clipping)."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)


def _check_world(rank, world_size) -> tuple[int, int]:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise InputError(f"rank/world_size: expected 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if world_size > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise InputError("world_size: > 1 needs an initialised torch.distributed process group "
                             "(torchrun or Ray Train set one up)")
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise InputError(f"rank/world_size: the process group has rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks in one flat all-reduce (missing grads count as 0)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])  # (total params,)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def sample_posterior(rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(b, 2C, H, W) [mean, std] latents and standard normal z (b, C, H, W) -> x0 = mean + std z."""
    c = rows.shape[1] // 2
    return rows[:, :c] + rows[:, c:] * z


def _data_arrays(data, unet: UNetConfig, posterior: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(samples (N, C, H, W) float32 CPU tensor, labels (N,) int64 or None) checked against the model;
    posterior: (N, 2C, H, W), the latents' [mean, std]."""
    samples = getattr(data, "samples", data)
    labels = getattr(data, "labels", None)
    samples = torch.as_tensor(np.asarray(samples.cpu() if isinstance(samples, torch.Tensor) else samples,
                                         dtype=np.float32))
    expected = ((2 if posterior else 1) * unet.img_channels, unet.img_resolution, unet.img_resolution)
    if samples.ndim != 4 or tuple(samples.shape[1:]) != expected:
        what = " ([mean, std] of posterior latents)" if posterior else ""
        raise InputError(f"data: samples of shape {tuple(samples.shape)}, but the preset expects "
                         f"(N, {', '.join(map(str, expected))}){what}")
    for start in range(0, len(samples), 65536):  # in chunks: data sets may be tens of GB
        if not torch.isfinite(samples[start : start + 65536]).all():
            raise InputError(f"data: samples contain NaN or infinite values (rows {start}..{start + 65535})")
    if unet.label_dim == 0:
        return samples, None
    if labels is None:
        raise InputError(f"data: the preset is class-conditional ({unet.label_dim} classes) but the data has no "
                         "labels; pass labelled data or set conditional=False")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if labels.shape != (len(samples),) or labels.min() < 0 or labels.max() >= unet.label_dim:
        raise InputError(f"data: expected labels (N,) in [0, {unet.label_dim}), got shape {tuple(labels.shape)} "
                         f"and range [{int(labels.min())}, {int(labels.max())}]")
    return samples, labels


def _resume_state(resume, checkpoint_dir, device) -> tuple[Path | None, dict | None]:
    """(checkpoint folder, its state) to continue from, or (None, None) for a fresh run.

    resume=True takes the newest checkpoint that reads; one that does not (a machine died while the
    file system was writing it) is skipped with a warning naming it, and the previous one is used."""
    if resume is False or resume is None:
        newest = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        if newest is not None:  # a fresh run there would interleave with, and prune, the old run's checkpoints
            raise InputError(f"resume=False: {checkpoint_dir} already holds checkpoints (newest {newest.name}); "
                             "resume it or choose another checkpoint_dir")
        return None, None
    if resume is not True:
        path = Path(resume)
        if not path.exists():
            raise InputError(f"resume: checkpoint {path} not found (expected a checkpoint-<n_img> folder)")
        return path, load_checkpoint(path, map_location=device)
    if checkpoint_dir is None:
        return None, None
    newest_first = [path for _, path in list_checkpoints(checkpoint_dir)][::-1]
    for path, older in zip(newest_first, [*newest_first[1:], None]):
        try:
            return path, load_checkpoint(path, map_location=device)
        except InputError as e:
            if older is None:
                raise InputError(f"resume: no checkpoint in {checkpoint_dir} can be read (the oldest: {e}); delete "
                                 "them to start afresh") from None
            log.warning("%s; resuming from the previous one, %s", e, older.name)
    return None, None


def check_resume(state: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to continue a checkpoint written by a different config (except the RESUME_MUTABLE fields),
    compared as resolved (`config.resume_view`: lr_ref left to the preset equals the preset's value given)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"resume: {path} is not a lossfloor training checkpoint (format {state.get('format')!r})")
    saved, now = resume_view(TrainConfig.from_dict(state["config"])), resume_view(config)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}" for k in differ[:3])
        raise InputError(f"resume: {path} was written by a different config ({detail}); train into another "
                         "run folder (--out, checkpoint_dir), or delete its checkpoints to start afresh")


__all__ = ["EpochSampler", "Resolved", "TrainResult", "check_resume", "loss_curve_table", "split_indices", "stream_seed", "train",
           "train_log_table", "zero_nonfinite_grads_"]



def _check_finite(result: EvalResult, run: str, n_img: int) -> None:
    """A NaN or inf evaluation loss ends the run before it is written: a curve of such numbers would be
    read back as a measurement (diagnosis, scaling fits)."""
    bad = np.nonzero(~np.isfinite(result.loss))[0]
    if len(bad):
        k = bad[0]
        raise InputError(f"run {run}: the evaluation loss at σ = {result.sigma[k]:g} is {result.loss[k]} after "
                         f"{n_img} images; the run stops before writing it (the model diverged, or the data's "
                         "scale overflows float32: see `lossfloor data describe`)")
