"""Sample quality as the published protocol measures it: reference statistics of a data set, stored once,
and the feature sums of a model's samples.

    ref = reference_statistics(load("bundled:digits"), feature_extractors("pixels"))
    write_reference(ref, "digits.stats.npz"); ref = read_reference("digits.stats.npz")
    ref.check(extractors, shape=(1, 8, 8), fingerprint=data.fingerprint)       # refuses other data/networks
    sums = block_sums(denoiser, extractors, SampleSpec(shape=ref.shape, seed=0, class_probs=ref.class_probs()),
                      start=0, stop=512, batch=128)
    fds = fd_metrics(sums, ref)                                                # {"fd": ...}

Protocol (EDM2's `generate_images` + `calculate_metrics`): sample i of seed s starts from noise (and a
class label drawn from the data's class frequencies) seeded by (s, i) (`sampling.sample_inputs`); the EDM
Heun sampler (32 steps, sigma in [0.002, 80], rho 7 by default) integrates it; the result is quantised
to uint8 as a saved PNG (`metrics.to_uint8`; a latent model's whitened latents are decoded to uint8
images by the data set's VAE instead, `lossfloor.data.vae.decode_latents`) and handed to each extractor
(`metrics`); features are summed in float64 (`FeatureSums`), mean and covariance come from the sums,
FD from those (`frechet_distance`).
A block of samples is a pure function of (model, seed, start, stop): blocks computed anywhere add up to
the same statistics.

The statistics file is an .npz of plain arrays (read with allow_pickle=False): `mu_<metric>`,
`cov_<metric>` (float64) and `meta`, a JSON string: format, data fingerprint and source, sample shape,
class counts, and per metric the extractor spec, its network file's sha256 and its preprocessing.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lossfloor.errors import InputError
from lossfloor.train.metrics import FeatureSums, frechet_distance, image_sums, to_uint8

STATS_FORMAT = "lossfloor-feature-statistics/1"


@dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    """EDM Heun sampler settings (EDM2's defaults: 32 steps, 63 evaluations)."""

    num_steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self):
        from lossfloor.train.sampling import edm_sigma_steps

        edm_sigma_steps(self.num_steps, self.sigma_min, self.sigma_max, self.rho)  # checks every value


@dataclass(frozen=True, kw_only=True)
class SampleSpec:
    """What one evaluation samples: the sample shape, the seed, the class frequencies (None: unconditional)."""

    shape: tuple[int, ...]
    seed: int = 0
    class_probs: tuple[float, ...] | None = None
    sampler: SamplerSettings = field(default_factory=SamplerSettings)


def describe(extractor) -> dict:
    """What identifies an extractor's features: spec, the network file's sha256, the preprocessing."""
    return {"spec": extractor.spec, "network_sha256": extractor.network_sha256, "preprocessing": extractor.preprocessing}


@dataclass(frozen=True, kw_only=True, eq=False)
class ReferenceStats:
    """Feature statistics of a data set (module docstring) per metric: (count, mu, cov)."""

    fingerprint: str
    source: str
    shape: tuple[int, ...]
    class_counts: tuple[int, ...] | None
    extractors: dict[str, dict]  # metric -> describe(extractor)
    stats: dict[str, tuple[int, np.ndarray, np.ndarray]]  # metric -> (count, mu, cov)

    def class_probs(self) -> tuple[float, ...] | None:
        if self.class_counts is None:
            return None
        c = np.asarray(self.class_counts, dtype=np.float64)
        return tuple(float(p) for p in c / c.sum())

    def check(self, extractors: Mapping[str, Callable], *, shape, fingerprint: str | None = None,
              path: str = "", data_flag: str = "--data") -> None:
        """Refuse (one line naming --reference-stats) statistics of other data (fingerprint), another sample
        shape, or features of another extractor or network file."""
        where = f"--reference-stats {path}"
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise InputError(f"{where}: statistics of other data (fingerprint {self.fingerprint[:12]}…, {self.source}); "
                             f"{data_flag} has fingerprint {fingerprint[:12]}…")
        if tuple(shape) != tuple(self.shape):
            raise InputError(f"{where}: statistics of samples of shape {tuple(self.shape)}, but these samples have "
                             f"shape {tuple(shape)}")
        for metric, ex in extractors.items():
            mine = describe(ex)
            theirs = self.extractors.get(metric)
            if theirs is None:
                raise InputError(f"{where}: no statistics for {ex.spec} (it holds "
                                 f"{', '.join(e['spec'] for e in self.extractors.values())})")
            if theirs["spec"] != mine["spec"] or theirs["preprocessing"] != mine["preprocessing"]:
                raise InputError(f"{where}: statistics of features {theirs['spec']}, not {mine['spec']}")
            if theirs["network_sha256"] != mine["network_sha256"]:
                raise InputError(f"{where}: statistics of another {ex.spec} network (sha256 "
                                 f"{str(theirs['network_sha256'])[:12]}…, this file's is {mine['network_sha256'][:12]}…)")


def reference_statistics(data, extractors: Mapping[str, Callable], *, batch: int = 256,
                         progress: Callable[[int], None] | None = None) -> ReferenceStats:
    """The statistics of a `lossfloor.data.Dataset` of images (1 or 3 channels, in [-1, 1])."""
    shape = tuple(data.samples.shape[1:])
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise InputError(f"--data {data.source}: samples of shape {shape}: expected images (1 or 3 channels, H, W); "
                         "latents need decoding through their VAE first")
    sums: dict[str, FeatureSums] = {}
    for i in range(0, len(data.samples), batch):
        part = image_sums(extractors, data.samples[i : i + batch], batch=batch)
        sums = part if not sums else {k: sums[k] + part[k] for k in sums}
        if progress is not None:
            progress(min(i + batch, len(data.samples)))
    counts = None if data.labels is None else tuple(int(c) for c in np.bincount(np.asarray(data.labels)))
    return ReferenceStats(fingerprint=data.fingerprint, source=str(data.source), shape=shape, class_counts=counts,
                          extractors={k: describe(ex) for k, ex in extractors.items()},
                          stats={k: (s.count, *s.statistics()) for k, s in sums.items()})


def write_reference(ref: ReferenceStats, path: str | os.PathLike) -> Path:
    """The statistics file (module docstring), written atomically."""
    from lossfloor.atomic import make_parents, write_npz

    meta = {"format": STATS_FORMAT, "fingerprint": ref.fingerprint, "source": ref.source, "shape": list(ref.shape),
            "class_counts": None if ref.class_counts is None else list(ref.class_counts),
            "extractors": ref.extractors, "counts": {k: v[0] for k, v in ref.stats.items()}}
    arrays = {"meta": np.array(json.dumps(meta))}
    for k, (_, mu, cov) in ref.stats.items():
        arrays[f"mu_{k}"], arrays[f"cov_{k}"] = mu, cov
    return write_npz(make_parents(path), arrays)


def read_reference(path: str | os.PathLike, flag: str = "--reference-stats") -> ReferenceStats:
    """A statistics file written by `write_reference`; InputError naming the flag otherwise."""
    where = f"{flag} {path}"
    if not Path(path).is_file():
        raise InputError(f"{where}: not found (write one with lossfloor evaluate --reference)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != STATS_FORMAT:
                raise ValueError("format")
            stats = {k: (int(meta["counts"][k]), np.asarray(z[f"mu_{k}"], np.float64), np.asarray(z[f"cov_{k}"], np.float64))
                     for k in meta["extractors"]}
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError):
        raise InputError(f"{where}: not a lossfloor statistics file (expected the .npz lossfloor evaluate "
                         "--reference writes)") from None
    return ReferenceStats(fingerprint=meta["fingerprint"], source=meta["source"], shape=tuple(meta["shape"]),
                          class_counts=None if meta["class_counts"] is None else tuple(meta["class_counts"]),
                          extractors=meta["extractors"], stats=stats)


def fd_metrics(sums: Mapping[str, FeatureSums], ref: ReferenceStats) -> dict[str, float]:
    """FD of each metric's sample statistics against the reference statistics."""
    return {k: frechet_distance(*s.statistics(), *ref.stats[k][1:]) for k, s in sums.items()}


def blocks(n: int, block: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive blocks of `block` samples covering 0..n-1."""
    return [(lo, min(lo + block, n)) for lo in range(0, n, block)]


@torch.no_grad()
def block_sums(denoiser: Callable, extractors: Mapping[str, Callable], spec: SampleSpec, *, start: int, stop: int,
               batch: int = 256, device="cpu", decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
               ) -> dict[str, FeatureSums]:
    """Feature sums of samples start..stop-1 of `spec` (module docstring), sampled in batches of `batch`
    from `start` (a block's batches are fixed by its bounds: any worker computes the same numbers).
    `decode`: a latent model's samples -> uint8 images (its VAE's decoder) instead of `to_uint8`."""
    from lossfloor.train.sampling import generate

    sums: dict[str, FeatureSums] = {}
    s = spec.sampler
    for lo in range(start, stop, batch):
        x, _ = generate(denoiser, min(batch, stop - lo), spec.shape, class_probs=spec.class_probs, seed=spec.seed,
                        batch=batch, device=device, start=lo, num_steps=s.num_steps, sigma_min=s.sigma_min,
                        sigma_max=s.sigma_max, rho=s.rho)
        if not torch.isfinite(x).all():
            raise InputError(f"--model: NaN or inf in the samples {lo}..{lo + len(x) - 1} of seed {spec.seed}")
        u8 = to_uint8(x) if decode is None else decode(x)
        for k, ex in extractors.items():
            part = FeatureSums.of(ex(u8.to(device)))
            sums[k] = part if k not in sums else sums[k] + part
    return sums


__all__ = ["STATS_FORMAT", "ReferenceStats", "SampleSpec", "SamplerSettings", "block_sums", "blocks", "describe",
           "fd_metrics", "read_reference", "reference_statistics", "write_reference"]
