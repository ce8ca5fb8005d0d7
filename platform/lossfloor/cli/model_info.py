"""`lossfloor model-info`: parameters, compute and shape of a model preset (no weights are built)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "model-info",
        help="parameters, GMAC per evaluation and shapes of an EDM2 U-Net preset",
        description="Count the parameters and the GMAC of one forward (batch 1) of an EDM2 U-Net preset, "
        "on the meta device (no memory, no weights).",
    )
    p.add_argument("--preset", required=True, help="img512-xs..xxl, img64-s..xl, tiny, tiny32")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def model_info(name: str) -> dict:
    """The facts `model-info` prints, as a dict (JSON-ready)."""
    from lossfloor.models import get_preset, gmac_per_eval, params_of

    preset = get_preset(name)
    cfg = preset.unet
    return {
        "preset": preset.name,
        "params": params_of(preset, uncertainty_head=True),
        "params_unet": params_of(preset, uncertainty_head=False),
        "gmac_per_eval": round(gmac_per_eval(preset), 4),
        "resolution": cfg.img_resolution,
        "channels": cfg.img_channels,
        "label_dim": cfg.label_dim,
        "mc": cfg.model_channels,
        "channel_mult": list(cfg.channel_mult),
        "num_blocks": cfg.num_blocks,
        "attn_resolutions": list(cfg.attn_resolutions),
        "dropout": cfg.dropout,
        "lr_ref": preset.lr_ref,
        "t_ref_iters": preset.t_ref_iters,
        "batch_n_img": preset.batch_n_img,
        "duration_n_img": preset.duration_n_img,
        "P_mean": preset.P_mean,
        "P_std": preset.P_std,
        "sigma_data": preset.sigma_data,
    }


def format_table(info: dict) -> str:
    """Two columns, one fact per line; big integers with thousands separators."""
    notes = {
        "params": f"  ({info['params'] / 1e6:.1f} M, F + uncertainty head)",
        "params_unet": f"  ({info['params_unet'] / 1e6:.1f} M, F alone)",
        "gmac_per_eval": "  (one forward at batch 1; x2 for GFLOPs)",
        "duration_n_img": f"  ({info['duration_n_img'] / 2**20:g} Mi images)",
    }
    lines = []
    for key, value in info.items():
        text = f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else str(value)
        lines.append(f"{key:<16} {text}{notes.get(key, '')}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from lossfloor.errors import InputError

    try:
        info = model_info(args.preset)
    except InputError as e:  # "preset: unknown ..." -> "--preset: unknown ..."
        raise InputError(f"--{e}") from None
    sys.stdout.write((json.dumps(info) if args.json else format_table(info)) + "\n")
    return 0
