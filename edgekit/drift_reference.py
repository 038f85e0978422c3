"""The drift reference a bundle carries: fixed bins, reference proportions and calibrated thresholds.

Features come from ``device_agent.features`` (the device computes them with the
same code) on reference rows run through the float model. Then, per feature:

- bins: numeric features get edges at reference quantiles (10 interior bins,
  20 from 2,000 rows) plus an underflow and an overflow bin; features with few
  distinct values (truncation, token counts of short texts) get edges halfway
  between their values instead, so every value has its own bin and a value the
  reference never showed lands in a bin of its own. Categorical features get
  one bin per category: the predicted class one per label, a table's
  categorical column one per training category plus "other"
  (``device_agent.features.table_layout``).
- proportions: the reference rows' share of each bin, except that the two
  overflow bins of quantile-binned features get ``1 / (N + 1)`` each (N
  reference rows): that is the expected share of new values beyond the largest
  (smallest) of N, and about 2W/N rows of every window of W land there even
  without drift. Left empty (floored at 1e-4) each such row added 0.006-0.011 to PSI,
  which made small references drift on unshifted data (2-4% of windows at
  N = 600-1,200, W = 300-500).
- thresholds, calibrated for the *window* false-alarm rate by a bootstrap that
  mimics the device: each round redraws a reference of N rows and a window of
  W rows (with replacement, from the reference rows), adds the window's rows
  beyond the reference's range (binomial, at a Beta(1, N) share per side), and
  scores the window against the redrawn reference. So the scores carry the
  window's sampling noise and the reference's own, which is the same for every
  window of one bundle. Each feature's PSI and JS scores are standardised by
  their bootstrap mean and standard deviation, and one multiplier ``z`` is set
  at the ``1 - target/2`` quantile of the largest standardised score per round
  (the max statistic corrects for the many features at once, without
  Bonferroni's excess caution for correlated features; the halved target leaves
  room for how one reference's rate varies around the average). A feature's
  threshold is ``mean + z * std``, floored where a score's bootstrap spread is
  degenerate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from device_agent import features as drift_features
from device_agent.bundle import SPECTRAL_INPUT, SpectralPreprocessing, TablePreprocessing
from device_agent.drift import bin_index, js_distance, psi
from device_agent.telemetry_schema import DriftReference, FeatureReference, Thresholds

# Below these a score difference means nothing in practice, and a constant reference feature has no spread to calibrate on.
PSI_FLOOR = 0.05
JS_FLOOR = 0.05
# A feature with at most this many distinct reference values is binned per value.
_DISCRETE_VALUES = 20


def numeric_edges(values: np.ndarray, rows: int | None = None) -> list[float]:
    """Ascending bin edges for one numeric feature (see the module docstring)."""
    return _binning(values, rows)[0]


def _binning(values: np.ndarray, rows: int | None = None) -> tuple[list[float], bool]:
    """The edges, and whether they are reference quantiles (their overflow bins then hold values beyond the reference's range)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [0.0], False
    distinct = np.unique(values)
    if distinct.size <= _DISCRETE_VALUES:
        gap = float(np.min(np.diff(distinct))) if distinct.size > 1 else 1.0
        midpoints = (distinct[:-1] + distinct[1:]) / 2
        edges = np.concatenate([[distinct[0] - gap / 2], midpoints, [distinct[-1] + gap / 2]])
        return [float(edge) for edge in edges], False
    interior_bins = 20 if (rows or values.size) >= 2000 else 10
    edges = np.quantile(values, np.linspace(0, 1, interior_bins + 1))
    # The largest reference value belongs inside the last interior bin, not in the overflow bin.
    edges[-1] = np.nextafter(edges[-1], np.inf)
    return [float(edge) for edge in np.unique(edges)], True


def with_range_share(proportions: np.ndarray, share: float) -> np.ndarray:
    """``proportions`` (reference rows only, overflow bins empty) with ``share`` moved into each overflow bin."""
    adjusted = proportions * (1 - 2 * share)
    adjusted[0] += share
    adjusted[-1] += share
    return adjusted


def _counts(feature: FeatureReference, values: np.ndarray) -> np.ndarray:
    if feature.kind == "numeric":
        return np.bincount(bin_index(np.asarray(feature.edges), values), minlength=feature.bins)
    indices = np.asarray(values, dtype=np.int64)
    indices = indices[(indices >= 0) & (indices < feature.bins)]
    return np.bincount(indices, minlength=feature.bins)


def build_reference(
    features: dict[str, np.ndarray],
    *,
    task: str,
    labels: Sequence[str],
    window_size: int = 500,
    min_window_size: int = 100,
    consecutive_for_alert: int = 2,
    target_false_alarm: float = 0.01,
    bootstrap_windows: int = 1000,
    seed: int = 0,
    categories: Mapping[str, Sequence[str]] | None = None,
) -> DriftReference:
    """The reference for ``features`` (name → one value per reference row, from ``device_agent.features``).

    A categorical feature's bins are ``categories[name]`` when given (a table's columns: ``TableLayout.categories``),
    else ``labels`` for the predicted class, else one per index up to the largest seen.
    """
    rows = {len(v) for v in features.values()}
    if len(rows) != 1 or 0 in rows:
        raise ValueError(f"every feature needs one value per reference row; got row counts {sorted(rows)}")
    (row_count,) = rows
    provisional: dict[str, FeatureReference] = {}
    beyond_range: dict[str, float] = {}  # quantile-binned features: expected share of new values past each end
    placeholder = Thresholds(psi=1.0, js=1.0)
    for name, values in sorted(features.items()):
        source = "output" if name.startswith("output.") else "input"
        if drift_features.is_categorical(name):
            names = _category_names(name, values, labels, categories or {})
            bins: dict = {"kind": "categorical", "categories": names}
            count = len(names)
        else:
            edges, quantile_bins = _binning(values, row_count)
            bins = {"kind": "numeric", "edges": edges}
            count = len(edges) + 1
            if quantile_bins:
                beyond_range[name] = 1 / (row_count + 1)
        provisional[name] = FeatureReference(source=source, proportions=[1 / count] * count, thresholds=placeholder, **bins)
        counts = _counts(provisional[name], values)
        proportions = counts / counts.sum()
        if name in beyond_range:
            proportions = with_range_share(proportions, beyond_range[name])
        provisional[name] = provisional[name].model_copy(update={"proportions": proportions.tolist()})

    thresholds = calibrate_thresholds(
        provisional, features, window_size=window_size, target_false_alarm=target_false_alarm,
        bootstrap_windows=bootstrap_windows, seed=seed, beyond_range=beyond_range,
    )
    return DriftReference(
        task=task,
        features={name: feature.model_copy(update={"thresholds": thresholds[name]}) for name, feature in provisional.items()},
        reference_rows=row_count,
        window_size=window_size,
        min_window_size=min(min_window_size, window_size),
        consecutive_for_alert=consecutive_for_alert,
    )


def _category_names(name: str, values: np.ndarray, labels: Sequence[str], categories: Mapping[str, Sequence[str]]) -> list[str]:
    if name in categories:
        return list(categories[name])
    if name in drift_features.CATEGORICAL and labels:
        return list(labels)
    return [str(i) for i in range(int(np.max(values)) + 1)]


def calibrate_thresholds(
    references: dict[str, FeatureReference],
    features: dict[str, np.ndarray],
    *,
    window_size: int,
    target_false_alarm: float,
    bootstrap_windows: int,
    seed: int,
    beyond_range: Mapping[str, float] | None = None,
) -> dict[str, Thresholds]:
    """Per-feature thresholds such that about ``target_false_alarm / 2`` of unshifted windows drift on any feature.

    ``beyond_range`` gives, for quantile-binned features, the reference proportion of each overflow bin (``1 / (N + 1)``).
    Each round redraws the reference as well as the window (see the module docstring): on the device a window
    differs from the reference by its own sampling noise and by the reference's, which is the same for every window.
    """
    generator = np.random.default_rng(seed)
    names = sorted(references)
    beyond_range = beyond_range or {}
    row_count = len(next(iter(features.values())))
    binned = {}
    for name in names:
        feature = references[name]
        values = np.asarray(features[name])
        binned[name] = bin_index(np.asarray(feature.edges), values) if feature.kind == "numeric" else values.astype(np.int64)
    scores = np.zeros((bootstrap_windows, len(names), 2))
    for window in range(bootstrap_windows):
        redrawn = generator.integers(0, row_count, row_count)
        rows = generator.integers(0, row_count, window_size)
        for column, name in enumerate(names):
            bins = references[name].bins
            reference_counts = np.bincount(binned[name][redrawn], minlength=bins)[:bins]
            proportions = reference_counts / max(int(reference_counts.sum()), 1)
            counts = np.bincount(binned[name][rows], minlength=bins)[:bins]
            if name in beyond_range:
                proportions = with_range_share(proportions, beyond_range[name])
                # The reference rows never fall outside their own range; new rows do, at a share that varies
                # with the reference drawn: Beta(1, N) per side for the largest (smallest) of N values.
                counts[[0, -1]] += generator.binomial(window_size, generator.beta(1, row_count, size=2))
            scores[window, column] = psi(proportions, counts), js_distance(proportions, counts)
    mean = scores.mean(axis=0)
    spread = np.maximum(scores.std(axis=0), 1e-9)
    largest = ((scores - mean) / spread).max(axis=(1, 2))
    z = float(np.quantile(largest, 1 - target_false_alarm / 2))
    thresholds = {}
    for column, name in enumerate(names):
        psi_threshold = mean[column, 0] + z * spread[column, 0]
        js_threshold = mean[column, 1] + z * spread[column, 1]
        thresholds[name] = Thresholds(psi=max(float(psi_threshold), PSI_FLOOR), js=max(float(js_threshold), JS_FLOOR))
    return thresholds


# --------------------------------------------------------------------------- features of a model on reference rows


def model_features(
    model_path: Path,
    inputs: Sequence[str] | Sequence[Mapping] | np.ndarray,
    *,
    tokenizer_file: Path | None = None,
    max_length: int | None = None,
    image_preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    tensor_input: str | None = None,
    table: TablePreprocessing | None = None,
    spectral: SpectralPreprocessing | None = None,
    output_name: str | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Input and output drift features of ``inputs`` (texts, raw uint8 images, tensors or table rows) through an ONNX classifier.

    Texts are tokenized with the bundle's tokenizer (``tokenizer_file``,
    ``max_length``); images are fed through ``image_preprocess`` (the bundle's
    ``device_agent.preprocess.ImagePreprocessor``) and their features taken
    from the raw pixels, as the device does. Raw float tensors (sensor
    windows) feed the input ``tensor_input`` as they are, and give
    ``tensor_features``, as the device computes them for a plain tensor model.
    Table rows (column name → value) are encoded as the bundle's ``table``
    says and give ``table_features``. Raw float windows of a ``spectral``
    bundle feed the model their ``spectral_features`` and give
    ``tensor_features`` of the windows as the input ``series``, as the device
    computes them from the raw windows a client sends.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    wanted_output = output_name if output_name in output_names else output_names[0]
    featurize = _featurizer(inputs, input_names, tokenizer_file=tokenizer_file, max_length=max_length,
                            image_preprocess=image_preprocess, tensor_input=tensor_input, table=table, spectral=spectral)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(inputs), batch_size):
        feeds, found = featurize(inputs[start:start + batch_size])
        (logits,) = session.run([wanted_output], feeds)
        found.update(drift_features.output_features(logits))
        parts.append(found)
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


Featurize = Callable[[Sequence], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


def _featurizer(inputs, input_names: list[str], *, tokenizer_file, max_length, image_preprocess, tensor_input, table,
                spectral) -> Featurize:
    """A chunk of reference rows → the model's feeds and the input drift features, as the device computes them."""
    if spectral is not None:
        return _spectral_featurizer(spectral, input_names[0])
    if table is not None:
        from device_agent.preprocess import TableEncoder

        encoder, layout = TableEncoder(table), drift_features.table_layout(table)

        def table_rows(chunk):
            encoded = encoder(list(chunk))
            return {input_names[0]: encoded}, drift_features.table_features(encoded, layout)
        return table_rows
    if tensor_input is not None:
        def tensors(chunk):
            feeds = {tensor_input: np.ascontiguousarray(chunk, dtype=np.float32)}
            return feeds, drift_features.tensor_features(feeds)
        return tensors
    if not isinstance(inputs, np.ndarray):
        from device_agent.preprocess import TextTokenizer

        if tokenizer_file is None or max_length is None:
            raise ValueError("text reference rows need the tokenizer file and max_length")
        tokenizer = TextTokenizer(tokenizer_file, max_length)

        def texts(chunk):
            encoded = tokenizer.encode(list(chunk))
            found = drift_features.text_features(encoded["input_ids"], encoded["attention_mask"], tokenizer.unknown_id, max_length)
            return {name: encoded[name] for name in input_names if name in encoded}, found
        return texts
    if image_preprocess is None:
        raise ValueError("image reference rows need the bundle's image preprocessing")

    def images(chunk):
        pixels = np.asarray(chunk)
        return {input_names[0]: image_preprocess(pixels if pixels.ndim == 4 else pixels[..., None])}, drift_features.image_features(pixels)
    return images


def _spectral_featurizer(spectral: SpectralPreprocessing, model_input: str) -> Featurize:
    """Raw windows → the model's spectral features, and the windows' own drift features under the device's input name."""
    from device_agent.preprocess import spectral_features

    expected = (spectral.channels, spectral.steps)

    def windows(chunk):
        series = np.ascontiguousarray(chunk, dtype=np.float32)
        if series.ndim != 3 or series.shape[1:] != expected:
            raise ValueError(f"spectral reference windows must be [n, {expected[0]}, {expected[1]}] (the bundle's channels "
                             f"and steps); got {list(series.shape)}")
        feeds = {model_input: spectral_features(series, spectral.bands)}
        return feeds, drift_features.tensor_features({SPECTRAL_INPUT: series})
    return windows


def reference_from_splits(
    model_path: Path,
    task,  # edgekit.artifact.TaskSpec
    splits: Sequence,  # edgekit.data.Split
    *,
    image_preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    tensor_input: str | None = None,
    table: TablePreprocessing | None = None,
    spectral: SpectralPreprocessing | None = None,
    max_rows: int = 20_000,
    window_size: int = 500,
) -> DriftReference:
    """The bundle's reference from data the model never trained on (validation and test splits), through the final model.

    A tabular task passes its bundle's ``table`` (``TablePreprocessing``); its splits' inputs are then sequences of raw
    rows (column name → value), and each categorical column's bins are its categories and "other". A spectral bundle's
    task passes its ``spectral`` (``SpectralPreprocessing``); its splits' inputs are then raw windows ``[n, channels,
    steps]``: the model runs on their spectral features, and the input features are the windows' own, named after the
    device's raw input ``series`` (``tensor_input``, if given, must be that name).
    """
    if spectral is not None and tensor_input not in (None, SPECTRAL_INPUT):
        raise ValueError(f"a spectral bundle's raw windows are its {SPECTRAL_INPUT!r} input on the device, "
                         f"not {tensor_input!r}: leave tensor_input out")
    parts = [split.inputs for split in splits if len(split)]
    if not parts:
        raise ValueError("no reference rows: the validation and test splits are empty")
    if table is None and isinstance(parts[0], np.ndarray):
        inputs: Sequence = np.concatenate(parts)[:max_rows]
        if image_preprocess is None and tensor_input is None and spectral is None:
            # TaskSpec.image is the bundle's ImagePreprocessing spec (image-classification tasks).
            spec = getattr(task, "image_preprocessing", None) or getattr(task, "image", None)
            if spec is None:
                raise ValueError("image reference rows need the task's image preprocessing")
            from device_agent.preprocess import ImagePreprocessor

            image_preprocess = ImagePreprocessor(spec)
    else:
        inputs = [row for part in parts for row in part][:max_rows]
    found = model_features(
        model_path, inputs, tokenizer_file=getattr(task, "tokenizer_file", None), max_length=getattr(task, "max_length", None),
        image_preprocess=image_preprocess, tensor_input=tensor_input, table=table, spectral=spectral,
        output_name=getattr(task, "output_name", None),
    )
    # A small data set (a UCR/UEA archive set: tens of rows) cannot stand for windows far larger than itself: the windows
    # it is calibrated for are then no larger than the reference.
    window_size = min(window_size, len(inputs))
    categories = drift_features.table_layout(table).categories if table is not None else None
    return build_reference(found, task=task.kind, labels=list(task.labels), window_size=window_size,
                           min_window_size=max(1, window_size // 5), categories=categories)
