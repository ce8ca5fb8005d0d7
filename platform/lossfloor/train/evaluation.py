"""Per-sigma evaluation on a fixed grid with common random numbers (paper §3 diagnostics, §5 curves).

At every evaluation the same data (a fixed subset), the same sigmas and the same noise are used, so
differences between checkpoints are differences between models, not between draws. For grid point
k the noise is drawn from a CPU generator seeded by (seed, k); sample i of the subset always gets row
i of it, whatever the batch size, device or number of ranks.

Reported per sigma_k: J_k = mean over the subset of ||D - x0||^2 (x0 units), J*_k and its 95 % interval
(if a J* table is given) and the gap J_k - J*_k. Totals: the schedule's weighted loss sum_k pi_k w(sigma_k) J_k, with
pi_k ∝ rho(sigma_k) dlnsigma_k, rho the schedule's reference density of ln sigma (EDM2/FM: the log-normal
it samples from; optimal-loss: uniform over its range) and dlnsigma_k the trapezoid widths of the grid in
ln sigma; the same sum of w J*_k (and of the interval's ends) as the total's J*, and of w (J_k - J*_k) as
the total gap. With EDM2's learned log-variance u(sigma) (the uncertainty head), also the total under the
learned weighting, sum_k pi_k w(sigma_k) e^{-u(sigma_k)} J_k (`total_learned`: the weighting EDM2's loss
applies to the x0 loss), beside the schedule's; J_k itself is always the plain x0 loss, the quantity J* bounds.

With the model's preconditioning (`to_native`, e.g. `Preconditioning.x0_to_native_loss`) each sigma's loss
and J* are also given in the network's own units, ||F - native target||^2 = J_k / c_out(sigma_k)^2 (paper
Eq. 12): an NCSN or DDPM model's eps loss, a VP-v model's v loss, as its own training reports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lossfloor.train.losses import learned_weight, x0_loss

EVAL_STREAM = 3  # seed stream of the evaluation noise


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """One evaluation: per-sigma arrays (K,) float64 and the weighted totals."""

    sigma: np.ndarray
    loss: np.ndarray  # J_sigma, x0 units
    j_star: np.ndarray | None  # J*_sigma, x0 units
    j_star_ci: tuple[np.ndarray, np.ndarray] | None  # its 95 % interval (low, high), x0 units
    gap: np.ndarray | None  # J_sigma - J*_sigma
    weight: np.ndarray  # w(sigma_k)
    quadrature: np.ndarray  # pi_k, sums to 1
    total: float  # sum_k pi_k w_k J_k
    total_gap: float | None  # sum_k pi_k w_k (J_k - J*_k)
    stderr: np.ndarray | None = None  # standard error of J_sigma over the subset's samples, x0 units
    log_var: np.ndarray | None = None  # u(sigma_k) of the model's uncertainty head, None without one
    loss_native: np.ndarray | None = None  # J_sigma in the network's own units (J / c_out^2); None without to_native
    j_star_native: np.ndarray | None = None  # J*_sigma in the same units; None without to_native or J*

    @property
    def coefficients(self) -> np.ndarray:
        """c_k = pi_k w_k: the total of any per-sigma quantity q is sum_k c_k q_k."""
        return self.quadrature * self.weight

    @property
    def learned_coefficients(self) -> np.ndarray | None:
        """pi_k w_k e^{-u_k}: the coefficients of the total under EDM2's learned weighting (None without u)."""
        if self.log_var is None:
            return None
        return self.quadrature * learned_weight(torch.as_tensor(self.weight), torch.as_tensor(self.log_var)).numpy()

    @property
    def total_learned(self) -> float | None:
        """sum_k pi_k w_k e^{-u_k} J_k, the total under the learned weighting (None without u)."""
        c = self.learned_coefficients
        return None if c is None else float(np.sum(c * self.loss))

    def rows(self) -> list[dict]:
        """One dict per sigma plus one with sigma None for the totals: sigma, loss, gap, j_star and its
        interval (j_star_ci_low, j_star_ci_high), the total row's the weighted sums; log_var (u(sigma) per
        sigma) and total_learned (the total row's) where the model has an uncertainty head, else None;
        loss_native and j_star_native per sigma (the network's own units; None on the total row)."""
        def at(values, k):
            return None if values is None else float(values[k])

        lo, hi = self.j_star_ci if self.j_star_ci is not None else (None, None)
        out = [
            {"sigma": float(s), "loss": float(self.loss[k]), "gap": at(self.gap, k), "j_star": at(self.j_star, k),
             "j_star_ci_low": at(lo, k), "j_star_ci_high": at(hi, k), "log_var": at(self.log_var, k),
             "total_learned": None, "loss_native": at(self.loss_native, k), "j_star_native": at(self.j_star_native, k)}
            for k, s in enumerate(self.sigma)
        ]
        c = self.coefficients

        def total(values):
            return None if values is None else float(np.sum(c * values))

        out.append({"sigma": None, "loss": self.total, "gap": self.total_gap, "j_star": total(self.j_star),
                    "j_star_ci_low": total(lo), "j_star_ci_high": total(hi), "log_var": None,
                    "total_learned": self.total_learned, "loss_native": None, "j_star_native": None})
        return out


def quadrature_weights(sigmas, density: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """pi_k ∝ rho(sigma_k) x trapezoid width of sigma_k in ln sigma, normalised to 1 (uniform if all zero)."""
    s = np.asarray(sigmas, dtype=np.float64)
    x = np.log(s)
    if len(s) == 1:
        return np.ones(1)
    widths = np.zeros_like(x)
    widths[1:] += np.diff(x) / 2
    widths[:-1] += np.diff(x) / 2
    rho = density(torch.as_tensor(s)).numpy()
    q = rho * widths
    return q / q.sum() if q.sum() > 0 else np.full(len(s), 1 / len(s))


def eval_noise(seed: int, k: int, n: int, sample_shape) -> torch.Tensor:
    """(n, *sample_shape) fixed noise of grid point k: CPU generator seeded by (seed, EVAL_STREAM, k)."""
    state = np.random.SeedSequence([int(seed), EVAL_STREAM, int(k)]).generate_state(2, np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn((n, *sample_shape), generator=g)


@torch.no_grad()
def batch_sums(denoiser: Callable, x0: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor, sigma: float,
               *, batch: int, device) -> torch.Tensor:
    """(ceil(n / batch), 2) float64: per forward batch of `batch` rows of x0 (n, ...), the sums of
    l = ||D(x0 + sigma eps; sigma) - x0||^2 and of l^2 (`evaluate` adds them up in order)."""
    out = torch.zeros(-(-len(x0) // batch), 2, dtype=torch.float64, device=device)
    for j, start in enumerate(range(0, len(x0), batch)):
        x = x0[start : start + batch].to(device, torch.float32)
        eps = noise[start : start + batch].to(device)
        s = torch.full((len(x),), sigma, dtype=torch.float32, device=device)
        lab = None if labels is None else labels[start : start + batch].to(device)
        D = denoiser(x + s.view(-1, *[1] * (x.ndim - 1)) * eps, s, lab)  # (b,) -> (b, 1, ..., 1)
        lx0 = x0_loss(D.to(torch.float32), x).to(torch.float64)
        out[j, 0] = lx0.sum()
        out[j, 1] = lx0.square().sum()
    return out


def mean_stderr(sums: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean of l, its standard error), each (K,), from the (2, K) sums of l and l^2 over n samples."""
    loss, mean_sq = sums.cpu().numpy() / n
    return loss, np.sqrt(np.maximum(mean_sq - loss**2, 0.0) / max(n - 1, 1))  # sample std / sqrt(n)


@torch.no_grad()
def evaluate(denoiser: Callable, x0: torch.Tensor, labels: torch.Tensor | None, sigmas, *, seed: int,
             weight: Callable[[torch.Tensor], torch.Tensor],
             reference_density: Callable[[torch.Tensor], torch.Tensor],
             j_star=None, batch: int = 256,
             rank: int = 0, world_size: int = 1, device="cpu",
             progress: Callable[[int], None] | None = None, grid_index=None,
             log_var: Callable[[torch.Tensor], torch.Tensor] | None = None,
             to_native: Callable | None = None) -> EvalResult:
    """Evaluate denoiser(x_hat, sigma, labels) on the fixed subset x0 (N, C, H, W) at each sigma.

    j_star: a J* table in x0 units (`lossfloor.floor.table.JStarX0`), read at the sigmas with its interval
    by `JStarX0.at(..., outside="error")`: a sigma beyond its grid is refused, never held flat (the gap
    is a reported number); or None.
    With world_size > 1 each rank evaluates samples rank, rank + world_size, ... and the per-sigma sums
    are all-reduced, so every rank returns the same result.
    progress: called with k after grid point k is done.
    grid_index: the noise of sigmas[k] is that of grid point grid_index[k] (default k): a part of a grid
    evaluated on its own draws the noise the whole grid would.
    log_var: sigma (K,) -> u(sigma) (K,), the model's uncertainty head (`Denoiser.log_var`); with it the
    result also holds u and the total under the learned weighting.
    to_native: (loss in x0 units (K,), sigma (K,)) -> the loss in the network's own units (module docstring).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    n = x0.shape[0]
    mine = torch.arange(rank, n, world_size)
    sums = torch.zeros(2, len(sigmas), dtype=torch.float64, device=device)  # sum of l, sum of l^2
    for k, s in enumerate(sigmas):
        point = k if grid_index is None else int(grid_index[k])
        noise = eval_noise(seed, point, n, x0.shape[1:])[mine]  # the rows of this rank's samples
        lab = None if labels is None else labels[mine]
        for part in batch_sums(denoiser, x0[mine], lab, noise, float(s), batch=batch, device=device):
            sums[:, k] += part  # batch by batch, in order
        if progress is not None:
            progress(k)
    if world_size > 1:
        dist.all_reduce(sums)
    loss, stderr = mean_stderr(sums, n)
    sig_t = torch.as_tensor(sigmas)
    w = weight(sig_t).to(torch.float64).numpy()
    pi = quadrature_weights(sigmas, reference_density)
    js, ci = None, None
    if j_star is not None:
        js, lo, hi = j_star.at(sigmas, outside="error")  # (K,) float64 each
        ci = (lo, hi)
    gap = None if js is None else loss - js
    u = None
    if log_var is not None:
        u = log_var(torch.as_tensor(sigmas, dtype=torch.float32, device=device)).to("cpu", torch.float64).numpy()
    native = None if to_native is None else np.asarray(to_native(loss, sigmas), dtype=np.float64)
    js_native = None if to_native is None or js is None else np.asarray(to_native(js, sigmas), dtype=np.float64)
    return EvalResult(
        sigma=sigmas, loss=loss, j_star=js, j_star_ci=ci, gap=gap, weight=w, quadrature=pi,
        total=float(np.sum(pi * w * loss)), total_gap=None if gap is None else float(np.sum(pi * w * gap)),
        stderr=stderr, log_var=u, loss_native=native, j_star_native=js_native,
    )
