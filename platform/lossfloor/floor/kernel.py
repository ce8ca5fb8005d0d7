"""The kernel behind the exact and subset estimators: per-query terms for all σ of a grid at once.

For a query y = x_s + σ ε (VE coordinates, source sample x_s) and a reference set {x_r}, the
self-normalised posterior mean is (paper Eq. 9-11)

    μ(y) = (w_src x_s + Σ_r w_r x_r) / (w_src + Σ_r w_r),   w_r = K_σ(y, x_r) = exp(-||y - x_r||² / 2σ²),

where the source term w_src carries the cDOL factor 1/C (C = 1: DOL, no source term: SNIS). With
w̃ the normalised weights, S = Σ_r w̃_r the mass on the references and δ = x_s - μ = Σ_r w̃_r (x_s - x_r),
the kernel returns one of two per-query terms:

- form "paper" (Theorem 1, J* = A - B): ||x_s||² - ||μ||² = 2 x_s·δ - ||δ||², averaged over stratified
  queries it is Â - B̂ (the estimators of Eq. 9-11 exactly as the paper defines them);
- form "posterior-variance": the posterior's own variance Σ_i w̃_i ||x_i - μ||² over the weighted set
  (source included). Its expectation is the same J* (E tr Cov[x0|y]), with 2-30x less query noise,
  used by the exact estimator.

The σ-independent pieces are computed once per batch:

    ||y - x_r||² - σ²||ε||² = Dxx_r + 2σ Dex_r,  Dxx_r = ||x_s - x_r||²,  Dex_r = ε·x_s - ε·x_r,

(the source's own distance is exactly σ²||ε||², so its logit is just -ln C), and nothing cancels at small σ:

    x_s·δ = ½ Σ_r w̃_r (||x_s||² - ||x_r||² + Dxx_r)                          (norms in float64)
    ||δ||² = ||S x_s - Σ_r w̃_r x_r||²  (a (B, D) GEMM per σ, when D <= L), or
           = S Σ_r w̃_r Dxx_r - ½ w̃ᵀ Dref w̃,  Dref_rr' = ||x_r - x_r'||²     (when L < D)
    posterior variance = Σ_r w̃_r Dxx_r - ||δ||²  = (1 - S) Σ_r w̃_r Dxx_r + ½ w̃ᵀ Dref w̃.

Distances through norms (||a||² + ||b||² - 2 a·b) lose every digit in float32 when two samples are
nearly equal in high D; every pair closer than NEAR (relative to the norms) is recomputed directly
from the difference, so near-duplicates cost nothing in accuracy.

Several "levels" (reference prefixes of different sizes, each with its own hidden entry and source
factor) share the pairwise terms: the subset estimators evaluate L, L/2 and L/4 in one pass for their
bias estimate (see `lossfloor.floor.uncertainty`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MATMUL_PRECISIONS = ("fp32", "3xtf32", "tf32")
FORMS = ("paper", "posterior-variance")
NEAR = 1e-2  # pairs with ||a - b||² < NEAR (||a||² + ||b||²) are recomputed from a - b
_RECOMPUTE_CHUNK = 1 << 16  # pairs per direct recomputation step


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32's 10 mantissa bits (round to nearest), still stored as float32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """a @ b with a chosen float32 GEMM precision.

    fp32: plain float32, TF32 explicitly off whatever the global setting. tf32: one TF32 GEMM (fast,
    ~1e-3 relative error: not for weights). 3xtf32: split each operand into a TF32 head and a remainder,
    a = a_h + a_l, and sum a_h b_h + a_h b_l + a_l b_h in TF32 GEMMs: close to float32 accuracy at TF32
    tensor-core speed on CUDA (on a CPU it is just three float32 GEMMs). Other dtypes use their own GEMM.
    """
    if a.dtype != torch.float32 or a.device.type != "cuda":
        if precision == "3xtf32" and a.dtype == torch.float32:
            a_h, b_h = _round_to_tf32(a), _round_to_tf32(b)
            return a_h @ b_h + (a_h @ (b - b_h) + (a - a_h) @ b_h)
        return a @ b
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    try:
        if precision in ("fp32", "tf32"):
            return a @ b
        a_h, b_h = _round_to_tf32(a), _round_to_tf32(b)
        return a_h @ b_h + (a_h @ (b - b_h) + (a - a_h) @ b_h)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def take_rows(x: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x[index] on `device`: gathered where x lives (the device, or host memory), only those rows moved."""
    return x[index.to(x.device)].to(device)


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_i||² per row, summed in float64: (n, D) -> (n,) float64."""
    return (x.double() ** 2).sum(1)


def _recompute_close(D2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_sq, b_sq, extra=None) -> None:
    """In place: entries of D2 (n, m) = ||a_i - b_j||² closer than NEAR, recomputed from a_i - b_j.

    extra: optional (E (n, m), e (n, D)): E_ij = e_i·(a_i - b_j) recomputed for the same pairs.
    """
    close = D2 < NEAR * (a_sq[:, None] + b_sq[None, :]).to(D2.dtype)
    i, j = torch.nonzero(close, as_tuple=True)
    for start in range(0, len(i), _RECOMPUTE_CHUNK):
        ii, jj = i[start:start + _RECOMPUTE_CHUNK], j[start:start + _RECOMPUTE_CHUNK]
        diff = a[ii] - b[jj]  # (P, D)
        D2[ii, jj] = (diff * diff).sum(1)
        if extra is not None:
            E, e = extra
            E[ii, jj] = (e[ii] * diff).sum(1)


def pairwise_terms(xs: torch.Tensor, eps: torch.Tensor, refs: torch.Tensor, precision: str = "fp32"):
    """σ-independent distance terms for a batch of queries against references.

    xs, eps: (B, D) sources and noise; refs: (L, D). Returns Dxx = ||x_s - x_r||², Dex = ε·x_s - ε·x_r
    (each (B, L), xs's dtype, near pairs recomputed directly) and the float64 norms ||x_s||² (B,), ||x_r||² (L,).
    """
    xs_sq, r_sq = sq_norms(xs), sq_norms(refs)
    G = matmul(xs, refs.T, precision)  # (B, L)
    E = matmul(eps, refs.T, precision)  # (B, L)
    Dxx = (xs_sq.to(xs.dtype)[:, None] + r_sq.to(xs.dtype)[None, :] - 2.0 * G).clamp_min_(0.0)
    Dex = (eps * xs).sum(1, keepdim=True) - E
    _recompute_close(Dxx, xs, refs, xs_sq, r_sq, extra=(Dex, eps))
    return Dxx, Dex, xs_sq, r_sq


def reference_distances(refs: torch.Tensor, r_sq: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Dref = ||x_r - x_r'||², (L, L), zero diagonal, near pairs recomputed directly."""
    K = matmul(refs, refs.T, precision)
    Dref = (r_sq.to(refs.dtype)[:, None] + r_sq.to(refs.dtype)[None, :] - 2.0 * K).clamp_min_(0.0)
    _recompute_close(Dref, refs, refs, r_sq, r_sq)
    Dref.fill_diagonal_(0.0)
    return Dref


@dataclass(frozen=True)
class Level:
    """One reference set of a pass: the first `size` references, one hidden entry and a source factor.

    exclude: (B,) long, the reference position hidden from each query (its own source when the source
      is also a reference, so it is not counted twice), or -1 for none; every entry < size.
    source_log_factor: (B,) log of the source term's kernel multiplier: -ln C for DOL/cDOL, 0 for a
      source that is among the references (exact, SNIS: then the source is the hidden entry), -inf for none.
    """

    size: int
    exclude: torch.Tensor
    source_log_factor: torch.Tensor


def optimal_loss_terms(
    xs: torch.Tensor,
    eps: torch.Tensor,
    refs: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    levels: list[Level],
    form: str = "paper",
    use_dref: bool | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Per-query terms (see the module docstring) for every level and σ: (B, n_levels, S), xs's dtype.

    xs, eps: (B, D); refs: (L, D); sigmas: (S,) float64 on any device.
    use_dref: ||δ||² through reference distances (default: when L < D).
    """
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    B, D = xs.shape
    L = refs.shape[0]
    Dxx, Dex, xs_sq, r_sq = pairwise_terms(xs, eps, refs, precision)
    dt = xs.dtype
    use_dref = (L < D) if use_dref is None else use_dref
    Dref = reference_distances(refs, r_sq, precision) if use_dref else None
    # x_s·(x_s - x_r) = ½(||x_s||² - ||x_r||² + Dxx_r): the norm difference in float64 (no cancellation)
    h = (0.5 * ((xs_sq[:, None] - r_sq[None, :]) + Dxx.double())).to(dt) if form == "paper" else None  # (B, L)

    rows = torch.arange(B, device=xs.device)
    out = torch.empty(B, len(levels), len(sigmas), dtype=dt, device=xs.device)
    for i, sigma in enumerate(sigmas.tolist()):
        # logits relative to the source's own distance term, which every logit shares
        logits = (Dxx + (2.0 * sigma) * Dex) * (-0.5 / sigma**2)  # (B, L)
        for li, lvl in enumerate(levels):
            n = lvl.size
            lg = logits[:, :n].clone()
            hide = lvl.exclude >= 0
            lg[rows[hide], lvl.exclude[hide]] = -math.inf
            src = lvl.source_log_factor.to(dt)[:, None]  # (B, 1)
            m = torch.maximum(lg.amax(1, keepdim=True), src)  # (B, 1)
            e = torch.exp(lg - m)
            Z = e.sum(1, keepdim=True) + torch.exp(src - m)
            w = e / Z  # normalised reference weights w̃_r, (B, n)
            S = w.sum(1)  # mass on the references
            wD = (w * Dxx[:, :n]).sum(1)  # Σ w̃ Dxx
            if Dref is not None:
                wDw = (matmul(w, Dref[:n, :n], precision) * w).sum(1)  # w̃ᵀ Dref w̃
                delta_sq = S * wD - 0.5 * wDw
            else:
                delta = S[:, None] * xs - matmul(w, refs[:n], precision)  # (B, D)
                delta_sq = (delta * delta).sum(1)
            if form == "paper":
                out[:, li, i] = 2.0 * (w * h[:, :n]).sum(1) - delta_sq
            elif Dref is not None:
                out[:, li, i] = (1.0 - S) * wD + 0.5 * wDw
            else:
                out[:, li, i] = wD - delta_sq
    return out
