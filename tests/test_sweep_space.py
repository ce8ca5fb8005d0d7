"""The sweep's pure parts, without a Ray instance: search-space files (parsing, every kind of bad file),
the searchers (baseline first, seeded random draws, save/restore), ASHA that never stops the baseline,
resource rules, and the objectives (fixed-weighting gap, Fréchet distance of a checkpoint)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lossfloor.data import load
from lossfloor.diffusion import parse_sigma_grid
from lossfloor.errors import InputError
from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table
from lossfloor.train import OptimalLossSchedule, TrainConfig, train
from lossfloor.train.objectives import FDObjective, GapObjective, gap_key, reference_weights
from lossfloor.train.schedules import JStarCurve
from lossfloor.train.space import DEFAULT_SPACE, load_space, parse_space

EXAMPLE = DEFAULT_SPACE


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- Space files -------------------------------------------------------------------------------------------


def test_the_example_space_parses_and_samples_inside_its_bounds():
    space = load_space(EXAMPLE)
    assert set(space.swept) == {"w_max", "mu", "varsigma", "uniform_mix"}
    rng = np.random.default_rng(0)
    draws = [space.sample(rng) for _ in range(200)]
    w = np.array([d["w_max"] for d in draws])
    assert w.min() >= 5 and w.max() <= 500
    # log-uniform: the median sits near the geometric mean, far below the arithmetic one
    assert 30 < np.median(w) < 80
    assert all(-3.5 <= d["mu"] <= -0.5 and 0.5 <= d["varsigma"] <= 2 for d in draws)
    assert {d["uniform_mix"] for d in draws} == {0.05, 0.1, 0.2}
    for d in draws[:5]:  # every draw is a valid schedule
        assert isinstance(space.schedule(d), OptimalLossSchedule)


def test_fixed_values_integers_and_booleans(tmp_path):
    space = load_space(write(tmp_path, "w_max: {loguniform: [1, 10]}\nn_bins: {randint: [4, 6]}\n"
                                       "uncertainty: {choice: [false, true]}\nuniform_mix: 0.2\n"))
    assert space.fixed == {"uniform_mix": 0.2}
    draws = [space.sample(np.random.default_rng(k)) for k in range(60)]
    assert {d["n_bins"] for d in draws} == {4, 5, 6}  # randint includes both bounds
    assert all(isinstance(d["n_bins"], int) for d in draws)
    assert {d["uncertainty"] for d in draws} == {False, True}
    assert space.to_dict()["n_bins"] == {"randint": [4, 6]}


BAD_SPACES = [
    ("", "empty"),
    ("w_max: [1, 2\n", "not valid YAML"),
    ("- w_max\n", "expected a mapping"),
    ("{}\n", "no fields to sweep"),
    ("w_maxx: {uniform: [1, 2]}\n", "w_maxx: unknown field"),
    ("w_max: {gaussian: [1, 2]}\n", "w_max: unknown distribution 'gaussian'"),
    ("w_max: {uniform: [10, 1]}\n", "w_max: uniform needs low < high"),
    ("w_max: {uniform: [3, 3]}\n", "w_max: uniform needs low < high"),
    ("mu: {loguniform: [0, 1]}\n", "mu: loguniform needs positive bounds"),
    ("mu: {loguniform: [-2, 1]}\n", "mu: loguniform needs positive bounds"),
    ("w_max: {uniform: [a, 2]}\n", "w_max: uniform bounds must be finite numbers"),
    ("w_max: {uniform: [1, .inf]}\n", "w_max: uniform bounds must be finite numbers"),
    ("w_max: {uniform: [1, 2, 3]}\n", "w_max: uniform expects two bounds"),
    ("mu: {choice: []}\n", "mu: choice expects a non-empty list"),
    ("mu: {choice: [1, x]}\n", "mu: expected a number, got 'x'"),
    ("w_max: abc\n", "w_max: expected a number"),
    ("varsigma: {uniform: [-1, 2]}\n", "varsigma: OptimalLossSchedule.varsigma: expected a positive number"),
    ("uniform_mix: {uniform: [0.5, 2]}\n", "uniform_mix: expected a fraction"),
    ("n_bins: {uniform: [4, 8]}\n", "n_bins: an integer field"),
    ("n_bins: {randint: [4.5, 8]}\n", "n_bins: randint bounds must be integers"),
    ("w_max: {randint: [4, 8]}\n", "w_max: randint is for the integer fields"),
    ("uncertainty: {uniform: [0, 1]}\n", "uncertainty: a true/false field"),
    ("w_max: {uniform: [1, 2], choice: [1]}\n", "w_max: expected one distribution"),
    ("mu: [1, 2]\n", "mu: a bare list"),
    ("uniform_mix: 0.1\n", "every field is fixed"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SPACES)
def test_bad_spaces_name_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text, "bad-space.yaml")
    with pytest.raises(InputError) as e:
        load_space(path)
    assert str(path) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_binary_space_files(tmp_path):
    with pytest.raises(InputError, match=r"nope\.yaml: search space file not found"):
        load_space(tmp_path / "nope.yaml")
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(InputError, match=r"bin\.yaml"):
        load_space(path)
    with pytest.raises(InputError, match="<space>: w_max: uniform needs low < high"):
        parse_space({"w_max": {"uniform": [2, 1]}})


# --- Searchers, scheduler, resources ------------------------------------------------------------------------


def test_baseline_first_then_seeded_random_configs_and_restore(tmp_path):
    from lossfloor.ray.sweep import RandomSearcher, WithBaseline
    from lossfloor.train.sweep import BASELINE

    space = load_space(EXAMPLE)

    def searcher():
        return WithBaseline(RandomSearcher(space, seed=3), {})

    a = searcher()
    first = [a.suggest(f"t{k}") for k in range(4)]
    assert first[0] == BASELINE and all(c["schedule"] == "optimal" for c in first[1:])
    b = searcher()  # same seed, same draws
    assert [b.suggest(f"t{k}") for k in range(4)] == first
    assert first[1] != first[2]
    # a restored searcher continues the sequence and remembers which trial is the baseline
    a.save(str(tmp_path / "state"))
    c = searcher()
    c.restore(str(tmp_path / "state"))
    assert c.baseline_id == "t0" and c.suggest("t4") == a.suggest("t4")
    # results of the baseline never reach the inner searcher
    seen = []
    c.inner.on_trial_complete = lambda trial_id, result=None, error=False: seen.append(trial_id)
    c.on_trial_complete("t0", {"objective": 1.0})
    c.on_trial_complete("t1", {"objective": 1.0})
    assert seen == ["t1"]


def test_asha_never_stops_the_baseline_but_stops_a_weak_trial():
    from ray.tune.schedulers import TrialScheduler

    from lossfloor.ray.sweep import BaselineKeepingASHA

    asha = BaselineKeepingASHA(time_attr="n_img", max_t=2048, grace_period=512, reduction_factor=2)
    asha.set_search_properties("objective", "min")
    good = SimpleNamespace(trial_id="good", config={"schedule": "optimal"})
    base = SimpleNamespace(trial_id="base", config={"schedule": "edm2"})
    weak = SimpleNamespace(trial_id="weak", config={"schedule": "optimal"})
    for t in (good, base, weak):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"n_img": 512, "objective": 1.0}) == TrialScheduler.CONTINUE
    # the baseline is worse than the cut-off, yet continues; it is recorded at the rung all the same
    assert asha.on_trial_result(None, base, {"n_img": 512, "objective": 5.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, weak, {"n_img": 512, "objective": 4.0}) == TrialScheduler.STOP


def test_resources_whole_gpus_for_multi_worker_trials_and_concurrency():
    from lossfloor.jobs.engine import Engine
    from lossfloor.train.sweep import Resources

    def on(**engine):  # the trials' engine: workers per trial, CPUs and GPUs per worker
        return Engine(kind="ray", **engine)

    with pytest.raises(InputError, match=r"gpus_per_worker: 0.25 GPUs cannot be given to each of 2 workers"):
        Resources(engine=on(workers=2, gpus_per_worker=0.25))
    with pytest.raises(InputError, match="whole GPUs"):
        Resources(engine=on(workers=2, gpus_per_worker=1.5))
    assert Resources(engine=on(workers=2, gpus_per_worker=2)).trial_resources() == {"cpu": 0.01}
    assert Resources(engine=on(gpus_per_worker=0.25)).trial_resources() == {"cpu": 1.0, "gpu": 0.25}
    cluster = {"CPU": 16.0, "GPU": 8.0}
    assert Resources(engine=on(gpus_per_worker=0.25)).max_concurrent_trials(cluster) == 16  # by CPUs: 16 x 1
    by_gpus = Resources(engine=on(gpus_per_worker=0.5, cpus_per_worker=0.5))
    assert by_gpus.max_concurrent_trials(cluster) == 16  # by GPUs
    assert Resources(engine=on(workers=2, gpus_per_worker=1)).max_concurrent_trials(cluster) == 4
    assert Resources(engine=on(workers=2, gpus_per_worker=1), max_concurrent=3).max_concurrent_trials(cluster) == 3
    assert Resources(engine=on()).max_concurrent_trials({"CPU": 2.0}) == 2
    with pytest.raises(InputError, match="a trial needs 1 GPUs, the Ray cluster has 0"):
        Resources(engine=on(gpus_per_worker=1)).max_concurrent_trials({"CPU": 2.0})
    with pytest.raises(InputError, match=r"a trial needs 2\.01 CPUs"):
        Resources(engine=on(workers=2)).max_concurrent_trials({"CPU": 2.0})
    with pytest.raises(InputError, match="expected ray"):  # a sweep's trials run on Ray Tune only
        Resources(engine=Engine(kind="local"))


# --- Objectives ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load("bundled:digits")


@pytest.fixture(scope="module")
def jstar(digits, tmp_path_factory):
    est = estimate(digits.samples, parse_sigma_grid("0.002:80:16"), EstimatorConfig(estimator="exact",
                                                                                     queries_per_sample=1),
                   progress=False)
    path = tmp_path_factory.mktemp("jstar") / "jstar.parquet"
    write_table(build_table(est, target="x0", fingerprint=digits.fingerprint), path)
    return path


def test_gap_objective_uses_one_fixed_weighting(jstar):
    curve = JStarCurve.from_path(jstar)
    sigmas = (0.02, 0.2, 1.0, 5.0)
    obj = GapObjective(curve, sigmas)
    gaps = {gap_key(s): g for s, g in zip(sigmas, (0.5, 1.0, 2.0, 4.0))}
    # by hand: w_ref = min(1/J*, 1/(1e-3 J*(inf))), pi ∝ trapezoid widths in ln sigma (uniform density)
    j = curve(torch.tensor(sigmas, dtype=torch.float64)).numpy()
    w = np.minimum(1 / np.maximum(j, 1e-300), 1 / (1e-3 * curve.table.total_variance))
    x = np.log(sigmas)
    widths = np.zeros(4)
    widths[1:] += np.diff(x) / 2
    widths[:-1] += np.diff(x) / 2
    expected = np.sum(widths / widths.sum() * w * np.array([0.5, 1.0, 2.0, 4.0]))
    assert obj(gaps) == pytest.approx(expected, rel=1e-12)
    assert reference_weights(curve, sigmas) == pytest.approx(widths / widths.sum() * w, rel=1e-12)
    with pytest.raises(InputError, match=r"eval/gap/sigma_5"):
        obj({k: v for k, v in gaps.items() if not k.endswith("_5")})


def test_fd_objective_of_a_checkpoint_is_finite_and_deterministic(digits, jstar, tmp_path):
    cfg = TrainConfig(preset="tiny", conditional=False, batch_n_img=32, duration_n_img=64, eval_n_samples=32,
                      eval_sigmas=(0.2, 1.0), warmup_n_img=0, jstar=str(jstar), schedule=OptimalLossSchedule())
    run = train(cfg, digits, checkpoint_dir=tmp_path / "run")
    fd = FDObjective(digits, n=48, num_steps=4, seed=1)
    a, b = fd({}, run.checkpoint), fd({}, run.checkpoint)
    assert math.isfinite(a) and a > 0 and a == b
    # a barely trained model is far from the data; the data against itself is at ~0
    _, mu, cov = fd.reference().stats["fd"]
    from lossfloor.train.metrics import frechet_distance

    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-6) and a > 1
    with pytest.raises(InputError, match="checkpoint"):
        fd({}, None)
