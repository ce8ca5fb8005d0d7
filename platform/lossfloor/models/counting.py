"""Parameter and compute counts of the U-Net.

Convention for `gmac_per_eval`: multiply-accumulates of ONE forward of F at batch 1, as counted by
`torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls and the attention matmuls of SDPA;
elementwise ops, normalisations and the uncertainty head are not counted). FlopCounterMode counts
2 m n k FLOPs per (m x k)(k x n) product, so GMAC = FLOPs / 2 / 1e9. This is the paper's "Gflops"
(a multiply-add counted as one op). A training step costs about 3x the forward (forward + backward),
so training FLOPs ~= 2 * 3 * gmac_per_eval * 1e9 * images.
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


def gmac_per_eval(config: UNetConfig | Preset) -> float:
    """GMAC of one forward of F at batch 1 (module docstring: convention), counted on the meta device."""
    return _gmac_per_eval(_unet_config(config))


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
