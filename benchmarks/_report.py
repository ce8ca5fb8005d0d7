"""What every benchmark script shares: a label for the device it ran on, and printing/writing its JSON."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def device_label(device) -> str:
    """The GPU's name, or "cpu (<processor>, <n> threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def emit(results: dict, out: str | Path | None, *, indent: int = 2) -> None:
    """Print the results as JSON and, with `out`, write them there too (folders created)."""
    text = json.dumps(results, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
