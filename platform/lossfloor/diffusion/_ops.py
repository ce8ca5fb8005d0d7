"""Elementwise math that works on python floats, numpy arrays and torch tensors alike."""

import math

import numpy as np
import torch

from lossfloor.errors import InputError


def log(x):
    """Natural logarithm of `x` (float, numpy array or torch tensor)."""
    if isinstance(x, torch.Tensor):
        return torch.log(x)
    if isinstance(x, np.ndarray):
        return np.log(x)
    return math.log(x)


def expm1(x):
    """exp(x) - 1 of `x` (float, numpy array or torch tensor), accurate near 0."""
    if isinstance(x, torch.Tensor):
        return torch.expm1(x)
    if isinstance(x, np.ndarray):
        return np.expm1(x)
    return math.expm1(x)


def atan(x):
    """Arc tangent of `x` (float, numpy array or torch tensor)."""
    if isinstance(x, torch.Tensor):
        return torch.atan(x)
    if isinstance(x, np.ndarray):
        return np.arctan(x)
    return math.atan(x)


def check_name(kind: str, name: str, valid) -> str:
    """Return `name` if it is one of `valid`, else raise InputError listing the valid names."""
    if name not in valid:
        choices = ", ".join(repr(v) for v in valid)
        raise InputError(f"{kind}: expected one of {choices}, got {name!r}")
    return name
