"""Benchmark `lossfloor data encode`'s encoder path against `AutoencoderKL.encode` in a plain loop, same run.

For each resolution R and batch B: the same N preprocessed images (uint8 (3, R, R)) are encoded
- by ours: `lossfloor.data.vae.encode_pixels` (B images per encoder call, inference mode), and
- by the plain loop: `vae.encode(x[None]).latent_dist` per image, under torch.no_grad(),
each timed best of `--repeats` after a warm-up, as images/s; both outputs must agree (max |difference|
reported). The preprocessing (`lossfloor.data.preprocess`: JPEG bytes -> centre crop) is timed separately
per R, from JPEGs twice R on the short side, and the whole chunk path (`ChunkEncoder`: read, crop, encode,
store) once per R at the largest batch.

No weights are downloaded: the VAE is random, built from a config: `sd` is the architecture of
sd-vae-ft-mse (block_out_channels 128, 256, 512, 512; what the real one costs), `small` a quarter of its
widths, `tiny` the test's; or a local folder with `--vae DIR`. Prints JSON; `--out` writes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _report import device_label, emit

from lossfloor.data.encoding import ChunkEncoder, EncodePlan, WorkFolder
from lossfloor.data.image_list import list_images
from lossfloor.data.preprocess import preprocess
from lossfloor.data.vae import encode_pixels, load_vae

CONFIGS = {
    "sd": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
    "small": {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 2, "norm_num_groups": 32},
    "tiny": {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4},
}


def random_vae(kind: str, folder: Path) -> Path:
    from diffusers import AutoencoderKL

    cfg = CONFIGS[kind]
    n = len(cfg["block_out_channels"])
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                  latent_channels=4, **cfg).save_pretrained(folder)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, device, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def plain_loop(vae, pixels: np.ndarray, device) -> np.ndarray:
    out = []
    with torch.no_grad():
        for p in pixels:
            d = vae.encode(torch.from_numpy(p[None]).to(device, torch.float32) / 255).latent_dist
            out.append(torch.cat([d.mean, d.std], dim=1).cpu().numpy())
    return np.concatenate(out)


def jpegs(n: int, r: int, rng) -> list[bytes]:
    """n JPEGs of smooth noise, short side 2R + a little, aspect ratios 1..1.5."""
    from PIL import Image

    out = []
    for _ in range(n):
        h = 2 * r + int(rng.integers(0, r // 4 + 1))
        w = int(h * rng.uniform(1.0, 1.5))
        img = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(img).resize((w, h)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", default="sd", help="sd | small | tiny (random, from a config) or a local folder")
    ap.add_argument("--resolutions", default="32,64,128", help="comma-separated R (default 32,64,128)")
    ap.add_argument("--batches", default="1,4,8", help="comma-separated B (default 1,4,8)")
    ap.add_argument("--images", type=int, default=8, help="images per timing (default 8)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats, best kept (default 2)")
    ap.add_argument("--device", default=None, help="cuda | cpu (default cuda when available)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_before = os.getloadavg()[0]  # the machine's load: on a shared CPU the rates are only comparable within a run
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.vae) if args.vae not in CONFIGS else random_vae(args.vae, Path(tmp) / "vae")
        vae = load_vae(folder, device=str(device))
        params = sum(p.numel() for p in vae.parameters())
        cases = []
        for r in (int(v) for v in args.resolutions.split(",")):
            data = jpegs(args.images, r, rng)
            t0 = time.perf_counter()
            pixels = np.stack([preprocess(d, "bench.jpg", r) for d in data])  # (N, 3, R, R)
            crop_s = time.perf_counter() - t0
            plain_s, plain = best_of(lambda p=pixels: plain_loop(vae, p, device), device, args.repeats)
            row = {"resolution": r, "images": args.images, "latent_shape": list(plain.shape[1:]),
                   "preprocess_img_per_s": args.images / crop_s, "plain_loop_img_per_s": args.images / plain_s,
                   "batches": []}
            for b in (int(v) for v in args.batches.split(",")):
                ours_s, ours = best_of(lambda b=b, p=pixels: encode_pixels(vae, p, batch=b), device, args.repeats)
                row["batches"].append({"batch": b, "ours_img_per_s": args.images / ours_s,
                                       "speedup_vs_plain_loop": plain_s / ours_s,
                                       "max_abs_diff_vs_plain_loop": float(np.abs(ours - plain).max())})
            # the whole chunk path: read the files, crop, encode at the largest batch, store the chunk
            src = Path(tmp) / f"src{r}"
            src.mkdir()
            for k, d in enumerate(data):
                (src / f"{k:04d}.jpg").write_bytes(d)
            plan = EncodePlan.make(list_images(str(src)), str(folder), resolution=r, batch=max(row["batches"],
                                   key=lambda c: c["batch"])["batch"])
            encoder = ChunkEncoder(plan, WorkFolder(Path(tmp) / f"work{r}", plan), device=str(device), vae=vae)
            chunk_s, _ = best_of(lambda e=encoder: e(0), device, args.repeats)
            row["chunk_path_img_per_s"] = args.images / chunk_s
            cases.append(row)
            print(f"R={r}: plain {row['plain_loop_img_per_s']:.2f} img/s, ours "
                  + ", ".join(f"B={c['batch']} {c['ours_img_per_s']:.2f}" for c in row["batches"])
                  + f", whole chunk path {row['chunk_path_img_per_s']:.2f} img/s", file=sys.stderr)
    import diffusers

    emit({"benchmark": "encode_bench", "date": dt.date.today().isoformat(), "device": device_label(device),
          "torch": torch.__version__, "diffusers": diffusers.__version__,
          "vae": args.vae if args.vae in CONFIGS else "local folder", "vae_params": params,
          "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]}, "repeats": args.repeats,
          "note": "random weights: the cost of the architecture, not of trained numbers", "cases": cases}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
