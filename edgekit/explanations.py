"""What a built model leans on, per class, for the build's report: occlusion on the test split, with the bundle.

After the build, each target's signed bundle is opened (checked against the key that just signed it) and explained
with ``device_agent.explain`` (occlusion, ONNX Runtime: what a device would answer) on the first rows of the test split
(stored in a stratified order, so the first rows cover every class), within a row and time limit the report states.
The bundle's model runs on ONNX Runtime's CPU provider only, whatever providers the bundle names: on a GPU build host
the TensorRT provider would first build an engine, for minutes, outside the time limit (the report says so).
The explanations are grouped by the class the model predicted:

- **Text**: per class, the words (lowercased, seen at least twice) with the highest mean score: the words whose
  deletion lowers that class's probability most.
- **Images**: per class, the mean heat map of its rows over the mean image of its rows.
- **Table rows**: per class, the columns with the highest mean score.

This is a look at the model, not a gate: a failure is reported (``explanations: {error}``) and never fails the build.
"""

from __future__ import annotations

import base64
import html
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from device_agent.bundle import VerifiedBundle
    from device_agent.classifier import Classifier
    from device_agent.explain import Explanation
    from edgekit.data import Split

MAX_ROWS = {"text": 60, "image": 40, "table": 60}  # test rows explained per target, by input kind
SECONDS = 8.0  # per target: a large model stops early rather than slow the build (the report says how many it explained)
TOP = 8  # words or columns listed per class
MIN_COUNT = 2  # a word seen once in a class's rows says more about that row than about the class
CPU_PROVIDER = "CPUExecutionProvider"  # the only provider the report's session uses (module docstring)


@dataclass(frozen=True)
class Scored:
    """A word or column with its mean score over the rows of one predicted class, and how often it was seen there."""

    name: str
    score: float
    count: int


@dataclass(frozen=True)
class ClassView:
    rows: int  # test rows predicted as this class
    top: list[Scored] = field(default_factory=list)  # text and table rows
    heatmap_png: bytes | None = None  # images: the mean heat map over the mean image


@dataclass(frozen=True)
class SplitExplanations:
    """Occlusion on the first test rows of one bundle, by predicted class."""

    input_kind: str
    rows: int  # test rows explained
    rows_available: int  # test rows the split holds
    max_rows: int
    model_rows: int  # rows the bundle ran, all explanations together
    seconds: float
    stopped_by_time: bool
    per_class: dict[str, ClassView]

    def to_json(self) -> dict:
        """The report.json record (no images: the heat maps are in report.html only)."""
        key = {"text": "top_words", "table": "top_columns"}.get(self.input_kind)
        per_class: dict[str, Any] = {}
        for label, view in self.per_class.items():
            per_class[label] = {"rows": view.rows}
            if key:
                per_class[label][key] = [{"word" if key == "top_words" else "column": s.name, "score": round(s.score, 5),
                                          "count": s.count} for s in view.top]
        return {"method": "occlusion", "execution_provider": CPU_PROVIDER, "input_kind": self.input_kind, "rows": self.rows,
                "rows_available": self.rows_available,
                "max_rows": self.max_rows, "max_seconds": SECONDS, "stopped_by_time": self.stopped_by_time,
                "model_rows": self.model_rows, "seconds": round(self.seconds, 3), "per_class": per_class}

    def html(self) -> str:
        e = html.escape
        limit = "stopped by the time limit" if self.stopped_by_time else f"at most {self.max_rows}"
        intro = (f"<h2>What the model leans on (test split)</h2><p>Occlusion on the bundle (its model on ONNX Runtime's "
                 f"CPU provider, whatever the target runs it on): {self.rows} of {self.rows_available} test rows ({limit}; "
                 f"{SECONDS:g} s at most), {self.model_rows} model rows in {self.seconds:.1f} s, grouped by the predicted "
                 "class. ")
        if self.input_kind == "image":
            figures = "".join(
                f'<figure style="display:inline-block;margin:0 1em 1em 0"><img alt="{e(label)}" width="160" '
                f'src="data:image/png;base64,{base64.b64encode(view.heatmap_png).decode()}"><figcaption>{e(label)} '
                f"({view.rows} rows)</figcaption></figure>"
                for label, view in self.per_class.items() if view.heatmap_png)
            return (intro + "Each map is the mean over the rows predicted as the class, drawn over their mean image: red "
                    "where covering the image lowers the class's probability, blue where it raises it.</p>" + figures)
        noun = "words" if self.input_kind == "text" else "columns"
        note = ("A word's score is the mean drop of the class's probability when it is deleted, over the rows it appears "
                "in (lowercased; words seen once are left out)." if self.input_kind == "text" else
                "A column's score is the mean drop of the class's probability when it is set to missing.")
        rows = "".join(f"<tr><td>{e(label)}</td><td>{view.rows}</td><td style=\"text-align:left\">"
                       + (", ".join(f"{e(s.name)} ({s.score:+.3f}, ×{s.count})" for s in view.top) or "—") + "</td></tr>"
                       for label, view in self.per_class.items())
        return (intro + note + f"</p><table><tr><th>predicted class</th><th>rows</th><th>top {noun}</th></tr>{rows}</table>")


def explain_test_split(bundle: Path, signing_key: Path, test: Split) -> SplitExplanations | None:
    """Occlusion on the first test rows with the bundle at ``bundle`` (signed by ``signing_key``); None for bundles
    that are not text, image or table classifiers."""
    from device_agent.bundle import open_bundle
    from device_agent.classifier import WrongInput
    from device_agent.explain import NothingToExplain, explain
    from device_agent.keys import Keyring, key_id, load_private_key

    public = load_private_key(signing_key).public_key()
    keyring = Keyring(directory=signing_key.parent, keys={key_id(public): public})
    started = time.perf_counter()
    with open_bundle(bundle, keyring) as opened:
        try:
            model = _on_cpu(opened)
        except WrongInput:
            return None
        kind = model.input_kind
        limit = MAX_ROWS[kind]
        explained: list[tuple[Any, Explanation]] = []
        stopped = False
        for item in test.inputs[:limit]:
            if time.perf_counter() - started > SECONDS:
                stopped = True
                break
            try:
                explained.append((item, explain(model, item)))
            except NothingToExplain:  # an empty text in the test split has nothing to show
                continue
        labels = model.labels
    per_class = _images_by_class(explained, labels) if kind == "image" else _pieces_by_class(explained, labels, kind)
    return SplitExplanations(kind, len(explained), len(test), limit, sum(e.rows_run for _, e in explained),
                             time.perf_counter() - started, stopped, per_class)


def _on_cpu(opened: VerifiedBundle) -> Classifier:
    """The bundle's classifier on ONNX Runtime's CPU provider alone (a copy of its manifest saying so): the report's
    look at the model must stay within its time limit, and a TensorRT or CUDA session would spend it, or minutes more,
    building an engine first."""
    from device_agent.classifier import Classifier
    from device_agent.runtime import load_session

    manifest = opened.manifest
    on_cpu = manifest.model_copy(update={"runtime": manifest.runtime.model_copy(
        update={"engine": "onnxruntime", "execution_providers": [CPU_PROVIDER]})})
    return Classifier(on_cpu, load_session(on_cpu, opened.path(manifest.runtime.model_file)), opened.root)


def _pieces_by_class(explained: list[tuple[Any, Explanation]], labels: list[str], kind: str) -> dict[str, ClassView]:
    least = MIN_COUNT if kind == "text" else 1
    views = {}
    for label in labels:
        members = [explanation for _, explanation in explained if explanation.label == label]
        if not members:
            continue
        tallies = tally_words(members, lowercase=kind == "text")
        means = [Scored(name, tally.mean, len(tally.scores)) for name, tally in tallies.items()
                 if len(tally.scores) >= least and tally.mean > 0]
        views[label] = ClassView(len(members), sorted(means, key=lambda s: -s.score)[:TOP])
    return views


def _images_by_class(explained: list[tuple[Any, Explanation]], labels: list[str]) -> dict[str, ClassView]:
    from edgekit.heatmap import heatmap_png

    views = {}
    for label in labels:
        members = [explanation for _, explanation in explained if explanation.label == label]
        if members:
            views[label] = ClassView(len(members), heatmap_png=heatmap_png(*mean_view(members)))
    return views


# --------------------------------------------------------------------------- aggregates of many explanations
# The build report (per predicted class) and the fleet report (per device's drifted and reference traffic) aggregate
# explanations with these, so a word's numbers are counted one way everywhere.


@dataclass(frozen=True)
class WordTally:
    """One word (or table column) over a set of explanations: its score at each place the model read it."""

    scores: list[float]
    supporting: int  # explanations in which it scores above 0 somewhere

    @property
    def mean(self) -> float:
        """The mean score over the places it was read: positive when deleting it lowers the class, on average."""
        return float(np.mean(self.scores))

    @property
    def positive_total(self) -> float:
        """Its positive scores summed: what it adds to the predictions it supports."""
        return float(sum(score for score in self.scores if score > 0))


def tally_words(explanations: list[Explanation], *, lowercase: bool) -> dict[str, WordTally]:
    """Every word (or column) the explanations scored where the model read it; words ``lowercase``d (one word to an
    uncased tokenizer, and to a reader) or as given (columns)."""
    scores: dict[str, list[float]] = defaultdict(list)
    supporting: dict[str, int] = defaultdict(int)
    for explanation in explanations:
        supported = set()
        for piece in explanation.pieces:
            if piece.read:
                name = piece.token.lower() if lowercase else piece.token
                scores[name].append(piece.score)
                if piece.score > 0:
                    supported.add(name)
        for name in supported:
            supporting[name] += 1
    return {name: WordTally(values, supporting[name]) for name, values in scores.items()}


def mean_view(explanations: list[Explanation]) -> tuple[np.ndarray, np.ndarray]:
    """Image explanations averaged: (mean of the model's views, mean heat map), to draw the one over the other."""
    return (np.mean([explanation.pixels for explanation in explanations], axis=0),
            np.mean([explanation.heatmap for explanation in explanations], axis=0))


def report_explanations(bundle: Path | None, signing_key: Path, test: Split | None) -> tuple[dict | None, str]:
    """The report.json record and the report.html section for one target; None and "" without a bundle or a test
    split. Never raises: an error is recorded as ``{"error": ...}``, since the build already made the bundle."""
    if bundle is None or test is None or not len(test):
        return None, ""
    try:
        explained = explain_test_split(bundle, signing_key, test)
    except Exception as error:  # noqa: BLE001 (a look at the model must not fail a build that made its bundle)
        message = f"{type(error).__name__}: {error}"
        return {"error": message}, (f"<h2>What the model leans on (test split)</h2><p>not computed: "
                                    f"{html.escape(message)}</p>")
    if explained is None:
        return None, ""
    return explained.to_json(), explained.html()
