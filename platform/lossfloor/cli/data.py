"""`lossfloor data ...`: inspect a data source, turn it into parquet shards for Ray Data, encode images to
VAE latents or decode latents to images.

    lossfloor data describe SRC [--no-values] [--latents mean|posterior]
    lossfloor data prepare SRC --out DIR [--rows-per-shard R]
    lossfloor data encode --data SRC --vae DIR --resolution R --out OUT [--format shards|edm2] [--labels FILE]
                          [--batch N] [--device D] [engine flags]
    lossfloor data decode --data LATENTS --vae DIR --out DIR [--count N] [--batch N] [--device D]
"""

from __future__ import annotations

import argparse
import json
import sys

from lossfloor.atomic import check_writable
from lossfloor.errors import InputError
from lossfloor.jobs.engine import Engine, add_engine_args

SRC_HELP = ("bundled:digits, FILE.npy, FILE.npz[:KEY], an EDM2 .zip or folder, a CIFAR-10 batch folder, "
            "an image folder (class sub-folders = labels) or a shard directory")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="inspect a data source, prepare parquet shards, encode images to VAE latents and back",
        description="Inspect a data source (describe), write it as parquet shards for Ray Data (prepare), encode "
                    "a folder or zip of images of any size to VAE latents as EDM2 does (encode), or decode latents "
                    "back to PNGs (decode).")
    commands = parser.add_subparsers(dest="data_command", required=True)

    describe = commands.add_parser(
        "describe", help="print count, sample shape, labels, normalisation and exact duplicates as JSON"
    )
    describe.add_argument("src", metavar="SRC", help=SRC_HELP)
    describe.add_argument("--no-values", action="store_true",
                          help="do not read the samples (no duplicate count, no NaN/inf check; says so)")
    describe.add_argument("--latents", default="mean", help="EDM2 latents: mean (default) | posterior")
    describe.set_defaults(func=run)

    prepare = commands.add_parser("prepare", help="write SRC as parquet shards + meta.json (for Ray Data)")
    prepare.add_argument("src", metavar="SRC", help=SRC_HELP)
    prepare.add_argument("--out", required=True, metavar="DIR", help="shard directory to create")
    prepare.add_argument("--rows-per-shard", type=int, default=None, metavar="R",
                         help="rows per shard (default: about 64 MiB of samples per shard)")
    prepare.set_defaults(func=run)

    encode = commands.add_parser(
        "encode", help="images (folder or zip, any size) -> VAE latents (posterior mean and std) + labels",
        description="Centre-crop every image to RxR as EDM2 does for ImageNet (halve with a box filter while the "
                    "short side is >= 2R, bicubic to a short side of R, centre crop), encode it with a local "
                    "diffusers AutoencoderKL (pixels x/255, as EDM2) and store the posterior mean and std (8 "
                    "channels, raw VAE units), the label and the set's per-channel statistics (used to whiten "
                    "when the set is loaded). Resumable: a killed run continues from .OUT.encode-work/.")
    encode.add_argument("--data", required=True, metavar="SRC",
                        help="a folder or .zip of PNG/JPEG images: class sub-folders = labels (ImageNet's training "
                             "layout), a dataset.json inside, or flat (no labels)")
    encode.add_argument("--vae", required=True, metavar="DIR",
                        help="a local diffusers AutoencoderKL folder: config.json + diffusion_pytorch_model."
                             "safetensors (e.g. stabilityai/sd-vae-ft-mse); nothing is downloaded")
    encode.add_argument("--resolution", required=True, type=int, metavar="R",
                        help="crop size in pixels, a multiple of 8 (EDM2: 512 or 64); latents are R/8 x R/8")
    encode.add_argument("--out", required=True, metavar="OUT", help="the set to create (must not exist)")
    encode.add_argument("--format", default="shards", metavar="shards|edm2",
                        help="shards: lossfloor parquet shards + meta.json (default); edm2: EDM2's layout "
                             "(NNNNN/img-mean-std-NNNNNNNN.npy + dataset.json) in a folder, or a zip if OUT ends "
                             "in .zip")
    encode.add_argument("--labels", default=None, metavar="FILE",
                        help='labels for a flat source: JSON {"labels": [[relative_path, int], ...]}')
    encode.add_argument("--batch", type=int, default=8, metavar="N", help="images per encoder call (default 8)")
    encode.add_argument("--device", default=None, help="local: cpu | cuda (default cuda when available)")
    add_engine_args(encode, ray="Ray Data batch inference on an actor pool", workers_help="encoder actors",
                    worker="actor", cpus_per_worker=1, gpus_help="> 0 encodes on CUDA")
    encode.set_defaults(func=run_encode)

    decode = commands.add_parser(
        "decode", help="latents -> PNG images with the same VAE",
        description="Un-whiten latents with their set's statistics (EDM2's constants for a .npy) and decode them "
                    "with the VAE into OUT/NNNNNNNN.png.")
    decode.add_argument("--data", required=True, metavar="LATENTS",
                        help="a latent set (lossfloor data encode, EDM2 latents) or a .npy of whitened latents "
                             "(n, 4, h, w) as the samplers produce")
    decode.add_argument("--vae", required=True, metavar="DIR", help="the AutoencoderKL folder the latents are of")
    decode.add_argument("--out", required=True, metavar="DIR", help="folder of PNGs to create (must not exist)")
    decode.add_argument("--count", type=int, default=None, metavar="N", help="decode the first N (default all)")
    decode.add_argument("--batch", type=int, default=8, metavar="N", help="latents per decoder call (default 8)")
    decode.add_argument("--device", default=None, help="cpu | cuda (default cuda when available)")
    decode.set_defaults(func=run_decode)


def run_encode(args: argparse.Namespace) -> int:
    from lossfloor.jobs.encode import EncodeSpec, encode

    engine = Engine.from_args(args)
    spec = EncodeSpec(data=args.data, vae=args.vae, resolution=args.resolution, out=args.out, format=args.format,
                      labels=args.labels, batch=args.batch, device=args.device)
    sys.stdout.write(f"{encode(spec, engine=engine)}\n")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from lossfloor.jobs.encode import DecodeSpec, decode

    spec = DecodeSpec(data=args.data, vae=args.vae, out=args.out, count=args.count, batch=args.batch,
                      device=args.device)
    sys.stdout.write(f"{decode(spec)}\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from lossfloor import data  # numpy/pyarrow/pillow only when the command runs

    if args.data_command == "describe":
        info = data.open_source(args.src, args.latents).info()
        fields = {"source": args.src, "count": info.count, "sample_shape": list(info.sample_shape),
                  "labels": info.has_labels, "normalisation": info.normalisation,
                  "values_read": not args.no_values}
        if not args.no_values:
            fields.update(read_values(args.src, args.latents))
        sys.stdout.write(json.dumps(fields) + "\n")
        return 0
    if args.rows_per_shard is not None and args.rows_per_shard < 1:
        raise InputError(
            f"--rows-per-shard: expected a positive integer like 4096, got {args.rows_per_shard}"
        )
    check_writable(args.out, folder=True)
    data.prepare_shards(args.src, args.out, rows_per_shard=args.rows_per_shard)
    return 0


def read_values(src: str, latents: str) -> dict:
    """Read every sample once: refuse NaN/inf, count exact duplicates (`lossfloor.data.duplicates`)."""
    import numpy as np

    from lossfloor.data import iter_chunks
    from lossfloor.data.duplicates import groups, row_keys

    keys, start = [], 0
    for samples, _ in iter_chunks(src, 4096, latents=latents):
        bad = ~np.isfinite(samples.reshape(len(samples), -1)).all(1)
        if bad.any():
            raise InputError(f"{src}: sample {start + int(np.argmax(bad))} contains NaN or infinite values")
        keys.append(row_keys(samples))
        start += len(samples)
    g = groups(np.concatenate(keys))
    return {"distinct": g.n_unique, "duplicates": g.n_duplicates, "largest_duplicate_group": int(g.counts.max())}
