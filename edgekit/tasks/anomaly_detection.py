"""Anomaly detection on table rows or sensor windows: learn normal ones, score how far one is from them, flag it past a
threshold.

Data, either
- a CSV or Parquet table (``edgekit.tasks.tabular_data.read_rows``): without ``data.label_column`` in it every row
  is normal; or
- labelled series (``.ts``, ``.npz``, or a CSV with ``task.series_format`` set: ``edgekit.tasks.timeseries_data``),
  brought to one length as the time-series task does.
Rows (or windows) labelled ``task.anomaly.normal_label`` are normal and any other label is an anomaly, kept for
evaluation only (a third in validation, the rest in test): the model never sees one. Normal ones are split 70/10/20
(train/val/test, seeded).

Model: ``builtin:autoencoder``, an MLP autoencoder over a row's features (the
table encoding of the tabular task) or a window's values (flattened), standardised
inside the model (per feature; per channel for windows), trained in
the one training loop to reconstruct normal ones. A row's anomaly score is its
mean squared reconstruction error. The threshold is the
``task.anomaly.threshold_quantile`` (0.99) quantile of the scores of the
validation split's normal rows, so about 1% of normal rows raise a false alarm.
The ONNX model has two outputs: ``logits`` ``[batch, 2]`` over the labels
(normal, anomaly), ``±log(score / threshold)`` (scale-free, so the export and
int8 keep it to a few decimals), so every classification
tool of edgekit (agreement gates, accuracy, PR-AUC of the anomaly class, the
agent's top-1 label) reads the flag; and ``score`` ``[batch]``. The agent takes
raw rows like the tabular task's bundles and returns both: the label is the
flag, the score how far past (or short of) the threshold the row is. A series bundle takes raw FP32 windows
``series`` ``[batch, channels, steps]`` like the time-series task's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_agent import preprocess
from pydantic import BaseModel, ConfigDict

from edgekit.config import (
    PACKAGED_DATA_PREFIX,
    AnomalySection,
    BuildConfig,
    FinetuneSection,
    PruneSection,
    TableSection,
    TrainSection,
)
from edgekit.data import DataError, Split, TaskData, carve_stratified, task_data_from
from edgekit.errors import EdgekitError
from edgekit.search_space import Dimension
from edgekit.tasks import tabular_classification, tabular_data, timeseries_data
from edgekit.tasks.model_folder import export_with_torch_onnx, load_model_folder, save_model_folder
from edgekit.tasks.tabular_classification import INPUT_NAME, encode, feature_statistics
from edgekit.tasks.tabular_data import row_array
from edgekit.tasks.timeseries_classification import INPUT_NAME as SERIES_INPUT

if TYPE_CHECKING:
    import torch

    from device_agent.bundle import TablePreprocessing
    from edgekit.artifact import Artifact, PassContext, TaskSpec

KIND = "anomaly-detection"
AUTOENCODER = "builtin:autoencoder"
LABELS = ("normal", "anomaly")
RECORD_FILE = "anomaly_model.json"
DEFAULT_WIDTHS = [32, 8]  # hidden, bottleneck
CALIBRATION_ROWS = 256
PREDICT_BATCH = 256
_EPSILON = 1e-12  # keeps log(score / threshold) finite for a perfect reconstruction

# No search: trials are ranked by validation accuracy, which the threshold fixes at about threshold_quantile on the
# normal rows; with few or no labelled anomalies every trial would tie. Tune train: and model.widths by hand.
SEARCH_SPACE: tuple[Dimension, ...] = ()


class AnomalySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: TrainSection
    widths: list[int] | None
    table: TableSection
    anomaly: AnomalySection
    label_column: str


@dataclass(frozen=True)
class AnomalyModelRecord:
    source: str
    widths: list[int]
    mean: list[float]  # per feature (tables) or per channel (windows), over the normal training data
    std: list[float]
    table: dict | None  # the TablePreprocessing, as JSON; None for windows
    shape: list[int]  # one input row: [width] for tables, [channels, steps] for windows
    threshold: float = 1.0  # set after training, from the validation split's normal rows

    def preprocessing(self) -> TablePreprocessing | None:
        from device_agent.bundle import TablePreprocessing

        return TablePreprocessing.model_validate(self.table) if self.table is not None else None


def build_model(record: AnomalyModelRecord) -> torch.nn.Module:
    """The autoencoder of ``record``; ``model(x)`` gives the logits over (normal, anomaly), ``model.score(x)`` the score."""
    import torch
    from torch import nn

    def stages(sizes: list[int], last_activation: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for index, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(a, b))
            if last_activation or index < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    width = math.prod(record.shape)
    statistics_shape = (1, -1) if len(record.shape) == 1 else (1, -1, 1)  # per feature, or per channel of a window

    class Autoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(record.mean, dtype=torch.float32).view(*statistics_shape))
            self.register_buffer("std", torch.tensor(record.std, dtype=torch.float32).view(*statistics_shape))
            self.register_buffer("threshold", torch.tensor(record.threshold, dtype=torch.float32))
            self.encoder = stages([width, *record.widths], last_activation=True)
            self.decoder = stages([*reversed(record.widths), width], last_activation=False)

        def score(self, features: torch.Tensor) -> torch.Tensor:
            standard = ((features - self.mean) / self.std).flatten(1)
            return ((self.decoder(self.encoder(standard)) - standard) ** 2).mean(dim=-1)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            margin = torch.log((self.score(features) + _EPSILON) / (self.threshold + _EPSILON))
            return torch.stack([-margin, margin], dim=-1)

    return Autoencoder()


def save_model(model: torch.nn.Module, record: AnomalyModelRecord, folder: Path) -> None:
    save_model_folder(model, record, folder, RECORD_FILE)


def load_model(folder: Path) -> tuple[torch.nn.Module, AnomalyModelRecord]:
    return load_model_folder(folder, RECORD_FILE, AnomalyModelRecord, build_model)


# --------------------------------------------------------------------------- data


def is_series_data(config: BuildConfig) -> bool:
    """Windows (.ts, .npz, sktime:…, or a CSV laid out as task.series_format says), else a table."""
    path = str(config.data.path)
    return path.startswith(PACKAGED_DATA_PREFIX) or Path(path).suffix in (".ts", ".npz") or config.task.series_format is not None


def load_task_data(config: BuildConfig, seed: int = 0) -> TaskData:
    """Normal rows (or windows) split 70/10/20; labelled anomalies, if any, a third to validation and the rest to test."""
    path, anomaly = config.data.path, config.task.anomaly
    if is_series_data(config):
        from edgekit.tasks.timeseries_data import read_series

        windows, names, _declared = read_series(path, config.data.label_column, config.task.series_format,
                                                config.task.series_length)
        normal_at = [i for i, name in enumerate(names) if name == anomaly.normal_label]
        normal, anomalies = windows[normal_at], np.delete(windows, normal_at, axis=0)
        labelled, described = True, {"series": {"channels": int(windows.shape[1]), "steps": int(windows.shape[2])}}
        if not normal_at:
            raise DataError(f"{path}: no series is labelled {anomaly.normal_label!r} (task.anomaly.normal_label); its labels: "
                            f"{', '.join(sorted(set(names))[:20])}")
        unlabelled = 0
    else:
        normal, anomalies, labelled, described, unlabelled = _table_rows(config)
    noun = "windows" if is_series_data(config) else "rows"
    if len(normal) < 20:
        raise DataError(f"{path} has {len(normal)} normal {noun} (label {anomaly.normal_label!r}"
                        f"{'' if labelled else ', every row when there is no ' + repr(config.data.label_column) + ' column'}); "
                        "an anomaly detector needs at least 20 to learn what normal looks like")
    parts, counts = _split(normal, anomalies, seed)
    kept = len(normal) + len(anomalies)
    summary = {"source": str(path), "rows_read": kept + unlabelled, "rows_kept": kept,
               "dropped": {"no label": unlabelled} if unlabelled else {}, "warnings": [], **described, "anomalies": counts}
    if not len(anomalies):
        summary["warnings"].append(f"no labelled anomalies: the test split measures false alarms on normal {noun} only")
    validation_normal = list(parts["val"][1]).count("normal")
    enough = math.ceil(1 / (1 - anomaly.threshold_quantile))
    if validation_normal < enough:
        summary["warnings"].append(
            f"the threshold is the {anomaly.threshold_quantile:g} quantile of {validation_normal} held-out normal {noun}; "
            f"under {enough} it is little more than their largest score, so the false-alarm rate on new data may differ "
            "from 1 - threshold_quantile: add normal data or lower task.anomaly.threshold_quantile")
    identity = repr((LABELS, sorted(described.items()), config.task.table.model_dump(), anomaly.model_dump(), labelled)).encode()
    return task_data_from(LABELS, parts, CALIBRATION_ROWS, identity, summary)


def _table_rows(config: BuildConfig) -> tuple[np.ndarray, np.ndarray, bool, dict, int]:
    """A table's normal and anomalous rows (object arrays of dicts), whether it has labels, its columns' kinds, and how
    many rows had an empty label."""
    from device_agent.preprocess import category_key
    from edgekit.tasks.tabular_data import feature_columns, read_rows, table_spec

    path, table, label_column = config.data.path, config.task.table, config.data.label_column
    columns, rows = read_rows(path)
    features = feature_columns(columns, label_column, table, path, label_required=False)
    labelled = label_column in columns
    if not labelled and "label_column" in config.data.model_fields_set:
        raise DataError(f"table {path} has no column {label_column!r} (data.label_column); its columns: "
                        f"{', '.join(columns[:30])}; name the column that marks normal rows, or remove data.label_column "
                        "if every row is normal")
    normal, anomalies, unlabelled = [], [], 0
    for row in rows:
        kept = {column: row[column] for column in features}
        label = category_key(row[label_column]) if labelled else config.task.anomaly.normal_label
        if label is None:  # a row nobody labelled is neither: left out, and counted
            unlabelled += 1
            continue
        (normal if label == config.task.anomaly.normal_label else anomalies).append(kept)
    spec = table_spec(normal, features, table)  # refuses what cannot be encoded, before any training
    return (row_array(normal), row_array(anomalies), labelled, {"columns": {c.name: c.kind for c in spec.columns}},
            unlabelled)


def _split(normal: np.ndarray, anomalies: np.ndarray, seed: int) -> tuple[dict, dict]:
    """Normal ones 70/10/20 by a seeded permutation; anomalies a third to val, the rest to test."""
    order = np.random.default_rng(seed).permutation(len(normal))
    test_n, val_n = math.ceil(0.2 * len(normal)), math.ceil(0.1 * len(normal))
    test_normal, val_normal, train_normal = order[:test_n], order[test_n:test_n + val_n], order[test_n + val_n:]
    to_val = carve_stratified(np.zeros(len(anomalies), dtype=np.int64), 1 / 3, seed) if len(anomalies) else np.zeros(0, bool)

    def joined(normal_at: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return np.concatenate([normal[normal_at], anomalies[anomalous]]), ["normal"] * len(normal_at) + ["anomaly"] * int(
            np.size(anomalies[anomalous], 0))

    parts = {"train": (normal[train_normal], ["normal"] * len(train_normal)),
             "val": joined(val_normal, to_val), "test": joined(test_normal, ~to_val)}
    return parts, {"labelled": len(anomalies), "in_val": int(to_val.sum()), "in_test": int((~to_val).sum())}


# --------------------------------------------------------------------------- the task


class AnomalyDetection:
    """The anomaly-detection task: see the module docstring."""

    kind = KIND
    bundle_kind = "anomaly-detection"
    graph_fusion = None
    builtin_sources = (AUTOENCODER,)
    onnx_sources: tuple[str, ...] = ()
    # the model, the table encoding and the readers of what it is trained on
    definitions = (Path(__file__), Path(tabular_classification.__file__), Path(tabular_data.__file__),
                   Path(preprocess.__file__), Path(timeseries_data.__file__))
    search_space = SEARCH_SPACE
    search_starts: tuple[dict, ...] = ()
    quantization_aware_schemes: tuple[str, ...] = ()

    def settings(self, config: BuildConfig) -> AnomalySettings:
        return AnomalySettings(train=config.train, widths=config.model.widths, table=config.task.table,
                               anomaly=config.task.anomaly, label_column=config.data.label_column)

    def config_problems(self, config: BuildConfig) -> list[str]:
        problems = []
        if config.model.source not in self.builtin_sources:
            problems.append(f"model.source {config.model.source!r} is not an anomaly detector; {KIND} takes {AUTOENCODER}")
        if config.finetune.enabled:
            problems.append(f"finetune does not apply to {KIND}: the autoencoder trains in the load pass with train:; "
                            "set finetune.enabled: false")
        if config.prune.enabled:
            problems.append(f"prune does not support {KIND} models yet; set prune.enabled: false")
        if config.search.enabled is True:
            problems.append(f"the search ranks trials by validation accuracy, which an anomaly threshold fixes; {KIND} is "
                            "not searched: set search.enabled: false and tune train: by hand")
        return problems

    def load_data(self, config: BuildConfig) -> TaskData:
        if config.data.test_path is not None:
            raise EdgekitError(f"{KIND} reads one table (data.path) and holds out its own test split; remove data.test_path "
                               "and put the labelled anomalies in data.path with data.label_column")
        return load_task_data(config)

    def spec(self, table: TablePreprocessing | None) -> TaskSpec:
        from edgekit.artifact import TaskSpec

        return TaskSpec(KIND, LABELS, 0, None, (INPUT_NAME if table is not None else SERIES_INPUT,), "logits", None, table)

    def load(self, source: str, digest: str, settings: AnomalySettings, ctx: PassContext) -> Artifact:
        """Describe the inputs from the normal training data, train the autoencoder on it, set the threshold on val."""
        import torch

        from edgekit.artifact import Artifact, Stage
        from edgekit.results import LoadResult, PassResults

        if source != AUTOENCODER:
            raise EdgekitError(f"model.source {source!r} is not an anomaly detector; {KIND} takes {AUTOENCODER}")
        record, train_x = _describe(source, settings, ctx.data.train.inputs)
        spec = self.spec(record.preprocessing())
        torch.manual_seed(settings.train.seed)
        model = build_model(record)
        val_normal = _model_input(spec, ctx.data.val.inputs[ctx.data.val.labels == 0])
        metrics = _train(model, ctx, settings.train, train_x, val_normal)
        with torch.no_grad():
            scores = model.score(torch.from_numpy(val_normal)).numpy()
        threshold = float(np.quantile(scores, settings.anomaly.threshold_quantile))
        record = AnomalyModelRecord(**{**asdict(record), "threshold": threshold})
        model.threshold.fill_(threshold)
        with torch.no_grad():  # the flags on validation: its normal ones, and its anomalies when the data labels some
            flags = model(torch.from_numpy(_model_input(spec, ctx.data.val.inputs))).argmax(-1).numpy()
        metrics["val_accuracy"] = float(np.mean(flags == ctx.data.val.labels))
        save_model(model, record, ctx.work_dir)
        parameters = sum(p.numel() for p in model.parameters())
        ctx.say(f"trained {source} on {len(train_x)} normal inputs ({math.prod(record.shape)} values each, "
                f"{parameters / 1e3:.1f} k parameters); threshold {threshold:.4g} = the "
                f"{settings.anomaly.threshold_quantile:g} quantile of {len(val_normal)} held-out normal inputs' scores")
        return Artifact(Stage.TORCH, ctx.work_dir, ".", digest, spec,
                        results=PassResults(load=LoadResult(model=source, parameters=parameters, widths=record.widths, **metrics)))

    def finetune(self, artifact: Artifact, settings: FinetuneSection, task_settings: AnomalySettings, ctx: PassContext) -> Artifact:
        raise EdgekitError(f"finetune does not apply to {KIND}; set finetune.enabled: false")

    def prune(self, artifact: Artifact, settings: PruneSection, task_settings: AnomalySettings, ctx: PassContext) -> Artifact:
        raise EdgekitError(f"prune does not support {KIND} models yet; set prune.enabled: false")

    def load_torch(self, folder: Path) -> torch.nn.Module:
        return load_model(folder)[0]

    def save_torch(self, model: torch.nn.Module, source: Path, folder: Path) -> None:
        save_model(model, load_model(source)[1], folder)

    @staticmethod
    def forward(model: torch.nn.Module, inputs) -> torch.Tensor:
        return model(next(iter(inputs.values())))

    def torch_batches(self, spec: TaskSpec, split: Split, batch_size: int = PREDICT_BATCH) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        for start in range(0, len(split), batch_size):
            yield {spec.input_names[0]: torch.from_numpy(_model_input(spec, split.inputs[start:start + batch_size]))}

    def export_onnx(self, folder: Path, output: Path, opset: int, say) -> None:
        """Two outputs: ``logits`` over (normal, anomaly) and ``score``."""
        import torch

        model, record = load_model(folder)

        class Scored(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return self.model(values), self.model.score(values)

        name = INPUT_NAME if record.table is not None else SERIES_INPUT
        export_with_torch_onnx(Scored(), torch.zeros(1, *record.shape), output, name, ["logits", "score"], opset, say)

    def feeds(self, spec: TaskSpec, inputs, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Raw rows (dicts) or windows → the model's input, as the device makes it."""
        return {spec.input_names[0]: _model_input(spec, inputs)}

    def bundle_preprocessing(self, spec: TaskSpec):
        from device_agent.bundle import NoPreprocessing

        return spec.table if spec.table is not None else NoPreprocessing()

    def bundle_files(self, spec: TaskSpec) -> dict[str, Path]:
        return {}

    def input_shape(self, spec: TaskSpec) -> dict:
        return {}

    def drift_reference(self, model_path: Path, spec: TaskSpec, splits: Sequence[Split]):
        """Per column (tables) or per channel's mean and std (windows), and the output features: what the device computes."""
        from edgekit.drift_reference import reference_from_splits

        # The reference is what a healthy device sees: the normal rows only, or labelled anomalies would look like drift.
        normal = [Split(split.inputs[split.labels == 0], split.labels[split.labels == 0]) for split in splits]
        if spec.table is not None:
            return reference_from_splits(model_path, spec, normal, table=spec.table)
        return reference_from_splits(model_path, spec, normal, tensor_input=SERIES_INPUT)


TASK = AnomalyDetection()


def _model_input(spec: TaskSpec, inputs) -> np.ndarray:
    """Raw rows (encoded as the device encodes them) or windows, as the model's FP32 input."""
    if spec.table is not None and not (isinstance(inputs, np.ndarray) and inputs.dtype != object):
        return encode(spec.table, inputs)
    return np.ascontiguousarray(inputs, dtype=np.float32)


def _describe(source: str, settings: AnomalySettings, train_inputs: np.ndarray) -> tuple[AnomalyModelRecord, np.ndarray]:
    """The model's record from the normal training inputs (the table's columns, or the windows' channel statistics)
    and those inputs as the model takes them."""
    widths = list(settings.widths or DEFAULT_WIDTHS)
    if train_inputs.dtype == object:  # table rows
        from edgekit.tasks.tabular_data import table_spec

        rows = list(train_inputs)
        table = table_spec(rows, list(rows[0]), settings.table, settings.label_column)
        train_x = encode(table, rows)
        mean, std = feature_statistics(table, train_x)
        return AnomalyModelRecord(AUTOENCODER, widths, mean, std, table.model_dump(mode="json"), [table.width]), train_x
    from edgekit.tasks.timeseries_data import channel_statistics

    train_x = np.ascontiguousarray(train_inputs, dtype=np.float32)
    mean, std = channel_statistics(train_x)
    return AnomalyModelRecord(AUTOENCODER, widths, mean, std, None, list(train_x.shape[1:])), train_x


def _train(model, ctx: PassContext, settings: TrainSection, train_x: np.ndarray, val_x: np.ndarray) -> dict:
    """Reconstruction of normal rows in the one loop; the epoch of lowest validation reconstruction error is kept."""
    import torch

    from edgekit import training
    from edgekit.checkpoints import Checkpoints

    rows = min(len(train_x), settings.max_train_rows or len(train_x))

    def batch(indices: np.ndarray, _epoch: int) -> training.Batch:
        return training.Batch({"values": torch.from_numpy(train_x[indices])}, torch.zeros(len(indices), dtype=torch.int64))

    def reconstruction(module, batch_: training.Batch) -> torch.Tensor:
        return module.score(batch_.inputs["values"]).mean()

    def negative_error(module) -> float:
        with torch.no_grad():
            return -float(module.score(torch.from_numpy(val_x)).mean())

    steps_per_epoch = math.ceil(rows / settings.batch_size)
    fit_settings = training.FitSettings(settings.epochs, settings.learning_rate, settings.weight_decay, "cosine",
                                        int(settings.warmup_ratio * steps_per_epoch * settings.epochs),
                                        settings.early_stopping_patience, label="train")
    result = training.fit(model, training.Shuffled(rows, settings.batch_size, settings.seed, batch), reconstruction,
                          fit_settings, progress=ctx.progress, say=ctx.say, validate=negative_error,
                          checkpoints=Checkpoints(ctx.checkpoint_dir), on_epoch=ctx.on_epoch)
    return {"device": result.device, "val_accuracy": None, "val_accuracy_before": None,
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "seconds": round(result.seconds, 2),
            "samples_per_second": round(result.samples_per_second, 1) if result.samples_per_second else None,
            "loss_curve": result.loss_curve(steps_per_epoch), "kept": "trained"}
