"""FLOP accounting for loss-vs-compute curves (paper §5: F = training FLOPs).

Convention (recorded with every run as FLOP_CONVENTION):
    forward_flops = FLOPs of ONE forward of the network F at batch 1, counted once per run on the meta
                    device by torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add;
                    convolutions, matmuls and attention; elementwise ops and the uncertainty head are
                    not counted) -- `lossfloor.models.gmac_per_eval(preset, "gemm")` x 2e9.
                    With flop_convention="edm2", plus the per-forward weight normalisation
                    (`gmac_per_eval(..., "edm2")`, EDM2's published Gflops to <= 0.4%).
    training FLOPs after n images = 3 x forward_flops x n   (forward + backward = 3 forwards).
Evaluation, EMA and sampling are not counted.
"""

from __future__ import annotations

from lossfloor.models import Preset, UNetConfig, gmac_per_eval

FLOP_CONVENTION = ("training_flops = 3 * forward_flops * images; forward_flops = FlopCounterMode FLOPs "
                   "(2 per multiply-add) of one forward of F at batch 1")
BACKWARD_FACTOR = 3  # forward + backward ~ 3 forwards


def forward_flops(config: Preset | UNetConfig, convention: str = "gemm") -> float:
    """FLOPs of one forward of F per image (module docstring)."""
    return 2e9 * gmac_per_eval(config, convention)


def training_flops(forward_flops_per_image: float, n_img: int) -> float:
    """3 x forward FLOPs x images (module docstring)."""
    return BACKWARD_FACTOR * forward_flops_per_image * n_img
