"""Champion against challenger: two classification bundles run on the same labelled slices, row for row.

Each ``--data`` file is one slice (the original test split, a drifted slice, ...). On each, both bundles predict every
row through their own preprocessing (``device_agent.classifier``); the slice reports both accuracies and macro F1s
(``edgekit.measure``), how often the two agree, and McNemar's exact test on the rows where exactly one of them is
right. The verdict is a rule over the slices (``RULE``), so a script can act on it (``edgekit compare ... && edgekit
fleet deploy ...``). A gain must hold after Holm–Bonferroni over the slices: with "significantly better on any one
slice" at plain alpha, every slice added would be one more chance of promoting a challenger that is no better (two
slices: up to about twice alpha). A loss counts at plain alpha: keeping the champion is the cautious side.

Data is read with the build's own readers, so a slice means what the build's test split meant: texts through
``text_data`` (cleaned the same way), class folders of images through ``image_data`` (brought to the bundle's size the
way the build does), tables through ``tabular_data`` with labels named as the build names them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.measure import holm_adjusted, mcnemar_p_value, paired_accuracy_gain_interval

if TYPE_CHECKING:
    from device_agent.classifier import Classifier

DEFAULT_ALPHA = 0.05
RULE = ("promote when the challenger is significantly better on at least one slice (more rows only it gets right, and "
        "McNemar's p, Holm-Bonferroni adjusted over the slices, < alpha) and significantly worse on none (more rows only "
        "the champion gets right, McNemar's p < alpha, unadjusted: the cautious side); otherwise keep the champion")
_SHOWN_LABELS = 5  # unknown labels named in an error; more are counted


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Columns:
    """The columns a labelled file's rows are read from."""

    text: str = "text"
    label: str = "label"


@dataclass(frozen=True)
class LabelledSlice:
    """One data file's rows, as the bundle's input kind takes them, with their true class names."""

    source: str
    inputs: Any  # list[str] (text), uint8 array [n, h, w, c] (image), list[dict] (table)
    labels: list[str]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out (no label, empty text, ...)


def read_slice(path: Path, classifier: "Classifier", columns: Columns) -> LabelledSlice:
    """The labelled rows of ``path`` in the form ``classifier`` takes; an ``EdgekitError`` saying how to fix a file of
    the wrong kind, a missing one, or one without its columns."""
    if not path.exists():
        raise EdgekitError(f"data {path} does not exist; give --data a labelled file (or, for images, a folder of class "
                           "folders)")
    kind = classifier.input_kind
    if kind == "image":
        return _read_images(path, classifier)
    if path.is_dir() and _holds_class_folders_of_images(path):
        raise EdgekitError(f"data {path} is a folder of images, but {classifier.name} is a {classifier.manifest.task.kind} "
                           f"bundle: it takes {_what_it_takes(kind, columns)}")
    if kind == "text":
        return _read_texts(path, columns)
    return _read_table(path, columns)


def _what_it_takes(kind: str, columns: Columns) -> str:
    return {
        "text": f"a file of labelled texts (CSV, TSV, JSONL or Parquet with columns {columns.text!r} and {columns.label!r})",
        "table": f"a CSV or Parquet table with a label column {columns.label!r}",
        "image": "a folder with one sub-folder of images per class (FOLDER/<class>/*.png)",
    }[kind]


def _holds_class_folders_of_images(path: Path) -> bool:
    from edgekit.tasks.image_data import IMAGE_SUFFIXES

    return any(file.suffix.lower() in IMAGE_SUFFIXES
               for child in path.iterdir() if child.is_dir() for file in child.iterdir() if file.is_file())


# The text reader's hints name the build config's fields; here the same fix is a command-line option.
_BUILD_HINTS = {"name the columns with data.text_column / data.label_column in the build config":
                "name them with --text-column / --label-column"}


def _read_texts(path: Path, columns: Columns) -> LabelledSlice:
    from edgekit.data import DataError
    from edgekit.tasks.text_data import Row, clean_rows, read_rows

    try:
        rows = read_rows(path, columns.text, columns.label)
    except DataError as error:
        message = str(error)
        for build_hint, option_hint in _BUILD_HINTS.items():
            message = message.replace(build_hint, option_hint)
        raise EdgekitError(message) from None
    # A split column is ignored: the file is one slice (give a test split its own file). Its rows are cleaned as the build
    # cleans them: unlabelled rows, empty texts, repeats and texts given two labels are dropped and counted.
    examples, report = clean_rows([Row(row.text, row.label, None, row.error) for row in rows], str(path))
    if not examples:
        raise EdgekitError(f"data {path}: no usable labelled rows ({report.summary()})")
    return LabelledSlice(str(path), [example.text for example in examples], [example.label for example in examples],
                         report.dropped())


def _read_table(path: Path, columns: Columns) -> LabelledSlice:
    from device_agent.preprocess import category_key
    from edgekit.data import DataError
    from edgekit.tasks.tabular_data import CSV_SUFFIXES, PARQUET_SUFFIXES, read_rows

    if path.is_dir() or path.suffix.lower() not in (*CSV_SUFFIXES, *PARQUET_SUFFIXES):
        raise EdgekitError(f"data {path} is not a table; a tabular-classification bundle takes "
                           f"{_what_it_takes('table', columns)}")
    try:
        names, rows = read_rows(path)
    except DataError as error:
        raise EdgekitError(str(error).replace("; set data.path to a CSV or Parquet file with a header row", "")) from None
    if columns.label not in names:
        raise EdgekitError(f"table {path} has no label column {columns.label!r} (its columns: {', '.join(names[:30])}"
                           f"{' …' if len(names) > 30 else ''}); name it with --label-column")
    inputs, labels = [], []
    for row in rows:
        label = category_key(row.pop(columns.label))
        if label is not None:
            inputs.append(row)
            labels.append(label)
    unlabelled = len(rows) - len(inputs)
    if not inputs:
        raise EdgekitError(f"table {path}: every row's {columns.label!r} is empty; fill in the labels")
    return LabelledSlice(str(path), inputs, labels, {"missing_label": unlabelled} if unlabelled else {})


def _read_images(path: Path, classifier: "Classifier") -> LabelledSlice:
    from edgekit.data import SPLIT_ALIASES
    from edgekit.tasks.image_data import _FolderScan, _scan_class_folder

    if not path.is_dir():
        raise EdgekitError(f"data {path} is a file, but {classifier.name} is an image-classification bundle: it takes "
                           f"{_what_it_takes('image', Columns())}")
    children = sorted(child for child in path.iterdir() if child.is_dir() and not child.name.startswith("."))
    if children and all(child.name.lower() in SPLIT_ALIASES for child in children):
        test = next((child for child in children if SPLIT_ALIASES[child.name.lower()] == "test"), children[0])
        raise EdgekitError(f"data {path} is split into {', '.join(child.name for child in children)}; compare one split "
                           f"at a time: --data {test}")
    spec = classifier.images.spec
    # Images of any size come to one square as the build brings them (the bundle's resize, then its crop), so they
    # stack into one batch and each bundle sees them as its own test split was seen.
    mode, side = ("L" if spec.channel_order == "L" else "RGB"), spec.resize or max(spec.crop)
    scan = _FolderScan()
    for child in children:
        _scan_class_folder(child, child.name, "", mode, side, scan)
    if not scan.images:
        found = (f"; {scan.dropped['unreadable']} could not be decoded (the first: {scan.first_problem})"
                 if scan.dropped["unreadable"] else "")
        raise EdgekitError(f"data {path} holds no readable images{found}; expected {path}/<class>/<image>.png "
                           "(or .jpg, .jpeg, .bmp, .gif, .webp)")
    return LabelledSlice(str(path), np.stack(scan.images), list(scan.labels),
                         {reason: count for reason, count in sorted(scan.dropped.items()) if count})


# --------------------------------------------------------------------------- checks


def check_comparable(champion: "Classifier", challenger: "Classifier") -> None:
    """Refuse two bundles whose predictions cannot be paired row for row: another task, input or set of classes."""
    kinds = (champion.manifest.task.kind, challenger.manifest.task.kind)
    if kinds[0] != kinds[1] or champion.input_kind != challenger.input_kind:
        raise EdgekitError(f"the champion {champion.name} is a {kinds[0]} bundle ({champion.input_kind} input) and the "
                           f"challenger {challenger.name} a {kinds[1]} bundle ({challenger.input_kind} input); compare "
                           "two bundles of the same task")
    only_champion = sorted(set(champion.labels) - set(challenger.labels))
    only_challenger = sorted(set(challenger.labels) - set(champion.labels))
    if only_champion or only_challenger:
        differences = [f"only the {role} has {labels}"
                       for role, labels in (("champion", only_champion), ("challenger", only_challenger)) if labels]
        raise EdgekitError(f"the bundles' classes differ: {'; '.join(differences)}. A challenger retrained with new "
                           "classes cannot be compared row for row with the champion; judge it on its own build report, "
                           "or retrain it on the champion's classes")


def check_known_labels(data: LabelledSlice, labels: Sequence[str]) -> None:
    """Refuse rows whose true class neither bundle can predict: every such row would count as wrong for both."""
    known = set(labels)
    unknown = Counter(label for label in data.labels if label not in known)
    if unknown:
        names = sorted(unknown)
        shown = ", ".join(map(repr, names[:_SHOWN_LABELS])) + (f" and {len(names) - _SHOWN_LABELS} more"
                                                              if len(names) > _SHOWN_LABELS else "")
        raise EdgekitError(f"data {data.source}: {sum(unknown.values())} row(s) carry label(s) the bundles do not know: "
                           f"{shown}; the bundles' classes are {', '.join(labels)}: remove those rows, or fix their "
                           "labels (or --label-column)")


# --------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class Scores:
    accuracy: float
    f1_macro: float


@dataclass(frozen=True)
class SliceResult:
    """Both bundles on one data file, row for row."""

    data: str
    rows: int
    dropped: dict[str, int]
    champion: Scores
    challenger: Scores
    agreement: float  # share of rows both predict the same class for
    champion_only: int  # rows only the champion gets right (McNemar's b)
    challenger_only: int  # rows only the challenger gets right (c)
    p_value: float
    alpha: float

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    @property
    def better(self) -> str | None:
        """Which bundle gets more of the discordant rows right ("champion", "challenger"), None on a tie."""
        if self.champion_only == self.challenger_only:
            return None
        return "challenger" if self.challenger_only > self.champion_only else "champion"

    @property
    def accuracy_gain_95(self) -> tuple[float, float]:
        return paired_accuracy_gain_interval(self.champion_only, self.challenger_only, self.rows)

    def to_dict(self) -> dict:
        return {
            "data": self.data, "rows": self.rows, "dropped": self.dropped,
            "champion": {"accuracy": self.champion.accuracy, "f1_macro": self.champion.f1_macro},
            "challenger": {"accuracy": self.challenger.accuracy, "f1_macro": self.challenger.f1_macro},
            "agreement": self.agreement,
            "discordant": {"champion_only": self.champion_only, "challenger_only": self.challenger_only},
            "p_value": self.p_value, "significant": self.significant, "better": self.better,
            "accuracy_gain": self.challenger.accuracy - self.champion.accuracy,
            "accuracy_gain_95": list(self.accuracy_gain_95),
        }


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str

    @property
    def name(self) -> str:
        return "promote" if self.promote else "keep"


@dataclass(frozen=True)
class Judged:
    """A slice as ``RULE`` reads it."""

    result: SliceResult
    p_value_holm: float  # McNemar's p, Holm-Bonferroni adjusted over the compared slices
    counts_as: str | None  # "better" or "worse" when it counts in the verdict, else None


def judge(slices: Sequence[SliceResult]) -> list[Judged]:
    """Which slices count in the verdict, and as what: "worse" when the champion is right on more of the discordant
    rows with p < alpha; "better" when the challenger is, with its Holm-adjusted p < alpha."""
    judged = []
    for result, adjusted in zip(slices, holm_adjusted([s.p_value for s in slices]), strict=True):
        counts_as = None
        if result.better == "champion" and result.significant:
            counts_as = "worse"
        elif result.better == "challenger" and adjusted < result.alpha:
            counts_as = "better"
        judged.append(Judged(result, adjusted, counts_as))
    return judged


def verdict_of(slices: Sequence[SliceResult]) -> Verdict:
    """``RULE`` applied to the slices, with the reason in one sentence."""
    judged = judge(slices)
    worse = [j for j in judged if j.counts_as == "worse"]
    better = [j for j in judged if j.counts_as == "better"]
    if worse:
        return Verdict(False, "the challenger is significantly worse on " + _listed(worse, "champion"))
    if better:
        return Verdict(True, "the challenger is significantly better on " + _listed(better, "challenger")
                       + " and significantly worse on no slice")
    closest = min(judged, key=lambda j: j.result.p_value)
    corrected = (f", Holm-adjusted over the {len(judged)} slices {closest.p_value_holm:.3g}" if len(judged) > 1 else "")
    return Verdict(False, f"the challenger is significantly better on no slice (the smallest p is "
                          f"{closest.result.p_value:.3g} on {closest.result.data}{corrected}, alpha {closest.result.alpha:g})")


def _listed(judged: Sequence[Judged], winner: str) -> str:
    def one(j: Judged) -> str:
        s = j.result
        wins, losses = ((s.challenger_only, s.champion_only) if winner == "challenger" else (s.champion_only, s.challenger_only))
        p = f"p {s.p_value:.3g}" + (f", Holm-adjusted {j.p_value_holm:.3g}" if winner == "challenger" and j.p_value_holm != s.p_value else "")
        return f"{s.data} ({p}: only the {winner} is right on {wins} rows, the other on {losses})"

    return ", ".join(one(j) for j in judged)


def predicted_labels(classifier: "Classifier", data: LabelledSlice) -> list[str]:
    """The class name ``classifier`` predicts for each row; a bundle that cannot read the rows, or whose model fails
    to run on them, is a clear error (exit 2), never a traceback or a verdict."""
    from device_agent.classifier import ModelRunFailed
    from device_agent.errors import UserError

    try:
        logits = classifier.logits(data.inputs)
    except EdgekitError:
        raise
    except ModelRunFailed as error:
        raise EdgekitError(f"{error} (data {data.source}); the bundle's model does not take what its own "
                           "preprocessing makes: rebuild the bundle, or compare another one") from None
    except UserError as error:
        raise EdgekitError(f"{classifier.name} cannot read {data.source}: {error}") from None
    return [classifier.labels[index] for index in np.argmax(logits, axis=1)]


def compare_slice(champion: "Classifier", challenger: "Classifier", slices: Sequence[LabelledSlice],
                  alpha: float = DEFAULT_ALPHA) -> SliceResult:
    """Score both bundles on one data file; ``slices`` holds the file as each reads it (once when they read it alike)."""
    from edgekit.measure import classification_metrics

    champion_data, challenger_data = slices[0], slices[-1]
    if champion_data.labels != challenger_data.labels:  # both read one file in one order: a bug, not the user's
        raise AssertionError(f"{champion_data.source} was read differently for the two bundles")
    truth = champion_data.labels
    labels = champion.labels  # the challenger's classes are the same names, perhaps in another order: pair by name
    index = {label: position for position, label in enumerate(labels)}
    true_ids = np.array([index[label] for label in truth])
    champion_ids = np.array([index[label] for label in predicted_labels(champion, champion_data)])
    challenger_ids = np.array([index[label] for label in predicted_labels(challenger, challenger_data)])
    champion_right, challenger_right = champion_ids == true_ids, challenger_ids == true_ids
    champion_only = int(np.sum(champion_right & ~challenger_right))
    challenger_only = int(np.sum(challenger_right & ~champion_right))
    champion_metrics = classification_metrics(true_ids, champion_ids, labels)
    challenger_metrics = classification_metrics(true_ids, challenger_ids, labels)
    return SliceResult(
        data=champion_data.source, rows=len(truth), dropped=champion_data.dropped,
        champion=Scores(champion_metrics.accuracy, champion_metrics.f1_macro),
        challenger=Scores(challenger_metrics.accuracy, challenger_metrics.f1_macro),
        agreement=float(np.mean(champion_ids == challenger_ids)),
        champion_only=champion_only, challenger_only=challenger_only,
        p_value=mcnemar_p_value(champion_only, challenger_only), alpha=alpha,
    )


def _reading_of(classifier: "Classifier") -> tuple:
    """What decides how a file is read for ``classifier``: images come to each bundle's own size."""
    if classifier.input_kind != "image":
        return (classifier.input_kind,)
    spec = classifier.images.spec
    return ("image", spec.channel_order == "L", spec.resize or max(spec.crop))


def read_for_both(path: Path, champion: "Classifier", challenger: "Classifier", columns: Columns) -> list[LabelledSlice]:
    """``path`` as the champion reads it, then as the challenger does when that differs (images of another size)."""
    first = read_slice(path, champion, columns)
    check_known_labels(first, champion.labels)
    if _reading_of(champion) == _reading_of(challenger):
        return [first]
    return [first, read_slice(path, challenger, columns)]


def compare(champion: "Classifier", challenger: "Classifier", data: Sequence[Path], columns: Columns = Columns(),
            alpha: float = DEFAULT_ALPHA) -> tuple[list[SliceResult], Verdict]:
    """Every data file as one slice, then the verdict; every file is read and checked before either model runs."""
    if not data:
        raise EdgekitError("give at least one --data FILE of labelled rows to compare on")
    if not 0 < alpha < 1:
        raise EdgekitError(f"--alpha {alpha} is not a significance level; give a value between 0 and 1, e.g. 0.05")
    check_comparable(champion, challenger)
    read = [read_for_both(path, champion, challenger, columns) for path in data]
    slices = [compare_slice(champion, challenger, both, alpha) for both in read]
    return slices, verdict_of(slices)
