"""The README stays true: its first-hour block runs as written in a fresh folder, and every other
`lossfloor ...` and study command line in it parses (a renamed or removed flag fails here)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent


def blocks(text: str) -> list[tuple[bool, list[str]]]:
    """(marked first-hour, command lines) of every ```bash block: continuations joined, comments dropped."""
    out = []
    for m in re.finditer(r"(<!-- first-hour -->\n)?```bash\n(.*?)```", text, flags=re.S):
        joined = m[2].replace("\\\n", " ")
        lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in joined.splitlines()]
        out.append((bool(m[1]), [ln for ln in lines if ln and not ln.startswith("#")]))
    return out


FIRST_HOUR = next(lines for marked, lines in blocks(README) if marked)
OTHERS = [ln for marked, lines in blocks(README) if not marked for ln in lines]


def test_the_readme_has_one_first_hour_block():
    assert sum(marked for marked, _ in blocks(README)) == 1
    assert any(ln.startswith("lossfloor train") for ln in FIRST_HOUR)


def _study_parser(name: str):
    sys.path.insert(0, str(ROOT / "studies"))
    spec = importlib.util.spec_from_file_location(f"readme_{name}", ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.parse_args


def _parse(line: str) -> None:
    words = shlex.split(line)
    if words[:3] == ["ray", "job", "submit"]:
        words = words[words.index("--") + 1:]
    if words[0] == "lossfloor":
        from lossfloor.cli import build_parser

        build_parser().parse_args(words[1:])
    elif words[0] == "python" and words[1].startswith("studies/"):
        _study_parser(Path(words[1]).stem)(words[2:])


@pytest.mark.parametrize("line", [ln for ln in OTHERS if re.match(r"(lossfloor|python studies/|ray job submit)", ln)
                                  and " [" not in ln])  # `fit`'s synopsis line uses [optional] brackets
def test_every_readme_command_line_parses(line):
    try:
        _parse(line)
    except SystemExit as e:
        pytest.fail(f"README command does not parse (exit {e.code}): {line}")


@pytest.mark.e2e
def test_the_first_hour_runs_as_written_in_a_fresh_folder(tmp_path):
    assert not tmp_path.resolve().is_relative_to(ROOT)  # an empty folder outside the clone
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "LOSSFLOOR"))}
    env |= {"LOSSFLOOR": str(ROOT),  # the clone, as the README says to set it
            "LOSSFLOOR_HOME": str(tmp_path / "home"), "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
            "RAY_AUTH_MODE": "disabled"}
    for line in FIRST_HOUR:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "home" / "mlflow.db").is_file()  # one store for the CLI and the study alike
    assert (tmp_path / "scaling.html").is_file() and (tmp_path / "diag.parquet").is_file()
    assert not (tmp_path / "runs" / "sweep").exists()  # a dry run writes nothing
