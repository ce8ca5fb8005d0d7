"""Sample metrics: Fréchet distance, feature sums and statistics, and the feature extractors.

FD (Heusel et al. 2017, "FID"): ||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)).

Every extractor takes images as a saved PNG holds them: uint8 (B, C, H, W), C = 1 or 3 (`to_uint8` turns
samples in [-1, 1] into those bytes with EDM2's rounding), and returns features (B, F):
- `PixelFeatures` ("pixels[:K]"): the pixels back in [-1, 1] (u / 127.5 - 1), average-pooled by an
  integer factor K, flattened (any data set, including the bundled digits; FD in pixel space).
- `NetworkFeatures`: a network from a user-supplied local file, a torch.export program (.pt2) or a
  TorchScript module (any other suffix); neither format unpickles code and nothing is downloaded. Its
  preprocessing is the network's published one:
  "inception:FILE" (FID): grey repeated to RGB; the uint8 values (as float, 0..255) resized to 299 x 299
    by TensorFlow-1's bilinear resize (`tf1_bilinear`), the resize the reference Inception-v3 network
    performs itself on a uint8 input (so a 299 input passes its own resize unchanged); then
    net(x, return_features=True).
  "dinov2:FILE" (FD_DINOv2): grey to RGB; bicubic, antialiased resize of the 0..255 values to 224
    (torch's, as EDM2's default "torch" resize mode); / 255; (x - ImageNet mean) / ImageNet std.
  "network:FILE": the pixels in [-1, 1], no resize.
`FeatureSums` holds count, sum f and sum f f^T in float64: sums of blocks add up exactly, so statistics of
any split of the samples (batches, Ray workers) are the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lossfloor.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_SIZE = 299
DINOV2_SIZE = 224
METRIC_NAMES = {"pixels": "fd", "network": "fd", "inception": "fid", "dinov2": "fd_dinov2"}


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 sqrtm(C1 C2)) (Fréchet distance of two Gaussians), float64.

    The imaginary part sqrtm returns from rounding is dropped; a product whose square root is not finite
    (singular covariances) is regularised by adding 1e-6 I to both covariances (the usual FID practice).
    """
    import scipy.linalg  # here, not at module level: spawned training ranks need not import it

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise InputError(f"frechet_distance: shapes do not match: mu {mu1.shape}/{mu2.shape}, cov {cov1.shape}/{cov2.shape}")
    with warnings.catch_warnings():  # singular covariances (constant features) are common and handled
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
        if not np.all(np.isfinite(covmean)):
            eps = 1e-6 * np.eye(len(mu1))
            covmean = scipy.linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureSums:
    """count, sum f (F,) and sum f f^T (F, F) of features, float64; `+` adds two disjoint sets."""

    count: int
    total: np.ndarray
    outer: np.ndarray

    @classmethod
    def of(cls, features) -> FeatureSums:
        f = torch.as_tensor(features).detach().to("cpu", torch.float64)  # (B, F)
        return cls(count=len(f), total=f.sum(0).numpy(), outer=(f.T @ f).numpy())

    def __add__(self, other: FeatureSums) -> FeatureSums:
        return FeatureSums(count=self.count + other.count, total=self.total + other.total,
                           outer=self.outer + other.outer)

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, C): mu = sum f / n, C = (sum f f^T - n mu mu^T) / (n - 1) (unbiased)."""
        if self.count < 2:
            raise InputError(f"features: statistics need at least 2 samples, got {self.count}")
        mu = self.total / self.count
        return mu, (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, C): mean (F,) and covariance (F, F) of features (N, F), float64 (unbiased, N - 1)."""
    f = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise InputError(f"features: expected (N, F) with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] as the bytes of a saved PNG: floor(clip(127.5 x + 128, 0, 255)), i.e.
    (x + 1) 127.5 rounded half up and clipped, computed as EDM2 computes it (x 127.5 + 128 in float32)."""
    return (x.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _rgb(u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1|3, H, W) -> float32 (B, 3, H, W) with values 0..255 (grey repeated)."""
    x = u8.to(torch.float32)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's bilinear resize (align_corners=False, no half-pixel centres) of (B, C, H, W) to
    (B, C, size, size): output pixel i reads the input at s = i * H / size, between rows floor(s) and
    min(floor(s) + 1, H - 1) with weight s - floor(s) (so the last rows repeat the edge); rows, then
    columns. At size == H it is the identity."""
    def along(x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        s = torch.arange(size, dtype=torch.float64) * (n / size)
        i0 = s.floor().to(torch.int64)
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (s - i0).to(x.dtype)
        shape = [1] * x.ndim
        shape[dim] = size
        a, b = x.index_select(dim, i0.to(x.device)), x.index_select(dim, i1.to(x.device))
        return a + (b - a) * w.to(x.device).view(shape)
    return along(along(x, 2), 3)


def inception_input(u8: torch.Tensor) -> torch.Tensor:
    """The reference Inception-v3's input: RGB, 0..255 float, TF1-bilinear to 299 (module docstring)."""
    x = _rgb(u8)
    return x if x.shape[-1] == INCEPTION_SIZE and x.shape[-2] == INCEPTION_SIZE else tf1_bilinear(x, INCEPTION_SIZE)


def dinov2_input(u8: torch.Tensor) -> torch.Tensor:
    """DINOv2's input: RGB, bicubic antialiased resize of 0..255 to 224, / 255, ImageNet-normalised."""
    x = F.interpolate(_rgb(u8), size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


def pixels_input(u8: torch.Tensor) -> torch.Tensor:
    """The pixels back in [-1, 1]: u / 127.5 - 1."""
    return u8.to(torch.float32) / 127.5 - 1


class PixelFeatures:
    """Features = pixels in [-1, 1] of uint8 images, average-pooled by `downsample` (1 = none), flattened."""

    def __init__(self, downsample: int = 1):
        if not (isinstance(downsample, int) and downsample >= 1):
            raise InputError(f"downsample: expected an integer >= 1, like 2, got {downsample!r}")
        self.downsample = downsample
        self.spec = "pixels" if downsample == 1 else f"pixels:{downsample}"
        self.metric, self.network_sha256 = "fd", None
        self.preprocessing = f"u/127.5-1, average-pooled by {downsample}"

    def __call__(self, u8: torch.Tensor) -> torch.Tensor:
        x = pixels_input(u8)
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)  # (B, C, H, W) -> (B, C, H/k, W/k)
        return x.flatten(1)  # (B, F)


PREPROCESS = {"inception": (inception_input, {"return_features": True},
                            "RGB, 0..255, TF1 bilinear to 299, net(x, return_features=True)"),
              "dinov2": (dinov2_input, {}, "RGB, 0..255 bicubic antialiased to 224, /255, ImageNet mean/std"),
              "network": (pixels_input, {}, "u/127.5-1, no resize")}


class NetworkFeatures:
    """Features from a network in a local file (module docstring): kind "inception", "dinov2" or
    "network" picks the preprocessing; the network must return (B, F) (or (B, F, 1, 1)). `network_sha256`
    names the file's content (reference statistics are refused for another network)."""

    def __init__(self, path: str | os.PathLike, *, kind: str = "network", device="cpu"):
        path = Path(path)
        if kind not in PREPROCESS:
            raise InputError(f"features: expected a network kind of {', '.join(PREPROCESS)}, got {kind!r}")
        if not path.is_file():
            raise InputError(f"--features {kind}:{path}: file not found (expected a torch.export .pt2 or TorchScript file)")
        self.net = load_network(path, device, f"--features {kind}:{path}")
        self.path, self.kind, self.device = path, kind, torch.device(device)
        self.preprocess, self.call_kwargs, self.preprocessing = PREPROCESS[kind]
        if path.suffix == ".pt2":  # an exported program takes the arguments it was exported with: net(x)
            self.call_kwargs = {}
        self.spec, self.metric, self.network_sha256 = kind, METRIC_NAMES[kind], file_sha256(path)

    @torch.no_grad()
    def __call__(self, u8: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(u8.to(self.device))
        return self.net(x, **self.call_kwargs).flatten(1).to(torch.float32)  # (B, F)


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_network(path: Path, device, what: str) -> Callable:
    """A torch.export program (.pt2) as a module, or a TorchScript module (other suffixes), in eval mode."""
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module().to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still supported
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # torch raises several types for foreign files
        kind = "torch.export .pt2" if path.suffix == ".pt2" else "TorchScript"
        raise InputError(f"{what}: not a {kind} file ({e.__class__.__name__})") from None


def feature_extractor(spec: str, *, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """Parse an extractor spec: "pixels" | "pixels:K" (pool by K) | "inception:PATH" | "dinov2:PATH" |
    "network:PATH". The extractor has .spec, .metric (fd | fid | fd_dinov2), .network_sha256, .preprocessing."""
    kind, _, arg = str(spec).partition(":")
    if kind == "pixels":
        try:
            return PixelFeatures(int(arg) if arg else 1)
        except ValueError:
            raise InputError(f"--features: expected pixels or pixels:K with an integer K, got {spec!r}") from None
    if kind in PREPROCESS and arg:
        return NetworkFeatures(arg, kind=kind, device=device)
    raise InputError(f"--features: expected pixels[:K], inception:PATH, dinov2:PATH or network:PATH, got {spec!r}")


def feature_extractors(specs: str, *, device="cpu") -> dict[str, Callable]:
    """`feature_extractor` of each comma-separated spec, keyed by its metric (fd, fid, fd_dinov2); two
    specs of one metric are refused."""
    out: dict[str, Callable] = {}
    for spec in [s.strip() for s in str(specs).split(",") if s.strip()] or [""]:
        ex = feature_extractor(spec, device=device)
        if ex.metric in out:
            raise InputError(f"--features: two extractors give {ex.metric} ({out[ex.metric].spec}, {ex.spec}); give one")
        out[ex.metric] = ex
    return out


@torch.no_grad()
def image_sums(extractors: dict[str, Callable], images, *, batch: int = 256) -> dict[str, FeatureSums]:
    """Feature sums per metric of images (N, C, H, W) in [-1, 1] (array or tensor), quantised to uint8 first."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    sums: dict[str, FeatureSums] = {}
    for i in range(0, len(x), batch):
        u8 = to_uint8(x[i : i + batch])
        for name, ex in extractors.items():
            s = FeatureSums.of(ex(u8))
            sums[name] = s if name not in sums else sums[name] + s
    return sums


def compute_statistics(extractor: Callable, images, *, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics (mu, C) of images (N, C, H, W) in [-1, 1], quantised to uint8, in batches."""
    return image_sums({"f": extractor}, images, batch=batch)["f"].statistics()


def frechet_distance_of(extractor: Callable, images_a, images_b, *, batch: int = 256) -> float:
    """FD between the feature statistics of two image sets."""
    return frechet_distance(*compute_statistics(extractor, images_a, batch=batch),
                            *compute_statistics(extractor, images_b, batch=batch))
