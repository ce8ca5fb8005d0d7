"""EDM2-style data sets (Karras et al. 2024), as a `.zip` or a folder.

Either PNG images `NNNNN/imgNNNNNNNN.png` (scaled to [-1, 1] as x/127.5 - 1) or SD-VAE latents
`NNNNN/img-mean-std-NNNNNNNN.npy`, float32 [8, H, W] = 4 channels of posterior mean then 4 of std.
For latents the sample is the posterior mean, whitened per channel to mean 0 and std 0.5:
    x = (mean - m_c) * (LATENT_SCALE / s_c)
or, with latents="posterior", the whole posterior N(mean, std²) whitened the same way: a sample is
[x, std * (LATENT_SCALE / s_c)], [8, H, W] (what EDM2 samples its training latents from).
(m_c, s_c) are the set's own per-channel statistics when it stores them (`latent_stats.json`, written by
`lossfloor data encode`: mean and std of the posterior means per channel over the set), else EDM2's
constants for SD-VAE (sd-vae-ft-mse) latents of ImageNet, LATENT_MEAN and LATENT_STD.
`dataset.json` = {"labels": [[relative_path, int], ...]} or {"labels": null}.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lossfloor.data.files import DirTree, ZipTree
from lossfloor.data.images import ImageReader, is_image_name
from lossfloor.data.source import READ_ERRORS, Chunk, Reader, SourceInfo, error_text
from lossfloor.errors import InputError

# Per-channel statistics of SD-VAE (sd-vae-ft-mse) posterior means on ImageNet, as used by EDM2.
LATENT_MEAN = (5.81, 3.25, 0.12, -2.15)
LATENT_STD = (4.17, 4.62, 3.71, 3.28)
LATENT_SCALE = 0.5  # std of the whitened latents
LATENT_NORMALISATION = "edm2-latent-whiten"
POSTERIOR_NORMALISATION = "edm2-latent-posterior-whiten"  # [whitened mean, whitened std]
LATENTS = ("mean", "posterior")
LABELS_FILE = "dataset.json"
STATS_FILE = "latent_stats.json"

_LATENT_NAME = re.compile(r"(.*/)?img-mean-std-\d+\.npy")
_EDM2_IMAGE_NAME = re.compile(r"\d{5}/img\d{8}\.png")


def is_latent_name(name: str) -> bool:
    return _LATENT_NAME.fullmatch(name) is not None


def looks_like_edm2(names: list[str]) -> bool:
    """A folder is EDM2-style if it has dataset.json, latents, or only NNNNN/imgNNNNNNNN.png images."""
    images = [n for n in names if is_image_name(n)]
    return (
        LABELS_FILE in names
        or any(is_latent_name(n) for n in names)
        or (bool(images) and all(_EDM2_IMAGE_NAME.fullmatch(n) for n in images))
    )


@dataclass(frozen=True, kw_only=True)
class LatentStats:
    """Per-channel mean and std of a latent set's posterior means (raw VAE units): what whitening divides
    out. EDM2_STATS: EDM2's constants for SD-VAE latents of ImageNet."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        ok = len(self.mean) == len(self.std) > 0 and all(math.isfinite(m) for m in self.mean)
        if not (ok and all(math.isfinite(s) and s > 0 for s in self.std)):
            raise InputError(f"latent statistics: expected finite means and stds > 0 per channel, got "
                             f"mean {list(self.mean)}, std {list(self.std)}")

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, fields, where: str) -> LatentStats:
        expected = 'expected {"mean": [4 numbers], "std": [4 numbers > 0]}'
        try:
            stats = cls(mean=tuple(float(v) for v in fields["mean"]), std=tuple(float(v) for v in fields["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: {expected} ({error_text(e)})") from None
        if len(stats.mean) != 4:
            raise InputError(f"{where}: {expected}, got {len(stats.mean)} channels")
        return stats


EDM2_STATS = LatentStats(mean=LATENT_MEAN, std=LATENT_STD)


def whiten_latent(mean_std: np.ndarray, posterior: bool = False, stats: LatentStats = EDM2_STATS) -> np.ndarray:
    """[8, H, W] posterior mean and std -> whitened mean [4, H, W] float32 (computed in float64), or with
    posterior=True [whitened mean, whitened std] [8, H, W]; `stats`: the set's (module docstring)."""
    mean = mean_std[:4].astype(np.float64)
    shift = np.asarray(stats.mean, dtype=np.float64)[:, None, None]  # (4, 1, 1)
    scale = (LATENT_SCALE / np.asarray(stats.std, dtype=np.float64))[:, None, None]
    x = (mean - shift) * scale
    if posterior:
        x = np.concatenate([x, mean_std[4:].astype(np.float64) * scale])  # (8, H, W)
    return x.astype(np.float32)


def unwhiten_latent(x: np.ndarray, stats: LatentStats = EDM2_STATS) -> np.ndarray:
    """Whitened latents (n, 4, H, W) -> raw VAE units (float32, computed in float64): the inverse of
    `whiten_latent` on the mean."""
    shift = np.asarray(stats.mean, dtype=np.float64)[:, None, None]
    scale = (LATENT_SCALE / np.asarray(stats.std, dtype=np.float64))[:, None, None]
    return (x.astype(np.float64) / scale + shift).astype(np.float32)


def read_stats(tree: DirTree | ZipTree, names: list[str]) -> LatentStats:
    """The set's `latent_stats.json` if it has one, else EDM2_STATS."""
    if STATS_FILE not in names:
        return EDM2_STATS
    with tree.open() as read:
        try:
            fields = json.loads(read(STATS_FILE))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{tree.where(STATS_FILE)}: cannot parse it ({e})") from e
    return LatentStats.from_dict(fields, tree.where(STATS_FILE))


def edm2_reader(path: str, tree: DirTree | ZipTree, names: list[str], latents: str = "mean") -> Reader:
    """The reader for an EDM2 zip or folder (`names`: its files): images or latents, dataset.json labels."""
    images = [n for n in names if is_image_name(n)]
    latent_files = [n for n in names if is_latent_name(n)]
    if images and latent_files:
        raise InputError(f"{path}: expected images or latents, found both ({images[0]}, {latent_files[0]})")
    if not images and not latent_files:
        raise InputError(f"{path}: expected PNG images or img-mean-std-*.npy latents, found none")
    members = images or latent_files
    labels = _read_labels(path, tree, members) if LABELS_FILE in names else None
    if images:
        if latents == "posterior":
            raise InputError(f"--latents posterior: {path} holds images, not SD-VAE latents (img-mean-std-*.npy)")
        return ImageReader(path, tree, images, labels)
    return LatentReader(path, tree, members, labels, posterior=latents == "posterior",
                        stats=read_stats(tree, names))


def _read_labels(path: str, tree: DirTree | ZipTree, members: list[str]) -> np.ndarray | None:
    with tree.open() as read:
        return parse_labels(read(LABELS_FILE), tree.where(LABELS_FILE), members)


def parse_labels(text: bytes, where: str, members: list[str]) -> np.ndarray | None:
    """A dataset.json's bytes -> the int64 label of each of `members` (relative paths), or None for
    {"labels": null}; InputError naming `where` unless every member has one."""
    expected = 'expected {"labels": [[relative_path, int], ...]} or {"labels": null}'
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: {expected}, cannot parse it ({e})") from e
    if not isinstance(meta, dict) or "labels" not in meta:
        raise InputError(f"{where}: {expected}")
    if meta["labels"] is None:
        return None
    table = {}
    for entry in meta["labels"] if isinstance(meta["labels"], list) else [None]:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        if not (ok and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            raise InputError(f"{where}: {expected}, got entry {entry!r}")
        table[entry[0]] = entry[1]
    missing = [m for m in members if m not in table]
    if missing:
        raise InputError(f"{where}: expected a label for every file, none for {missing[0]}")
    return np.array([table[m] for m in members], dtype=np.int64)


class LatentReader(Reader):
    """EDM2 latents: one [8, H, W] npy per image; the sample is the whitened posterior mean, or with
    posterior=True the whitened [mean, std] (8 channels)."""

    def __init__(self, path: str, tree: DirTree | ZipTree, names: list[str], labels: np.ndarray | None,
                 posterior: bool = False, stats: LatentStats = EDM2_STATS):
        super().__init__(path)
        if len(names) < 2:
            raise InputError(f"{path}: expected at least 2 latents, found {len(names)}")
        self.tree, self.names, self.labels, self.posterior, self.stats = tree, names, labels, posterior, stats

    def _decode(self, data: bytes, name: str) -> np.ndarray:
        try:
            mean_std = np.load(io.BytesIO(data), allow_pickle=False)
        except READ_ERRORS as e:
            raise InputError(f"{self.tree.where(name)}: cannot read as .npy ({error_text(e)})") from e
        if mean_std.ndim != 3 or mean_std.shape[0] != 8 or not np.issubdtype(mean_std.dtype, np.floating):
            raise InputError(
                f"{self.tree.where(name)}: expected a float array [8, H, W] (mean then std), "
                f"got {mean_std.dtype} {list(mean_std.shape)}"
            )
        return mean_std

    @functools.cached_property
    def _shape(self) -> tuple[int, int, int]:
        with self.tree.open() as read:
            _, height, width = self._decode(read(self.names[0]), self.names[0]).shape
        return 8 if self.posterior else 4, height, width

    def info(self) -> SourceInfo:
        return SourceInfo(count=len(self.names), sample_shape=self._shape, has_labels=self.labels is not None,
                          normalisation=POSTERIOR_NORMALISATION if self.posterior else LATENT_NORMALISATION)

    def blocks(self, rows: int) -> Iterator[Chunk]:
        shape = self._shape
        with self.tree.open() as read:
            for start in range(0, len(self.names), rows):
                names = self.names[start : start + rows]
                block = np.empty((len(names), *shape), dtype=np.float32)  # (n, 4, H, W)
                for i, name in enumerate(names):
                    mean_std = self._decode(read(name), name)
                    if mean_std.shape[1:] != shape[1:]:
                        raise InputError(
                            f"{self.tree.where(name)}: expected [8, {shape[1]}, {shape[2]}] like "
                            f"{self.names[0]}, got {list(mean_std.shape)}"
                        )
                    if self.posterior and (mean_std[4:] < 0).any():
                        raise InputError(f"{self.tree.where(name)}: expected a posterior std >= 0 in channels 4..7")
                    block[i] = whiten_latent(mean_std, self.posterior, self.stats)
                yield block, None if self.labels is None else self.labels[start : start + len(names)]
