"""Magnitude-preserving building blocks of the EDM2 U-Net (edm2.md §2; Karras et al. 2024, §3).

Each op keeps unit-variance inputs at unit variance, so activations, weights and updates stay at a
known scale without biases or normalisation layers. All are pure functions of tensors except
`MPFourier` (two fixed buffers) and `MPConv` (one weight, forced weight normalisation).

Notation (edm2.md §2): N(x) = x / (1e-4 + rms(x)) over the given dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-4  # the epsilon of N(x) (edm2.md §2, notation)
SILU_STD = 0.596  # std of silu(x) for x ~ N(0, 1): mp_silu divides by it (edm2.md §2)


def normalize(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = EPS) -> torch.Tensor:
    """N(x) = x / (eps + rms(x)), rms over `dim` (default: every dim but the first, i.e. per filter).

    The norm is taken in fp32 and cast back to x's dtype (edm2.md §2, MPConv: normalise in fp32).
    """
    if dim is None:
        dim = tuple(range(1, x.ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = 1
    for d in dims:  # a plain loop: torch.compile traces it (math.prod over a generator breaks the graph)
        n *= x.shape[d]
    rms = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32) / math.sqrt(n)
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """mp_silu(x) = silu(x) / 0.596 (edm2.md §2)."""
    return F.silu(x) / SILU_STD


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """mp_sum(a, b, t) = ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (edm2.md §2)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, dim: int = 1) -> torch.Tensor:
    """mp_cat(a, b, t): concatenate along `dim`, a scaled by C (1 - t) / sqrt(Na), b by C t / sqrt(Nb),
    C = sqrt((Na + Nb) / ((1 - t)^2 + t^2)) (edm2.md §2)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=dim)


class MPFourier(nn.Module):
    """MPFourier(n): y = sqrt(2) cos(2 pi (f x + phi)), f ~ N(0, 1), phi ~ U(0, 1) fixed (edm2.md §2).

    Maps a batch of scalars (B,) to (B, n) features of unit variance; computed in fp32.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer("freqs", torch.empty(num_channels))
        self.register_buffer("phases", torch.empty(num_channels))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw f ~ N(0, 1) and phi ~ U(0, 1) (on the CPU, so a seed gives the same buffers anywhere)."""
        if self.freqs.is_meta:
            return
        with torch.no_grad():
            self.freqs.copy_(torch.randn(self.freqs.shape, generator=generator))
            self.phases.copy_(torch.rand(self.phases.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = sqrt(2) cos(2 pi (f x + phi))                               (B,) -> (B, n)
        y = torch.outer(x.to(torch.float32), self.freqs) + self.phases
        return torch.cos(y * (2 * math.pi)) * math.sqrt(2)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (kh, kw)) or linear layer (kernel ()) without bias.

    Effective weight (edm2.md §2, MPConv): w = gain N(W) / sqrt(fan_in), N per output filter over all
    fan-in dims, so every filter has unit norm and unit-variance inputs give unit-variance outputs
    (times gain). Forced weight normalisation: in training the stored W is overwritten by N(W) (no
    grad) before each forward, and the forward normalises again so gradients flow through N. The
    overwrite can instead be done once per optimizer step with `force_weight_norm_(model)` after
    `set_forced_wn(model, False)` (same numbers, no parameter mutation inside a compiled forward).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        self.force_wn = True  # overwrite W by N(W) at each training forward (EDM2's default)
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """W ~ N(0, 1) (edm2.md §2, MPConv init), drawn on the CPU so a seed gives the same W anywhere."""
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator))

    def effective_weight(self, gain: float | torch.Tensor = 1.0, dtype: torch.dtype | None = None):
        """w = gain N(W) / sqrt(fan_in), normalised in fp32 and then cast to `dtype` (edm2.md §2)."""
        if self.training and self.force_wn:
            # Forced weight normalisation: W <- N(W), outside autograd (edm2.md §2, MPConv)
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))
        # w = gain N(W) / sqrt(fan_in), N in fp32
        w = normalize(self.weight.to(torch.float32)) * (gain / math.sqrt(self.fan_in))
        return w.to(dtype or w.dtype)

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.effective_weight(gain, x.dtype)
        if w.ndim == 2:  # linear: (B, in) @ (in, out) -> (B, out)
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)  # (B, in, H, W) -> (B, out, H, W)


# --- Forced weight normalisation, once per step -----------------------------------------------


def set_forced_wn(module: nn.Module, enabled: bool) -> None:
    """Turn the per-forward overwrite W <- N(W) of every MPConv in `module` on or off."""
    for m in module.modules():
        if isinstance(m, MPConv):
            m.force_wn = enabled


@torch.no_grad()
def force_weight_norm_(module: nn.Module) -> None:
    """W <- N(W) for every MPConv in `module` (edm2.md §2, forced WN); call after each optimizer step
    when the per-forward overwrite is off (`set_forced_wn(module, False)`)."""
    weights = [m.weight for m in module.modules() if isinstance(m, MPConv)]
    for w in weights:
        w.copy_(normalize(w.to(torch.float32)))
