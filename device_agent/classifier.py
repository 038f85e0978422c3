"""A classification bundle run on raw inputs: texts, uint8 images or table rows in, class probabilities out.

The one way code outside the HTTP server runs a model on what a client would send (``edgekit explain``, ``edgekit
compare``, the agent's explain route): the bundle's own preprocessing, and runs of the rows the model takes
(``rows_per_run``):

- a model whose tensors share a symbolic first dimension (a batch) runs up to ``max_rows`` rows at once, or one at a
  time where the bundle says ``runtime.max_rows_per_run: 1`` (dynamic int8 answers a row differently beside other
  rows, so its texts are also tokenized alone, without padding);
- a model exported with a fixed first dimension N runs exactly N rows each time: the last run is filled up with
  copies of its last row, whose answers are dropped (N = 1, the usual export, never needs filling);
- any other model runs a row at a time.

How many rows the agent's batcher may join is the same rule (``joined_rows``). A model run that fails is a
``ModelRunFailed`` naming the model and the runtime's message. numpy and ONNX Runtime only, like the rest of the agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import (
    ImagePreprocessing, Manifest, SpectralPreprocessing, TablePreprocessing, TokenizerPreprocessing, VerifiedBundle,
)
from device_agent.errors import UserError
from device_agent.preprocess import ImagePreprocessor, TableEncoder, TextTokenizer
from device_agent.runtime import RuntimeOptions, Session, open_model

ROWS_PER_RUN = 32  # rows joined in one run when the bundle allows batches: enough to fill the cores, bounded memory

INPUT_KINDS = {TokenizerPreprocessing: "text", ImagePreprocessing: "image", TablePreprocessing: "table"}


class WrongInput(UserError):
    """An input of another kind than the bundle takes (an image for a text model), or no classification output."""


class ModelRunFailed(UserError):
    """The model refused inputs its preprocessing made (a shape its export does not take, a broken graph): the
    bundle's fault, not the input's; the message names the model and the runtime's own words."""


def batchable(manifest: Manifest) -> bool:
    """Whether rows can be joined along dimension 0: every tensor starts with the same symbolic dimension."""
    first_dims = [spec.shape[0] if spec.shape else None for spec in [*manifest.inputs, *manifest.outputs]]
    return isinstance(first_dims[0], str) and all(dim == first_dims[0] for dim in first_dims)


def fixed_batch(manifest: Manifest) -> int | None:
    """The rows every run must hold when the model's first input starts with a fixed dimension (an export at batch
    1), else None."""
    shape = manifest.inputs[0].shape if manifest.inputs else []
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def joined_rows(manifest: Manifest, max_rows: int) -> int:
    """The most rows one run of this model may join (the batcher's requests, a classifier's inputs): none beyond one
    when it cannot be batched or when its answers depend on the rows it runs with (``runtime.max_rows_per_run``,
    dynamic int8); else up to ``max_rows``."""
    if not batchable(manifest):
        return 1
    return min(max_rows, manifest.runtime.max_rows_per_run or max_rows)


@dataclass
class Classifier:
    """A loaded classification model with its preprocessing; ``input_kind`` is text, image or table."""

    manifest: Manifest
    session: Session
    root: Path  # where the bundle's files lie (an unpacked bundle, or the agent's slot)
    max_rows: int = ROWS_PER_RUN  # most rows a run of a batchable model holds (the agent: its max_batch)

    def __post_init__(self) -> None:
        kind = INPUT_KINDS.get(type(self.manifest.preprocessing))
        if kind is None:
            takes = ("raw windows of a time series (spectral features)"
                     if isinstance(self.manifest.preprocessing, SpectralPreprocessing)
                     else f"raw tensors ({self.manifest.task.kind})")
            raise WrongInput(f"{self.name} takes {takes}; explanations and comparisons cover text, image and table "
                             "bundles")
        if not self.manifest.task.labels:
            raise WrongInput(f"{self.name} lists no class labels; it is not a classifier")
        self.input_kind = kind
        self._tokenizer: TextTokenizer | None = None
        self._images = ImagePreprocessor(self.manifest.preprocessing) if kind == "image" else None
        self._table = TableEncoder(self.manifest.preprocessing) if kind == "table" else None

    @property
    def name(self) -> str:
        return f"{self.manifest.model.name} {self.manifest.model.version}"

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.task.labels)

    @property
    def rows_per_run(self) -> int:
        """Rows in one model run (the module's docstring): a fixed first dimension's size, else ``joined_rows``."""
        return fixed_batch(self.manifest) or joined_rows(self.manifest, self.max_rows)

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            spec = self.manifest.preprocessing
            assert isinstance(spec, TokenizerPreprocessing)
            self._tokenizer = TextTokenizer(self.root / spec.tokenizer_file, spec.max_length)
        return self._tokenizer

    @property
    def images(self) -> ImagePreprocessor:
        if self._images is None:
            raise WrongInput(f"{self.name} takes {self.input_kind} input, not images")
        return self._images

    def expect(self, kind: str, how: str | None = None) -> None:
        """A clear error when the caller's input is of another kind than the bundle takes; ``how`` says how the
        caller is given that kind (a command's option), else the input itself is named."""
        if kind != self.input_kind:
            raise WrongInput(f"{self.name} is a {self.manifest.task.kind} bundle and takes {self.input_kind} input, "
                             f"not {kind}; give it {how or _WHAT_IT_TAKES[self.input_kind]}")

    # ------------------------------------------------------------------ running

    def _output_name(self) -> str:
        names = [spec.name for spec in self.manifest.outputs]
        return "logits" if "logits" in names else names[0]

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(next(iter(feeds.values())))
        fixed = fixed_batch(self.manifest)
        if fixed is not None and rows < fixed:  # a fixed batch takes exactly its rows: fill up with the last one
            feeds = {name: np.concatenate([array, np.repeat(array[-1:], fixed - rows, axis=0)]) for name, array in feeds.items()}
        try:
            outputs = self.session.run(feeds)
        except Exception as error:  # ONNX Runtime's and TensorRT's own error types
            runtime_says = " ".join(str(error).split()) or type(error).__name__
            raise ModelRunFailed(f"{self.name} failed to run on {rows} row(s) its preprocessing made: {runtime_says}") from error
        logits = np.asarray(outputs[self._output_name()], dtype=np.float64)
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise WrongInput(f"{self.name}'s output {self._output_name()!r} has shape {list(logits.shape)}, "
                             f"not [rows, {len(self.labels)}] class scores")
        return logits[:rows]

    def logits_of_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.expect("text")
        names = [spec.name for spec in self.manifest.inputs]
        parts = []
        for start in range(0, len(texts), self.rows_per_run):
            encoded = self.tokenizer.encode(list(texts[start:start + self.rows_per_run]))
            parts.append(self._run({name: encoded[name] for name in names}))
        return _joined(parts, len(self.labels))

    def logits_of_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Logits of images already resized and cropped (``ImagePreprocessor.geometry``), as float pixels."""
        name = self.manifest.inputs[0].name
        parts = [self._run({name: self.images.normalise(pixels[start:start + self.rows_per_run])})
                 for start in range(0, len(pixels), self.rows_per_run)]
        return _joined(parts, len(self.labels))

    def logits_of_images(self, images: np.ndarray) -> np.ndarray:
        self.expect("image")
        # Resized and cropped run by run: float pixels of a whole data set would not fit in memory.
        parts = [self.logits_of_pixels(self.images.geometry(images[start:start + self.rows_per_run]))
                 for start in range(0, len(images), self.rows_per_run)]
        return _joined(parts, len(self.labels))

    def logits_of_rows(self, rows: Sequence[Any]) -> np.ndarray:
        self.expect("table")
        assert self._table is not None
        name = self.manifest.inputs[0].name
        parts = [self._run({name: self._table(rows[start:start + self.rows_per_run])})
                 for start in range(0, len(rows), self.rows_per_run)]
        return _joined(parts, len(self.labels))

    def logits(self, inputs: Any) -> np.ndarray:
        """Logits of raw inputs of the bundle's kind: texts, uint8 images ``[n, h, w, c]`` or row objects."""
        run = {"text": self.logits_of_texts, "image": self.logits_of_images, "table": self.logits_of_rows}[self.input_kind]
        return run(inputs)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _joined(parts: list[np.ndarray], classes: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, classes))


_WHAT_IT_TAKES = {"text": "texts (strings)", "image": "images (uint8 pixels [height, width, channels])",
                  "table": "table rows (objects of column name → value)"}


def classifier_of_bundle(bundle: VerifiedBundle, options: RuntimeOptions = RuntimeOptions()) -> Classifier:
    """The classifier of a verified, unpacked bundle (valid while ``bundle`` is open)."""
    manifest = bundle.manifest
    return Classifier(manifest, open_model(manifest, bundle.path(manifest.runtime.model_file), options), bundle.root)
