"""Anomaly detection on table rows: learn normal rows, score how far a row is from them, raise a flag past a threshold.

Data: a CSV or Parquet table (``edgekit.tasks.tabular_data.read_rows``). Without
``data.label_column`` in it every row is normal; with it, rows labelled
``task.anomaly.normal_label`` are normal and any other label is an anomaly,
kept for evaluation only (a third in validation, the rest in test): the model
never sees one. Normal rows are split 70/10/20 (train/val/test, seeded).

Model: ``builtin:autoencoder``, an MLP autoencoder over the row's features (the
table encoding of the tabular task, standardised inside the model), trained in
the one training loop to reconstruct normal rows. A row's anomaly score is its
mean squared reconstruction error. The threshold is the
``task.anomaly.threshold_quantile`` (0.99) quantile of the scores of the
validation split's normal rows, so about 1% of normal rows raise a false alarm.
The ONNX model has two outputs: ``logits`` ``[batch, 2]`` over the labels
(normal, anomaly), ``±log(score / threshold)`` (scale-free, so the export and
int8 keep it to a few decimals), so every classification
tool of edgekit (agreement gates, accuracy, PR-AUC of the anomaly class, the
agent's top-1 label) reads the flag; and ``score`` ``[batch]``. The agent takes
raw rows like the tabular task's bundles and returns both: the label is the
flag, the score how far past (or short of) the threshold the row is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgekit.config import AnomalySection, BuildConfig, FinetuneSection, PruneSection, SearchRange, TableSection, TrainSection
from edgekit.data import DataError, Split, TaskData, carve_stratified, task_data_from
from edgekit.errors import EdgekitError
from edgekit.search_space import Dimension
from edgekit.tasks.tabular_classification import INPUT_NAME, encode, feature_statistics

if TYPE_CHECKING:
    import torch

    from device_agent.bundle import TablePreprocessing
    from edgekit.artifact import Artifact, PassContext, TaskSpec

KIND = "anomaly-detection"
AUTOENCODER = "builtin:autoencoder"
LABELS = ("normal", "anomaly")
RECORD_FILE = "anomaly_model.json"
WEIGHTS_FILE = "model.pt"
DEFAULT_WIDTHS = [32, 8]  # hidden, bottleneck
CALIBRATION_ROWS = 256
PREDICT_BATCH = 256
_EPSILON = 1e-12  # keeps log(score / threshold) finite for a perfect reconstruction

SEARCH_SPACE = (
    Dimension("train.learning_rate", SearchRange(low=5e-4, high=1e-2, log=True)),
    Dimension("train.epochs", SearchRange(low=10, high=60, integer=True)),
    Dimension("model.widths", [[32, 8], [64, 16], [64, 32, 8]]),
)


class AnomalySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: TrainSection
    widths: list[int] | None
    table: TableSection
    anomaly: AnomalySection


@dataclass(frozen=True)
class AnomalyModelRecord:
    source: str
    widths: list[int]
    mean: list[float]
    std: list[float]
    table: dict  # the TablePreprocessing, as JSON
    threshold: float = 1.0  # set after training, from the validation split's normal rows

    def preprocessing(self) -> TablePreprocessing:
        from device_agent.bundle import TablePreprocessing

        return TablePreprocessing.model_validate(self.table)


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

    width = len(record.mean)

    class TableAutoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(record.mean, dtype=torch.float32).view(1, -1))
            self.register_buffer("std", torch.tensor(record.std, dtype=torch.float32).view(1, -1))
            self.register_buffer("threshold", torch.tensor(record.threshold, dtype=torch.float32))
            self.encoder = stages([width, *record.widths], last_activation=True)
            self.decoder = stages([*reversed(record.widths), width], last_activation=False)

        def score(self, features: torch.Tensor) -> torch.Tensor:
            standard = (features - self.mean) / self.std
            return ((self.decoder(self.encoder(standard)) - standard) ** 2).mean(dim=-1)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            margin = torch.log((self.score(features) + _EPSILON) / (self.threshold + _EPSILON))
            return torch.stack([-margin, margin], dim=-1)

    return TableAutoencoder()


def save_model(model: torch.nn.Module, record: AnomalyModelRecord, folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)


def load_model(folder: Path) -> tuple[torch.nn.Module, AnomalyModelRecord]:
    import torch

    record = AnomalyModelRecord(**json.loads((folder / RECORD_FILE).read_text()))
    model = build_model(record)
    model.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), record


# --------------------------------------------------------------------------- data


def load_task_data(path: Path, label_column: str, table: TableSection, anomaly: AnomalySection, seed: int = 0) -> TaskData:
    """Normal rows split 70/10/20; labelled anomalies, if any, a third to validation and the rest to test."""
    from device_agent.preprocess import category_key
    from edgekit.tasks.tabular_data import read_rows, table_spec

    columns, rows = read_rows(path)
    unknown = sorted((set(table.ignore) | set(table.categorical)) - set(columns))
    if unknown:
        raise DataError(f"task.table names column(s) {unknown} that {path} does not have; its columns: {', '.join(columns[:30])}")
    features = [column for column in columns if column != label_column and column not in table.ignore]
    if not features:
        raise DataError(f"table {path} has no column to learn from besides {label_column!r}")
    labelled = label_column in columns
    normal, anomalies = [], []
    for row in rows:
        kept = {column: row[column] for column in features}
        (anomalies if labelled and category_key(row[label_column]) != anomaly.normal_label else normal).append(kept)
    if len(normal) < 20:
        raise DataError(f"table {path} has {len(normal)} normal rows (label {anomaly.normal_label!r}"
                        f"{'' if labelled else ', every row when there is no ' + repr(label_column) + ' column'}); "
                        "an anomaly detector needs at least 20 to learn what normal looks like")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(normal))
    test_n, val_n = math.ceil(0.2 * len(normal)), math.ceil(0.1 * len(normal))
    test_normal = [normal[i] for i in order[:test_n]]
    val_normal = [normal[i] for i in order[test_n:test_n + val_n]]
    train_normal = [normal[i] for i in order[test_n + val_n:]]
    to_val = carve_stratified(np.zeros(len(anomalies), dtype=np.int64), 1 / 3, seed) if anomalies else np.zeros(0, bool)
    val_anomalies = [row for row, v in zip(anomalies, to_val, strict=True) if v]
    test_anomalies = [row for row, v in zip(anomalies, to_val, strict=True) if not v]
    spec = table_spec(train_normal, features, table)  # refuses what cannot be encoded, before any training
    parts = {
        "train": (_objects(train_normal), ["normal"] * len(train_normal)),
        "val": (_objects(val_normal + val_anomalies), ["normal"] * len(val_normal) + ["anomaly"] * len(val_anomalies)),
        "test": (_objects(test_normal + test_anomalies), ["normal"] * len(test_normal) + ["anomaly"] * len(test_anomalies)),
    }
    summary = {"source": str(path), "rows_read": len(rows), "rows_kept": len(rows), "dropped": {}, "warnings": [],
               "columns": {column.name: column.kind for column in spec.columns},
               "anomalies": {"labelled": len(anomalies), "in_val": len(val_anomalies), "in_test": len(test_anomalies)}}
    if not anomalies:
        summary["warnings"].append("no labelled anomalies: the test split measures false alarms on normal rows only")
    identity = repr((LABELS, features, table.model_dump(), anomaly.model_dump(), labelled)).encode()
    return task_data_from(LABELS, parts, CALIBRATION_ROWS, identity, summary)


def _objects(rows: list[dict]) -> np.ndarray:
    array = np.empty(len(rows), dtype=object)
    array[:] = rows
    return array


# --------------------------------------------------------------------------- the task


class AnomalyDetection:
    """The anomaly-detection task: see the module docstring."""

    kind = KIND
    bundle_kind = "anomaly-detection"
    graph_fusion = None
    builtin_sources = (AUTOENCODER,)
    definitions = Path(__file__)
    search_space = SEARCH_SPACE
    search_starts: tuple[dict, ...] = ()
    quantization_aware_schemes: tuple[str, ...] = ()

    def settings(self, config: BuildConfig) -> AnomalySettings:
        return AnomalySettings(train=config.train, widths=config.model.widths, table=config.task.table,
                               anomaly=config.task.anomaly)

    def config_problems(self, config: BuildConfig) -> list[str]:
        problems = []
        if config.model.source not in self.builtin_sources:
            problems.append(f"model.source {config.model.source!r} is not an anomaly detector; {KIND} takes {AUTOENCODER}")
        if config.finetune.enabled:
            problems.append(f"finetune does not apply to {KIND}: the autoencoder trains in the load pass with train:; "
                            "set finetune.enabled: false")
        if config.prune.enabled:
            problems.append(f"prune does not support {KIND} models yet; set prune.enabled: false")
        return problems

    def load_data(self, config: BuildConfig) -> TaskData:
        if config.data.test_path is not None:
            raise EdgekitError(f"{KIND} reads one table (data.path) and holds out its own test split; remove data.test_path "
                               "and put the labelled anomalies in data.path with data.label_column")
        return load_task_data(config.data.path, config.data.label_column, config.task.table, config.task.anomaly)

    def spec(self, table: TablePreprocessing) -> TaskSpec:
        from edgekit.artifact import TaskSpec

        return TaskSpec(KIND, LABELS, 0, None, (INPUT_NAME,), "logits", None, table)

    def load(self, source: str, digest: str, settings: AnomalySettings, ctx: PassContext) -> Artifact:
        """Describe the table from the normal training rows, train the autoencoder on them, set the threshold on val."""
        import torch

        from edgekit.artifact import Artifact, Stage
        from edgekit.results import LoadResult, PassResults
        from edgekit.tasks.tabular_data import table_spec

        if source != AUTOENCODER:
            raise EdgekitError(f"model.source {source!r} is not an anomaly detector; {KIND} takes {AUTOENCODER}")
        train_rows = list(ctx.data.train.inputs)
        table = table_spec(train_rows, list(train_rows[0]), settings.table)
        train_x = encode(table, train_rows)
        mean, std = feature_statistics(table, train_x)
        record = AnomalyModelRecord(source, list(settings.widths or DEFAULT_WIDTHS), mean, std, table.model_dump(mode="json"))
        torch.manual_seed(settings.train.seed)
        model = build_model(record)
        val_normal = encode(table, ctx.data.val.inputs[ctx.data.val.labels == 0])
        metrics = _train(model, ctx, settings.train, train_x, val_normal)
        with torch.no_grad():
            scores = model.score(torch.from_numpy(val_normal)).numpy()
        threshold = float(np.quantile(scores, settings.anomaly.threshold_quantile))
        record = AnomalyModelRecord(**{**asdict(record), "threshold": threshold})
        model.threshold.fill_(threshold)
        with torch.no_grad():  # the flags on validation: its normal rows, and its anomalies when the table labels some
            flags = model(torch.from_numpy(encode(table, ctx.data.val.inputs))).argmax(-1).numpy()
        metrics["val_accuracy"] = float(np.mean(flags == ctx.data.val.labels))
        save_model(model, record, ctx.work_dir)
        parameters = sum(p.numel() for p in model.parameters())
        ctx.say(f"trained {source} on {len(train_rows)} normal rows ({table.width} features, {parameters / 1e3:.1f} k "
                f"parameters); threshold {threshold:.4g} = the {settings.anomaly.threshold_quantile:g} quantile of "
                f"{len(val_normal)} held-out normal rows' scores")
        return Artifact(Stage.TORCH, ctx.work_dir, ".", digest, self.spec(table),
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
        return model(inputs[INPUT_NAME])

    def torch_batches(self, spec: TaskSpec, split: Split, batch_size: int = PREDICT_BATCH) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        for start in range(0, len(split), batch_size):
            yield {INPUT_NAME: torch.from_numpy(encode(spec.table, split.inputs[start:start + batch_size]))}

    def export_onnx(self, folder: Path, output: Path, opset: int, say) -> None:
        """torch.onnx with two outputs: ``logits`` over (normal, anomaly) and ``score``."""
        import warnings

        import onnx
        import torch

        model, record = load_model(folder)

        class Scored(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return self.model(features), self.model.score(features)

        say(f"exporting to ONNX (opset {opset}) with torch.onnx")
        example = torch.zeros(1, len(record.mean))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice says nothing about this model
            torch.onnx.export(Scored().eval(), (example,), str(output), input_names=[INPUT_NAME], output_names=["logits", "score"],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}, "score": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        onnx.checker.check_model(str(output))

    def feeds(self, spec: TaskSpec, inputs, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        if isinstance(inputs, np.ndarray) and inputs.dtype != object:
            return {INPUT_NAME: np.ascontiguousarray(inputs, dtype=np.float32)}
        return {INPUT_NAME: encode(spec.table, inputs)}

    def bundle_preprocessing(self, spec: TaskSpec):
        return spec.table

    def bundle_files(self, spec: TaskSpec) -> dict[str, Path]:
        return {}

    def input_shape(self, spec: TaskSpec) -> dict:
        return {}

    def drift_reference(self, model_path: Path, spec: TaskSpec, splits: Sequence[Split]):
        from edgekit.drift_reference import reference_from_splits

        return reference_from_splits(model_path, spec, splits, table=spec.table)


TASK = AnomalyDetection()


def _train(model, ctx: PassContext, settings: TrainSection, train_x: np.ndarray, val_x: np.ndarray) -> dict:
    """Reconstruction of normal rows in the one loop; the epoch of lowest validation reconstruction error is kept."""
    import torch

    from edgekit import training
    from edgekit.checkpoints import Checkpoints

    rows = min(len(train_x), settings.max_train_rows or len(train_x))

    def batch(indices: np.ndarray, _epoch: int) -> training.Batch:
        return training.Batch({INPUT_NAME: torch.from_numpy(train_x[indices])}, torch.zeros(len(indices), dtype=torch.int64))

    def reconstruction(module, batch_: training.Batch) -> torch.Tensor:
        return module.score(batch_.inputs[INPUT_NAME]).mean()

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
