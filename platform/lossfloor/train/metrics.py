"""Sample metrics: Fréchet distance between feature statistics, and the feature extractors.

FD (Heusel et al. 2017, "FID"): ||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)).
Feature extractors map images (B, C, H, W) in [-1, 1] to features (B, F):
- `PixelFeatures`: the flattened pixels, optionally average-pooled by an integer factor (works on any
  data set, including the bundled digits; FD in pixel space).
- `NetworkFeatures`: a network from a user-supplied local file, a torch.export program (.pt2,
  torch.export.save) or a TorchScript module (any other suffix, torch.jit.save), e.g. an Inception-v3
  export for FID or a DINOv2 ViT-L/14 export for FD_DINOv2 (edm2.md §6). Neither format unpickles
  code, and nothing is downloaded. `inception_features` / `dinov2_features` set the preprocessing those
  networks expect.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lossfloor.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_RANGES = {"-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0), "0,255": (0.0, 255.0)}


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 sqrtm(C1 C2)) (Fréchet distance of two Gaussians), float64.

    The imaginary part sqrtm returns from rounding is dropped; a singular product is regularised by
    adding 1e-6 I to both covariances (the usual FID practice).
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


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, C): mean (F,) and covariance (F, F) of features (N, F), float64 (unbiased, N - 1)."""
    f = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise InputError(f"features: expected (N, F) with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


class PixelFeatures:
    """Features = pixels of images in [-1, 1], average-pooled by `downsample` (1 = none), flattened."""

    def __init__(self, downsample: int = 1):
        if not (isinstance(downsample, int) and downsample >= 1):
            raise InputError(f"downsample: expected an integer >= 1, like 2, got {downsample!r}")
        self.downsample = downsample

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)  # (B, C, H, W) -> (B, C, H/k, W/k)
        return x.flatten(1)  # (B, F)


class NetworkFeatures:
    """Features from a network in a local file: torch.export (.pt2) or TorchScript (other suffixes).

    Preprocessing, from images (B, C, H, W) in [-1, 1]: clamped to [-1, 1]; grey images repeated to
    `channels`; then resized (bicubic, antialiased) to `resize` x `resize` if given; mapped to `input_range`
    ("-1,1", "0,1" or "0,255"); then (x - mean) / std per channel if `mean`/`std` are given.
    The network is called as net(x, **call_kwargs) and must return (B, F) (or (B, F, 1, 1)).
    """

    def __init__(self, path: str | os.PathLike, *, resize: int | None = None, input_range: str = "-1,1",
                 channels: int | None = None, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, call_kwargs: Mapping | None = None, device="cpu"):
        path = Path(path)
        if not path.is_file():
            raise InputError(f"feature network {path}: file not found (expected a torch.export .pt2 or TorchScript .pt file)")
        if input_range not in INPUT_RANGES:
            raise InputError(f"input_range: expected one of {', '.join(INPUT_RANGES)}, got {input_range!r}")
        self.net = load_network(path, device)
        self.path, self.resize, self.input_range = path, resize, input_range
        self.channels, self.mean, self.std = channels, mean, std
        self.call_kwargs = dict(call_kwargs or {})
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32).clamp(-1, 1)
        if self.channels and x.shape[1] == 1 and self.channels > 1:
            x = x.expand(-1, self.channels, -1, -1)  # (B, 1, H, W) -> (B, C, H, W)
        if self.resize and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bicubic", antialias=True, align_corners=False)
        lo, hi = INPUT_RANGES[self.input_range]
        x = (x + 1) / 2 * (hi - lo) + lo
        if self.mean is not None:
            x = (x - torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)) / torch.tensor(
                self.std, device=x.device).view(1, -1, 1, 1)
        return self.net(x, **self.call_kwargs).flatten(1).to(torch.float32)  # (B, F)


def load_network(path: Path, device) -> Callable:
    """A torch.export program (.pt2) as a module, or a TorchScript module (other suffixes), in eval mode."""
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module().to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still supported
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # torch raises several types for foreign files
        kind = "torch.export .pt2" if path.suffix == ".pt2" else "TorchScript"
        raise InputError(f"feature network {path}: not a {kind} file ({e.__class__.__name__})") from None


def inception_features(path: str | os.PathLike, *, device="cpu") -> NetworkFeatures:
    """FID features from a local Inception-v3 network file (TorchScript or .pt2) taking [0, 255] images of any size with
    `return_features=True` (the format EDM2's FID uses, edm2.md §6); resized to 299."""
    return NetworkFeatures(path, resize=299, input_range="0,255", channels=3,
                               call_kwargs={"return_features": True}, device=device)


def dinov2_features(path: str | os.PathLike, *, device="cpu") -> NetworkFeatures:
    """FD_DINOv2 features from a local DINOv2 network file (e.g. ViT-L/14 traced at 224): images
    resized to 224, scaled to [0, 1], ImageNet-normalised (edm2.md §6)."""
    return NetworkFeatures(path, resize=224, input_range="0,1", channels=3, mean=IMAGENET_MEAN,
                               std=IMAGENET_STD, device=device)


def feature_extractor(spec: str, *, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """Parse an extractor spec: "pixels" | "pixels:K" (pool by K) | "inception:PATH" | "dinov2:PATH" |
    "network:PATH" (images passed in [-1, 1], no other preprocessing)."""
    kind, _, arg = str(spec).partition(":")
    if kind == "pixels":
        try:
            return PixelFeatures(int(arg) if arg else 1)
        except ValueError:
            raise InputError(f"features: expected pixels or pixels:K with an integer K, got {spec!r}") from None
    makers = {"inception": inception_features, "dinov2": dinov2_features,
              "network": lambda p, device: NetworkFeatures(p, device=device)}
    if kind in makers and arg:
        return makers[kind](arg, device=device)
    raise InputError(f"features: expected pixels[:K], inception:PATH, dinov2:PATH or network:PATH, got {spec!r}")


@torch.no_grad()
def compute_statistics(extractor: Callable, images, *, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics (mu, C) of images (N, C, H, W) (array or tensor, [-1, 1]), in batches."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    feats = [extractor(x[i : i + batch]).cpu().to(torch.float64) for i in range(0, len(x), batch)]
    return feature_statistics(torch.cat(feats))


def frechet_distance_of(extractor: Callable, images_a, images_b, *, batch: int = 256) -> float:
    """FD between the feature statistics of two image sets."""
    return frechet_distance(*compute_statistics(extractor, images_a, batch=batch),
                            *compute_statistics(extractor, images_b, batch=batch))


def sample_fd(denoiser: Callable, reference, extractor: Callable, *, n: int, label_dim: int = 0, seed: int = 0,
              batch: int = 256, device="cpu", **sampler) -> float:
    """FD between n samples of `denoiser` (EDM Heun, `lossfloor.train.sampling.generate`; sampler options
    such as num_steps pass through) and reference images (N, C, H, W) in [-1, 1], e.g. the training data.

    FID / FD_DINOv2 as EDM2 reports them use 50k samples against the full training set (edm2.md §6).
    """
    from lossfloor.train.sampling import generate

    ref = reference.samples if hasattr(reference, "samples") else reference
    images, _ = generate(denoiser, n, tuple(np.shape(ref)[1:]), label_dim=label_dim, seed=seed, batch=batch,
                         device=device, **sampler)
    return frechet_distance_of(extractor, images, ref, batch=batch)
