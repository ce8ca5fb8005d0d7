"""The denoiser D built from a network and a preconditioning table, and the training losses.

Every process trains the same object (paper Eq. 12): D(x_hat; sigma) = c_skip x_hat + c_out F(c_in x_hat;
c_noise), x_hat = x0 + sigma eps in VE coordinates, with (c_skip, c_out, c_in, c_noise) from
`lossfloor.diffusion.get_preconditioning` ("edm" for EDM2, "fm" for flow matching, "ncsn", "ddpm-eps",
"vp-v"). The per-sample
x0 loss l = ||D - x0||^2 (summed over C, H, W, the units of J*) is what schedules weight, trackers
follow and evaluation reports; for w = 1/c_out^2 it equals the network's native loss ||F - target||^2.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from lossfloor.diffusion import Preconditioning

PRECISIONS = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Denoiser(nn.Module):
    """D(x_hat, sigma, labels) = c_skip x_hat + c_out F(c_in x_hat; c_noise, labels) (paper Eq. 12).

    net: F(x, c_noise, class_labels) (e.g. `lossfloor.models.build_unet`); uncertainty: optional
    u(c_noise) head (EDM2's log-variance, loss only). precision "bf16"/"fp16" runs F under autocast;
    the preconditioning, D and the loss stay fp32 (edm2.md §5).
    """

    def __init__(self, net: nn.Module, precond: Preconditioning, uncertainty: nn.Module | None = None,
                 precision: str = "none"):
        super().__init__()
        self.net = net
        self.uncertainty = uncertainty
        self.precond = precond
        self.precision = precision

    def _autocast(self, device: torch.device):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def forward(self, x_hat: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat: (B, C, H, W) fp32; sigma: (B,) or a scalar tensor; returns D, (B, C, H, W) fp32."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x_hat.device).expand(x_hat.shape[0])  # (B,)
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma.view(-1, 1, 1, 1))  # (B, 1, 1, 1)
        with self._autocast(x_hat.device):
            F_x = self.net(c_in * x_hat, c_noise.flatten(), labels)  # (B,1,1,1) -> (B,)
        return c_skip * x_hat + c_out * F_x.to(torch.float32)

    def log_var(self, sigma: torch.Tensor) -> torch.Tensor:
        """u(sigma) = head(c_noise(sigma)), (B,) fp32 (edm2.md §2, uncertainty head)."""
        return self.uncertainty(self.precond.c_noise(sigma)).to(torch.float32)


def x0_loss(D: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """l = ||D - x0||^2 per sample, summed over all but the batch dim: (B, ...) -> (B,) (paper §1)."""
    return (D - x0).square().flatten(1).sum(1)


def learned_weight(weight: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """w(sigma) / e^{u(sigma)}: the weight EDM2's loss puts on the x0 loss under the learned log-variance u
    (edm2.md §4). For a fixed per-sample x0 loss l with mean J over d elements, w e^{-u} J + d u is smallest
    at u = ln(w J / d), where the learned weight is d / J: every sigma then contributes equally."""
    return weight * torch.exp(-log_var)


def training_loss(denoiser: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                  labels: torch.Tensor | None, weight: torch.Tensor, *, uncertainty: bool):
    """Per-sample training objective and x0 loss.

    x_hat = x0 + sigma eps; l = ||D(x_hat; sigma) - x0||^2.
    Without uncertainty: L = w(sigma) l (paper §4: the weighted x0 loss).
    With uncertainty (EDM2, edm2.md §4): L = w(sigma)/e^u(sigma) l + d u(sigma), d = elements per sample;
    it is EDM2's per-element w/e^u (D - x0)^2 + u summed over C, H, W.
    The caller averages L over the global batch. Returns (L, l, u or None), each (B,).
    """
    x_hat = x0 + sigma.view(-1, 1, 1, 1) * noise  # (B,) -> (B, 1, 1, 1)
    D = denoiser(x_hat, sigma, labels)
    lx0 = x0_loss(D, x0)
    if not uncertainty:
        return weight * lx0, lx0, None
    u = denoiser.log_var(sigma)
    d = x0[0].numel()
    return learned_weight(weight, u) * lx0 + d * u, lx0, u
