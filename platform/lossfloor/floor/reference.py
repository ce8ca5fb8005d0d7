"""A naive reference for the kernel: per σ, form the queries, two GEMMs and a softmax (paper Eq. 9-11).

Used only by tests (an independent route to the same numbers) and benchmarks (the baseline to beat).
It builds y = x_s + σ ε explicitly, computes ||y - x_r||² through one GEMM, adds the source term with its
exact distance, and forms μ = Σ w x with a second GEMM: 2 GEMMs of B·L·D per σ.
"""

from __future__ import annotations

import torch


def naive_optimal_loss_terms(
    xs: torch.Tensor,
    eps: torch.Tensor,
    refs: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    exclude: torch.Tensor,
    source_log_factor: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `kernel.optimal_loss_terms`: per-query ||x_s||² - ||μ_σ||², shape (B, S)."""
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
        out[:, i] = xs_sq - (mu * mu).sum(1)
    return out
