"""`lossfloor data ...`: inspect a data source, or turn it into parquet shards for Ray Data.

    lossfloor data describe SRC [--no-values] [--latents mean|posterior]
    lossfloor data prepare SRC --out DIR [--rows-per-shard R]
"""

from __future__ import annotations

import argparse
import json
import sys

from lossfloor.atomic import check_writable
from lossfloor.errors import InputError

SRC_HELP = ("bundled:digits, FILE.npy, FILE.npz[:KEY], an EDM2 .zip or folder, a CIFAR-10 batch folder, "
            "an image folder (class sub-folders = labels) or a shard directory")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect a data source or prepare parquet shards")
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
