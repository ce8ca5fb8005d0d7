"""Encoding images to VAE latents in fixed chunks kept in a work folder: what both engines of
`lossfloor data encode` run.

    plan = EncodePlan.make(images, vae_folder, resolution=512, batch=8)
    work = WorkFolder(path, plan)
    ChunkEncoder(plan, work, device="cuda")(i)       # chunk i: read, preprocess, encode, store
    work.read(i)                                     # float32 (n, 8, R/8, R/8): posterior mean then std

Chunk i holds images [i * chunk, (i + 1) * chunk) of the source in order (chunk = CHUNK), and is encoded
in calls of `batch` images from its start, whoever encodes it: the local engine and any number of Ray
workers compute the same batches, so the same bytes on the same device type. A chunk's file is named by a
hash of everything its numbers depend on (its images' names and sizes, the resolution, the batch, the
VAE's config and weights), so a rerun reuses exactly the chunks still valid; a rerun after an image was
removed keeps every chunk before it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lossfloor.atomic import write_atomic
from lossfloor.data.image_list import ImageList
from lossfloor.data.preprocess import preprocess
from lossfloor.data.vae import CONFIG, WEIGHTS, check_vae_folder, encode_pixels, latent_shape, load_vae
from lossfloor.hashing import config_hash

CHUNK = 256  # images per work chunk (the unit of resumption and of a Ray task)


def vae_digest(folder: str | Path) -> str:
    """sha256 of a VAE folder's config and weights: which VAE a chunk was encoded with."""
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(Path(folder) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class EncodePlan:
    """What to encode and how: the source's images, the VAE folder and its digest, R, the batch."""

    images: ImageList
    vae: str  # the --vae folder
    vae_digest: str
    resolution: int
    batch: int
    latent_shape: tuple[int, int, int]  # (8, h, w) stored per image
    chunk: int = CHUNK  # images per chunk

    @classmethod
    def make(cls, images: ImageList, vae: str, *, resolution: int, batch: int, chunk: int | None = None) -> EncodePlan:
        folder = Path(vae).expanduser().absolute()
        return cls(images=images, vae=str(folder), vae_digest=vae_digest(folder), resolution=resolution,
                   batch=batch, latent_shape=latent_shape(check_vae_folder(folder), resolution), chunk=chunk or CHUNK)

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.images) / self.chunk)

    def chunk_range(self, i: int) -> range:
        return range(i * self.chunk, min((i + 1) * self.chunk, len(self.images)))

    def chunk_key(self, i: int) -> str:
        rows = self.chunk_range(i)
        return config_hash({"names": self.images.names[rows.start : rows.stop],
                            "sizes": self.images.sizes[rows.start : rows.stop],
                            "resolution": self.resolution, "batch": self.batch, "vae": self.vae_digest}, chars=16)


class WorkFolder:
    """The finished chunks of a plan: `chunk-NNNNNN-KEY.npy`, each written atomically."""

    def __init__(self, path: str | Path, plan: EncodePlan):
        self.path, self.plan = Path(path), plan

    def file(self, i: int) -> Path:
        return self.path / f"chunk-{i:06d}-{self.plan.chunk_key(i)}.npy"

    def missing(self) -> list[int]:
        return [i for i in range(self.plan.n_chunks) if not self.file(i).is_file()]

    def write(self, i: int, mean_std: np.ndarray) -> None:
        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, mean_std, allow_pickle=False)

        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.file(i), save)

    def read(self, i: int) -> np.ndarray:
        """Chunk i's float32 (n, 8, h, w), checked against the plan's shape."""
        mean_std = np.load(self.file(i), allow_pickle=False)
        expected = (len(self.plan.chunk_range(i)), *self.plan.latent_shape)
        if mean_std.shape != expected or mean_std.dtype != np.float32:
            raise ValueError(f"{self.file(i)}: expected float32 {expected}, got {mean_std.dtype} {mean_std.shape}")
        return mean_std


class ChunkEncoder:
    """Encodes whole chunks into a work folder: read and preprocess the chunk's images, then
    `encode_pixels` in calls of plan.batch images. The VAE (plan.vae) is loaded on first use unless given."""

    def __init__(self, plan: EncodePlan, work: WorkFolder, *, device: str = "cpu", vae=None):
        self.plan, self.work, self.device, self._vae = plan, work, device, vae

    def pixels(self, i: int) -> np.ndarray:
        """uint8 (n, 3, R, R): chunk i's images preprocessed (`lossfloor.data.preprocess`)."""
        images, rows = self.plan.images, self.plan.chunk_range(i)
        with images.tree.open() as read:
            return np.stack([preprocess(read(images.names[j]), images.tree.where(images.names[j]),
                                        self.plan.resolution) for j in rows])

    def __call__(self, i: int) -> int:
        """Encode chunk i and store it; returns its number of images."""
        if self._vae is None:
            self._vae = load_vae(self.plan.vae, device=self.device)
        mean_std = encode_pixels(self._vae, self.pixels(i), batch=self.plan.batch)
        self.work.write(i, mean_std)
        return len(mean_std)
