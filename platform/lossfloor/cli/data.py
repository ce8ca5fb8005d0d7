"""`lossfloor data ...`: inspect a data source, or turn it into parquet shards for Ray Data.

    lossfloor data describe SRC
    lossfloor data prepare SRC --out DIR [--rows-per-shard R]
"""

from __future__ import annotations

import argparse
import json
import sys

from lossfloor.errors import InputError

SRC_HELP = ("bundled:digits, FILE.npy, FILE.npz[:KEY], an EDM2 .zip or folder, a CIFAR-10 batch folder, "
            "an image folder (class sub-folders = labels) or a shard directory")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect a data source or prepare parquet shards")
    commands = parser.add_subparsers(dest="data_command", required=True)

    describe = commands.add_parser(
        "describe", help="print count, sample shape, labels and normalisation as JSON"
    )
    describe.add_argument("src", metavar="SRC", help=SRC_HELP)
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
        info = data.open_source(args.src).info()
        fields = {"source": args.src, "count": info.count, "sample_shape": list(info.sample_shape),
                  "labels": info.has_labels, "normalisation": info.normalisation}
        sys.stdout.write(json.dumps(fields) + "\n")
        return 0
    if args.rows_per_shard is not None and args.rows_per_shard < 1:
        raise InputError(
            f"--rows-per-shard: expected a positive integer like 4096, got {args.rows_per_shard}"
        )
    data.prepare_shards(args.src, args.out, rows_per_shard=args.rows_per_shard)
    return 0
