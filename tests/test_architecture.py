"""The layers of ARCHITECTURE.md, checked on the source: (studies, cli) -> jobs -> (ray, tracking, pages) -> core.

Every `import` and `from ... import` of a module counts, also those inside functions (a lazy import is
still an arrow). The core never imports Ray, MLflow or plotly at all (tests/test_tracking.py checks that
at run time too).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "platform" / "lossfloor"
CORE = ("diffusion", "data", "floor", "models", "train", "scaling", "diagnose")
ADAPTERS = ("ray", "tracking", "pages")


def imports(path: Path) -> set[str]:
    """The lossfloor modules and the third-party top-level packages a file imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lossfloor":
        return None
    return parts[1] if len(parts) > 1 else "lossfloor"


def files(*where: str):
    for w in where:
        yield from sorted((PACKAGE / w).rglob("*.py")) if (PACKAGE / w).is_dir() else [PACKAGE / f"{w}.py"]


FORBIDDEN = [
    # (layers of the importing files, what they must not import)
    (CORE, {"ray", "mlflow", "plotly", "lossfloor.ray", "lossfloor.tracking", "lossfloor.pages", "lossfloor.jobs",
            "lossfloor.cli"}),
    (("ray",), {"lossfloor.pages", "lossfloor.jobs", "lossfloor.cli"}),
    (("tracking",), {"lossfloor.jobs", "lossfloor.cli", "lossfloor.ray"}),
    (("pages",), {"lossfloor.ray", "lossfloor.tracking", "lossfloor.jobs", "lossfloor.cli", "mlflow", "ray"}),
    (("jobs",), {"lossfloor.cli"}),
]


@pytest.mark.parametrize("layers, banned", FORBIDDEN, ids=[",".join(f[0]) for f in FORBIDDEN])
def test_no_arrow_against_the_layers(layers, banned):
    bad, paths = [], list(files(*layers))
    assert len(paths) >= len(layers)  # the layers exist: the check is not vacuous
    for path in paths:
        for module in imports(path):
            if any(module == b or module.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_studies_never_import_the_command_line():
    bad = [f"{p.name} imports {m}" for p in sorted((ROOT / "studies").glob("*.py")) for m in imports(p)
           if m == "lossfloor.cli" or m.startswith("lossfloor.cli.")]
    assert not bad, "\n".join(bad)


def test_every_layer_is_a_package_the_architecture_names():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert set(packages) == {*CORE, *ADAPTERS, "jobs", "cli"}, packages
    for name in packages:
        assert f"`{name}`" in text or f"`lossfloor.{name}`" in text, f"ARCHITECTURE.md does not name {name}"
