"""A run's data set as an MLflow dataset input: what the UI's Dataset column and `run.inputs` show.

    log_dataset(run, table_fingerprint, source="bundled:digits", context="estimate")

The input names the data by its source (`--data`) and carries lossfloor's data fingerprint: MLflow keeps
at most DIGEST_CHARS characters of a digest, so the digest is the fingerprint's first 36 hex digits
(144 bits) and the whole fingerprint is in the dataset's profile and in the input tag
`lossfloor.fingerprint`. Two runs on the same data (same samples, any source path) share the digest.

MLflow creates a new dataset row without a lock: two runs logging the same new data set at once (the
models of a ladder, on a PostgreSQL server) can collide on the row's key, and the loser's call fails
whole. The row exists then, so `log_dataset` repeats that call once (tests/test_mlflow_server.py).
"""

from __future__ import annotations

import json

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from lossfloor.tracking.runs import TrackedRun

DIGEST_CHARS = 36  # MLflow's limit on a dataset digest (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE)
SOURCE_TYPE = "lossfloor"
FINGERPRINT_TAG = "lossfloor.fingerprint"
_MAX_NAME = 500  # MLflow's limit on a dataset name
_DUPLICATE_KEY = ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry", "dataset_pk")


def dataset_input(fingerprint: str, *, source: str = "", context: str = "") -> DatasetInput:
    """The MLflow dataset input of the data with this fingerprint (module docstring)."""
    name = (source or f"data-{fingerprint[:12]}")[:_MAX_NAME]
    dataset = Dataset(name=name, digest=fingerprint[:DIGEST_CHARS], source_type=SOURCE_TYPE,
                      source=json.dumps({"data": source}), profile=json.dumps({"fingerprint": fingerprint}))
    tags = [InputTag(FINGERPRINT_TAG, fingerprint)]
    if context:
        tags.append(InputTag(MLFLOW_DATASET_CONTEXT, context))
    return DatasetInput(dataset, tags)


def log_dataset(run: TrackedRun, fingerprint: str, *, source: str = "", context: str = "") -> None:
    """Log the data set as an input of `run`; nothing when the fingerprint is unknown ("")."""
    if not fingerprint:
        return
    inputs = [dataset_input(fingerprint, source=source, context=context)]
    try:
        run.client.log_inputs(run.run_id, datasets=inputs)
    except MlflowException as e:
        if not any(s in str(e) for s in _DUPLICATE_KEY):
            raise
        run.client.log_inputs(run.run_id, datasets=inputs)  # another run created the dataset row first
