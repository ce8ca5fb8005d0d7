"""Parameter and compute counts of the U-Net.

Convention for `gmac_per_eval`: multiply-accumulates of ONE forward of F at batch 1.

- "gemm": as counted by `torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls and the
  attention matmuls of SDPA; elementwise ops and the uncertainty head are not counted). FlopCounterMode
  counts 2 m n k FLOPs per (m x k)(k x n) product, so GMAC = FLOPs / 2 / 1e9.
- "edm2" (the default): "gemm" plus the weight normalisation every forward performs on each MPConv
  weight, counted as 3 multiply-adds per weight (the squared-norm accumulation and rescale of the forced
  normalisation, and the rescale into the effective weight). This is our reading of EDM2's published
  "Gflops" (a multiply-add counted as one op), which it reproduces to <= 0.4% for XS..XXL
  (45.5, 101.9, 180.8, 282.1, 405.9, 552.1); the GEMM count alone is 0.9-1.2% lower.
A training step costs 3x the forward (forward + backward), so training FLOPs = 2 * 3 * GMAC * 1e9 * images.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lossfloor.models.config import Preset, UNetConfig
from lossfloor.models.unet import _unet_config, build_uncertainty_head, build_unet


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as MPFourier's are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def params_of(config: UNetConfig | Preset, *, uncertainty_head: bool = True) -> int:
    """Parameters of F (plus u(sigma), 128 more at EDM2 widths, by default), counted on the meta device."""
    n = count_params(build_unet(config, device="meta"))
    if uncertainty_head:
        n += count_params(build_uncertainty_head(config, device="meta"))
    return n


GMAC_CONVENTIONS = ("edm2", "gemm")
WEIGHT_NORM_MAC_PER_WEIGHT = 3


def gmac_per_eval(config: UNetConfig | Preset, convention: str = "edm2") -> float:
    """GMAC of one forward of F at batch 1 (module docstring: conventions), counted on the meta device."""
    cfg = _unet_config(config)
    if convention == "gemm":
        return _gmac_per_eval(cfg)
    if convention == "edm2":
        return _gmac_per_eval(cfg) + WEIGHT_NORM_MAC_PER_WEIGHT * _mpconv_weights(cfg) / 1e9
    raise ValueError(f"convention: expected one of {GMAC_CONVENTIONS}, got {convention!r}")


@functools.lru_cache(maxsize=64)
def _mpconv_weights(cfg: UNetConfig) -> int:
    """Number of weights normalised per forward: every MPConv weight of F."""
    from lossfloor.models.mp import MPConv

    net = build_unet(cfg, device=torch.device("meta"))
    return sum(m.weight.numel() for m in net.modules() if isinstance(m, MPConv))


@functools.lru_cache(maxsize=64)
def _gmac_per_eval(cfg: UNetConfig) -> float:
    meta = torch.device("meta")
    net = build_unet(cfg, device=meta).eval()
    x = torch.zeros(1, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, device=meta)
    c_noise = torch.zeros(1, device=meta)
    labels = torch.zeros(1, cfg.label_dim, device=meta) if cfg.label_dim else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, c_noise, labels)
    return counter.get_total_flops() / 2 / 1e9
