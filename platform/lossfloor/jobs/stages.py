"""Hash-addressed stages: a study's work in folders named by what they compute, skipped when finished.

    stage = Stage("estimate", {"data_fingerprint": fp, "estimator": cfg}, out)   # OUT/estimate-<hash>
    if not stage.done:
        folder = stage.begin()          # the folder, with config.json
        ...                             # write the stage's outputs into it
        stage.finish({"seconds": 12})   # DONE.json, written last (atomically): the stage is finished
    stage.result()                      # what finish() recorded, read back by a rerun

The hash is `lossfloor.hashing.config_hash` of the stage's config, which names the stages it reads by
their hashes, so a changed input reruns everything after it and an unchanged rerun does nothing. A stage
killed half-way leaves no DONE.json: the rerun redoes it (training resumes from its newest checkpoint in
the same folder, estimation from its work folder). A study may name the folder itself (`folder=`, e.g.
the survey's OUT/<data set>/): the stage is then finished when its DONE.json records the same hash.
`lossfloor.jobs.study` runs a study's stages: skip, run, log.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from lossfloor.atomic import write_json
from lossfloor.hashing import config_hash

MARKER = "DONE.json"  # written last: the stage is finished


@dataclass(frozen=True)
class Stage:
    """One stage: `OUT/<name>-<hash of config>` (or `OUT/<folder>`), finished when its marker exists."""

    name: str  # e.g. "estimate", "train-<model>", "fit"
    config: dict
    out: Path
    folder: str | None = None  # the folder's name when the study names it; default <name>-<hash>

    @property
    def hash(self) -> str:
        return config_hash(self.config)

    @property
    def dir(self) -> Path:
        return Path(self.out) / (self.folder or f"{self.name}-{self.hash}")

    @property
    def done(self) -> bool:
        marker = self.dir / MARKER
        if not marker.is_file():
            return False
        # a folder named by the study may hold another config's marker; one named by the hash cannot
        return self.folder is None or json.loads(marker.read_text(encoding="utf-8"))["hash"] == self.hash

    def begin(self) -> Path:
        """Create the folder and record the config in it (config.json); returns the folder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "config.json", {"stage": self.name, "hash": self.hash, "config": self.config})
        return self.dir

    def finish(self, result: dict) -> None:
        """Write the marker (last): the stage's result summary, read back by a rerun."""
        write_json(self.dir / MARKER, {"stage": self.name, "hash": self.hash, "config": self.config,
                                       "result": result, "finished_unix_s": time.time()})

    def result(self) -> dict:
        return json.loads((self.dir / MARKER).read_text(encoding="utf-8"))["result"]
