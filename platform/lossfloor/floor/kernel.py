"""The one kernel behind every estimator: per-query optimal-loss terms for all σ of a grid at once.

For a query y = x_s + σ ε (VE coordinates, source sample x_s) and a reference set {x_r}, the
self-normalised posterior mean is (paper Eq. 9-11)

    μ(y) = (w_src x_s + Σ_r w_r x_r) / (w_src + Σ_r w_r),   w_r = K_σ(y, x_r) = exp(-||y - x_r||² / 2σ²),

where the source term w_src carries the cDOL factor 1/C (C = 1: DOL, no source term: SNIS). Per query
the kernel returns the paper's optimal-loss term ||x_s||² - ||μ||² (Theorem 1: J* = A - B with
A = E||x0||², B = E||E[x0|y]||²); averaged over stratified queries it is Â - B̂.

The σ-independent pieces are computed once per batch with two GEMMs (plus norms):

    ||y - x_r||² - σ²||ε||² = Dxx_r + 2σ Dex_r,  Dxx_r = ||x_s - x_r||²,  Dex_r = ε·x_s - ε·x_r,

and the source's own distance is exactly σ²||ε||² (it cancels: its logit is just -ln C). With
S = Σ_r w_r / Z the mass on the references and δ = x_s - μ = S x_s - Σ_r (w_r/Z) x_r,

    ||x_s||² - ||μ||² = 2 x_s·δ - ||δ||²,   x_s·δ = S||x_s||² - Σ_r w̃_r G_sr,

so every term scales with S and nothing cancels catastrophically at small σ (never 1 - w_src).
||δ||² comes either directly (δ as a (B, D) GEMM per σ, cheaper when D ≤ L) or from the reference Gram
matrix K = R Rᵀ: ||δ||² = S²||x_s||² - 2S w̃·G_s + w̃ᵀ K w̃ (cheaper when L < D).
"""

from __future__ import annotations

import math

import torch

MATMUL_PRECISIONS = ("fp32", "3xtf32", "tf32")


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32's 10 mantissa bits (round to nearest), still stored as float32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """a @ b with a chosen float32 GEMM precision.

    fp32: plain float32 (TF32 off). tf32: one TF32 GEMM (fast, ~1e-3 relative error: not for weights).
    3xtf32: split each operand into a TF32 head and a remainder, a = a_h + a_l, and sum
    a_h b_h + a_h b_l + a_l b_h in TF32 GEMMs: close to float32 accuracy at TF32 tensor-core speed on
    CUDA (on a CPU it is just three float32 GEMMs). Other dtypes always use their own GEMM.
    """
    if precision == "fp32" or a.dtype != torch.float32 or a.device.type != "cuda":
        if precision == "3xtf32" and a.dtype == torch.float32:
            a_h, b_h = _round_to_tf32(a), _round_to_tf32(b)
            return a_h @ b_h + (a_h @ (b - b_h) + (a - a_h) @ b_h)
        return a @ b
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        if precision == "tf32":
            return a @ b
        a_h, b_h = _round_to_tf32(a), _round_to_tf32(b)
        return a_h @ b_h + (a_h @ (b - b_h) + (a - a_h) @ b_h)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def pairwise_terms(xs: torch.Tensor, eps: torch.Tensor, refs: torch.Tensor, precision: str = "fp32"):
    """σ-independent distance terms for a batch of queries against references.

    xs, eps: (B, D) sources and noise; refs: (L, D). Returns G = xs refsᵀ, Dxx = ||x_s - x_r||²,
    Dex = ε·x_s - ε·x_r, each (B, L).
    """
    G = matmul(xs, refs.T, precision)  # (B, L)
    E = matmul(eps, refs.T, precision)  # (B, L)
    xs_sq = (xs * xs).sum(1, keepdim=True)  # (B, 1)
    r_sq = (refs * refs).sum(1)[None, :]  # (1, L)
    Dxx = (xs_sq + r_sq - 2.0 * G).clamp_min_(0.0)
    Dex = (eps * xs).sum(1, keepdim=True) - E
    return G, Dxx, Dex


def optimal_loss_terms(
    xs: torch.Tensor,
    eps: torch.Tensor,
    refs: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    exclude: torch.Tensor,
    source_log_factor: torch.Tensor,
    gram: bool | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Per-query ||x_s||² - ||μ_σ(y)||² for every σ (paper Eq. 9-11), shape (B, S), in xs's dtype.

    xs, eps: (B, D); refs: (L, D); sigmas: (S,) float64 on any device.
    exclude: (B,) long, the reference position hidden from each query (its own source when the source
      is also a reference, so it is not counted twice), or -1 for none.
    source_log_factor: (B,) log of the source term's kernel multiplier: -ln C for DOL/cDOL, 0 for a
      source that is a reference (exact, SNIS), -inf for no source term.
    gram: use the reference Gram matrix for ||δ||² (default: when L < D).
    precision: float32 GEMM precision, see `matmul`.
    """
    B, D = xs.shape
    L = refs.shape[0]
    G, Dxx, Dex = pairwise_terms(xs, eps, refs, precision)
    hidden = torch.zeros(B, L, dtype=torch.bool, device=xs.device)
    has_exclude = exclude >= 0
    rows = torch.nonzero(has_exclude).squeeze(1)
    hidden[rows, exclude[rows]] = True
    Dxx.masked_fill_(hidden, math.inf)
    Dex.masked_fill_(hidden, 0.0)

    use_gram = (L < D) if gram is None else gram
    K = matmul(refs, refs.T, precision) if use_gram else None  # (L, L)
    xs_sq = (xs * xs).sum(1)  # (B,)
    src = source_log_factor.to(xs.dtype)[:, None]  # (B, 1)

    out = torch.empty(B, len(sigmas), dtype=xs.dtype, device=xs.device)
    for i, sigma in enumerate(sigmas.tolist()):
        # logits relative to the source's own distance term, which every logit shares
        logits = (Dxx + (2.0 * sigma) * Dex) * (-0.5 / sigma**2)  # (B, L)
        m = torch.maximum(logits.amax(1, keepdim=True), src)  # (B, 1)
        e = torch.exp(logits - m)
        e_src = torch.exp(src - m)
        Z = e.sum(1, keepdim=True) + e_src
        w = e / Z  # normalised reference weights w̃_r
        S = e.sum(1) / Z[:, 0]  # mass on the references
        wG = (w * G).sum(1)
        xs_delta = S * xs_sq - wG
        if use_gram:
            delta_sq = S * S * xs_sq - 2.0 * S * wG + (matmul(w, K, precision) * w).sum(1)
        else:
            delta = S[:, None] * xs - matmul(w, refs, precision)  # (B, D)
            delta_sq = (delta * delta).sum(1)
        out[:, i] = 2.0 * xs_delta - delta_sq
    return out
