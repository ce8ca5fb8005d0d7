"""The one way lossfloor names a config by its content: sha256 of its canonical JSON.

    config_hash({"estimator": "knn", "L": 128})        # '4f1c...' (12 hex digits)

Canonical JSON: keys sorted, no spaces, NaN/inf allowed, values JSON cannot hold written as str. Used for
work folders (`floor.resume`), training run names (`train.config`) and study stages (`jobs.stages`).
Data sets are named by their content fingerprint instead (`lossfloor.data.fingerprint`).
"""

from __future__ import annotations

import hashlib
import json


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"), allow_nan=True)


def config_hash(obj, chars: int = 12) -> str:
    """The first `chars` hex digits of sha256(canonical JSON of obj)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:chars]
