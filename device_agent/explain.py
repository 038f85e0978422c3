"""Why a bundle decides as it does, with the bundle alone: occlusion attributions in numpy and ONNX Runtime.

One method for every input kind, so the device, the collector host and the build host can all run it without torch:
take the input away piece by piece and measure how much the predicted class's probability drops.

- **Text, by word.** Each word (a run of letters and digits, or one punctuation mark) is deleted from the text in
  turn, with one whitespace run beside it (``without_spans``); its score is
  ``p(predicted | text) - p(predicted | text without it)``: positive when the word supports the prediction, negative
  when it speaks against it. Every word the model reads is scored, however long the text; words it does not read
  (past the ``max_length`` cut, or symbols the tokenizer drops) are listed with ``read: False`` and score 0 without a
  run. Words that share one of the model's pieces (a byte-level BPE token such as ``?!``) are deleted together and
  share its score. Cost: one row per read word (or group) plus one, so at most ``max_length + 1`` rows whatever the
  text's length (the pieces read are at most ``max_length``), run in batches the bundle allows.
- **Images, by patch.** A square patch slides over the image as the model sees it (after resize and crop) with a
  stride of half its side; each position is painted with the neutral pixel (the training mean when the bundle
  normalises, else the image's own mean) and scored as above; a pixel's heat is the mean score of the patches that
  cover it. Cost: one row per position plus one (169 for a 28x28 image, 225 for a 224x224 crop); the occluded copies
  are made and run ``rows_per_run`` at a time, so memory holds one run's copies, not all of them.
- **Table rows, by column.** Each column is set to missing in turn (the bundle's fill for a number, "other" for a
  category); cost: one row per column plus one.

Deletion is also how faithfulness is measured (``deletion_drop``): removing the top-attributed words or patches should
lower the predicted class's probability more than removing as many at random.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent.classifier import Classifier, softmax
from device_agent.errors import UserError

METHOD = "occlusion"
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_SPACE = re.compile(r"\s+")


class NothingToExplain(UserError):
    """An input with nothing the model reads (an empty text, one of only symbols the tokenizer drops)."""


@dataclass(frozen=True)
class Piece:
    """One attributed part of an input: a word (text), a column (table), with its signed score."""

    token: str
    score: float
    start: int | None = None  # text: the word's character span
    end: int | None = None
    read: bool = True  # text: False where the model reads none of it (past max_length, or dropped): 0 without a run


@dataclass(frozen=True)
class Explanation:
    label: str
    class_index: int
    probability: float
    method: str
    rows_run: int  # model rows this explanation cost
    milliseconds: float
    pieces: list[Piece] = field(default_factory=list)  # text words or table columns, in input order
    heatmap: np.ndarray | None = None  # images: [height, width] scores over the model's view of the image
    pixels: np.ndarray | None = None  # images: the model's view (float pixels [height, width, channels])
    patch: int | None = None  # images: the patch side in pixels

    def top(self, count: int) -> list[Piece]:
        """The ``count`` pieces that support the prediction most (highest scores first)."""
        return sorted(self.pieces, key=lambda piece: -piece.score)[:count]

    def to_json(self, top: int | None = None) -> dict:
        document: dict[str, Any] = {"label": self.label, "class_index": self.class_index,
                                    "probability": round(self.probability, 6), "method": self.method,
                                    "rows_run": self.rows_run, "milliseconds": round(self.milliseconds, 3)}
        if self.heatmap is not None:
            document["heatmap"] = {"shape": list(self.heatmap.shape), "patch": self.patch,
                                   "max": float(self.heatmap.max()), "min": float(self.heatmap.min()),
                                   "top_regions": [{"row": r, "col": c, "score": round(s, 6)}
                                                   for r, c, s in top_regions(self.heatmap, self.patch or 1, top or 5)]}
            return document
        pieces = self.top(top) if top is not None else self.pieces
        key = "tokens" if any(piece.start is not None for piece in self.pieces) else "columns"
        document[key] = [{"token": p.token, "score": round(p.score, 6)} | ({} if p.read else {"read": False})
                         for p in pieces]
        return document


# --------------------------------------------------------------------------- text


def words(text: str) -> list[tuple[str, int, int]]:
    """The words of ``text`` with their character spans: runs of letters and digits (with inner apostrophes), and
    each other symbol alone."""
    return [(match.group(), match.start(), match.end()) for match in _WORD.finditer(text)]


def without_spans(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """``text`` with the given words' character spans cut out, and with them the whitespace that deleting a word would
    leave doubled or dangling: between two whitespace runs the one after goes ("a b c" without "b" is "a c"), at the
    start of the text the one after, at its end the one before. Whitespace between a word and a symbol stays ("a, b"
    without "," is "a b"), words separated by whitespace alone are cut as one, and the rest of the text is kept.

    A byte-level BPE tokenizer (RoBERTa's ``Ġ`` pieces) reads a doubled space as a piece of its own: left in, every
    variant would hold a piece the text does not.
    """
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and not text[merged[-1][1]:start].strip():  # overlapping, or apart by whitespace only
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    kept, position = [], 0
    for start, end in merged:
        space_before = start
        while space_before > position and text[space_before - 1].isspace():
            space_before -= 1
        after = _SPACE.match(text, end)
        if after and (space_before < start or start == 0):
            end = after.end()
        elif space_before < start and end == len(text):
            start = space_before
        kept.append(text[position:start])
        position = end
    kept.append(text[position:])
    return "".join(kept)


def read_groups(found: Sequence[tuple[str, int, int]], read: Sequence[tuple[int, int]]) -> list[list[int]]:
    """The indices of the words under the model's ``read`` piece spans, grouped where one piece covers several words
    (a BPE ``?!``): each group is deleted and scored as one, so there are never more groups than pieces."""
    ends = [end for _, _, end in found]
    groups: list[list[int]] = []
    for start, end in read:
        covered = []
        index = bisect.bisect_right(ends, start)  # the first word ending after the piece starts
        while index < len(found) and found[index][1] < end:
            covered.append(index)
            index += 1
        if not covered:
            continue
        if groups and groups[-1][-1] >= covered[0]:  # a word in several pieces, or a piece across words: one group
            groups[-1].extend(i for i in covered if i > groups[-1][-1])
        else:
            groups.append(covered)
    return groups


def explain_text(model: Classifier, text: str) -> Explanation:
    model.expect("text")
    started = time.perf_counter()
    read = model.tokenizer.read_spans(text)
    found = words(text)
    groups = read_groups(found, read)
    if not groups:
        raise NothingToExplain("the text holds no words the model reads (it is empty, or only symbols the tokenizer "
                               "drops); send a text with words in it")
    variants = [text] + [without_spans(text, [found[index][1:] for index in group]) for group in groups]
    probabilities = softmax(model.logits_of_texts(variants))
    predicted = int(np.argmax(probabilities[0]))
    base = float(probabilities[0, predicted])
    scores = {index: drop for group, drop in zip(groups, (base - probabilities[1:, predicted]).tolist()) for index in group}
    pieces = [Piece(word, float(scores.get(index, 0.0)), start, end, index in scores)
              for index, (word, start, end) in enumerate(found)]
    return Explanation(model.labels[predicted], predicted, base, METHOD, len(variants),
                       (time.perf_counter() - started) * 1e3, pieces)


# --------------------------------------------------------------------------- images


def patch_side(height: int, width: int) -> int:
    """About an eighth of the shorter side, at least 2 pixels: 4 for Fashion-MNIST's 28, 28 for a 224 crop."""
    return max(2, math.ceil(min(height, width) / 8))


def _positions(length: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, max(1, length - patch + 1), stride))
    if starts[-1] + patch < length:  # the last patch reaches the far edge
        starts.append(length - patch)
    return starts


def neutral(model: Classifier, pixels: np.ndarray) -> np.ndarray:
    """The pixel an occluded patch is painted with: what normalises to zero, else the image's own mean colour."""
    value = model.images.neutral_pixel()
    return value if value is not None else pixels.reshape(-1, pixels.shape[-1]).mean(axis=0)


def explain_image(model: Classifier, image: np.ndarray) -> Explanation:
    """``image``: uint8 ``[height, width, channels]`` (or ``[height, width]`` for grey), of any size the bundle's
    preprocessing can resize and crop."""
    model.expect("image")
    started = time.perf_counter()
    if image.ndim == 2:
        image = image[:, :, None]
    pixels = model.images.geometry(image[None])[0]
    height, width = pixels.shape[:2]
    patch = patch_side(height, width)
    stride = max(1, patch // 2)
    fill = neutral(model, pixels)
    boxes = [(top, left) for top in _positions(height, patch, stride) for left in _positions(width, patch, stride)]
    occluded: list[tuple[int, int] | None] = [None, *boxes]  # the image itself first, then each patch painted over
    parts = []
    for start in range(0, len(occluded), model.rows_per_run):
        chunk = occluded[start:start + model.rows_per_run]
        variants = np.repeat(pixels[None], len(chunk), axis=0)
        for variant, box in zip(variants, chunk):
            if box is not None:
                variant[box[0]:box[0] + patch, box[1]:box[1] + patch] = fill
        parts.append(softmax(model.logits_of_pixels(variants)))
    probabilities = np.concatenate(parts)
    predicted = int(np.argmax(probabilities[0]))
    base = float(probabilities[0, predicted])
    drops = base - probabilities[1:, predicted]
    total, covered = np.zeros((height, width)), np.zeros((height, width))
    for drop, (top, left) in zip(drops, boxes):
        total[top:top + patch, left:left + patch] += drop
        covered[top:top + patch, left:left + patch] += 1
    heatmap = total / np.maximum(covered, 1)
    return Explanation(model.labels[predicted], predicted, base, METHOD, len(occluded),
                       (time.perf_counter() - started) * 1e3, heatmap=heatmap, pixels=pixels, patch=patch)


def grid_cells(height: int, width: int, patch: int) -> list[tuple[int, int]]:
    """The non-overlapping patches that tile an image (the last row and column may be narrower)."""
    return [(top, left) for top in range(0, height, patch) for left in range(0, width, patch)]


def top_regions(heatmap: np.ndarray, patch: int, count: int) -> list[tuple[int, int, float]]:
    """The ``count`` grid cells of highest mean heat: (top pixel row, left pixel column, mean score)."""
    cells = [(top, left, float(heatmap[top:top + patch, left:left + patch].mean()))
             for top, left in grid_cells(*heatmap.shape, patch)]
    return sorted(cells, key=lambda cell: -cell[2])[:count]


# --------------------------------------------------------------------------- table rows


def explain_row(model: Classifier, row: dict) -> Explanation:
    model.expect("table")
    started = time.perf_counter()
    if not isinstance(row, dict):
        raise UserError(f"a table row is an object of column name → value, not {type(row).__name__}")
    columns = [column.name for column in model.manifest.preprocessing.columns]  # type: ignore[union-attr]
    variants = [row] + [{**row, name: None} for name in columns]
    probabilities = softmax(model.logits_of_rows(variants))
    predicted = int(np.argmax(probabilities[0]))
    base = float(probabilities[0, predicted])
    pieces = [Piece(name, float(base - probabilities[index, predicted])) for index, name in enumerate(columns, start=1)]
    return Explanation(model.labels[predicted], predicted, base, METHOD, len(variants),
                       (time.perf_counter() - started) * 1e3, pieces)


def explain(model: Classifier, item: Any) -> Explanation:
    """One raw input of the bundle's kind: a text, a uint8 image, or a row object."""
    run = {"text": explain_text, "image": explain_image, "table": explain_row}[model.input_kind]
    return run(model, item)


# --------------------------------------------------------------------------- faithfulness


def deletion_drop(model: Classifier, item: Any, explanation: Explanation, count: int,
                  rng: np.random.Generator) -> tuple[float, float]:
    """The predicted class's probability drop when the ``count`` top-attributed pieces are deleted, and when as many
    random ones are (words, or grid cells of the patch side for images)."""
    index = explanation.class_index
    if model.input_kind == "text":
        read = [piece for piece in explanation.pieces if piece.read]
        top = sorted(read, key=lambda piece: -piece.score)[:count]
        chosen = rng.choice(len(read), size=min(count, len(read)), replace=False)
        variants = [without_spans(item, [(p.start, p.end) for p in top]),  # type: ignore[misc]
                    without_spans(item, [(read[i].start, read[i].end) for i in chosen])]  # type: ignore[misc]
        probabilities = softmax(model.logits_of_texts(variants))[:, index]
    elif model.input_kind == "image":
        assert explanation.heatmap is not None and explanation.pixels is not None and explanation.patch
        pixels, patch = explanation.pixels, explanation.patch
        cells = grid_cells(*pixels.shape[:2], patch)
        ranked = top_regions(explanation.heatmap, patch, count)
        random_cells = [cells[i] for i in rng.choice(len(cells), size=min(count, len(cells)), replace=False)]
        fill = neutral(model, pixels)
        variants = np.repeat(pixels[None], 2, axis=0)
        for variant, boxes in zip(variants, ([(t, l) for t, l, _ in ranked], random_cells)):
            for top, left in boxes:
                variant[top:top + patch, left:left + patch] = fill
        probabilities = softmax(model.logits_of_pixels(variants))[:, index]
    else:
        top_columns = [piece.token for piece in explanation.top(count)]
        columns = [piece.token for piece in explanation.pieces]
        random_columns = [columns[i] for i in rng.choice(len(columns), size=min(count, len(columns)), replace=False)]
        variants = [{**item, **{name: None for name in names}} for names in (top_columns, random_columns)]
        probabilities = softmax(model.logits_of_rows(variants))[:, index]
    return explanation.probability - float(probabilities[0]), explanation.probability - float(probabilities[1])
