"""Image data: labelled images read, cleaned and split as raw uint8 arrays, and how the device preprocesses them.

Two layouts:

- a folder with one sub-folder per class (``data.path: photos/`` holding
  ``photos/<class>/*.png``), or per split and class (``photos/train/<class>/``,
  ``photos/test/<class>/``, optionally ``val/``). PNG, JPEG, BMP, GIF and WebP
  are decoded with Pillow; an image that cannot be decoded is skipped and
  counted, never fatal. Exact duplicates are dropped and counted too.
- IDX files (MNIST, Fashion-MNIST), gzip or not (``data.idx``), with
  ``data.label_names`` naming the integer classes.

Every split holds raw uint8 images ``[n, height, width, channels]``, as a
device would receive them; the task's ``feeds`` (the device's
``ImagePreprocessor``) turns them into the model's input everywhere. Folder
images of different sizes are brought to a common square of side ``resize``
with the device's own resize and centre crop, so the preprocessing recorded in
the bundle finds them as a device would.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.config import DataSection, IdxFiles, ImageSection
from edgekit.data import (
    SPLIT_ALIASES,
    SPLITS,
    DataError,
    Example,
    TaskData,
    assign_splits,
    carve_stratified,
    checked_labels,
    task_data_from,
)

if TYPE_CHECKING:
    from device_agent.bundle import ImagePreprocessing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
INPUT_NAME = "pixel_values"
CALIBRATION_ROWS = 1024
# ImageNet statistics for colour images; for grayscale a neutral centring (0.5 ± 0.25 maps 0..1 to -2..2).
_DEFAULT_NORMALISATION = {"RGB": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "L": ([0.5], [0.25])}
_DEFAULT_NORMALISATION["BGR"] = tuple(list(reversed(v)) for v in _DEFAULT_NORMALISATION["RGB"])
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def preprocessing(section: ImageSection) -> ImagePreprocessing:
    """The bundle's record of how raw images become the model's input (the device runs exactly this)."""
    from device_agent.bundle import ImagePreprocessing

    mean, std = _DEFAULT_NORMALISATION[section.channel_order]
    return ImagePreprocessing(resize=section.resize or max(section.size), crop=section.size, channel_order=section.channel_order,
                              layout=section.layout, scale=1 / 255, mean=section.mean or mean, std=section.std or std)


def channels_of(section: ImageSection) -> int:
    return 1 if section.channel_order == "L" else 3


# ---------------------------------------------------------------- IDX


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as an array; ``DataError`` naming the problem for anything that is not one."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path} ({exc.strerror}); check data.idx in the build config") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is a damaged gzip file ({exc}); download it again") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file (magic {raw[:4].hex() or 'empty'}; expected 0000 + type 08..0e + dimension count)")
    dims_count = raw[3]
    header = 4 + 4 * dims_count
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header ({len(raw)} bytes); download it again")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims_count)]
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path} holds {len(raw) - header} data bytes but its header says {dims} ({expected} bytes): "
                        "the file is truncated or damaged; download it again")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"{images_path}: expected uint8 images [n, height, width(, channels)], got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: expected one integer label per image, got {labels.dtype} {list(labels.shape)}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; they must pair up")
    return (images[..., None] if images.ndim == 3 else images), labels.astype(np.int64)


# ---------------------------------------------------------------- folders


@dataclass
class _FolderScan:
    images: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    first_problem: str | None = None


def _load_image(file: Path, mode: str, side: int) -> np.ndarray:
    """Decode with Pillow, convert to the model's colour mode, bring to side x side the way the device resizes and crops."""
    from PIL import Image

    from device_agent.preprocess import _centre_crop, _resize_shorter_side

    with Image.open(file) as opened:
        opened.load()
        pixels = np.asarray(opened.convert(mode), dtype=np.float32)
    pixels = pixels.reshape(1, *pixels.shape[:2], -1)
    if min(pixels.shape[1:3]) < 1:
        raise ValueError("empty image")
    square = _centre_crop(_resize_shorter_side(pixels, side), side, side)
    return np.clip(np.rint(square[0]), 0, 255).astype(np.uint8)


def _scan_class_folder(folder: Path, label: str, split: str, mode: str, side: int, scan: _FolderScan) -> None:
    from PIL import UnidentifiedImageError

    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            scan.dropped["not_images"] += 1
            continue
        try:
            image = _load_image(file, mode, side)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # Pillow raises all of these for damaged files
            scan.dropped["unreadable"] += 1
            scan.first_problem = scan.first_problem or f"{file}: {exc}"
            continue
        scan.images.append(image)
        scan.labels.append(label)
        scan.splits.append(split)
        scan.digests.append(hashlib.sha256(image.tobytes()).hexdigest())


def _read_folder(path: Path, section: ImageSection) -> _FolderScan:
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist; set data.path to a folder with one sub-folder per class")
    mode, side = ("L" if section.channel_order == "L" else "RGB"), section.resize or max(section.size)
    children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_split = bool(children) and all(child.name.lower() in SPLIT_ALIASES for child in children)
    scan = _FolderScan()
    for child in children:
        if by_split:
            for class_folder in sorted(p for p in child.iterdir() if p.is_dir() and not p.name.startswith(".")):
                _scan_class_folder(class_folder, class_folder.name, SPLIT_ALIASES[child.name.lower()], mode, side, scan)
        else:
            _scan_class_folder(child, child.name, "", mode, side, scan)
    if not scan.images:
        found = f"; {scan.dropped['unreadable']} could not be decoded (first: {scan.first_problem})" if scan.dropped["unreadable"] else ""
        raise DataError(f"{path} holds no readable images{found}; expected {path}/<class>/<image>.png (or .jpg, .jpeg, .bmp, .gif, "
                        f".webp), or {path}/train/<class>/... and {path}/test/<class>/...")
    return scan


def _folder_dataset(path: Path, section: ImageSection, seed: int = 0) -> tuple[dict[str, tuple[np.ndarray, list[str]]], dict, list[str]]:
    """Images per split (uint8 stacks with their class names), the cleaning counts, and warnings."""
    scan = _read_folder(path, section)
    labels_of: dict[str, set[str]] = {}
    for digest, label in zip(scan.digests, scan.labels, strict=True):
        labels_of.setdefault(digest, set()).add(label)
    kept: list[int] = []
    seen: set[str] = set()
    for index, digest in enumerate(scan.digests):
        if len(labels_of[digest]) > 1:
            scan.dropped["conflicting_labels"] += 1
        elif digest in seen:  # also across splits: the same image in train and test would flatter the test score
            scan.dropped["duplicates"] += 1
        else:
            seen.add(digest)
            kept.append(index)
    examples = [Example(scan.digests[i], scan.labels[i], scan.splits[i]) for i in kept]
    warnings: list[str] = []
    if not any(example.split for example in examples):
        examples, warnings = assign_splits(examples, seed)
    elif not any(example.split == "val" for example in examples):
        train = [e for e in examples if e.split == "train"]
        carved, warnings = assign_splits(train, seed)  # the folder has no val/: take it from train, by content hash
        moved = {e.text for e in carved if e.split == "val"}
        examples = [Example(e.text, e.label, "val" if e.text in moved else e.split) for e in examples]
    image_of = {scan.digests[i]: scan.images[i] for i in kept}
    splits = {}
    for name in SPLITS:
        members = [e for e in examples if e.split == name]
        stack = np.stack([image_of[e.text] for e in members]) if members else np.zeros((0, 1, 1, 1), np.uint8)
        splits[name] = (stack, [e.label for e in members])
    cleaning = {"rows_read": len(scan.digests) + scan.dropped["unreadable"] + scan.dropped["not_images"], "rows_kept": len(kept),
                "dropped": {k: v for k, v in sorted(scan.dropped.items()) if v}}
    if scan.first_problem:
        warnings.append(f"skipped {scan.dropped['unreadable']} unreadable image(s); the first: {scan.first_problem}")
    return splits, cleaning, warnings


# ---------------------------------------------------------------- to the build


def _idx_dataset(files: IdxFiles, names: list[str] | None) -> tuple[dict[str, tuple[np.ndarray, list[str]]], dict, list[str]]:
    train_images, train_labels = _idx_pair(files.train_images, files.train_labels)
    test_images, test_labels = _idx_pair(files.test_images, files.test_labels)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"train images are {list(train_images.shape[1:])} but test images {list(test_images.shape[1:])}; they must match")
    top = int(max(train_labels.max(), test_labels.max()))
    if int(min(train_labels.min(), test_labels.min())) < 0:
        raise DataError(f"{files.train_labels}: labels must be class indices 0..n-1, found negative ones")
    if names is not None and top >= len(names):
        raise DataError(f"the IDX labels go up to {top} but data.label_names has {len(names)} names; name every class")
    names = names or [str(i) for i in range(top + 1)]
    val = carve_stratified(train_labels, files.val_share, seed=0)
    splits = {"train": (train_images[~val], [names[i] for i in train_labels[~val]]),
              "val": (train_images[val], [names[i] for i in train_labels[val]]),
              "test": (test_images, [names[i] for i in test_labels])}
    total = len(train_labels) + len(test_labels)
    return splits, {"rows_read": total, "rows_kept": total, "dropped": {}}, []


def load_task_data(data: DataSection, section: ImageSection) -> TaskData:
    """Read, clean and split the build's labelled images (IDX files when ``data.idx`` is set, else the folder ``data.path``)."""
    if section.layout != "NCHW":
        raise DataError("task.image.layout NHWC is for imported models that take channels last; models edgekit builds take NCHW")
    if data.idx is not None:
        splits, cleaning, warnings = _idx_dataset(data.idx, data.label_names)
        source, order = f"IDX {data.idx.train_images.parent}", list(data.label_names or [])
    else:
        splits, cleaning, warnings = _folder_dataset(data.path, section)
        source, order = str(data.path), []
    # Named classes keep their given order (a dataset's documented label indices); otherwise sorted, as for text.
    labels = checked_labels(splits, order, source, "images", "add images (each class needs 3 to be split) or a {split}/ folder")
    channels = splits["train"][0].shape[-1]
    if channels != channels_of(section):
        raise DataError(f"{source}: the images have {channels} channel(s) but task.image.channel_order is {section.channel_order}; "
                        f"set channel_order: {'L' if channels == 1 else 'RGB'}")
    identity = json.dumps([labels, preprocessing(section).model_dump(mode="json")]).encode()
    return task_data_from(labels, splits, CALIBRATION_ROWS, identity, {"source": source, **cleaning, "warnings": warnings})


def fit_image(image: np.ndarray, spec: ImagePreprocessing) -> tuple[np.ndarray, list[str]]:
    """One uint8 image ``[height, width, channels]`` in the colour mode a bundle's preprocessing takes (L or RGB, as
    Pillow converts) and, when that preprocessing does not resize, at its input size; with a note of each change.

    What ``edgekit explain`` does to a single image file before either method: a device's client sends images at
    the model's size, a person explaining one gives whatever file they have."""
    from PIL import Image

    mode = "L" if spec.channel_order == "L" else "RGB"
    given_mode = "L" if image.ndim == 2 or image.shape[2] == 1 else "RGB"
    picture = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    notes = [] if given_mode == mode else [f"converted from {given_mode} to {mode}"]
    picture = picture.convert(mode)
    height, width = spec.crop
    if spec.resize is None and (picture.height, picture.width) != (height, width):
        notes.append(f"resized from {picture.width}x{picture.height} to the model's {width}x{height}")
        picture = picture.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(picture, dtype=np.uint8)
    return (pixels[:, :, None] if pixels.ndim == 2 else pixels), notes
