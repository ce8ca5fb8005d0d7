"""lossfloor.train loop: EMA and post-hoc EMA, learning rate, outputs, FLOPs, exact resume, ranks.

Oracles: EDM2's gamma for sigma_rel 0.05 / 0.10 (edm2.md §5: 16.97 / 6.94); the mean of a power-function
profile, E[tau] = (gamma+1)/(gamma+2) t; post-hoc reconstruction to a tracked width returns that EMA; a
resumed run equals an uninterrupted one bit for bit; two gloo ranks equal one rank; the loss of any
model on its training data is >= J* (Theorem 1) with J* from the exact estimator.
"""

import dataclasses
import logging
import math
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lossfloor.data import load
from lossfloor.errors import InputError
from lossfloor.floor import EstimatorConfig, build_table, estimate, estimate_conditional, write_table
from lossfloor.models import build_uncertainty_head, build_unet, get_preset
from lossfloor.scaling.data import as_curves
from lossfloor.train import (
    EDM2Schedule,
    OptimalLossSchedule,
    PowerFunctionEMA,
    TrainConfig,
    evaluate,
    gamma_to_sigma_rel,
    learning_rate,
    posthoc_ema,
    read_snapshots,
    sigma_rel_to_gamma,
    train,
)
from lossfloor.train.checkpoint import list_checkpoints, load_checkpoint
from lossfloor.train.distributed import run_local_ranks
from lossfloor.train.evaluation import quadrature_weights
from lossfloor.train.loop import zero_nonfinite_grads_

TINY = get_preset("tiny")
# A smaller cousin of `tiny` (190k parameters, one block per level) so CPU tests stay fast
MICRO = dataclasses.replace(TINY, name="micro", warmup_n_img=0, unet=dataclasses.replace(
    TINY.unet, model_channels=16, num_blocks=1, channels_per_head=16))
SIGMAS = (0.02, 0.2, 1.0, 5.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load("bundled:digits")


@pytest.fixture(scope="module")
def jstar_path(digits, tmp_path_factory):
    """The class-conditional J* of the digits (the floor of MICRO, a conditional model) by the exact
    estimator (Eq. 9), x0 units, on a small grid."""
    est = estimate_conditional(digits.samples, digits.labels, np.geomspace(0.01, 20, 6),
                               EstimatorConfig(estimator="exact", queries_per_sample=1), progress=False)
    return str(write_table(build_table(est, fingerprint=digits.fingerprint),
                           tmp_path_factory.mktemp("jstar") / "jstar.parquet"))


def config(**kw):
    base = {"preset": MICRO, "batch_n_img": 32, "duration_n_img": 32 * 4, "eval_n_samples": 32,
            "eval_sigmas": SIGMAS, "lr_ref": 0.01}
    return TrainConfig(**{**base, **kw})


# --- EMA ------------------------------------------------------------------------------------------


def test_sigma_rel_gamma_conversions_match_edm2():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-10)
    with pytest.raises(InputError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)


def _scalar_module(value=0.0):
    m = torch.nn.Module()
    m.theta = torch.nn.Parameter(torch.tensor([value], dtype=torch.float64))
    return m


def test_power_function_ema_averages_with_the_power_profile():
    m = _scalar_module()
    ema = PowerFunctionEMA(m, (0.05, 0.10))
    batch, n = 4, 0
    for _ in range(3000):  # theta_t = t: the EMA is E[tau] under p_t = (gamma+1)/(gamma+2) t
        n += batch
        m.theta.data.fill_(n)
        ema.update(m, n, batch)
    for s, g in zip(ema.sigma_rels, ema.gammas):
        assert ema.state(s)["theta"].item() == pytest.approx((g + 1) / (g + 2) * n, rel=2e-3)


def test_posthoc_reconstruction_reproduces_a_tracked_ema_and_interpolates():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    lin = _scalar_module()
    ema, ema_lin = PowerFunctionEMA(m, (0.05, 0.10)), PowerFunctionEMA(lin, (0.05, 0.10))
    snaps, snaps_lin, n, batch = [], [], 0, 8
    for step in range(1, 801):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))  # a random walk
        n += batch
        lin.theta.data.fill_(n)
        ema.update(m, n, batch)
        ema_lin.update(lin, n, batch)
        if step % 100 == 0:
            snaps.append(ema.snapshot(n))
            snaps_lin.append(ema_lin.snapshot(n))
    for sigma_rel, t in ((0.10, n), (0.05, 400 * batch)):
        rec = posthoc_ema(snaps, sigma_rel=sigma_rel, n_img=t)
        tracked = next(s for s in snaps if s["n_img"] == t)["emas"][ema.sigma_rels.index(sigma_rel)]["state"]
        for k in tracked:
            torch.testing.assert_close(rec[k], tracked[k], rtol=1e-4, atol=1e-5)
    # an untracked width: the profile mean of theta_t = t comes out as (gamma+1)/(gamma+2) t, which lies
    # between the two tracked EMAs' (the mean falls as sigma_rel grows)
    g = sigma_rel_to_gamma(0.075)
    rec = posthoc_ema(snaps_lin, sigma_rel=0.075)
    assert rec["theta"].item() == pytest.approx((g + 1) / (g + 2) * n, rel=5e-3)
    wide, narrow = (snaps_lin[-1]["emas"][ema_lin.sigma_rels.index(s)]["state"]["theta"].item() for s in (0.10, 0.05))
    assert wide < rec["theta"].item() < narrow
    # a point before the last snapshot is reconstructed from the snapshots up to it alone
    t = 400 * batch
    for sigma_rel in (0.075, 0.2):
        early = posthoc_ema(snaps[:4], sigma_rel=sigma_rel, n_img=t)
        for k, v in posthoc_ema(snaps, sigma_rel=sigma_rel, n_img=t).items():
            assert torch.equal(v, early[k])
    with pytest.raises(InputError, match="none taken at or before 10 images"):
        posthoc_ema(snaps, sigma_rel=0.1, n_img=10)


def test_the_ema_choice_is_parsed_once_for_diagnose_and_the_study():
    from lossfloor.train.ema import EmaChoice, ema_unavailable, parse_ema

    for text, kind, s in (("raw", "raw", None), ("0.1", "tracked", 0.1), ("posthoc:0.135", "posthoc", 0.135)):
        choice = parse_ema(text)
        assert choice == EmaChoice(kind=kind, sigma_rel=s) and str(choice) == text
    assert parse_ema("auto", auto=True).kind == "auto"
    for text, message in (("auto", "--ema: auto is not raw, a tracked sigma_rel"), ("best", "best is not"),
                          ("posthoc:0.3", "out of range: SIGMA_REL must be in (0, 0.2887)"),
                          ("posthoc:0", "out of range"), ("posthoc:nan", "out of range")):
        with pytest.raises(InputError, match=re.escape(message)):
            parse_ema(text)
    assert ema_unavailable(parse_ema("posthoc:0.1"), tracked=(0.05, 0.1), snapshots=False) == "needs EMA snapshots"
    assert ema_unavailable(parse_ema("0.07"), tracked=(0.05, 0.1), snapshots=True) == "is not tracked"
    assert ema_unavailable(parse_ema("0.1"), tracked=(0.05, 0.1), snapshots=False) is None


def test_learning_rate_is_inverse_sqrt_with_warmup():
    kw = {"lr_ref": 0.01, "t_ref_iters": 100, "batch_n_img": 10, "warmup_n_img": 500}
    assert learning_rate(100, **kw) == pytest.approx(0.01 * 100 / 500)
    assert learning_rate(1000, **kw) == pytest.approx(0.01)
    assert learning_rate(4000, **kw) == pytest.approx(0.01 / math.sqrt(4))
    assert learning_rate(10, **{**kw, "warmup_n_img": 0}) == pytest.approx(0.01)


def test_nonfinite_gradients_are_zeroed():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1.0, math.nan, math.inf, -math.inf])
    zero_nonfinite_grads_([p])
    assert p.grad.tolist() == [1.0, 0.0, 0.0, 0.0]


# --- A run's outputs ------------------------------------------------------------------------------


def test_run_outputs_loss_curve_gap_and_flops(digits, jstar_path, tmp_path):
    reports = []
    cfg = config(jstar=jstar_path, eval_holdout=False, eval_every_n_img=64)
    res = train(cfg, digits, checkpoint_dir=tmp_path, report=lambda m, p: reports.append((m, p)))
    assert res.n_img == 128 and res.step == 4 and len(res.train_log) == 4

    # FLOPs: 3 x forward FLOPs (FlopCounterMode, batch 1) x images
    net = build_unet(MICRO, device="meta")
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, 8, 8, device="meta"), torch.zeros(1, device="meta"),
            torch.zeros(1, dtype=torch.long, device="meta"))
    assert res.forward_flops == pytest.approx(counter.get_total_flops(), rel=1e-9)
    for row in res.train_log + res.loss_curve:
        assert row["flops"] == pytest.approx(3 * res.forward_flops * row["images"])

    # loss curve: per evaluation, one row per sigma and one total (sigma null)
    rows = [r for r in res.loss_curve if r["images"] == 128]
    assert [r["sigma"] for r in rows] == [*SIGMAS, None]
    assert {r["images"] for r in res.loss_curve} == {64, 128}
    per_sigma = rows[:-1]
    for r in per_sigma:
        assert r["gap"] == pytest.approx(r["loss"] - r["j_star"])
        assert r["gap"] > 0  # Theorem 1: no model beats J* (its class-conditional floor) on its training data
    ev = res.evals[-1][1]
    pi = quadrature_weights(SIGMAS, lambda s: torch.exp(-0.5 * ((torch.log(s) + 0.8) / 1.6) ** 2))
    w = (np.array(SIGMAS) ** 2 + 0.25) / (np.array(SIGMAS) * 0.5) ** 2  # EDM2 schedule: 1/c_out^2
    assert rows[-1]["loss"] == pytest.approx(float(np.sum(pi * w * ev.loss)))
    assert rows[-1]["gap"] == pytest.approx(float(np.sum(pi * w * ev.gap)))

    # files: parquet tables readable by lossfloor.scaling, checkpoints, no temporary leftovers
    table = pq.read_table(tmp_path / "loss_curve.parquet")
    assert table.column_names[:9] == ["run", "model", "params", "step", "images", "flops", "sigma", "loss", "gap"]
    assert as_curves(tmp_path / "loss_curve.parquet", sigma=1.0).n_points == 2
    assert pq.read_table(tmp_path / "train_log.parquet").num_rows == 4
    assert [n for n, _ in list_checkpoints(tmp_path)] == [64, 128]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    state = load_checkpoint(res.checkpoint)
    assert state["n_img"] == 128 and set(state) >= {"net", "optimizer", "ema", "schedule", "uncertainty"}
    assert [p is not None for _, p in reports] == [True, True]
    assert reports[-1][0]["eval/total"] == pytest.approx(rows[-1]["loss"])

    # EDM2's learned weighting: u(sigma) of the trained head per sigma, the total under it beside the schedule's
    head = build_uncertainty_head(MICRO)
    head.load_state_dict(state["uncertainty"])
    with torch.no_grad():
        u = head(torch.log(torch.tensor(SIGMAS)) / 4).double().numpy()  # c_noise = ln(sigma) / 4
    assert [r["log_var"] for r in per_sigma] == pytest.approx(u.tolist(), rel=1e-5, abs=1e-6)
    assert rows[-1]["total_learned"] == pytest.approx(float(np.sum(pi * w * np.exp(-u) * ev.loss)), rel=1e-5)
    assert reports[-1][0]["eval/total_learned"] == rows[-1]["total_learned"]


def test_resume_is_bit_identical_to_an_uninterrupted_run(digits, jstar_path, tmp_path, caplog):
    sched = OptimalLossSchedule(n_bins=8, halflife_n_img=256, sigma_min=0.01, sigma_max=20.0)
    cfg = config(duration_n_img=32 * 6, schedule=sched, jstar=jstar_path, eval_every_n_img=96,
                 checkpoint_every_n_img=64, snapshot_every_n_img=64, accum_rounds=2, keep_checkpoints=2,
                 log_every_n_img=64)
    full = train(cfg, digits, checkpoint_dir=tmp_path / "full")
    assert all(r["total_learned"] is None and r["log_var"] is None for r in full.loss_curve)  # no head
    part = train(cfg, digits, checkpoint_dir=tmp_path / "cut", stop_n_img=96)
    assert part.n_img == 96 and [n for n, _ in list_checkpoints(tmp_path / "cut")] == [64, 96]
    # the newest checkpoint is torn (the machine died while it was flushed): resume from the one before
    newest = list_checkpoints(tmp_path / "cut")[-1][1]
    (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="lossfloor.train.loop"):
        rest = train(cfg, digits, checkpoint_dir=tmp_path / "cut")
    assert "cannot be read" in caplog.text and "resuming from the previous one, checkpoint-" in caplog.text
    assert rest.n_img == full.n_img == 192
    for k, v in full.model_state.items():
        assert torch.equal(v, rest.model_state[k]), k
    for s in cfg.ema_stds:
        for k, v in full.ema_states[s].items():
            assert torch.equal(v, rest.ema_states[s][k]), k
    assert rest.train_log == full.train_log and rest.loss_curve == full.loss_curve
    assert [r["images"] for r in full.train_log] == [64, 128, 192]  # means over 2 steps, one cut by the stop
    assert [n for n, _ in list_checkpoints(tmp_path / "cut")] == [128, 192]  # keep_checkpoints = 2
    assert [s["n_img"] for s in read_snapshots(tmp_path / "cut")] == [64, 96, 128, 192]
    tracker = load_checkpoint(rest.checkpoint)["schedule"]["sums"]
    assert torch.equal(tracker, load_checkpoint(full.checkpoint)["schedule"]["sums"]) and tracker[0].sum() > 0
    # a resumed config may change what is recorded, not what is trained
    with pytest.raises(InputError, match="lr_ref"):
        train(dataclasses.replace(cfg, lr_ref=0.02), digits, checkpoint_dir=tmp_path / "cut")
    again = train(dataclasses.replace(cfg, eval_every_n_img=64), digits, checkpoint_dir=tmp_path / "cut")
    assert again.n_img == 192 and again.evals == []
    # a fresh run into a folder with checkpoints would interleave with (and prune) the old run's
    with pytest.raises(InputError, match=r"resume=False.*already holds checkpoints"):
        train(cfg, digits, checkpoint_dir=tmp_path / "cut", resume=False)
    assert [n for n, _ in list_checkpoints(tmp_path / "cut")] == [128, 192]


def test_accumulation_rounds_and_fm_bf16_and_ema_eval(digits):
    one = train(config(duration_n_img=64), digits)
    two = train(config(duration_n_img=64, accum_rounds=4), digits)
    for k, v in one.model_state.items():
        torch.testing.assert_close(v, two.model_state[k], rtol=1e-4, atol=1e-5)
    fm = train(config(duration_n_img=64, process="fm", precision="bf16", eval_ema=0.1, conditional=False), digits)
    assert all(math.isfinite(r["loss"]) for r in fm.train_log + fm.loss_curve)
    assert fm.run.startswith("micro-fm-fm-")
    with pytest.raises(InputError, match="precision"):
        train(config(precision="fp16"), digits, device="cpu")


def test_evaluation_uses_common_random_numbers(digits):
    den = lambda x, s, lab: x / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731 - a fixed linear denoiser
    x0 = torch.from_numpy(digits.samples[:40])
    kw = {"seed": 3, "weight": lambda s: torch.ones_like(s), "reference_density": lambda s: torch.ones_like(s)}
    a = evaluate(den, x0, None, SIGMAS, batch=7, **kw)
    b = evaluate(den, x0, None, SIGMAS, batch=40, **kw)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    c = evaluate(den, x0, None, SIGMAS, batch=40, **{**kw, "seed": 4})
    assert not np.allclose(a.loss, c.loss)
    # the exact loss of this denoiser: E||(x0 + s eps)/(1+s^2) - x0||^2 = (s^4 |x0|^2 + s^2 d)/(1+s^2)^2
    s = np.array(SIGMAS)
    exact = (s**4 * (x0.double() ** 2).sum((1, 2, 3)).mean().item() + s**2 * 64) / (1 + s**2) ** 2
    np.testing.assert_allclose(a.loss, exact, rtol=0.1)


# --- Two ranks ------------------------------------------------------------------------------------


@pytest.mark.e2e  # 12 s of process-group start-up: the end-to-end tier
def test_two_gloo_ranks_match_one_rank(digits, tmp_path):
    cfg = config(duration_n_img=96, eval_every_n_img=64)
    out = run_local_ranks(cfg, digits, world_size=2, checkpoint_dir=tmp_path)
    single = train(cfg, digits)
    for k, v in single.model_state.items():
        torch.testing.assert_close(out[0]["model_state"][k], v, rtol=1e-4, atol=1e-5)
        assert torch.equal(out[0]["model_state"][k], out[1]["model_state"][k])  # ranks agree exactly
    for a, b in zip(out[0]["loss_curve"], single.loss_curve):
        assert a["images"] == b["images"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert [r["checkpoint"] for r in out[1]["reports"]] == [None, None]
    assert [os.path.basename(r["checkpoint"]) for r in out[0]["reports"]] == [
        "checkpoint-000000000064", "checkpoint-000000000096"]
    assert not (tmp_path / "rank1").exists()  # rank 0 alone writes


# --- Configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"precision": "fp8"}, "precision"), ({"process": "vp"}, "process"), ({"preset": "huge"}, "preset"),
    ({"eval_ema": 0.07}, "eval_ema"), ({"ema_stds": (0.5,)}, "ema_stds"), ({"batch_n_img": 0}, "batch_n_img"),
    ({"schedule": OptimalLossSchedule()}, "jstar"), ({"schedule": "edm2"}, "schedule"),
    ({"eval_sigmas": (1.0, -2.0)}, "eval_sigmas"), ({"accum_rounds": 1.5}, "accum_rounds"),
])
def test_bad_config_fields_raise_input_error_naming_the_field(kwargs, field):
    with pytest.raises(InputError, match=field):
        TrainConfig(**kwargs)


def test_config_dict_round_trip_and_data_checks(digits, tmp_path):
    cfg = config(schedule=OptimalLossSchedule(a=2.0), jstar=str(tmp_path / "j.parquet"), ema_stds=(0.05,))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(TrainConfig(schedule=EDM2Schedule(P_mean=-1.0)).to_dict()).schedule.P_mean == -1.0
    with pytest.raises(InputError, match="unknown field"):
        TrainConfig.from_dict({"bacth_n_img": 4})
    with pytest.raises(InputError, match="data"):
        train(config(), np.zeros((10, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="labels"):
        train(config(), digits.samples)  # a conditional preset needs labels
    with pytest.raises(InputError, match="batch_n_img"):
        train(config(batch_n_img=30, accum_rounds=4), digits)


def test_posterior_latents_are_sampled_every_step_and_need_a_posterior_floor(tmp_path):
    # 4-channel 8x8 "latents": [mean, std] rows; x0 = mean + std z is drawn at every step (as EDM2 does)
    preset = dataclasses.replace(MICRO, name="micro4", unet=dataclasses.replace(MICRO.unet, img_channels=4, label_dim=0))
    rng = np.random.default_rng(0)
    means = rng.normal(0, 0.5, (64, 4, 8, 8)).astype(np.float32)
    rows = np.concatenate([means, np.zeros_like(means)], 1)  # std 0: the posterior is the mean itself
    kw = dict(preset=preset, conditional=False, eval_sigmas=(0.2, 2.0), duration_n_img=64)
    as_means = train(config(**kw), means)
    as_posterior = train(config(latents="posterior", **kw), rows)
    for k, v in as_means.model_state.items():  # same noise, same data: the same parameters
        assert torch.equal(v, as_posterior.model_state[k]), k
    rows[:, 4:] = 0.3
    noisy = train(config(latents="posterior", **kw), rows)
    assert any(not torch.equal(v, noisy.model_state[k]) for k, v in as_means.model_state.items())
    # the floor a posterior run is compared with must be the posterior's, and vice versa
    sig = np.geomspace(0.05, 5, 4)
    est = estimate(rows.reshape(64, -1), sig, EstimatorConfig(estimator="exact", latents="posterior"), progress=False)
    post_table = write_table(build_table(est, latents="posterior"), tmp_path / "post.parquet")
    with pytest.raises(InputError, match="latents"):
        train(config(jstar=str(post_table), **kw), means)
    run = train(config(jstar=str(post_table), latents="posterior", **kw), rows)
    assert all(r["j_star"] is not None for r in run.loss_curve if r["sigma"] is not None)


def test_evaluation_sigmas_beyond_the_jstar_grid_are_refused_before_training(digits, tmp_path):
    # a J* table at sigma = 0.002 alone held flat would read J* = 0 at sigma = 1: a gap of 100 % of the loss
    from lossfloor.train import JStarCurve

    est = estimate_conditional(digits.samples, digits.labels, np.array([0.002]),
                               EstimatorConfig(estimator="exact", queries_per_sample=1), progress=False)
    path = write_table(build_table(est, fingerprint=digits.fingerprint), tmp_path / "narrow.parquet")
    with pytest.raises(InputError, match=r"eval_sigmas: σ = 0.02, 0.2, 1, 5 outside the σ grid \[0.002, 0.002\]"):
        train(config(jstar=str(path)), digits, checkpoint_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    one = lambda s: torch.ones_like(s)  # noqa: E731
    with pytest.raises(InputError, match="outside its grid"):  # the evaluation itself never holds J* flat
        evaluate(lambda x, s, lab: x, torch.as_tensor(digits.samples[:4]), None, [1.0], seed=0, weight=one, reference_density=one,
                 j_star=JStarCurve.from_path(path).table)


def test_a_nonfinite_evaluation_loss_ends_the_run_before_it_is_written(digits, tmp_path):
    # digits x 1e20 in float32: (D(x) - x0)^2 overflows to inf; the curve must never hold it (issue 19)
    big = tmp_path / "big.npy"
    np.save(big, (digits.samples[:64] * 1e20).astype(np.float32))
    with pytest.raises(InputError, match=r"evaluation loss at σ = 0.2 is inf after 32 images; the run stops"):
        train(config(duration_n_img=32, eval_n_samples=8, conditional=False), load(str(big)),
              checkpoint_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
