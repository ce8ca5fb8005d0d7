"""Elementwise math that works on python floats, numpy arrays and torch tensors alike."""

import math

import numpy as np
import torch

from lossfloor.errors import InputError


def _elementwise(name: str, torch_fn, numpy_fn, math_fn):
    """A function applying the same operation to a python float, a numpy array or a torch tensor."""

    def op(x):
        if isinstance(x, torch.Tensor):
            return torch_fn(x)
        if isinstance(x, np.ndarray):
            return numpy_fn(x)
        return math_fn(x)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"{name} of `x` (float, numpy array or torch tensor)."
    return op


log = _elementwise("log", torch.log, np.log, math.log)  # natural logarithm
expm1 = _elementwise("expm1", torch.expm1, np.expm1, math.expm1)  # exp(x) - 1, accurate near 0
atan = _elementwise("atan", torch.atan, np.arctan, math.atan)


def check_name(kind: str, name: str, valid) -> str:
    """Return `name` if it is one of `valid`, else raise InputError listing the valid names."""
    if name not in valid:
        choices = ", ".join(repr(v) for v in valid)
        raise InputError(f"{kind}: expected one of {choices}, got {name!r}")
    return name
