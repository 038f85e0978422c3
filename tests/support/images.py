"""Tiny image data sets and the small CNN trained on them: 12x12 grey patterns a CNN learns in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.support.builds import relaxed_target

PATTERNS = ("dot", "horizontal", "vertical")
# Accuracy budgets a toy test set can be judged by.
TOY_BUDGETS = {"max_accuracy_drop_points": 25.0, "min_top1_agreement": 0.7}


def pattern(label: str, rng: np.random.Generator, size: int = 12) -> np.ndarray:
    """Noise with two horizontal lines three rows apart, two vertical lines, or a square blob."""
    image = rng.integers(0, 60, size=(size, size)).astype(np.uint8)
    k = int(rng.integers(0, size))
    if label == "horizontal":
        image[[k, (k + 3) % size], :] = 255
    elif label == "vertical":
        image[:, [k, (k + 3) % size]] = 255
    else:
        y, x = rng.integers(3, size - 3, 2)
        image[y - 2 : y + 2, x - 2 : x + 2] = 255
    return image


def make_image_folder(root: Path, per_class: int = 40, classes=PATTERNS, seed: int = 0) -> Path:
    """``root/<class>/<n>.png`` of ``pattern`` images."""
    rng = np.random.default_rng(seed)
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(pattern(label, rng)).save(root / label / f"{index}.png")
    return root


def build_tiny_cnn(root: Path, targets: tuple[str, ...], *, classes=PATTERNS, budgets: dict | None = None,
                   **sections: dict) -> Path:
    """`edgekit build` of the small CNN (widths 8, 16) on a pattern folder under ``root``, with ``sections`` added to
    the config, into ``root/out`` (cache ``root/cache``); ``root/keyring`` trusts the build's development key."""
    from edgekit.cli import app

    make_image_folder(root / "images", classes=classes)
    config = {
        "model": {"source": "builtin:small-cnn", "name": "tiny-cnn", "widths": [8, 16]},
        "task": {"kind": "image-classification", "image": {"size": [12, 12], "channel_order": "L"}},
        "data": {"path": "images"},
        "train": {"epochs": 12, "batch_size": 16, "learning_rate": 0.01, "augment": "none"},
        "quantization": {"time_limit_s": 10},
        "evaluation": {"latency_iterations": 5, "throughput_seconds": 0.1},
        "targets": [str(relaxed_target(root, name, **(budgets or TOY_BUDGETS))) for name in targets],
        **sections,
    }
    (root / "build.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["build", str(root / "build.yaml"), "--out", str(root / "out"), "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    keyring = root / "keyring"
    keyring.mkdir()
    shutil.copy(root / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    return root
