"""The layers of ARCHITECTURE.md, checked on the source: which layer may import which.

ARCHITECTURE.md's table "Which layer may import which" is the one statement of the arrows: this test reads
it, puts every module of the package and every study in its layer, and fails on an import of a lossfloor
module the table does not allow (an upward or undrawn arrow), of a module no layer holds, or of a third-party
package the layer never imports. Every `import` and `from ... import` counts, also those inside functions (a
lazy import is still an arrow) and relative ones; `from lossfloor import tracking` imports lossfloor.tracking.
The picture above the table must agree with it: every layer is drawn above the layers it may import. The core
never imports Ray, MLflow or plotly at all (tests/test_tracking.py checks that at run time too).
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "platform" / "lossfloor"
STUDIES = ROOT / "studies"
TABLE_HEADING = "## Which layer may import which"
LAYERS = ("studies", "cli", "jobs", "ray", "tracking", "pages", "core", "helpers")


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # lossfloor packages and modules (a package holds its submodules), or a file pattern
    may_import: frozenset[str]  # other layers
    never: frozenset[str]  # third-party top-level packages


def read_layers(text: str) -> dict[str, Layer]:
    """The table under TABLE_HEADING: | layer | its modules | may import | never imports |."""
    rows = []
    for line in text.split(TABLE_HEADING, 1)[1].splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    words = lambda cell: frozenset(w for w in re.split(r"[,\s]+", cell) if w not in ("", "-"))  # noqa: E731
    return {name: Layer(name, tuple(re.findall(r"`([^`]+)`", modules)), words(may), words(never))
            for name, modules, may, never in rows[2:]}  # after the header and its |---| line


LAYER_TABLE = read_layers((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"))


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str, layers: dict[str, Layer]) -> str | None:
    """The layer holding `module`: the longest name of the table it is or lies under (the package root
    `lossfloor` holds only itself, not every lossfloor module)."""
    best = (None, "")
    for layer in layers.values():
        for name in layer.modules:
            if (module == name or ("." in name and module.startswith(name + "."))) and len(name) > len(best[1]):
                best = (layer.name, name)
    return best[0]


def imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The modules a file imports (`module`: its own name, to resolve relative imports; `known`: the
    package's modules, to tell `from pkg import submodule` from `from pkg import name`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = module.split(".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package (a package's __init__ is its own package)
                keep = len(own) - node.level + (path.name == "__init__.py")
                base = ".".join([*own[:keep], *([node.module] if node.module else [])])
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return out


def sources(package: Path, studies: Path, layers: dict[str, Layer]) -> list[tuple[Path, str, str | None]]:
    """(file, module name, layer) of every module of `package` and every study; layer None: no layer holds it."""
    found = [(p, m, layer_of(m, layers)) for p in sorted(package.rglob("*.py")) for m in [module_name(p, package)]]
    for p in sorted(studies.glob("*.py")):
        held = [layer.name for layer in layers.values() for name in layer.modules
                if fnmatch.fnmatch(f"{studies.name}/{p.name}", name)]
        found.append((p, p.stem, held[0] if held else None))
    return found


def arrows_against_the_table(package: Path, studies: Path, layers: dict[str, Layer],
                             only: str | None = None) -> list[str]:
    """Every import the table does not allow, as lines naming the file, the module and the layers
    (`only`: of that layer's files)."""
    found = sources(package, studies, layers)
    known = {m for _, m, _ in found}
    bad = []
    for path, module, layer in found:
        if layer is None:
            bad.append(f"{path}: module {module} lies in no layer of ARCHITECTURE.md")
            continue
        if only is not None and layer != only:
            continue
        rule = layers[layer]
        for imported in sorted(imports(path, module, known)):
            top = imported.split(".")[0]
            if top == "lossfloor":
                target = layer_of(imported, layers)
                if target is None:
                    bad.append(f"{path} imports {imported}, which lies in no layer of ARCHITECTURE.md")
                elif target != layer and target not in rule.may_import:
                    bad.append(f"{path} imports {imported}: {layer} -> {target} is no arrow of ARCHITECTURE.md")
            elif top in rule.never:
                bad.append(f"{path} imports {imported}: {layer} never imports {top}")
    return bad


def test_the_table_holds_every_layer_once():
    assert tuple(LAYER_TABLE) == LAYERS
    for layer in LAYER_TABLE.values():
        assert layer.modules, layer.name
        assert layer.may_import <= set(LAYERS) - {layer.name}, layer.name
    assert LAYER_TABLE["core"].never >= {"ray", "mlflow", "plotly"}  # the core's rule, whatever the table says


def test_every_module_and_package_lies_in_a_layer():
    found = sources(PACKAGE, STUDIES, LAYER_TABLE)
    assert not [str(p) for p, _, layer in found if layer is None]
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {layer_of(f"lossfloor.{name}", LAYER_TABLE) for name in packages} == set(LAYERS) - {"studies", "helpers"}
    assert {layer for _, _, layer in found} == set(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_every_import_is_an_arrow_of_the_table(layer):
    bad = arrows_against_the_table(PACKAGE, STUDIES, LAYER_TABLE, only=layer)
    assert not bad, "\n".join(bad)


def test_the_picture_draws_every_layer_above_what_it_imports():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    picture = text.split("```", 2)[1].splitlines()

    def row(layer: str) -> int:  # where the picture draws it: lossfloor.NAME, NAME/ or NAME:
        rows = [i for i, line in enumerate(picture) if re.search(rf"lossfloor\.{layer}\b|\b{layer}[/:]", line)]
        assert rows, f"the picture of ARCHITECTURE.md does not draw {layer}"
        return rows[0]

    for layer in LAYER_TABLE.values():
        for target in layer.may_import:
            assert row(target) > row(layer.name), f"{layer.name} -> {target} is drawn going up or sideways"


def test_the_check_fails_on_an_upward_or_undrawn_arrow(tmp_path):
    """The check itself, on a small package: each bad import is reported, the drawn arrows are not."""
    files = {
        "__init__.py": "",
        "errors.py": "",
        "cli/__init__.py": "from lossfloor.jobs import study\n",  # cli -> jobs: drawn
        "jobs/__init__.py": "",
        "jobs/study.py": "import mlflow\nfrom lossfloor import tracking\nfrom lossfloor.pages.html import page\n"
                         "from lossfloor.floor import table\nfrom lossfloor.errors import InputError\n",  # all drawn
        "jobs/late.py": "def f():\n    from ..cli import main\n",  # jobs -> cli, relative and lazy: up
        "tracking/__init__.py": "",
        "tracking/train.py": "def f():\n    from lossfloor.pages.training import figure\n",  # sideways
        "tracking/runs.py": "from lossfloor import pages\n",  # sideways, as `from lossfloor import`
        "pages/__init__.py": "",
        "pages/html.py": "import mlflow\n",  # a third-party package pages never imports
        "floor/__init__.py": "from lossfloor.ray import engine\n",  # core -> ray: up
        "floor/table.py": "from .. import errors\nfrom lossfloor.floor import x\n",  # core -> helpers, core
        "ray/__init__.py": "",
        "extra/__init__.py": "",  # a package no layer holds
    }
    package = tmp_path / "lossfloor"
    for name, code in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(code, encoding="utf-8")
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "survey.py").write_text("from lossfloor.tracking import start_run\nfrom lossfloor.jobs import study\n")

    bad = arrows_against_the_table(package, studies, LAYER_TABLE)
    expected = [
        ("jobs/late.py", "jobs -> cli"),
        ("tracking/train.py", "tracking -> pages"),
        ("tracking/runs.py", "tracking -> pages"),
        ("pages/html.py", "pages never imports mlflow"),
        ("floor/__init__.py", "core -> ray"),
        ("extra/__init__.py", "lies in no layer"),
        ("survey.py", "studies -> tracking"),
    ]
    for where, what in expected:
        assert any(where in line and what in line for line in bad), (where, what, bad)
    assert len(bad) == len(expected), "\n".join(bad)
