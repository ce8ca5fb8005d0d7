"""The images of an encode source, in order, with their labels: what `lossfloor data encode` reads.

A source is a folder or a .zip of PNG/JPEG images of any size (other files are ignored). Labels come from
exactly one scheme: class sub-folders (ImageNet's training layout, `lossfloor.data.images.folder_labels`),
a `dataset.json` inside the source (EDM2's {"labels": [[relative_path, int], ...]}), or a labels file
given with --labels in the same format; flat folders without either are unlabelled. Mixing schemes (a
labels file for images already in class folders, or a source with its own dataset.json) is refused.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lossfloor.data.edm2 import LABELS_FILE, parse_labels
from lossfloor.data.files import DirTree, ZipTree
from lossfloor.data.images import folder_labels, is_image_name
from lossfloor.errors import InputError


@dataclass(frozen=True, kw_only=True)
class ImageList:
    """A source's images: names relative to its root (sorted), their sizes in bytes, labels or None."""

    path: str  # the --data string
    tree: DirTree | ZipTree
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    labels: np.ndarray | None  # (N,) int64

    def __len__(self) -> int:
        return len(self.names)


def list_images(src: str, labels_file: str | None = None) -> ImageList:
    """The images of SRC (module docstring); InputError naming --data or --labels for a bad source."""
    path = Path(src).expanduser()
    if path.is_file() and path.suffix.lower() == ".zip":
        tree = ZipTree(path, label=src)
    elif path.is_dir():
        tree = DirTree(path, label=src)
    else:
        what = "no such file or directory" if not path.exists() else "not a folder or a .zip"
        raise InputError(f"--data {src}: {what}; expected a folder or a .zip of PNG/JPEG images")
    all_names = tree.names()
    images = [n for n in all_names if is_image_name(n)]
    if len(images) < 2:
        raise InputError(f"--data {src}: expected at least 2 PNG/JPEG images, found {len(images)}")
    if LABELS_FILE in all_names and labels_file is not None:
        raise InputError(f"--labels {labels_file}: {src} has its own {LABELS_FILE}; give one label scheme, not both")
    if LABELS_FILE in all_names:
        with tree.open() as read:
            labels = parse_labels(read(LABELS_FILE), tree.where(LABELS_FILE), images)
    elif labels_file is not None:
        if any("/" in n for n in images) and all("/" in n for n in images):
            raise InputError(f"--labels {labels_file}: {src} already labels its images by class sub-folders; "
                             "give one label scheme, not both")
        try:
            text = Path(labels_file).expanduser().read_bytes()
        except OSError as e:
            raise InputError(f"--labels {labels_file}: cannot read it ({e.strerror or e})") from None
        labels = parse_labels(text, f"--labels {labels_file}", images)
    else:
        images, labels = folder_labels(src, images)
    return ImageList(path=src, tree=tree, names=tuple(images), sizes=_sizes(tree, images), labels=labels)


def _sizes(tree: DirTree | ZipTree, names: list[str]) -> tuple[int, ...]:
    if isinstance(tree, DirTree):
        return tuple((tree.root / n).stat().st_size for n in names)
    with zipfile.ZipFile(tree.file) as archive:
        return tuple(archive.getinfo(n).file_size for n in names)
