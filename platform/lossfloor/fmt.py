"""Numbers in the text a user reads (tables, summaries, page cells): one rule for missing values."""

from __future__ import annotations

import math


def num(value, spec: str = ".4g") -> str:
    """A number formatted with `spec`; "-" for None, NaN and inf; other values (a choice, a name) as str."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            return str(value)
    return format(value, spec) if math.isfinite(value) else "-"
