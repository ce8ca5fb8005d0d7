"""Data sets for the estimators: readers of every supported source, fingerprints, parquet shards.

    load(SRC) -> Dataset                      everything in memory, float32 (N, *sample_shape)
    load_for(SRC, engine) -> Dataset | ShardRef   the same, but a shard folder for Ray stays on its storage
    iter_chunks(SRC, rows) / describe(SRC)    streaming, for sources larger than memory
    prepare_shards(SRC, DIR)                  parquet shards for Ray Data (`lossfloor data prepare`)
    read_shard_rows(batch)                    a shard batch back to numpy (Ray workers)

SRC forms are listed in `lossfloor.data.dataset`. Imports only numpy, pyarrow, pillow and (for
`bundled:digits`) scikit-learn. `lossfloor.data.node_cache` (one memory-mapped copy of a data set per
machine, for the estimation actors; torch) is imported where it is used, and so are the modules of
`lossfloor data encode` (torch and diffusers, inside their functions): `preprocess` (EDM2's crop rule),
`image_list` (an encode source's images and labels), `vae` (the AutoencoderKL: encode, decode),
`encoding` (chunks in a work folder), `latent_sets` (the set written as shards or in EDM2's layout).
"""

from lossfloor.data.bundled import DEFAULT as DEFAULT_SOURCE
from lossfloor.data.dataset import (
    Dataset,
    ShardRef,
    describe,
    iter_chunks,
    load,
    load_for,
    open_source,
    source_fingerprint,
)
from lossfloor.data.edm2 import whiten_latent
from lossfloor.data.fingerprint import Fingerprinter, fingerprint, labels_fingerprint
from lossfloor.data.prepare import prepare_shards
from lossfloor.data.shards import ShardMeta, ShardRows, read_meta, read_shard_rows, shard_paths, x_matrix
from lossfloor.data.source import SourceInfo

__all__ = [
    "DEFAULT_SOURCE",
    "Dataset",
    "ShardRef",
    "Fingerprinter",
    "ShardMeta",
    "ShardRows",
    "SourceInfo",
    "describe",
    "fingerprint",
    "iter_chunks",
    "labels_fingerprint",
    "load",
    "load_for",
    "open_source",
    "prepare_shards",
    "read_meta",
    "read_shard_rows",
    "shard_paths",
    "source_fingerprint",
    "whiten_latent",
    "x_matrix",
]
