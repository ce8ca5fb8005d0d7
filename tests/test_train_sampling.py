"""lossfloor.train sampling and sample metrics: EDM Heun sampler, Fréchet distance, feature extractors.

Oracles: the Fréchet distance of Gaussians in closed form (commuting covariances: ||mu1 - mu2||^2 +
sum (sqrt(a_i) - sqrt(b_i))^2); FD of a distribution with itself = 0; the Heun sampler with the exact
posterior-mean denoiser of a two-point data set ends on the data points (EDM paper Algorithm 1).
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from lossfloor.data import load
from lossfloor.diffusion import get_preconditioning
from lossfloor.errors import InputError
from lossfloor.models import build_unet, get_preset
from lossfloor.train import (
    Denoiser,
    NetworkFeatures,
    PixelFeatures,
    compute_statistics,
    edm_sigma_steps,
    feature_extractor,
    feature_statistics,
    frechet_distance,
    frechet_distance_of,
    generate,
    heun_sample,
    to_uint8,
)
from lossfloor.train.metrics import dinov2_input, inception_input

pytestmark = pytest.mark.usefixtures("one_thread")


# --- Fréchet distance -------------------------------------------------------------------------------


def test_frechet_distance_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    cov1, cov2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commuting: sqrtm(C1 C2) = Q diag(sqrt(ab)) Q^T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(4 + 1)  # 1-D: (2-1)^2
    # a general pair, against the trace of the symmetric form sqrtm(C1^1/2 C2 C1^1/2)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    w, v = np.linalg.eigh(c1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ c2 @ r1)
    expected = np.trace(c1) + np.trace(c2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(np.zeros(5), c1, np.zeros(5), c2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_a_distribution_with_itself_is_zero_on_digits():
    x = load("bundled:digits").samples
    mu, cov = feature_statistics(PixelFeatures()(to_uint8(torch.from_numpy(x))))
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-6
    halves = frechet_distance_of(PixelFeatures(2), x[::2], x[1::2])
    noise = frechet_distance_of(PixelFeatures(2), x[::2], np.random.default_rng(0).uniform(-1, 1, x[1::2].shape))
    assert 0 < halves < 0.1 * noise  # two halves of the data are close, data vs noise is far
    with pytest.raises(InputError, match="frechet_distance"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# --- Feature networks from local TorchScript files --------------------------------------------------


class SmallNet(torch.nn.Module):
    """A random conv net standing in for Inception / DINOv2 (same call conventions)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))  # (B, 3, H, W) -> (B, 6)


@pytest.fixture(scope="module")
def network_files(tmp_path_factory):
    """The same random network saved as TorchScript (.pt) and as a torch.export program (.pt2)."""
    torch.manual_seed(0)
    net = SmallNet().eval()
    folder = tmp_path_factory.mktemp("nets")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still supported
        torch.jit.save(torch.jit.script(net), str(folder / "net.pt"))
    program = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(folder / "net.pt2"))
    return net, folder / "net.pt", folder / "net.pt2"


def test_feature_networks_load_from_local_files(network_files, tmp_path):
    net, pt, pt2 = network_files
    x = torch.from_numpy(load("bundled:digits").samples[:64])  # (64, 1, 8, 8): grey, repeated to RGB
    for extractor in (NetworkFeatures(pt, kind="inception"), feature_extractor(f"dinov2:{pt}")):
        f = extractor(to_uint8(x))
        assert f.shape == (64, 6) and torch.isfinite(f).all()
        mu, cov = compute_statistics(extractor, x, batch=16)
        assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-9
    # each kind's preprocessing, then the network; the .pt2 program was exported for 16 x 16 RGB inputs
    u8 = to_uint8(x)
    for kind, prep in (("inception", inception_input), ("dinov2", dinov2_input)):
        torch.testing.assert_close(NetworkFeatures(pt, kind=kind)(u8), net(prep(u8)))
    rgb = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for path in (pt, pt2):
        torch.testing.assert_close(NetworkFeatures(path, kind="network")(rgb), net(rgb.float() / 127.5 - 1))
    with pytest.raises(InputError, match="not found"):
        NetworkFeatures(tmp_path / "missing.pt", kind="inception")
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="TorchScript"):
        NetworkFeatures(tmp_path / "bad.pt")
    assert isinstance(feature_extractor("pixels:2"), PixelFeatures)
    with pytest.raises(InputError, match="features"):
        feature_extractor("inception")


# --- Heun sampler -----------------------------------------------------------------------------------


def test_sigma_steps_follow_edm_eq5():
    t = edm_sigma_steps()
    assert len(t) == 33 and t[0] == pytest.approx(80) and t[-2] == pytest.approx(0.002) and t[-1] == 0
    assert torch.all(t[1:] < t[:-1])
    i = 10
    expected = (80 ** (1 / 7) + i / 31 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t[i].item() == pytest.approx(expected, rel=1e-12)


def test_heun_with_the_exact_posterior_mean_lands_on_the_data_points():
    points = torch.tensor([[1.0, 0.5], [-1.0, -0.5]], dtype=torch.float64)  # (2, 2)
    calls = []

    def posterior_mean(x, sigma, labels):
        """E[x0 | x_hat] = softmax_n(-||x - x_n||^2 / 2 sigma^2) x_n (Bayes' rule over the data set)."""
        calls.append(1)
        d2 = ((x[:, None, :] - points[None]) ** 2).sum(-1)  # (B, 2)
        w = torch.softmax(-d2 / (2 * sigma.view(-1, 1) ** 2), dim=1)
        return w @ points

    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = heun_sample(posterior_mean, noise, dtype=torch.float64)
    assert len(calls) == 63  # 32 steps, 2nd-order except the last (EDM2: 63 NFE)
    dist = torch.cdist(x, points)  # (200, 2)
    assert dist.min(1).values.max() < 1e-3
    share = (dist.argmin(1) == 0).double().mean().item()
    assert 0.35 < share < 0.65  # both points, about equally often


def test_generate_with_a_model_denoiser():
    tiny = get_preset("tiny")
    unet = dataclasses.replace(tiny.unet, model_channels=16, num_blocks=1, channels_per_head=16)
    den = Denoiser(build_unet(unet), get_preconditioning("edm")).eval()
    x, labels = generate(den, 5, (1, 8, 8), label_dim=10, seed=1, batch=3, num_steps=4)
    assert x.shape == (5, 1, 8, 8) and labels.shape == (5,) and torch.isfinite(x).all()
    x2, labels2 = generate(den, 5, (1, 8, 8), label_dim=10, seed=1, batch=3, num_steps=4)
    assert torch.equal(x, x2) and torch.equal(labels, labels2)
    digits = load("bundled:digits")
    fd = frechet_distance_of(PixelFeatures(2), x, digits.samples)
    assert np.isfinite(fd) and fd > 0
