"""What a task means to the passes: where its data comes from and how raw inputs become model tensors.

Two tasks: ``text-classification`` (texts, tokenized by the bundle's
``tokenizer.json``) and ``image-classification`` (uint8 images, preprocessed as
the bundle's ``ImagePreprocessing`` says). Both encodings are the device's own
code in ``device_agent.preprocess``, so a pass that feeds a model (export
parity, optimize, quantize calibration, evaluate, package golden vectors) and a
device serving the bundle turn the same raw input into the same tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgekit.artifact import TaskSpec
    from edgekit.config import BuildConfig
    from edgekit.data import TaskData

TEXT, IMAGE = "text-classification", "image-classification"
KINDS = (TEXT, IMAGE)


def model_feeds(task: TaskSpec, inputs: Sequence[str] | np.ndarray, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
    """The model's input tensors for a batch of raw inputs: texts, or uint8 images ``[n, height, width, channels]``.

    Text feeds carry every tensor the tokenizer makes (callers keep those the
    graph takes); ``pad_to_max_length`` pads texts to ``task.max_length`` for
    fixed-shape timing and is meaningless for images, whose shape the
    preprocessing fixes.
    """
    if task.image is not None:
        from device_agent.preprocess import ImagePreprocessor

        return {task.input_names[0]: ImagePreprocessor(task.image)(np.asarray(inputs))}
    if task.tokenizer_file is None:
        raise ValueError(f"task {task.kind!r} has neither a tokenizer nor image preprocessing")
    return _tokenizer(Path(task.tokenizer_file), task.max_length, pad_to_max_length).encode(list(inputs))


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer_file: Path, max_length: int, pad_to_max_length: bool):
    # Passes encode in many small batches; reading tokenizer.json once per batch cost more than the encoding.
    from device_agent.preprocess import TextTokenizer

    return TextTokenizer(tokenizer_file, max_length, pad_to_max_length=pad_to_max_length)


def load_task_data(config: BuildConfig) -> TaskData:
    """Read, clean and split the build's data for its task."""
    if config.task.kind == IMAGE:
        from edgekit.tasks.image_classification import load_task_data as load_images

        return load_images(config.data, config.task.image)
    from edgekit.tasks.text_classification import load_task_data as load_texts

    return load_texts(config.data)
