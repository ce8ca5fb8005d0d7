"""Which torch devices a flag may name on this machine."""

from __future__ import annotations

import torch

from lossfloor.errors import InputError


def check_device(device: str | None, flag: str = "--device") -> str | None:
    """`device` if this machine has it: None (the caller's default), cpu, cuda or cuda:N; InputError naming
    the flag otherwise (torch's own error for a missing CUDA is an AssertionError deep in the first copy)."""
    if device is None or device == "cpu":
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"{flag}: expected cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise InputError(f"{flag} {device}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise InputError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
