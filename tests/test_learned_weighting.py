"""EDM2's learned (uncertainty) weighting: the head's fixed point and the total under it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lossfloor.diffusion import get_preconditioning
from lossfloor.models import build_uncertainty_head, get_preset
from lossfloor.train.evaluation import evaluate
from lossfloor.train.losses import Denoiser, training_loss

pytestmark = pytest.mark.usefixtures("one_thread")


class _Zero(torch.nn.Module):
    """F = 0, so D = c_skip x_hat: a fixed denoiser whose x0 loss is written out below."""

    def forward(self, x, c_noise, labels=None):
        return torch.zeros_like(x)


def test_head_learns_the_fixed_point():
    """For a fixed x0 loss l (mean J over d elements), E[w e^-u l + d u] is smallest at u = ln(w J / d):
    the uncertainty head of the tiny preset, trained on EDM2's loss (`training_loss`) beside a fixed
    denoiser, reaches it at every sigma."""
    head = build_uncertainty_head(get_preset("tiny"), seed=0)
    den = Denoiser(_Zero(), get_preconditioning("edm", sigma_data=0.5), head)
    g = torch.Generator().manual_seed(0)
    sigmas = torch.tensor([0.1, 0.5, 2.0])
    n = 32
    x0 = 0.5 * torch.randn(len(sigmas) * n, 1, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sigma = sigmas.repeat_interleave(n)
    weight = torch.tensor([3.0, 0.2, 1.5]).repeat_interleave(n)  # any w: the fixed point moves with it
    # the x0 loss of D = c_skip x_hat, written out: c_skip = sd^2 / (sigma^2 + sd^2)
    c_skip = (0.25 / (sigma**2 + 0.25)).view(-1, 1, 1, 1)
    lx0_hand = (c_skip * (x0 + sigma.view(-1, 1, 1, 1) * noise) - x0).square().flatten(1).sum(1)
    d = x0[0].numel()
    target = torch.log(weight.view(3, n)[:, 0] * lx0_hand.view(3, n).mean(1) / d)

    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    head.train()
    for step in range(300):
        if step == 200:
            opt.param_groups[0]["lr"] = 0.005
        opt.zero_grad()
        L, lx0, u = training_loss(den, x0, sigma, noise, None, weight, uncertainty=True)
        L.mean().backward()
        opt.step()
    assert torch.allclose(lx0, lx0_hand, rtol=1e-5)
    head.eval()
    with torch.no_grad():
        u = den.log_var(sigmas)
    assert (u - target).abs().max() < 0.01, (u, target)


def test_learned_total_by_hand():
    """total_learned = sum_k pi_k w_k e^{-u_k} J_k, with pi_k the trapezoid widths in ln sigma times the
    reference density, normalised; here D = 0, so J_k = mean ||x0||^2 at every sigma."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(10, 1, 2, 2, generator=g)
    sigmas = np.array([0.1, 0.4, 1.0, 5.0])
    res = evaluate(lambda x, s, lab: torch.zeros_like(x), x0, None, sigmas, seed=0,
                   weight=lambda s: 1 + s, reference_density=lambda s: torch.exp(-s),
                   log_var=lambda s: torch.log(s) + 0.5)
    J = float(x0.square().flatten(1).sum(1).double().mean())
    x = np.log(sigmas)
    widths = np.array([x[1] - x[0], x[2] - x[0], x[3] - x[1], x[3] - x[2]]) / 2
    pi = np.exp(-sigmas) * widths
    pi /= pi.sum()
    want = sum(pi[k] * (1 + sigmas[k]) * math.exp(-(math.log(sigmas[k]) + 0.5)) * J for k in range(4))
    assert math.isclose(res.total_learned, want, rel_tol=1e-6)
    assert math.isclose(res.total, sum(pi[k] * (1 + sigmas[k]) * J for k in range(4)), rel_tol=1e-6)
    rows = res.rows()
    assert [r["log_var"] for r in rows[:-1]] == pytest.approx((np.log(sigmas) + 0.5).tolist(), rel=1e-6)
    assert rows[-1]["total_learned"] == res.total_learned and rows[-1]["log_var"] is None
    plain = evaluate(lambda x, s, lab: torch.zeros_like(x), x0, None, sigmas, seed=0, weight=lambda s: 1 + s,
                     reference_density=lambda s: torch.exp(-s))
    assert plain.total_learned is None and plain.rows()[-1]["total_learned"] is None
    assert plain.total == res.total

