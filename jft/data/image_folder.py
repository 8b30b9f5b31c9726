"""`image_folder`: the user's own images, one subfolder per class, as a tfds builder.

``path/cat/1.jpg``, ``path/dog/x.png``, ...: classes are the subfolder names, sorted
(label 0 is the first). Each class gives a fixed ``validation`` split: its files are
ordered by a hash of their relative path and the first 10% (at least one, when the
class has two or more files) go to ``validation``, the rest to ``train``. Files keep
their encoded bytes; they are decoded (to RGB) when read. Every image is decoded
once when the folder is prepared: a damaged one (truncated, not an image) stops
the preparation with one line naming it, rather than a training step. A folder is prepared once
into the data dir under a name made from a hash of its path and listing, so a changed
folder is prepared again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from jft.data.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "VALIDATION_FRACTION",
    "ImageFolder",
    "ImageFolderConfig",
    "builder",
    "folder_key",
    "scan",
    "split_files",
    "unreadable",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
VALIDATION_FRACTION = 0.1


def scan(path: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Returns (class names, [(relative file path, label)]) of an image folder.

    Raises:
      DataError: when ``path`` is not a folder or holds no class subfolder with images.
    """
    if not path or not os.path.isdir(path):
        raise DataError(f"image_folder: {path!r} is not a folder (config.data.path)")
    classes = sorted(
        d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and d[0] != "."
    )
    files = []
    for label, name in enumerate(classes):
        for root, _, names in sorted(os.walk(os.path.join(path, name))):
            for f in sorted(names):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((os.path.relpath(os.path.join(root, f), path), label))
    if not files:
        raise DataError(
            f"image_folder: {path!r} has no class subfolders with images "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, files


def unreadable(path: str, files: list[tuple[str, int]]) -> list[str]:
    """The files among ``files`` (relative to ``path``) that do not decode as images."""
    import PIL.Image

    bad = []
    for rel, _ in files:
        try:
            with PIL.Image.open(os.path.join(path, rel)) as img:
                img.load()  # decodes every byte: a truncated file fails here
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            bad.append(rel)
    return bad


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def split_files(files: list[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
    """Splits ``scan``'s files into fixed ``train`` and ``validation`` lists."""
    out = {"train": [], "validation": []}
    for label in sorted({lab for _, lab in files}):
        mine = sorted((f for f in files if f[1] == label), key=lambda f: _hash(f[0]))
        n_val = max(1, round(VALIDATION_FRACTION * len(mine))) if len(mine) > 1 else 0
        out["validation"] += mine[:n_val]
        out["train"] += mine[n_val:]
    return {k: sorted(v) for k, v in out.items()}


def folder_key(path: str, files: list[tuple[str, int]]) -> str:
    """A config name for the folder: its base name and a hash of its path and listing."""
    path = os.path.abspath(path)
    listing = [path] + [f"{f}:{os.path.getsize(os.path.join(path, f))}" for f, _ in files]
    base = "".join(c if c.isalnum() else "_" for c in os.path.basename(path.rstrip("/")))
    return f"{base[:40].lower() or 'root'}_{_hash(chr(10).join(listing))[:12]}"


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """The folder that an `ImageFolder` builder prepares."""

    path: str = ""
    classes: tuple[str, ...] = ()


class ImageFolder(tfds.core.GeneratorBasedBuilder):
    """A folder of class subfolders: ``image`` (encoded bytes), ``label``, ``file_name``.

    Registered with tfds as ``jft_image_folder``; build it with `builder`.
    """

    name = "jft_image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Class subfolders, 10% hashed validation split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"Images of {self.builder_config.path}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "label": tfds.features.ClassLabel(names=list(self.builder_config.classes)),
                    "file_name": tfds.features.Tensor(shape=(), dtype=np.object_),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        root = self.builder_config.path
        _, files = scan(root)
        # Every image is decoded once here, so a damaged one is named now rather than
        # met at some training step.
        bad = unreadable(root, files)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DataError(
                f"image_folder {root}: {len(bad)} of {len(files)} images cannot be decoded "
                f"(truncated or not images): {shown}; repair or remove them"
            )
        return {k: self._generate_examples(v) for k, v in split_files(files).items() if v}

    def _generate_examples(self, files):
        root = self.builder_config.path
        for rel, label in files:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read()
            yield rel, {"image": data, "label": label, "file_name": rel.encode()}


def builder(path: str, data_dir: str | None) -> ImageFolder:
    """Returns the `ImageFolder` builder of ``path`` (prepare it with ``download_and_prepare``)."""
    classes, files = scan(path)
    config = ImageFolderConfig(
        name=folder_key(path, files),
        path=os.path.abspath(path),
        classes=tuple(classes),
        version=ImageFolder.VERSION,
    )
    return ImageFolder(config=config, data_dir=data_dir, file_format="array_record")
