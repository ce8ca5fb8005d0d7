"""EDM2 magnitude-preserving U-Net (edm2.md §2), its presets (§3) and parameter / compute counts.

    preset = get_preset("img512-xs")            # or "tiny" for CPU tests
    net = build_unet(preset, device="cuda", seed=0)
    u = build_uncertainty_head(preset, device="cuda", seed=0)
    F_x = net(x, c_noise, class_labels)            # c_noise = ln(sigma) / 4
"""

from lossfloor.models.config import Preset, UNetConfig
from lossfloor.models.counting import count_params, gmac_per_eval, params_of
from lossfloor.models.mp import (
    MPConv,
    MPFourier,
    force_weight_norm_,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    set_forced_wn,
)
from lossfloor.models.presets import PRESETS, get_preset, sized_preset
from lossfloor.models.unet import Block, UncertaintyHead, UNet, build_uncertainty_head, build_unet

__all__ = [
    "PRESETS",
    "Block",
    "MPConv",
    "MPFourier",
    "Preset",
    "UNet",
    "UNetConfig",
    "UncertaintyHead",
    "build_uncertainty_head",
    "build_unet",
    "count_params",
    "force_weight_norm_",
    "get_preset",
    "gmac_per_eval",
    "mp_cat",
    "mp_silu",
    "mp_sum",
    "normalize",
    "params_of",
    "set_forced_wn",
    "sized_preset",
]
