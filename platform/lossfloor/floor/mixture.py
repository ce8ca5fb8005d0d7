"""J* of a Gaussian mixture: the floor of VAE latents as the model sees them (`latents="posterior"`).

EDM2 trains on latents *sampled* from each image's encoder posterior N(m_n, diag s_n²) at every step,
not on the posterior means, so the data distribution is the mixture (1/N) Σ_n N(m_n, diag s_n²). Its
posterior given y = x0 + σε has a closed form per component (per coordinate, a_n = 1/(s_n² + σ²)):

    x0 | y, n  ~  N(μ_n, v_n),   μ_n = m_n + c_n (y - m_n),  c_n = s_n² a_n,  v_n = s_n² σ² a_n
    P(n | y)   ∝  N(y; m_n, s_n² + σ²)  =  exp ℓ_n,   ℓ_n = -½ Σ_d [(y_d - m_nd)² a_nd - ln(a_nd σ²)]

(ℓ_n is shifted by a constant that cancels in the softmax; s_n = 0 gives the finite-set kernel). With
f_n = μ_n - m_s (relative to the query's own component mean) and q_n = Σ_d v_nd + ||f_n||², the
posterior variance of x0 is Σ_n r_n q_n - ||Σ_n r_n f_n||² (r the normalised responsibilities): the
query term of the exact and kNN estimators. The paper's form (Theorem 1, cDOL) is ||x0||² - ||μ̂||²
with ||x0||² replaced by its mean given the component, ||m_s||² + Σ s_s²:
    Σ_d s_sd² - 2 m_s·δ - ||δ||²,  δ = Σ_n r_n f_n.

A query draws its component s (stratified), x0 = m_s + s_s ⊙ z and y = x0 + σε; every term above is
computed from direct differences y - m_n (no cancellation through norms).
"""

from __future__ import annotations

import numpy as np
import torch


def split_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2D) rows of [mean, std] -> means (N, D), stds (N, D)."""
    d = x.shape[1] // 2
    return x[:, :d], x[:, d:]


def second_moments(x: torch.Tensor) -> torch.Tensor:
    """E||x0||² per component, ||m_n||² + Σ_d s_nd², float64 (N,)."""
    m, s = split_rows(x.double())
    return (m * m).sum(1) + (s * s).sum(1)


def total_variance(x: torch.Tensor) -> float:
    """J*(∞) of the mixture: the variance of the means plus the mean within-component variance."""
    m, s = split_rows(x.double())
    return float((m - m.mean(0)).pow(2).sum(1).mean() + (s * s).sum(1).mean())


def component_terms(y: torch.Tensor, ref: torch.Tensor, m: torch.Tensor, s: torch.Tensor, sigma: float):
    """ℓ (B, n), f (B, n, D), q (B, n) of components (m, s) for queries y (B, D), relative to ref (B, D).

    m, s: (n, D) shared by the batch, or (B, n, D) per query.
    """
    if m.dim() == 2:
        m, s = m[None], s[None]
    var = s * s  # (·, n, D)
    a = 1.0 / (var + sigma**2)
    d = y[:, None, :] - m  # (B, n, D): direct differences
    logit = -0.5 * ((d * d) * a - torch.log(a * sigma**2)).sum(-1)
    f = (m - ref[:, None, :]) + (var * a) * d
    q = (var * (sigma**2 * a)).sum(-1) + (f * f).sum(-1)
    return logit, f, q


def mixture_totals(x: torch.Tensor, sigma: float) -> dict:
    """Sums over all N components needed for Σ_n f_n and Σ_n q_n of any query (float64, (D,) and scalar):
    μ_n = m_n(1 - c_n) + c_n y, so Σ_n f_n = P1 + P2 ⊙ y - N m_s and
    Σ_n q_n = V + Σ_d [P3 + 2 y P4 + y² P5 - 2 m_s (P1 + P2 y) + N m_s²]."""
    m, s = split_rows(x.double())
    var = s * s
    c = var / (var + sigma**2)
    b = m * (1.0 - c)
    return {"P1": b.sum(0), "P2": c.sum(0), "P3": (b * b).sum(0), "P4": (b * c).sum(0), "P5": (c * c).sum(0),
            "V": float((var * (1.0 - c)).sum()), "N": float(len(x))}


def total_f_q(tot: dict, y: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_n f_n (B, D), Σ_n q_n (B,)) over all components for queries y relative to ref, float64."""
    y, ref = y.double(), ref.double()
    lin = tot["P1"] + tot["P2"] * y
    sum_f = lin - tot["N"] * ref
    sum_q = tot["V"] + (tot["P3"] + 2 * y * tot["P4"] + y * y * tot["P5"] - 2 * ref * lin + tot["N"] * ref * ref).sum(1)
    return sum_f, sum_q


def query_noise(eps2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A query's (B, 2D) standard normal draws -> (z, ε): x0 = m_s + s_s z, y = x0 + σε."""
    d = eps2.shape[1] // 2
    return eps2[:, :d], eps2[:, d:]


def mixture_terms(x: torch.Tensor, src: torch.Tensor, eps2: torch.Tensor, sigmas, refs: torch.Tensor | None,
                  levels, form: str) -> torch.Tensor:
    """Per-query terms (B, n_levels, S) of the exact (refs None: all components) or subset estimators.

    levels: `kernel.Level`s over the positions of `refs` (exclude, source_log_factor as in the kernel).
    form: "posterior-variance" or "paper" (see the module docstring).
    """
    means, stds = split_rows(x)
    ms, ss = means[src], stds[src]  # (B, D)
    z, e = query_noise(eps2)
    x0 = ms + ss * z
    m_r, s_r = (means, stds) if refs is None else (means[refs], stds[refs])
    rows = torch.arange(len(src), device=x.device)
    out = torch.empty(len(src), len(levels), len(sigmas), dtype=torch.float64, device=x.device)
    for i, sigma in enumerate(np.asarray(sigmas, dtype=np.float64).tolist()):
        y = x0 + sigma * e
        lg, f, q = component_terms(y, ms, m_r, s_r, sigma)  # (B, L), (B, L, D), (B, L)
        lg_s, f_s, q_s = component_terms(y, ms, ms[:, None], ss[:, None], sigma)  # the source's own term
        for li, lvl in enumerate(levels):
            n = lvl.size
            l_ref = lg[:, :n].clone()
            hide = lvl.exclude >= 0
            l_ref[rows[hide], lvl.exclude[hide]] = -torch.inf
            l_src = lg_s[:, 0].double() + lvl.source_log_factor
            mx = torch.maximum(l_ref.double().amax(1), l_src)[:, None]
            w = torch.exp(l_ref.double() - mx)  # (B, n)
            w_s = torch.exp(l_src[:, None] - mx)[:, 0]
            Z = w.sum(1) + w_s
            delta = (torch.bmm(w[:, None, :].to(f.dtype), f[:, :n])[:, 0].double() + w_s[:, None] * f_s[:, 0].double())
            delta = delta / Z[:, None]
            dd = (delta * delta).sum(1)
            if form == "paper":
                out[:, li, i] = (ss.double() ** 2).sum(1) - 2 * (ms.double() * delta).sum(1) - dd
            else:
                Q = ((w * q[:, :n].double()).sum(1) + w_s * q_s[:, 0].double()) / Z
                out[:, li, i] = Q - dd
    return out
