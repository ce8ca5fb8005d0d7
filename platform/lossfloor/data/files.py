"""File trees a data set can live in: a folder or a zip archive, read member by member.

Both list files as sorted POSIX paths relative to the root (hidden files and folders, and macOS
`__MACOSX/` debris, left out) and read one member at a time, so a zip of a million images is opened
once and never extracted.
"""

from __future__ import annotations

import contextlib
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from lossfloor.errors import InputError

ReadMember = Callable[[str], bytes]


def _visible(name: str) -> bool:
    return not any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class DirTree:
    """Files under a folder."""

    def __init__(self, root: Path, *, label: str):
        self.root = root
        self.label = label  # how errors name the tree (the SRC string)

    def where(self, name: str) -> str:
        """How errors name a member: its path."""
        return str(self.root / name)

    def names(self) -> list[str]:
        names = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(n for n in names if _visible(n))

    @contextlib.contextmanager
    def open(self) -> Iterator[ReadMember]:
        def read(name: str) -> bytes:
            try:
                return (self.root / name).read_bytes()
            except OSError as e:
                raise InputError(f"{self.root / name}: cannot read ({e.strerror or e})") from e

        yield read


class ZipTree:
    """Members of a zip archive (opened once per `open()`)."""

    def __init__(self, file: Path, *, label: str):
        self.file = file
        self.label = label

    def where(self, name: str) -> str:
        """How errors name a member: ARCHIVE:MEMBER."""
        return f"{self.label}:{name}"

    def names(self) -> list[str]:
        with self._zip() as archive:
            return sorted(n for n in archive.namelist() if not n.endswith("/") and _visible(n))

    @contextlib.contextmanager
    def open(self) -> Iterator[ReadMember]:
        with self._zip() as archive:

            def read(name: str) -> bytes:
                try:
                    return archive.read(name)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
                    raise InputError(f"{self.where(name)}: cannot read this zip member ({e})") from e

            yield read

    @contextlib.contextmanager
    def _zip(self) -> Iterator[zipfile.ZipFile]:
        try:
            archive = zipfile.ZipFile(self.file)
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"{self.label}: expected a readable zip archive ({e})") from e
        with archive:
            yield archive
