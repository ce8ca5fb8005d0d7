"""EDM's deterministic Heun sampler (EDM paper Algorithm 1 with Eq. 5 steps; edm2.md §6), guidance-free.

It integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma in VE coordinates, so it
serves every parametrisation alike (EDM, flow matching, NCSN, DDPM-eps, VP-v): `lossfloor.train.losses.Denoiser`
turns the network's output into D(x_hat; sigma) = c_skip x_hat + c_out F(c_in x_hat; c_noise) through the
run's preconditioning table, whatever its process and target.
Defaults as EDM2: 32 steps (63 evaluations), sigma in [0.002, 80], rho = 7.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lossfloor.errors import InputError


def edm_sigma_steps(num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """(num_steps + 1,) noise levels t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,
    i < N, followed by t_N = 0 (EDM paper Eq. 5)."""
    if not (isinstance(num_steps, int) and num_steps >= 2):
        raise InputError(f"num_steps: expected an integer >= 2, like 32, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise InputError(f"sigma_min: expected 0 < sigma_min < sigma_max, like 0.002 and 80, got {sigma_min}, {sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(dtype=dtype, device=device)


@torch.no_grad()
def heun_sample(denoiser: Callable, noise: torch.Tensor, *, labels: torch.Tensor | None = None,
                num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic EDM Heun sampling (EDM paper Algorithm 1).

    denoiser(x, sigma, labels) -> D, with x (B, ...) and sigma (B,); noise: (B, ...) standard normal.
    x_0 = t_0 eps; per step d = (x - D(x; t_i)) / t_i, Euler x' = x + (t_{i+1} - t_i) d, and where
    t_{i+1} > 0 the trapezoidal correction with d' at (x', t_{i+1}). Returns x at sigma = 0 in `dtype`.
    """
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x = noise.to(dtype) * t_steps[0]
    n = x.shape[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        d_cur = (x - denoiser(x, t_cur.expand(n), labels).to(dtype)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur  # Euler step
        if i < num_steps - 1:  # 2nd-order correction except into sigma = 0
            d_next = (x_next - denoiser(x_next, t_next.expand(n), labels).to(dtype)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def sample_inputs(seed: int, start: int, stop: int, sample_shape: tuple[int, ...], *,
                  class_probs=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The noise (m, *sample_shape) and class labels (m,) or None of samples start..stop-1.

    Sample i's noise and label come from its own generator, seeded by (seed, i), so they do not depend
    on the batching, the device or the number of workers. Its label is the inverse CDF of class_probs
    (K,) at a uniform u from the same generator: class k with probability class_probs[k].
    """
    cdf = None if class_probs is None else torch.cumsum(torch.as_tensor(class_probs, dtype=torch.float64), 0)
    noise, labels = [], []
    for i in range(start, stop):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 7, i]).generate_state(1)[0]))
        noise.append(torch.randn(sample_shape, generator=g))
        if cdf is not None:
            u = torch.rand((), generator=g, dtype=torch.float64) * cdf[-1]
            labels.append(torch.searchsorted(cdf, u, right=True).clamp(max=len(cdf) - 1))
    return torch.stack(noise), (torch.stack(labels).to(torch.int64) if cdf is not None else None)


def guided(denoiser: Callable, guide: Callable, scale: float, *, guide_labels: bool = True) -> Callable:
    """EDM2's guidance: D = D_guide + scale (D - D_guide) (a lerp from the guide to the main model).

    With an unconditional guide (guide_labels False: called without labels) it is classifier-free
    guidance; with a smaller or less-trained conditional model, autoguidance. scale = 1 is the main model
    alone (the guide is not evaluated), exactly.
    """
    if scale == 1:
        return denoiser

    def call(x, sigma, labels=None):
        D = denoiser(x, sigma, labels).to(torch.float32)
        G = guide(x, sigma, labels if guide_labels else None).to(torch.float32)
        return G + scale * (D - G)
    return call


@torch.no_grad()
def generate(denoiser: Callable, n: int, sample_shape: tuple[int, ...], *, label_dim: int = 0,
             class_probs=None, seed: int = 0, batch: int = 256, device="cpu", start: int = 0,
             **sampler) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples start..start+n-1 (n, *sample_shape) fp32 on the CPU, and their class labels (n,) or None.

    Noise and labels from (seed, sample index) (`sample_inputs`): the output does not depend on `batch`.
    Labels follow class_probs (K,) when given, else are uniform over label_dim classes (label_dim > 0).
    """
    if class_probs is None and label_dim:
        class_probs = np.full(label_dim, 1.0 / label_dim)
    outs, labels_out = [], []
    for lo in range(start, start + n, batch):
        hi = min(lo + batch, start + n)
        noise, labels = sample_inputs(seed, lo, hi, sample_shape, class_probs=class_probs)
        x = heun_sample(denoiser, noise.to(device), labels=None if labels is None else labels.to(device), **sampler)
        outs.append(x.to("cpu", torch.float32))
        if labels is not None:
            labels_out.append(labels)
    return torch.cat(outs), (torch.cat(labels_out) if labels_out else None)
