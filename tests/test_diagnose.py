"""`lossfloor diagnose` against ground truth: the exact posterior mean (gap 0 in every prediction and
process), diffusers models measured by hand through their scheduler, a lossfloor run's own evaluation,
and every bad input (exit 2, one line, nothing written)."""

import itertools
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cli_run import cli
from diagnose_models import save_oracle
from lossfloor.data import load
from lossfloor.diagnose import PREDICTIONS, coefficients
from lossfloor.diffusion import PROCESSES, jstar_factor
from lossfloor.jobs.diagnose import DiagnoseSpec, diagnose
from lossfloor.jobs.engine import Engine
from lossfloor.train.evaluation import eval_noise

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")]

SIGMAS = np.array([0.01, 0.07, 0.3, 1.0, 3.0, 30.0])
COLUMNS = ["sigma", "loss_x0", "loss_stderr", "j_star_x0", "j_star_ci_low", "j_star_ci_high", "gap_x0", "rel_gap",
           "prediction", "process", "model", "dataset_fingerprint", "seed", "n_samples"]


@pytest.fixture(scope="module")
def oracle_data(tmp_path_factory):
    """200 digits as .npy, 200 other digits as held-out data, and the exact J* table of the first."""
    from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table

    d = tmp_path_factory.mktemp("oracle")
    samples = load("bundled:digits").samples
    np.save(d / "train.npy", samples[:200])
    np.save(d / "other.npy", samples[200:400])
    data = load(str(d / "train.npy"))
    est = estimate(data.samples, SIGMAS, EstimatorConfig(estimator="exact", queries_per_sample=4, seed=1),
                   progress=False)
    write_table(build_table(est, fingerprint=data.fingerprint), d / "jstar.parquet")
    return d


def test_each_prediction_converts_with_the_inverse_of_its_jstar_factor():
    sigma = np.array([0.01, 0.3, 1.0, 7.0])
    for p in PREDICTIONS:
        c_out = coefficients(p, sigma)[1]
        np.testing.assert_allclose(1 / c_out**2, jstar_factor(p, sigma), rtol=1e-12, err_msg=p)


def _spec(d, model, out, **kw):
    return DiagnoseSpec(model=str(model), data=str(d / "train.npy"), sigmas=SIGMAS, out=str(out),
                        j_star=str(d / "jstar.parquet"), **kw)


def test_the_posterior_mean_has_no_gap_in_any_prediction_or_process(oracle_data, tmp_path):
    d = oracle_data
    data = np.load(d / "train.npy")
    losses = {}
    for prediction, process in itertools.product(PREDICTIONS, PROCESSES):
        path = save_oracle(data, prediction, process, tmp_path / f"{prediction}-{process}.pt")
        res = diagnose(_spec(d, path, tmp_path / f"{prediction}-{process}.parquet", prediction=prediction,
                             process=process))
        gap, se = res.column("gap_x0"), res.column("gap_stderr")
        assert np.all(np.abs(gap) <= 4 * se + 1e-9), (prediction, process, gap, se)  # + float round-off at J* = 0
        losses[prediction, process] = res.column("loss_x0")
    ref = losses["x0", "ve"]
    for key, loss in losses.items():  # the same draws: every conversion gives the same x0 loss
        np.testing.assert_allclose(loss, ref, rtol=2e-4, atol=1e-7, err_msg=str(key))


def test_cli_writes_the_table_the_figure_and_held_out_columns(oracle_data, tmp_path, capsys):
    from lossfloor.pages.html import is_offline_html

    d = oracle_data
    model = save_oracle(np.load(d / "train.npy"), "eps", "vp", tmp_path / "oracle.pt")
    out = tmp_path / "diag.parquet"
    code, stdout, err = cli(["diagnose", "--model", model, "--prediction", "eps", "--process", "vp", "--data",
                             str(d / "train.npy"), "--j-star", str(d / "jstar.parquet"), "--sigmas",
                             ",".join(map(str, SIGMAS)), "--holdout", str(d / "other.npy"), "--out", str(out)],
                            capsys)
    assert code == 0, err
    table = pq.read_table(out)
    assert set(COLUMNS) | {"loss_holdout_x0", "loss_holdout_stderr", "generalisation_gap"} <= set(table.column_names)
    rows = table.to_pylist()
    assert [r["sigma"] for r in rows] == pytest.approx(SIGMAS.tolist())
    assert {r["prediction"] for r in rows} == {"eps"} and {r["process"] for r in rows} == {"vp"}
    assert {r["n_samples"] for r in rows} == {200}
    mid = [r for r in rows if 0.5 < r["sigma"] < 5]
    assert all(r["generalisation_gap"] > 0 for r in mid)  # the training set's posterior mean on other digits
    assert "gap_x0" in stdout and "total, reference weighting" in stdout
    assert is_offline_html((tmp_path / "diag.html").read_text())
    # common random numbers: the same seed, the same numbers
    again = diagnose(_spec(d, model, tmp_path / "again.parquet", prediction="eps", process="vp"))
    np.testing.assert_array_equal(again.column("loss_x0"), table.column("loss_x0").to_numpy())


# --- diffusers -------------------------------------------------------------------------------------


def _train_diffusers(folder, prediction_type: str, samples: torch.Tensor) -> None:
    """diffusers' unconditional recipe (train_unconditional.py): uniform timesteps, add_noise, MSE on the
    scheduler's target; a tiny UNet2DModel for 150 steps."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        clean = samples[torch.randint(0, len(samples), (8,), generator=g)]
        noise = torch.randn(clean.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (8,), generator=g)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, t)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(clean, noise, t), t).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))


@pytest.fixture(scope="module")
def diffusers_models(oracle_data):
    samples = torch.as_tensor(np.load(oracle_data / "train.npy"))
    folders = {}
    for kind in ("epsilon", "v_prediction"):
        folders[kind] = oracle_data / f"ddpm-{kind}"
        _train_diffusers(folders[kind], kind, samples)
    return folders


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_diffusers_loss_is_the_one_computed_through_the_scheduler(oracle_data, diffusers_models, kind, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    from lossfloor.diagnose.measure import evaluation_subset

    folder = diffusers_models[kind]
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    unet = UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    steps = [20, 150, 400, 800]
    abar = scheduler.alphas_cumprod.to(torch.float64)
    sigmas = [float(torch.sqrt((1 - abar[t]) / abar[t])) for t in steps]
    n, seed = 64, 3
    spec = DiagnoseSpec(model=str(folder), data=str(oracle_data / "train.npy"), sigmas=np.array(sigmas),
                        out=str(tmp_path / "d.parquet"), j_star=None, seed=seed, n_samples=n)
    res = diagnose(spec)
    samples = torch.as_tensor(np.load(oracle_data / "train.npy"))
    x0 = samples[torch.from_numpy(evaluation_subset(len(samples), n, seed))]
    by_hand = []
    with torch.no_grad():
        for k, (t, s) in enumerate(zip(steps, sigmas)):
            noise = eval_noise(seed, k, n, x0.shape[1:])
            tt = torch.full((n,), t)
            pred = unet(scheduler.add_noise(x0, noise, tt), tt).sample
            if kind == "epsilon":  # eps = (x_hat - x0) / sigma: ||D - x0||^2 = sigma^2 ||eps_hat - eps||^2
                native, factor = (pred - noise), s**2
            else:  # v = a eps - s_t x0: ||D - x0||^2 = sigma^2 / (1 + sigma^2) ||v_hat - v||^2
                native, factor = (pred - scheduler.get_velocity(x0, noise, tt)), s**2 / (1 + s**2)
            by_hand.append(factor * native.double().square().flatten(1).sum(1).mean().item())
    np.testing.assert_allclose(res.column("loss_x0"), by_hand, rtol=1e-5)
    assert set(res.column("prediction")) == {"eps" if kind == "epsilon" else "vp-v"}
    assert res.totals["own"] is not None and res.totals["own"]["loss"] > 0


# --- class-conditional models: EDM2 snapshots, diffusers with class embeddings -------------------------


def _by_hand_edm(net, x0, labels, sigmas, seed):
    """mean ||D - x0||^2 per sigma of D = c_skip x_hat + c_out F(c_in x_hat; ln(sigma)/4, labels), EDM with
    sigma_data 0.5 written out, on the evaluation's noise."""
    out = []
    with torch.no_grad():
        for k, s in enumerate(sigmas):
            x_hat = x0 + s * eval_noise(seed, k, len(x0), x0.shape[1:])
            c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / np.sqrt(s**2 + 0.25), 1 / np.sqrt(s**2 + 0.25)
            F = net(c_in * x_hat, torch.full((len(x0),), np.log(s) / 4), labels)
            out.append((c_skip * x_hat + c_out * F - x0).double().square().flatten(1).sum(1).mean().item())
    return out


def test_an_edm2_snapshot_diagnoses_as_our_network_with_the_data_labels(tmp_path):
    """A class-conditional EDM2 snapshot in the published layout (tests/edm2_pickles.py, from our tiny network):
    `diagnose --model snapshot.pkl` passes the data's labels, with EDM2's preconditioning."""
    import edm2_pickles
    from lossfloor.diagnose.measure import evaluation_subset
    from lossfloor.models import build_uncertainty_head, build_unet, get_preset

    preset = get_preset("tiny")
    net, head = build_unet(preset, seed=3), build_uncertainty_head(preset, seed=3)
    with torch.no_grad():  # non-zero gains (0 at init): the output and the embedding (noise, label) matter
        net.out_gain.fill_(0.8)
        for b in [*net.enc, *net.dec]:
            b.emb_gain.fill_(0.5)
    path = tmp_path / "network-snapshot-0000008-0.100.pkl"
    edm2_pickles.write_snapshot(path, net, head)
    sigmas, n, seed = np.array([0.05, 0.5, 5.0]), 64, 3
    res = diagnose(DiagnoseSpec(model=str(path), data="bundled:digits", sigmas=sigmas, out=str(tmp_path / "d.parquet"),
                                j_star=None, seed=seed, n_samples=n))
    ds = load("bundled:digits")
    idx = torch.from_numpy(evaluation_subset(len(ds), n, seed))
    x0, labels = torch.as_tensor(ds.samples)[idx], torch.as_tensor(ds.labels)[idx]
    net.eval()
    np.testing.assert_allclose(res.column("loss_x0"), _by_hand_edm(net, x0, labels, sigmas, seed), rtol=1e-5)
    other = _by_hand_edm(net, x0, (labels + 1) % 10, sigmas, seed)  # the labels matter
    assert not np.allclose(res.column("loss_x0"), other, rtol=1e-3)
    assert set(res.column("prediction")) == {"edm"} and res.totals["own"] is not None


def test_a_diffusers_model_with_class_embeddings_gets_the_data_labels(tmp_path):
    """A UNet2DModel with num_class_embeds is class-conditional: diagnose calls it with class_labels."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from lossfloor.diagnose.measure import evaluation_subset

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=10).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp_path / "cond"))
    steps = [50, 500]
    abar = scheduler.alphas_cumprod.to(torch.float64)
    sigmas = [float(torch.sqrt((1 - abar[t]) / abar[t])) for t in steps]
    n, seed = 32, 1
    res = diagnose(DiagnoseSpec(model=str(tmp_path / "cond"), data="bundled:digits", sigmas=np.array(sigmas),
                                out=str(tmp_path / "d.parquet"), j_star=None, seed=seed, n_samples=n))
    ds = load("bundled:digits")
    idx = torch.from_numpy(evaluation_subset(len(ds), n, seed))
    x0, labels = torch.as_tensor(ds.samples)[idx], torch.as_tensor(ds.labels)[idx]
    by_hand = []
    with torch.no_grad():
        for k, (t, s) in enumerate(zip(steps, sigmas)):
            noise = eval_noise(seed, k, n, x0.shape[1:])
            tt = torch.full((n,), t)
            pred = unet(scheduler.add_noise(x0, noise, tt), tt, class_labels=labels).sample
            by_hand.append(s**2 * (pred - noise).double().square().flatten(1).sum(1).mean().item())
            other = unet(scheduler.add_noise(x0, noise, tt), tt, class_labels=(labels + 1) % 10).sample
            assert not torch.allclose(other, pred, rtol=1e-3)  # the labels matter
    np.testing.assert_allclose(res.column("loss_x0"), by_hand, rtol=1e-4)


# --- a lossfloor run -------------------------------------------------------------------------------


def test_a_lossfloor_run_diagnoses_as_its_own_last_evaluation(tmp_path, capsys):
    from lossfloor.train import TrainConfig, train

    cfg = TrainConfig(preset="tiny", batch_n_img=32, duration_n_img=64, warmup_n_img=0, eval_n_samples=64,
                      eval_sigmas=(0.05, 0.5, 5.0), seed=2, snapshot_every_n_img=32)
    res = train(cfg, load("bundled:digits"), checkpoint_dir=tmp_path / "run")
    last = res.evals[-1][1]
    out = tmp_path / "d.parquet"
    code, _, err = cli(["diagnose", "--model", str(tmp_path / "run"), "--data", "bundled:digits", "--sigmas",
                             "0.05,0.5,5", "--n-samples", "64", "--seed", "2", "--out", str(out),
                             "--figure", "none"], capsys)
    assert code == 0, err
    table = pq.read_table(out)
    np.testing.assert_allclose(table.column("loss_x0").to_numpy(), last.loss, rtol=1e-6)
    totals = json.loads(table.schema.metadata[b"totals"])
    assert totals["own"]["loss"] == pytest.approx(last.total, rel=1e-6)
    assert not (tmp_path / "d.html").exists()
    from lossfloor.floor import EstimatorConfig, build_table, estimate_conditional, write_table

    digits = load("bundled:digits")  # the run is class-conditional: its floor is the class-conditional one
    est = estimate_conditional(digits.samples, digits.labels, np.array([0.5]),
                               EstimatorConfig(estimator="exact", queries_per_sample=1), progress=False)
    write_table(build_table(est, fingerprint=digits.fingerprint), tmp_path / "jstar.parquet")
    losses = {}
    for ema in ("raw", "0.1", "posthoc:0.07", "posthoc:0.1"):  # the weights a run keeps, each selectable
        code, _, err = cli(["diagnose", "--model", str(tmp_path / "run"), "--data", "bundled:digits", "--sigmas",
                            "0.5", "--n-samples", "16", "--ema", ema, "--out", str(out), "--figure", "none",
                            "--j-star", str(tmp_path / "jstar.parquet")], capsys)
        assert code == 0, err
        losses[ema] = pq.read_table(out).column("loss_x0").to_numpy()[0]
    assert len({losses[k] for k in ("raw", "0.1", "posthoc:0.07")}) == 3, losses
    # the reconstruction of a tracked width is that EMA itself (its profile is one of the snapshots')
    assert losses["posthoc:0.1"] == pytest.approx(losses["0.1"], rel=1e-6)
    code, _, err = cli(["diagnose", "--model", str(tmp_path / "run"), "--data", "bundled:digits", "--sigmas", "0.5",
                        "--ema", "0.3", "--out", str(tmp_path / "e.parquet"), "--j-star", str(tmp_path / "jstar.parquet")],
                       capsys)
    assert code == 2 and "--ema: 0.3 is not tracked" in err and not (tmp_path / "e.parquet").exists()


# --- bad input -------------------------------------------------------------------------------------


def _bad_cases(d, tmp_path, diffusers_models):
    data, jstar = str(d / "train.npy"), str(d / "jstar.parquet")
    (tmp_path / "empty").mkdir()
    weird = tmp_path / "weird"
    shutil.copytree(diffusers_models["epsilon"], weird)
    cfg = json.loads((weird / "scheduler" / "scheduler_config.json").read_text())
    cfg["prediction_type"] = "flow"
    (weird / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    half = torch.jit.script(_Half())
    torch.jit.save(half, str(tmp_path / "half.pt"))
    good = save_oracle(np.load(d / "train.npy"), "x0", "ve", tmp_path / "good.pt")
    np.save(tmp_path / "other.npy", load("bundled:digits").samples[500:700])
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    shutil.copytree(diffusers_models["epsilon"] / "unet", tmp_path / "no-scheduler")
    ts = ["--prediction", "x0"]
    return [
        # (argv after `diagnose`, the flag or file the message must name)
        (["--model", str(tmp_path / "empty")], "empty: a folder that is no model"),
        (["--model", str(weird)], "prediction_type 'flow'"),
        (["--model", str(tmp_path / "no-scheduler")], "no scheduler_config.json"),
        (["--model", str(tmp_path / "half.pt"), *ts], "--model"),
        (["--model", good, *ts, "--data", str(tmp_path / "other.npy")], "--j-star"),
        (["--model", good, *ts, "--sigmas", "0.001,1"], "outside its grid"),
        (["--model", str(diffusers_models["epsilon"]), "--sigmas", "0.01,500", "--j-star", None], "--sigmas"),
        (["--model", good], "--prediction"),
        (["--model", good, *ts, "--process", "edm"], "--process"),
        (["--model", str(tmp_path / "junk.pt"), *ts], "junk.pt"),
        (["--model", str(diffusers_models["epsilon"]), *ts], "--prediction"),
        (["--model", good, *ts, "--out", str(tmp_path / "d.csv")], "--out"),
        (["--model", good, *ts, "--data", str(tmp_path / "missing.npy")], "--data"),
        (["--model", good, *ts, "--holdout", str(tmp_path / "missing.npy")], "--holdout"),
        (["--model", good, *ts, "--sigma-grid", "1:0.1:3"], "--sigma-grid"),
    ], data, jstar


class _Half(torch.nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x[..., :4]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(oracle_data, diffusers_models, tmp_path, capsys):
    cases, data, jstar = _bad_cases(oracle_data, tmp_path, diffusers_models)
    for extra, needle in cases:
        out = tmp_path / "out" / "d.parquet"
        out.parent.mkdir(exist_ok=True)
        argv = {"--data": data, "--j-star": jstar, "--sigmas": "0.05,1", "--out": str(out)}
        flags = dict(zip(extra[::2], extra[1::2]))
        argv.update(flags)
        if "--sigma-grid" in argv:
            argv.pop("--sigmas")
        args = ["diagnose"] + [x for k, v in argv.items() if v is not None for x in (k, v)]
        code, _, err = cli(args, capsys)
        lines = [line for line in err.splitlines() if "error" in line]
        assert code == 2, (extra, err)
        assert len(lines) == 1 and needle in lines[0], (extra, err)
        assert not any(out.parent.iterdir()), (extra, list(out.parent.iterdir()))


class _FailsInBatches(torch.nn.Module):  # passes the three-sample probe, fails in the evaluation above t = 1
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 3 and bool((t > 1.0).any()):
            raise ValueError("batch of 8 above t = 1")
        return x


class _NaNInBatches(torch.nn.Module):  # passes the three-sample probe, NaN in the evaluation above t = 1
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 3 and bool((t > 1.0).any()):
            return x * float("nan")
        return x


@pytest.mark.parametrize(("module", "words"), [(_FailsInBatches, ["fails at σ = 3", "ValueError: batch of 8"]),
                                               (_NaNInBatches, ["loss nan", "at σ = 3", "NaN or inf"])])
def test_a_model_that_fails_in_the_evaluation_leaves_nothing(oracle_data, tmp_path, capsys, module, words):
    from lossfloor.tracking import client

    torch.jit.save(torch.jit.script(module()), str(tmp_path / "m.pt"))
    (tmp_path / "out").mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, _, err = cli(["diagnose", "--model", str(tmp_path / "m.pt"), "--prediction", "x0", "--data",
                        str(oracle_data / "train.npy"), "--j-star", str(oracle_data / "jstar.parquet"), "--sigmas",
                        "0.3,3", "--n-samples", "16", "--batch", "8", "--out", str(tmp_path / "out" / "d.parquet"),
                        "--mlflow", "--tracking-uri", uri], capsys)
    lines = [line for line in err.splitlines() if " INFO " not in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in ["--model", "m.pt", *words]), lines[0]
    assert not any((tmp_path / "out").iterdir())  # no table, no figure
    experiment = client(uri).get_experiment_by_name("diagnose")
    assert experiment is None or not client(uri).search_runs([experiment.experiment_id])


def test_a_corrupt_torch_export_file_is_one_line(oracle_data, tmp_path):
    """In a fresh process: torch logs through handlers of its own, bound to the real stderr at import."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "corrupt.pt2").write_bytes(b"PK\x03\x04" + b"not a torch.export archive" * 20)
    platform = str(Path(__file__).resolve().parent.parent / "platform")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([platform, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "lossfloor", "diagnose", "--model", str(tmp_path / "corrupt.pt2"),
                          "--prediction", "x0", "--data", str(oracle_data / "train.npy"), "--j-star",
                          str(oracle_data / "jstar.parquet"), "--sigmas", "0.3", "--out", str(tmp_path / "d.parquet")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"lossfloor diagnose: error: --model {tmp_path / 'corrupt.pt2'}: not a TorchScript or torch.export file, a "
        "lossfloor checkpoint or a diffusers folder (BadZipFile)"], res.stderr


def test_an_unknown_estimator_is_refused_before_any_log_line(tmp_path, capsys):
    code, _, err = cli(["diagnose", "--model", str(tmp_path / "m.pt"), "--prediction", "x0", "--data",
                        "bundled:digits", "--sigmas", "0.3,3", "--estimator", "foo", "--out",
                        str(tmp_path / "d.parquet")], capsys)
    assert code == 2 and err.splitlines() == [
        "lossfloor diagnose: error: --estimator: expected one of auto, exact, snis, dol, cdol, knn, got 'foo'"]


def test_flow_matching_diffusers_loss_is_the_one_computed_through_scale_noise(oracle_data, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    from lossfloor.diagnose.measure import evaluation_subset

    torch.manual_seed(1)  # an untrained network: the conversion, not the training, is under test
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unet.save_pretrained(str(tmp_path / "fm"))
    scheduler.save_pretrained(str(tmp_path / "fm" / "scheduler"))
    idx = [900, 600, 300, 50]  # indices of the scheduler's (descending) timesteps
    ts, t = scheduler.timesteps[idx], scheduler.sigmas[idx].to(torch.float64)
    sigmas = (t / (1 - t)).tolist()[::-1]  # ascending σ
    n, seed = 32, 0
    res = diagnose(DiagnoseSpec(model=str(tmp_path / "fm"), data=str(oracle_data / "train.npy"),
                                sigmas=np.array(sigmas), out=str(tmp_path / "d.parquet"),
                                j_star=None, seed=seed, n_samples=n))
    samples = torch.as_tensor(np.load(oracle_data / "train.npy"))
    x0 = samples[torch.from_numpy(evaluation_subset(len(samples), n, seed))]
    by_hand = []
    with torch.no_grad():
        for k, (step, tk) in enumerate(zip(ts.flip(0), t.flip(0))):
            noise = eval_noise(seed, k, n, x0.shape[1:])
            timestep = torch.full((n,), float(step))
            v = unet(scheduler.scale_noise(x0, timestep, noise), timestep).sample
            # velocity eps - x0, x_t = (1 - t) x0 + t eps: ||D - x0||^2 = t^2 ||v_hat - v||^2
            by_hand.append(float(tk) ** 2 * (v - (noise - x0)).double().square().flatten(1).sum(1).mean().item())
    np.testing.assert_allclose(res.column("loss_x0"), by_hand, rtol=1e-5)
    assert set(res.column("prediction")) == {"fm-velocity"} and set(res.column("process")) == {"fm"}


def test_a_torch_export_file_reads_like_the_torchscript_one(oracle_data, tmp_path):
    from diagnose_models import PosteriorMean

    data = torch.as_tensor(np.load(oracle_data / "train.npy"))
    module = PosteriorMean(data, "score", "fm")
    example = (torch.randn(2, 1, 8, 8), torch.full((2,), 0.5))
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, example, dynamic_shapes={"x": {0: batch}, "t": {0: batch}})
    torch.export.save(program, str(tmp_path / "oracle.pt2"))
    scripted = save_oracle(data, "score", "fm", tmp_path / "oracle.pt")
    a = diagnose(_spec(oracle_data, tmp_path / "oracle.pt2", tmp_path / "a.parquet", prediction="score", process="fm"))
    b = diagnose(_spec(oracle_data, scripted, tmp_path / "b.parquet", prediction="score", process="fm"))
    np.testing.assert_allclose(a.column("loss_x0"), b.column("loss_x0"), rtol=1e-5, atol=1e-9)


def test_mlflow_runs_of_two_models_make_one_dashboard_page(oracle_data, tmp_path, capsys):
    from lossfloor.pages.html import is_offline_html
    from lossfloor.tracking import client

    d = oracle_data
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = np.load(d / "train.npy")
    base = ["--data", str(d / "train.npy"), "--j-star", str(d / "jstar.parquet"), "--sigmas", "0.1,1,10",
            "--mlflow", "--tracking-uri", uri, "--figure", "none"]
    for name, other in (("oracle", data), ("blurred", data * 0.9)):  # 0.9 x the posterior mean: a gap
        model = save_oracle(other, "x0", "ve", tmp_path / f"{name}.pt")
        code, _, err = cli(["diagnose", "--model", model, "--prediction", "x0", "--out",
                            str(tmp_path / f"{name}.parquet"), "--run-name", name, *base], capsys)
        assert code == 0, err
    runs = client(uri).search_runs([client(uri).get_experiment_by_name("diagnose").experiment_id])
    assert {r.info.run_name for r in runs} == {"oracle", "blurred"}
    blurred = next(r for r in runs if r.info.run_name == "blurred")
    assert blurred.data.tags["lossfloor.kind"] == "diagnose" and blurred.data.metrics["total_reference/gap"] > 0
    assert {f.path for f in client(uri).list_artifacts(blurred.info.run_id)} == {"diag.parquet", "diag.html"}
    code, out, err = cli(["dashboard", "--experiment", "diagnose", "--tracking-uri", uri, "--out",
                          str(tmp_path / "page.html")], capsys)
    assert code == 0, err
    page = (tmp_path / "page.html").read_text()
    assert is_offline_html(page) and "blurred" in page and "oracle" in page and "2 diagnosed model(s)" in out


@pytest.mark.e2e
def test_the_ray_engine_gives_the_local_numbers(oracle_data, tmp_path, local_ray):
    d = oracle_data
    model = save_oracle(np.load(d / "train.npy"), "vp-v", "fm", tmp_path / "oracle.pt")

    def run(name, **kw):  # 2 σ x 4 batches of 64 rows: 3 workers get σ x sample-batch blocks
        return diagnose(DiagnoseSpec(model=model, data=str(d / "train.npy"), sigmas=SIGMAS[2:4], batch=64,
                                     out=str(tmp_path / name), j_star=str(d / "jstar.parquet"), prediction="vp-v",
                                     process="fm", **kw))

    local = run("local.parquet")
    for workers in (1, 3):
        on_ray = run("ray.parquet", engine=Engine(kind="ray", workers=workers, cpus_per_worker=0.5))
        for name in ("loss_x0", "loss_stderr", "gap_x0"):
            np.testing.assert_array_equal(on_ray.column(name), local.column(name), err_msg=f"{name}, {workers}")
