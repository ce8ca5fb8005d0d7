"""A naive reference for the kernel: per σ, form the queries, two GEMMs and a softmax (paper Eq. 9-11).

Used only by tests (an independent route to the same numbers) and benchmarks (the baseline to beat,
and the exact paper-form J* on given queries).
It builds y = x_s + σ ε explicitly, computes ||y - x_r||² through one GEMM, adds the source term with its
exact distance, and forms μ = Σ w x with a second GEMM: 2 GEMMs of B·L·D per σ.
"""

from __future__ import annotations

import numpy as np
import torch


def naive_optimal_loss_terms(
    xs: torch.Tensor,
    eps: torch.Tensor,
    refs: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    exclude: torch.Tensor,
    source_log_factor: torch.Tensor,
    form: str = "paper",
) -> torch.Tensor:
    """One level of `kernel.optimal_loss_terms`, shape (B, S): ||x_s||² - ||μ_σ||² (form "paper") or
    the posterior variance Σ_i w_i ||x_i||² - ||μ_σ||² (form "posterior-variance")."""
    B, _ = xs.shape
    L = refs.shape[0]
    hidden = torch.zeros(B, L, dtype=torch.bool, device=xs.device)
    rows = torch.nonzero(exclude >= 0).squeeze(1)
    hidden[rows, exclude[rows]] = True
    r_sq = (refs * refs).sum(1)[None, :]
    xs_sq = (xs * xs).sum(1)
    out = torch.empty(B, len(sigmas), dtype=xs.dtype, device=xs.device)
    for i, sigma in enumerate(sigmas.tolist()):
        y = xs + sigma * eps  # (B, D)
        d2 = (y * y).sum(1, keepdim=True) + r_sq - 2.0 * (y @ refs.T)  # (B, L)
        logits = torch.cat(
            [(-d2 / (2 * sigma**2)).masked_fill(hidden, -torch.inf),
             (-(sigma * eps).pow(2).sum(1) / (2 * sigma**2) + source_log_factor.to(xs.dtype))[:, None]],
            dim=1,
        )  # (B, L + 1): the references, then the source
        w = torch.softmax(logits, dim=1)
        mu = w[:, :L] @ refs + w[:, L:] * xs  # (B, D)
        if form == "paper":
            out[:, i] = xs_sq - (mu * mu).sum(1)
        else:
            out[:, i] = (w[:, :L] * r_sq).sum(1) + w[:, L] * xs_sq - (mu * mu).sum(1)
    return out


def paper_exact_same_queries(x, sigmas, cfg) -> np.ndarray:
    """The exact estimator in the paper's form, ||x_s||² - ||μ||² (Theorem 1), averaged over the queries a
    resolved config draws (the same sources and noise as its batches): the reference for cDOL's subset
    error, query noise excluded (the exact estimator itself reports the posterior-variance form)."""
    from lossfloor.floor.batch import prepare_data, query_noise, query_plan
    from lossfloor.floor.kernel import Level, optimal_loss_terms

    xt = prepare_data(x, cfg)
    plan = query_plan(cfg, len(xt))
    sig = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    total = np.zeros(len(sig))
    for b in range(plan.n_batches):
        src = plan.sources(b)
        eps = query_noise(cfg, plan, b, xt.shape[1], "cpu").to(xt.dtype)
        lvl = Level(len(xt), src, torch.zeros(len(src), dtype=torch.float64))
        j = optimal_loss_terms(xt[src], eps, xt, sig, levels=[lvl], form="paper", precision=cfg.matmul_precision)
        total += j[:, 0].double().sum(0).numpy()
    return total / plan.n_queries
