"""`lossfloor evaluate`: reference statistics, the published protocol, guidance, labels, the command.

Oracles: FD from an independent computation (eigen-decompositions and scipy.linalg.sqrtm of the symmetric
form sqrt(C1) C2 sqrt(C1)); uint8 quantisation and each network's preprocessing against values computed
by hand; feature sums of split blocks equal to those of the whole; guidance against its formula on linear
denoisers (scale 1: the unguided samples, bit for bit); the label histogram against the class
frequencies (binomial bounds). A small TorchScript network built here stands in for Inception / DINOv2.
"""

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from lossfloor.cli import main
from lossfloor.data import load
from lossfloor.errors import InputError
from lossfloor.train.metrics import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureSums,
    dinov2_input,
    feature_extractor,
    feature_extractors,
    frechet_distance,
    inception_input,
    tf1_bilinear,
    to_uint8,
)
from lossfloor.train.quality import (
    SamplerSettings,
    SampleSpec,
    block_sums,
    read_reference,
    reference_statistics,
    write_reference,
)
from lossfloor.train.sampling import generate, guided, sample_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


class ChannelMeans(torch.nn.Module):
    """Features = per-channel mean and mean square of the input, times a weight (B, 6)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        m = x.mean(dim=(2, 3))
        return self.scale * torch.cat([m, (x * x).mean(dim=(2, 3))], dim=1)


class ShrinkDenoiser(torch.nn.Module):
    """A TorchScript 've' x0-model: D(x, sigma) = x / (1 + sigma^2) (the posterior mean of N(0, 1) data)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x / (1 + t.view(-1, 1, 1, 1) ** 2)


class ZeroDenoiser(torch.nn.Module):
    """D = 0 (the mean of the data, nothing else)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _script(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    return {"net": _script(ChannelMeans(), d / "net.pt"), "net2": _script(ChannelMeans(2.0), d / "net2.pt"),
            "model": _script(ShrinkDenoiser(), d / "model.pt"), "zero": _script(ZeroDenoiser(), d / "zero.pt"),
            "dir": d}


# --- Fréchet distance and feature sums ---------------------------------------------------------------


def _independent_fd(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(c1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # sqrt(C1)
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ c2 @ r1), 0, None)).sum()  # tr sqrt(C1 C2), symmetric form
    tr_scipy = np.trace(np.real(scipy.linalg.sqrtm(r1 @ c2 @ r1)))
    assert tr == pytest.approx(tr_scipy, rel=1e-8)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr)


def test_fd_of_feature_sums_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(250, 5)) * 1.5 + 0.3
    sa = FeatureSums.of(torch.from_numpy(a[:100])) + FeatureSums.of(torch.from_numpy(a[100:]))  # split sums
    mu, cov = sa.statistics()
    np.testing.assert_allclose(mu, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-12)
    got = frechet_distance(*sa.statistics(), *FeatureSums.of(torch.from_numpy(b)).statistics())
    assert got == pytest.approx(_independent_fd(a, b), rel=1e-8)


# --- the published protocol ------------------------------------------------------------------------


def test_uint8_quantisation_is_edm2s_rounding():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.99, 1.0, 3.0])
    # floor(127.5 x + 128) clipped: -1 -> 0.5 -> 0; -0.999 -> 0.6275 -> 0; 0 -> 128; 0.5 -> 191.75 -> 191;
    # 0.99 -> 254.225 -> 254; 1 -> 255.5 -> 255
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 191, 254, 255, 255]
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(u.to(torch.float32) / 127.5 - 1), u)  # PNG bytes read back come back exact


def test_tf1_bilinear_by_hand():
    x = torch.tensor([[0.0, 100.0], [200.0, 255.0]]).view(1, 1, 2, 2)
    # output i reads the input at s = i * 2 / 3: 0, 2/3, 4/3 (-> row 1, clamped); rows then columns
    rows = [[0.0, 100.0], [400 / 3, 100 + (155 * 2 / 3)], [200.0, 255.0]]
    expected = [[r[0], r[0] + (r[1] - r[0]) * 2 / 3, r[1]] for r in rows]
    torch.testing.assert_close(tf1_bilinear(x, 3)[0, 0], torch.tensor(expected))
    img = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    assert torch.equal(inception_input(img), img.to(torch.float32))  # 299: no resize
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    got = inception_input(grey)
    assert got.shape == (2, 3, 299, 299) and torch.equal(got[:, 0], got[:, 2])
    assert got[0, 0, 0, 0] == grey[0, 0, 0, 0] and got.max() <= 255 and got.min() >= 0


def test_dinov2_preprocessing_by_hand():
    img = torch.full((1, 3, 32, 32), 51, dtype=torch.uint8)
    img[:, 1] = 204
    got = dinov2_input(img)
    assert got.shape == (1, 3, 224, 224)
    want = [(v / 255 - m) / s for v, m, s in zip((51, 204, 51), IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(got.mean(dim=(2, 3))[0], torch.tensor(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.std(dim=(2, 3))[0], torch.zeros(3), rtol=0, atol=1e-4)  # constant stays constant


def test_extractors_apply_their_preprocessing(files):
    u8 = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    net = ChannelMeans()
    ex = feature_extractors(f"inception:{files['net']},dinov2:{files['net']},network:{files['net']}")
    assert set(ex) == {"fid", "fd_dinov2", "fd"}
    torch.testing.assert_close(ex["fid"](u8), net(inception_input(u8)))
    torch.testing.assert_close(ex["fd_dinov2"](u8), net(dinov2_input(u8)))
    torch.testing.assert_close(ex["fd"](u8), net(u8.to(torch.float32) / 127.5 - 1))
    torch.testing.assert_close(feature_extractor("pixels:2")(u8),
                               torch.nn.functional.avg_pool2d(u8.float() / 127.5 - 1, 2).flatten(1))
    with pytest.raises(InputError, match="two extractors give fd"):
        feature_extractors("pixels,pixels:2")


# --- reference statistics --------------------------------------------------------------------------


def test_reference_statistics_round_trip_and_refusals(files, tmp_path):
    digits = load("bundled:digits")
    ex = feature_extractors(f"pixels:2,dinov2:{files['net']}")
    ref = reference_statistics(digits, ex, batch=500)
    path = write_reference(ref, tmp_path / "d.stats.npz")
    back = read_reference(path)
    u8 = to_uint8(torch.from_numpy(digits.samples))
    f = np.asarray(ex["fd"](u8), dtype=np.float64)
    np.testing.assert_allclose(back.stats["fd"][1], f.mean(0), rtol=1e-10)
    np.testing.assert_allclose(back.stats["fd"][2], np.cov(f, rowvar=False), rtol=1e-8, atol=1e-12)
    assert back.class_counts == tuple(np.bincount(digits.labels)) and back.shape == (1, 8, 8)
    back.check(ex, shape=(1, 8, 8), fingerprint=digits.fingerprint)
    with pytest.raises(InputError, match="other data"):
        back.check(ex, shape=(1, 8, 8), fingerprint="0" * 64)
    with pytest.raises(InputError, match="another dinov2 network"):
        back.check(feature_extractors(f"dinov2:{files['net2']}"), shape=(1, 8, 8))
    with pytest.raises(InputError, match="no statistics for inception"):
        back.check(feature_extractors(f"inception:{files['net']}"), shape=(1, 8, 8))
    with pytest.raises(InputError, match="features pixels:2, not pixels"):
        back.check(feature_extractors("pixels"), shape=(1, 8, 8))
    with pytest.raises(InputError, match=r"shape \(1, 8, 8\)"):
        back.check(ex, shape=(3, 8, 8))
    (tmp_path / "x.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a lossfloor statistics file"):
        read_reference(tmp_path / "x.npz")


# --- sampling: seeds per index, labels, guidance ---------------------------------------------------


def test_samples_do_not_depend_on_batching_and_labels_follow_the_class_frequencies():
    probs = (0.6, 0.3, 0.1, 0.0)
    noise, labels = sample_inputs(5, 0, 4000, (2,), class_probs=probs)
    part_noise, part_labels = sample_inputs(5, 1000, 1010, (2,), class_probs=probs)
    assert torch.equal(noise[1000:1010], part_noise) and torch.equal(labels[1000:1010], part_labels)
    counts = np.bincount(labels.numpy(), minlength=4)
    for c, p in zip(counts, probs):
        assert abs(c - 4000 * p) <= 4 * np.sqrt(4000 * p * (1 - p)) + 1e-9  # 4 binomial sd; class 3 never drawn
    assert counts[3] == 0

    def den(x, s, lab):  # a conditional denoiser: the label shifts D
        return x / (1 + s.view(-1, 1) ** 2) + 0.01 * lab.view(-1, 1).to(x.dtype)
    a, la = generate(den, 30, (2,), class_probs=probs, seed=3, batch=7, num_steps=4)
    b, lb = generate(den, 30, (2,), class_probs=probs, seed=3, batch=30, num_steps=4)
    assert torch.equal(la, lb) and torch.allclose(a, b, rtol=0, atol=1e-6)


def test_guidance_scale_one_is_no_guidance_and_other_scales_follow_the_formula():
    def main(x, s, lab=None):
        return 0.5 * x

    def guide(x, s, lab=None):
        assert lab is None  # an unconditional guide is called without labels
        return 0.2 * x
    assert guided(main, guide, 1.0) is main
    x, s = torch.randn(4, 3), torch.ones(4)
    torch.testing.assert_close(guided(main, guide, 2.0, guide_labels=False)(x, s, torch.zeros(4)), 0.8 * x)  # .2+2(.3)
    ref, _ = generate(main, 8, (3,), seed=1, num_steps=4)
    one, _ = generate(guided(main, guide, 1.0), 8, (3,), seed=1, num_steps=4)
    assert torch.equal(ref, one)


def test_block_sums_add_up_to_the_whole():
    ex = feature_extractors("pixels")

    def den(x, s, lab=None):
        return x / (1 + s.view(-1, 1, 1, 1) ** 2)
    spec = SampleSpec(shape=(1, 4, 4), seed=2, sampler=SamplerSettings(num_steps=4))
    whole = block_sums(den, ex, spec, start=0, stop=24, batch=8)["fd"]
    parts = block_sums(den, ex, spec, start=0, stop=16, batch=8)["fd"] + block_sums(den, ex, spec, start=16, stop=24,
                                                                                    batch=8)["fd"]
    assert whole.count == parts.count == 24
    np.testing.assert_array_equal(whole.total, parts.total)
    np.testing.assert_allclose(whole.outer, parts.outer, rtol=1e-15)


# --- the command ----------------------------------------------------------------------------------


def test_cli_reference_then_model_then_samples(files, tmp_path, capsys):
    stats = tmp_path / "digits.stats.npz"
    assert main(["evaluate", "--reference", "--data", "bundled:digits", "--features", "pixels:2",
                 "--out", str(stats)]) == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(files["model"]), "--prediction", "x0", "--reference-stats", str(stats),
            "--features", "pixels:2", "--out", str(out), "--n-samples", "24", "--seeds", "2", "--steps", "4",
            "--batch", "8", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    fd = result["fd"]
    assert len(fd["per_seed"]) == 2 and fd["mean"] == pytest.approx(np.mean(fd["per_seed"]))
    assert fd["std"] == pytest.approx(np.std(fd["per_seed"], ddof=1)) and fd["per_seed"][0] != fd["per_seed"][1]
    assert not (out / "work").exists() and (out / "metrics.json").is_file()
    # the seed's statistics file holds what its FD was computed from
    seed0 = read_reference(out / "samples-seed0.stats.npz")
    ref = read_reference(stats)
    assert frechet_distance(*seed0.stats["fd"][1:], *ref.stats["fd"][1:]) == pytest.approx(fd["per_seed"][0])
    # a rerun gives the same numbers (samples from (seed, index))
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["fd"] == fd
    # guided by itself the model is itself (D_g + S (D - D_g) = D); another guide moves the samples
    assert main([*args[:-1], "--guidance", "2", "--guide-model", str(files["model"]), "--out", str(tmp_path / "g"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fd"] == fd
    assert main([*args[:-1], "--guidance", "2", "--guide-model", str(files["zero"]), "--out", str(tmp_path / "g2"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fd"]["mean"] != fd["mean"]
    # a folder of PNGs is scored as it is: the digits themselves have FD 0 to their own statistics
    from PIL import Image

    pngs = tmp_path / "pngs"
    pngs.mkdir()
    u8 = to_uint8(torch.from_numpy(load("bundled:digits").samples[:64])).numpy()
    for i, img in enumerate(u8):
        Image.fromarray(img[0]).save(pngs / f"{i:03d}.png")
    assert main(["evaluate", "--samples", str(pngs), "--reference-stats", str(stats), "--features", "pixels:2",
                 "--out", str(tmp_path / "s"), "--json"]) == 0
    fd_pngs = json.loads(capsys.readouterr().out)["fd"]["mean"]
    from lossfloor.train.metrics import compute_statistics

    direct = frechet_distance(*compute_statistics(feature_extractor("pixels:2"), u8.astype(np.float32) / 127.5 - 1),
                              *ref.stats["fd"][1:])
    assert fd_pngs == pytest.approx(direct, rel=1e-9, abs=1e-9)


def test_resume_reuses_finished_blocks(files, tmp_path, monkeypatch, capsys):
    from lossfloor.diagnose import sampling
    from lossfloor.jobs import evaluate as job

    stats = tmp_path / "s.npz"
    write_reference(reference_statistics(load("bundled:digits"), feature_extractors("pixels:2")), stats)
    spec = job.EvaluateSpec(model=str(files["model"]), prediction="x0", reference_stats=str(stats),
                            features="pixels:2", out=str(tmp_path / "o"), n_samples=32, seeds=1, batch=8,
                            settings=SamplerSettings(num_steps=3))
    clean = job.evaluate(spec)["fd"]["mean"]
    real_build, calls = sampling.SampleWork.build, []

    def failing_build(self, device):
        compute = real_build(self, device)

        def run(seed, start, stop):
            calls.append(start)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return compute(seed, start, stop)
        return run
    monkeypatch.setattr(sampling.SampleWork, "build", failing_build)
    spec2 = job.EvaluateSpec(**{**spec.__dict__, "out": str(tmp_path / "o2")})
    with pytest.raises(KeyboardInterrupt):
        job.evaluate(spec2)
    assert len(list((tmp_path / "o2" / "work").glob("*/seed0-*.npz"))) == 2
    calls.clear()
    assert job.evaluate(spec2)["fd"]["mean"] == clean  # same numbers, only the missing blocks computed
    assert calls == [16, 24]


def test_mlflow_gets_the_metrics_and_the_statistics(files, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    stats = tmp_path / "s.npz"
    write_reference(reference_statistics(load("bundled:digits"), feature_extractors("pixels:2")), stats)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["evaluate", "--model", str(files["model"]), "--prediction", "x0", "--reference-stats", str(stats),
                 "--features", "pixels:2", "--out", str(tmp_path / "o"), "--n-samples", "16", "--seeds", "2",
                 "--steps", "3", "--batch", "8", "--json", "--mlflow", "--tracking-uri", uri]) == 0
    result = json.loads(capsys.readouterr().out)
    c = MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name("evaluate").experiment_id])[0]
    assert run.data.metrics["fd"] == pytest.approx(result["fd"]["mean"])
    assert [m.value for m in c.get_metric_history(run.info.run_id, "fd/seed")] == pytest.approx(result["fd"]["per_seed"])
    names = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "samples-seed0.stats.npz", "samples-seed1.stats.npz", "s.npz"} <= names


def test_a_conditional_run_is_sampled_with_the_datas_class_frequencies(tmp_path, monkeypatch):
    from lossfloor.jobs import evaluate as job
    from lossfloor.train import TrainConfig, sampling, train

    digits = load("bundled:digits")
    train(TrainConfig(preset="tiny", batch_n_img=32, duration_n_img=32, warmup_n_img=0, eval_n_samples=8,
                      eval_sigmas=(0.5,)), digits, checkpoint_dir=tmp_path / "run")
    keep = digits.labels < 3  # data with 3 classes of unequal counts: the statistics hold their counts
    from lossfloor.data import Dataset

    part = Dataset(samples=digits.samples[keep][:300], labels=digits.labels[keep][:300], fingerprint="part",
                   source="part", normalisation="none")
    stats = tmp_path / "s.npz"
    write_reference(reference_statistics(part, feature_extractors("pixels:2")), stats)
    probs = np.bincount(part.labels) / len(part.labels)
    seen, real = [], sampling.heun_sample

    def spy(denoiser, noise, *, labels=None, **kw):
        seen.append(labels.clone())
        return real(denoiser, noise, labels=labels, **kw)
    monkeypatch.setattr(sampling, "heun_sample", spy)
    spec = job.EvaluateSpec(model=str(tmp_path / "run"), reference_stats=str(stats), features="pixels:2",
                            out=str(tmp_path / "o"), n_samples=600, seeds=1, batch=200,
                            settings=SamplerSettings(num_steps=2))
    assert np.isfinite(job.evaluate(spec)["fd"]["mean"])
    counts = np.bincount(torch.cat(seen).numpy(), minlength=10)
    assert counts[3:].sum() == 0 and counts.sum() == 600
    for c, p in zip(counts[:3], probs):
        assert abs(c - 600 * p) <= 4 * np.sqrt(600 * p * (1 - p))


class NaNBelow1(torch.nn.Module):
    """Fine at large σ (passes the probe), NaN below σ = 1: fails mid-sampling."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t.view(-1, 1, 1, 1) < 1.0, torch.full_like(x, float("nan")), x * 0)


def test_a_model_failing_mid_way_leaves_nothing(tmp_path, capsys):
    stats = tmp_path / "s.npz"
    write_reference(reference_statistics(load("bundled:digits"), feature_extractors("pixels:2")), stats)
    model = _script(NaNBelow1(), tmp_path / "nan.pt")
    code = main(["evaluate", "--model", str(model), "--prediction", "x0", "--reference-stats", str(stats),
                 "--features", "pixels:2", "--out", str(tmp_path / "out" / "o"), "--n-samples", "16", "--seeds", "1",
                 "--steps", "3", "--batch", "8"])
    assert code == 2 and "NaN or inf in the samples 0..7 of seed 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_statistics_of_a_subset_of_the_reference_features(files, tmp_path, capsys):
    stats = tmp_path / "s.npz"
    assert main(["evaluate", "--reference", "--data", "bundled:digits", "--features",
                 f"pixels:2,dinov2:{files['net']}", "--out", str(stats)]) == 0
    assert main(["evaluate", "--model", str(files["model"]), "--prediction", "x0", "--reference-stats", str(stats),
                 "--features", f"dinov2:{files['net']}", "--out", str(tmp_path / "o"), "--n-samples", "8",
                 "--seeds", "1", "--steps", "2", "--batch", "8", "--json"]) == 0
    capsys.readouterr()
    assert set(read_reference(tmp_path / "o" / "samples-seed0.stats.npz").stats) == {"fd_dinov2"}


# --- latent models: samples decoded by the data set's VAE ---------------------------------------------


LATENT_MEAN, LATENT_STD = (1.0, -2.0, 0.5, 3.0), (2.0, 1.0, 3.0, 0.5)  # the latent set's own statistics
EDM2_MEAN, EDM2_STD = (5.81, 3.25, 0.12, -2.15), (4.17, 4.62, 3.71, 3.28)  # EDM2's published SD-VAE constants


@pytest.fixture(scope="module")
def latent(tmp_path_factory, one_thread):
    """A tiny random AutoencoderKL (one 2x level: latents (4, 8, 8) <-> images (3, 16, 16)), an EDM2-layout
    latent set of 40 images with its own statistics, a run trained on its whitened latents, and reference
    statistics (pixels:8) of 48 random RGB 16x16 images."""
    from diffusers import AutoencoderKL

    from lossfloor.data import Dataset
    from lossfloor.data.edm2 import LatentStats
    from lossfloor.data.latent_sets import write_edm2
    from lossfloor.models import sized_preset
    from lossfloor.train import TrainConfig, train

    d = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(d / "vae", safe_serialization=True)
    rng = np.random.default_rng(0)
    m, s = np.array(LATENT_MEAN)[:, None, None], np.array(LATENT_STD)[:, None, None]
    raw = np.concatenate([m + s * rng.standard_normal((40, 4, 8, 8)), np.full((40, 4, 8, 8), 0.1)], axis=1)
    d.joinpath("latents").mkdir()
    write_edm2(d / "latents", lambda: iter([raw.astype(np.float32)]), None,
               stats=LatentStats(mean=LATENT_MEAN, std=LATENT_STD), as_zip=False)
    train(TrainConfig(preset=sized_preset((4, 8, 8)), batch_n_img=32, duration_n_img=32, warmup_n_img=0,
                      eval_n_samples=8, eval_sigmas=(0.5,)), load(d / "latents"), checkpoint_dir=d / "run")
    images = rng.uniform(-1, 1, (48, 3, 16, 16)).astype(np.float32)
    ref = Dataset(samples=images, labels=None, fingerprint="rgb16", source="rgb16", normalisation="none")
    write_reference(reference_statistics(ref, feature_extractors("pixels:8")), d / "rgb16.stats.npz")
    _script(ShrinkDenoiser(), d / "shrink.pt")
    return {"dir": d, "images": images}


def _pixels8(u8: np.ndarray) -> np.ndarray:
    """pixels:8 by hand: the mean of each 8x8 tile of each channel, of u8 / 127.5 - 1."""
    x = u8.astype(np.float64) / 127.5 - 1
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5)).reshape(n, -1)


@pytest.mark.parametrize("kind", ["run", "torchscript"])
def test_a_latent_models_samples_are_decoded_by_the_vae_before_the_features(latent, tmp_path, capsys, kind):
    """The run (latents (4, 8, 8) from its config) with the set's statistics; a TorchScript model (the latent
    shape from the reference images' (3, 16, 16) and the VAE's 2x) with EDM2's constants (no --latent-stats)."""
    from diffusers import AutoencoderKL

    from lossfloor.diagnose.models import load_model

    d = latent["dir"]
    model = ["--model", str(d / "run")] if kind == "run" else ["--model", str(d / "shrink.pt"), "--prediction", "x0"]
    stats = ["--latent-stats", str(d / "latents")] if kind == "run" else []
    assert main(["evaluate", *model, "--vae", str(d / "vae"), *stats, "--reference-stats", str(d / "rgb16.stats.npz"),
                 "--features", "pixels:8", "--out", str(tmp_path / "o"), "--n-samples", "12", "--seeds", "2",
                 "--steps", "3", "--batch", "8", "--json", "--mlflow", "--tracking-uri",
                 f"sqlite:///{tmp_path / 'm.db'}"]) == 0
    result = json.loads(capsys.readouterr().out)
    mean, std = (LATENT_MEAN, LATENT_STD) if kind == "run" else (EDM2_MEAN, EDM2_STD)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    params = c.search_runs([c.get_experiment_by_name("evaluate").experiment_id])[0].data.params
    assert params["vae"] == str(d / "vae")
    assert params["latent_stats"] == (str(d / "latents") if kind == "run" else "EDM2's SD-VAE constants")
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["vae"] == str(d / "vae") and saved["latent_stats"]["mean"] == pytest.approx(mean)
    assert saved["latent_stats"]["std"] == pytest.approx(std)
    # by hand: the same samples (noise from (seed, index)), un-whitened by inverting the whitening
    # x = (raw - m_c) (0.5 / s_c) of EDM2's latents in float64: raw = x / (0.5 / s_c) + m_c; the VAE's own decode,
    # clamp to [0, 1], 8 bits, pixels:8, FD against the reference images' features
    den = load_model(**({"spec": str(d / "run")} if kind == "run" else {"spec": str(d / "shrink.pt"),
                                                                         "prediction": "x0"})).denoiser
    vae = AutoencoderKL.from_pretrained(d / "vae").eval()
    m, s = np.array(mean)[:, None, None], np.array(std)[:, None, None]
    ref_features = _pixels8(to_uint8(torch.from_numpy(latent["images"])).numpy())
    for seed in (0, 1):
        x, _ = generate(den, 12, (4, 8, 8), seed=seed, batch=8, num_steps=3)
        raw = (x.double().numpy() / (0.5 / s) + m).astype(np.float32)
        with torch.no_grad():
            u8 = np.concatenate([(vae.decode(torch.from_numpy(raw[a:b])).sample.clamp(0, 1) * 255 + 0.5)
                                 .to(torch.uint8).numpy() for a, b in ((0, 8), (8, 12))])
        assert u8.shape == (12, 3, 16, 16)
        want = _independent_fd(_pixels8(u8), ref_features)
        assert result["fd"]["per_seed"][seed] == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_the_vae_and_the_latent_statistics_are_part_of_the_work_key(latent, tmp_path, monkeypatch):
    from lossfloor.diagnose import sampling
    from lossfloor.jobs import evaluate as job

    d = latent["dir"]
    base = {"model": str(d / "shrink.pt"), "prediction": "x0", "reference_stats": str(d / "rgb16.stats.npz"),
            "features": "pixels:8", "n_samples": 12, "seeds": 1, "batch": 8, "settings": SamplerSettings(num_steps=2),
            "vae": str(d / "vae")}
    clean = job.evaluate(job.EvaluateSpec(**base, latent_stats=str(d / "latents"), out=str(tmp_path / "clean")))
    real_build, calls = sampling.SampleWork.build, []

    def failing_build(self, device):
        compute = real_build(self, device)

        def run(seed, start, stop):
            calls.append(start)
            if start == 8 and interrupt:
                raise KeyboardInterrupt
            return compute(seed, start, stop)
        return run

    def interrupted(spec):  # block 0..7 done, then interrupted
        nonlocal interrupt
        interrupt = True
        with pytest.raises(KeyboardInterrupt):
            job.evaluate(spec)
        interrupt = False
        calls.clear()
    interrupt = False
    monkeypatch.setattr(sampling.SampleWork, "build", failing_build)
    interrupted(job.EvaluateSpec(**base, out=str(tmp_path / "o")))  # EDM2's constants
    got = job.evaluate(job.EvaluateSpec(**base, latent_stats=str(d / "latents"), out=str(tmp_path / "o")))
    assert calls == [0, 8] and got["fd"] == clean["fd"]  # other statistics: nothing reused
    interrupted(job.EvaluateSpec(**base, out=str(tmp_path / "o2")))
    (tmp_path / "vae2").mkdir()
    for f in (d / "vae").iterdir():
        (tmp_path / "vae2" / f.name).write_bytes(f.read_bytes())
    job.evaluate(job.EvaluateSpec(**{**base, "vae": str(tmp_path / "vae2")}, out=str(tmp_path / "o2")))
    assert calls == [0, 8]  # another VAE folder: nothing reused
    interrupted(job.EvaluateSpec(**base, out=str(tmp_path / "o3")))
    job.evaluate(job.EvaluateSpec(**base, out=str(tmp_path / "o3")))
    assert calls == [8]  # the same inputs: the finished block is reused
