"""Writing files so that nobody ever sees half of one (DESIGN §2: nothing half-written is left behind).

    write_atomic(path, lambda p: pq.write_table(table, p))     # any writer that takes a path
    write_npz(path, {"x": x, "labels": labels})                # numpy arrays
    write_output(path, text)                                   # a command's text output (--out)
    write_json(path, obj)                                      # JSON (values JSON cannot hold as str)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
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
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def write_json(path: str | os.PathLike, obj, *, indent: int = 1) -> Path:
    """`obj` as JSON, written atomically; values JSON cannot hold (paths, ...) are written as str."""
    text = json.dumps(obj, indent=indent, default=str)
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def check_run_folder(out, flag: str = "--out") -> Path:
    """OUT for a command that fills a folder: OUT may exist (as a folder), its parent must."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is not a folder")
    if not out.absolute().parent.is_dir():
        raise InputError(f"{flag} {out}: its parent folder {out.absolute().parent} does not exist")
    return out
