"""The estimate path goes down once: `jobs.estimate` → `floor.estimate` → (`floor.config`, `floor.resume`,
`floor.batch` → `floor.kernel` / `floor.knn`), and no module on a call stack is entered again below
itself (no call back up into a module that called it)."""

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from lossfloor.floor import EstimatorConfig
from lossfloor.jobs.estimate import estimate

FLOOR = Path(__file__).resolve().parent.parent / "platform" / "lossfloor" / "floor"


def floor_imports() -> dict[str, set[str]]:
    """For each module of lossfloor.floor, the floor modules it imports (lazily or not)."""
    out = {}
    for path in FLOOR.glob("*.py"):
        mods = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lossfloor.floor"):
                sub = node.module.split(".")[2:]
                mods.update(sub[:1] or [a.name for a in node.names if (FLOOR / f"{a.name}.py").is_file()])
        out[path.stem] = mods - {path.stem}
    return out


def test_floor_modules_import_only_downwards():
    graph = floor_imports()

    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in graph.get(start, ()))

    cycles = sorted(m for m in graph if m != "__init__" and reaches(m, m))
    assert not cycles, f"import cycles through {cycles}"
    assert {"config", "batch", "resume"} <= graph["estimate"]
    assert not graph["config"] & {"batch", "estimate", "resume"}
    assert not graph["batch"] & {"estimate", "resume"} and not graph["resume"] & {"batch", "estimate"}


PATH = ("lossfloor.jobs.estimate", "lossfloor.floor.")


def module_stacks(fn) -> set[tuple[str, ...]]:
    """The modules of the estimate path on every Python call stack while fn runs, outermost first, repeats
    of the same module next to each other merged (a helper outside the path, such as `atomic`, calling a
    function it was handed is not an arrow)."""
    stacks = set()

    def profile(frame, event, arg):
        if event != "call" or not frame.f_globals.get("__name__", "").startswith(PATH):
            return
        mods = []
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if name.startswith(PATH) and (not mods or mods[-1] != name):
                mods.append(name)
            frame = frame.f_back
        stacks.add(tuple(reversed(mods)))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return stacks


@pytest.mark.parametrize("cfg", [
    EstimatorConfig(estimator="exact"),
    EstimatorConfig(estimator="cdol", subset_size=16, rows_per_batch=10),
    EstimatorConfig(estimator="knn", subset_size=8, rel_error=0.1, rows_per_batch=10),  # two passes
], ids=["exact", "cdol", "knn-automatic-L"])
def test_the_walk_from_jobs_estimate_enters_each_module_once(cfg, tmp_path):
    x = np.random.default_rng(0).normal(size=(80, 4)).astype(np.float32)
    stacks = module_stacks(lambda: estimate(x, [0.05, 0.5, 5.0], cfg, work_dir=tmp_path / "w", progress=False))
    bounced = sorted(s for s in stacks if len(set(s)) < len(s))
    assert not bounced, "a module called back up into one that called it:\n" + "\n".join(" → ".join(s) for s in bounced[:5])
    walked = {m for s in stacks for m in s}
    assert {"lossfloor.floor.estimate", "lossfloor.floor.config", "lossfloor.floor.resume", "lossfloor.floor.batch",
            "lossfloor.floor.knn" if cfg.estimator == "knn" else "lossfloor.floor.kernel"} <= walked


def test_the_class_conditional_walk_enters_each_module_once(tmp_path):
    # jobs.estimate → floor.conditional → floor.estimate.run_pass → floor.classes (the class's batches) → floor.batch
    x = np.random.default_rng(1).normal(size=(80, 4)).astype(np.float32)
    cfg = EstimatorConfig(estimator="knn", subset_size=8, rows_per_batch=4)
    stacks = module_stacks(lambda: estimate(x, [0.05, 0.5, 5.0], cfg, labels=np.arange(80) % 2,
                                            work_dir=tmp_path / "w", progress=False))
    bounced = sorted(s for s in stacks if len(set(s)) < len(s))
    assert not bounced, "a module called back up into one that called it:\n" + "\n".join(" → ".join(s) for s in bounced[:5])
    assert {"lossfloor.floor.conditional", "lossfloor.floor.classes", "lossfloor.floor.estimate",
            "lossfloor.floor.resume", "lossfloor.floor.batch", "lossfloor.floor.knn"} <= {m for s in stacks for m in s}
