"""Writing files so that nobody ever sees half of one (nothing half-written is left behind).

    write_atomic(path, lambda p: pq.write_table(table, p))     # any writer that takes a path
    write_npz(path, {"x": x, "labels": labels})                # numpy arrays
    write_output(path, text)                                   # a command's text output (--out)
    write_json(path, obj)                                      # JSON (values JSON cannot hold as str)
    check_writable(out, "--out")                               # before any work: OUT can be written

Outputs' missing parent folders are made (by the writers, once the work is done), never refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lossfloor.errors import InputError


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """write(tmp) to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    The file gets the mode a plain open() would give it (mkstemp makes 0600). On any error the temporary
    file is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez of `arrays`, written atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, **arrays)

    return write_atomic(path, write)


def write_output(path: str | os.PathLike, text: str, flag: str = "--out") -> Path:
    """A command's text output (JSON, an HTML page) written atomically, its folder created if missing; an
    OSError becomes an InputError naming the flag and the path."""
    path = make_parents(path, flag)
    try:
        return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def write_json(path: str | os.PathLike, obj, *, indent: int = 1) -> Path:
    """`obj` as JSON, written atomically; values JSON cannot hold (paths, ...) are written as str."""
    text = json.dumps(obj, indent=indent, default=str)
    return write_atomic(make_parents(path), lambda p: p.write_text(text, encoding="utf-8"))


def check_writable(path, flag: str = "--out", *, folder: bool = False) -> Path:
    """Before any work: PATH can be written (a file, or a folder when `folder`) and its missing parent
    folders can be made. Nothing is created (a check that fails later must not leave an empty folder);
    the writers make the parents when they write. InputError naming the flag otherwise."""
    path = Path(path).expanduser()
    where = f"{flag} {path}"
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{where}: exists and is not a folder")
    if not folder and path.is_dir():
        raise InputError(f"{where}: is a folder, expected a file path")
    existing = path.absolute() if folder else path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{where}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(f"{where}: cannot write in {existing} ({e.strerror or e.__class__.__name__})") from None
    return path


def make_parents(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the folders above `path` (the rule for every output: its missing parents are made)."""
    path = Path(path).expanduser()
    try:
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot create its folder ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Make the folder PATH (and its parents) for a command's outputs; when the block fails, remove the
    folders this made if they are still empty (a failed run leaves nothing behind, a resumable one keeps
    what it wrote)."""
    path = Path(path).expanduser()
    made = []
    for folder in [path.absolute(), *path.absolute().parents]:
        if folder.exists():
            break
        made.append(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None
    try:
        yield path
    except BaseException:
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise
