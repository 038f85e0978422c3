"""Tabular classification: labelled rows of numeric and categorical columns in, a small MLP or boosted trees out, raw rows on the device.

Data: ``edgekit.tasks.tabular_data`` (CSV or Parquet). The bundle records how a
raw row becomes the model's input (``device_agent.bundle.TablePreprocessing``:
each numeric column with its fill for a missing value, each categorical column
with its training categories, one-hot plus "other"), and the device runs the
same ``device_agent.preprocess.TableEncoder`` the build does. Model:
``builtin:mlp``, Linear → ReLU → Dropout stages and one Linear; the mean and
standard deviation of each numeric feature over the training rows are buffers
of the model, so standardising is inside the ONNX graph. It trains from
scratch in the load pass (``train:`` settings) and further in the finetune pass
(``method: full``), in the one training loop. The bundle's input is ``features``
``[batch, width]`` FP32; the agent also takes the raw rows (BYTES ``rows``, JSON
objects).

``builtin:gbt``: scikit-learn's gradient-boosted trees on the same encoded
features, trained in the load pass (``model.trees``; ``train.seed`` and
``train.max_train_rows`` apply, the other train settings do not) and converted
with skl2onnx, so the build has no PyTorch stage: the pipeline runs the
``load-to-onnx`` pass (``edgekit.passes.load``) and no finetune, prune, export
or qat (the config refuses them). Early stopping: rounds are added ten at a
time and scored by log-loss on the validation split; boosting stops after
``model.trees.patience`` rounds that lower it by less than ``LOSS_TOLERANCE``,
and the model is cut back to its best round, as scikit-learn's own early
stopping cuts it. The load record's ``epochs_run`` and ``best_epoch`` are
boosting rounds (fitted, kept), ``parameters`` the trees' nodes.

The trees' graph is an ai.onnx.ml TreeEnsembleClassifier whose probabilities
become ``logits`` through a ``Log`` (clipped at ``LOG_FLOOR`` first): argmax
and softmax of them are the probabilities' own, so evaluation, agreement gates,
the agent's classification output and drift features read it like any
classifier's logits. Nothing in it can be quantized: the quantize pass keeps it
fp32 and says so. GradientBoostingClassifier, not the histogram variant:
skl2onnx 1.20's converter for HistGradientBoostingClassifier writes Python
booleans into integer attributes, which protobuf 7.34 and later refuse
("Expected an int, got a boolean"; fixed on skl2onnx's main branch, not yet
released), and the encoder fills missing values before the trees see them
anyway. Not yet: pruning.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_agent import preprocess
from pydantic import BaseModel, ConfigDict

from edgekit.config import BuildConfig, FinetuneSection, PruneSection, SearchRange, TableSection, TrainSection, TreesSection
from edgekit.data import Split, TaskData
from edgekit.errors import EdgekitError
from edgekit.search_space import Dimension
from edgekit.tasks import tabular_data
from edgekit.tasks.model_folder import export_with_torch_onnx, finetune_as_train, load_model_folder, save_model_folder
from edgekit.tasks.scratch_training import PREDICT_BATCH, train_classifier

if TYPE_CHECKING:
    import torch

    from sklearn.ensemble import GradientBoostingClassifier

    from device_agent.bundle import TablePreprocessing
    from edgekit.artifact import Artifact, PassContext, TaskSpec
    from edgekit.passes.export import Options as ExportOptions

KIND = "tabular-classification"
INPUT_NAME = "features"
MLP = "builtin:mlp"
GBT = "builtin:gbt"
RECORD_FILE = "table_model.json"
DEFAULT_WIDTHS = [64, 32]
DROPOUT = 0.1
TREES_FILE = "trees.json"
ROUNDS_PER_STEP = 10  # boosting rounds added between two looks at the validation loss
ML_OPSET = 3  # ai.onnx.ml: TreeEnsembleClassifier-3, which every ONNX Runtime the bundles are tested against runs
LOG_FLOOR = 1e-12  # probabilities are clipped here before the log: a zero would be -inf
LOSS_TOLERANCE = 1e-4  # a round counts as better when it lowers the validation log-loss this much (scikit-learn's tol)
INSTALL_HINT = "pip install 'edgekit[tabular]'"

# Each model's own dimensions: the search fixes model.source to the build's model when it does not choose among models.
_FOR_MLP, _FOR_GBT = ("model.source", (MLP,)), ("model.source", (GBT,))
SEARCH_SPACE = (
    Dimension("train.learning_rate", SearchRange(low=5e-4, high=1e-2, log=True), when=_FOR_MLP),
    Dimension("train.epochs", SearchRange(low=5, high=40, integer=True), when=_FOR_MLP),
    Dimension("train.batch_size", [32, 64, 128], when=_FOR_MLP),
    Dimension("train.weight_decay", SearchRange(low=0.0, high=1e-3), when=_FOR_MLP),
    Dimension("model.widths", [[64, 32], [128, 64], [256, 128, 64]], when=_FOR_MLP),
    Dimension("model.trees.learning_rate", SearchRange(low=0.02, high=0.3, log=True), when=_FOR_GBT),
    Dimension("model.trees.max_depth", SearchRange(low=2, high=6, integer=True), when=_FOR_GBT),
    Dimension("model.trees.min_samples_leaf", [1, 5, 20], when=_FOR_GBT),
    Dimension("model.trees.subsample", [0.7, 1.0], when=_FOR_GBT),
)


class TableSettings(BaseModel):
    """What a tabular build's config says about the task (part of the cache key of the passes that train)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: TrainSection
    widths: list[int] | None
    table: TableSection
    label_column: str  # recorded in the bundle with the ignored columns: a device may receive whole rows
    trees: TreesSection | None = None  # builtin:gbt only, so an MLP's cache key does not move when they change


@dataclass(frozen=True)
class TableModelRecord:
    """Enough to rebuild the module before loading its weights, and the table encoding it was trained on."""

    source: str
    classes: int
    widths: list[int]
    mean: list[float]  # per feature, over the training rows (0 for one-hot features)
    std: list[float]  # per feature (1 for one-hot features)
    table: dict  # the TablePreprocessing, as JSON

    def preprocessing(self) -> TablePreprocessing:
        from device_agent.bundle import TablePreprocessing

        return TablePreprocessing.model_validate(self.table)


def build_model(record: TableModelRecord) -> torch.nn.Module:
    """The MLP of ``record``, freshly initialised, standardising its input with the record's statistics."""
    import torch
    from torch import nn

    class TableMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(record.mean, dtype=torch.float32).view(1, -1))
            self.register_buffer("std", torch.tensor(record.std, dtype=torch.float32).view(1, -1))
            layers: list[nn.Module] = []
            previous = len(record.mean)
            for width in record.widths:
                layers += [nn.Linear(previous, width), nn.ReLU(), nn.Dropout(DROPOUT)]
                previous = width
            self.hidden = nn.Sequential(*layers)
            self.classifier = nn.Linear(previous, record.classes)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.hidden((features - self.mean) / self.std))

    return TableMLP()


def save_model(model: torch.nn.Module, record: TableModelRecord, folder: Path) -> None:
    save_model_folder(model, record, folder, RECORD_FILE)


def load_model(folder: Path) -> tuple[torch.nn.Module, TableModelRecord]:
    return load_model_folder(folder, RECORD_FILE, TableModelRecord, build_model)


def encode(table: TablePreprocessing, rows: Sequence) -> np.ndarray:
    """Raw rows → FP32 features, with the device's own encoder."""
    from device_agent.preprocess import TableEncoder

    return TableEncoder(table)(list(rows))


def feature_statistics(table: TablePreprocessing, features: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean and std per feature over the training rows; one-hot features keep 0 and 1 (already on a unit scale)."""
    mean, std = np.zeros(table.width), np.ones(table.width)
    offset = 0
    for column in table.columns:
        if column.kind == "numeric":
            values = features[:, offset].astype(np.float64)
            mean[offset] = values.mean()
            std[offset] = values.std() if values.std() > 1e-8 else 1.0
        offset += column.width
    return mean.tolist(), std.tolist()


def require_tree_libraries() -> None:
    """scikit-learn and skl2onnx are the ``tabular`` extra: a clear error naming it when either is missing."""
    import importlib

    for module in ("sklearn", "skl2onnx"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise EdgekitError(f"{GBT} needs scikit-learn and skl2onnx ({module} is missing): {INSTALL_HINT}") from None


def _probabilities(raw: np.ndarray) -> np.ndarray:
    """Class probabilities from boosting's raw scores under its log-loss: a sigmoid for two classes, else a softmax."""
    if raw.shape[1] == 1:
        positive = 1.0 / (1.0 + np.exp(-raw[:, 0]))
        return np.column_stack([1.0 - positive, positive])
    shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _log_loss(raw: np.ndarray, labels: np.ndarray) -> float:
    chosen = _probabilities(raw)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(chosen, LOG_FLOOR, None))))


def _best_round(losses: list[float]) -> int:
    """The index of the last round that lowered the best validation log-loss so far by at least LOSS_TOLERANCE."""
    best = 0
    for index, loss in enumerate(losses):
        if loss < losses[best] - LOSS_TOLERANCE:
            best = index
    return best


def _keep_rounds(model: GradientBoostingClassifier, rounds: int) -> None:
    """Cut a fitted model back to its first ``rounds`` rounds, as scikit-learn's own early stopping cuts it."""
    model.estimators_ = model.estimators_[:rounds]
    model.train_score_ = model.train_score_[:rounds]
    if hasattr(model, "oob_improvement_"):  # subsample < 1
        model.oob_improvement_ = model.oob_improvement_[:rounds]
        model.oob_scores_ = model.oob_scores_[:rounds]
        model.oob_score_ = model.oob_scores_[-1]
    model.n_estimators_ = rounds
    model.set_params(n_estimators=rounds, warm_start=False)


def fit_boosted_trees(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                      trees: TreesSection, seed: int) -> tuple[GradientBoostingClassifier, list[float]]:
    """Boost ``ROUNDS_PER_STEP`` rounds at a time until ``trees.patience`` rounds bring no lower validation log-loss (by
    LOSS_TOLERANCE; or ``trees.max_trees``), then keep the best round; the model and the validation log-loss after each
    round fitted."""
    from sklearn.ensemble import GradientBoostingClassifier

    model = GradientBoostingClassifier(n_estimators=1, learning_rate=trees.learning_rate, max_depth=trees.max_depth,
                                       min_samples_leaf=trees.min_samples_leaf, subsample=trees.subsample,
                                       random_state=seed, warm_start=True)
    model.fit(train_x, train_y)
    raw = model.decision_function(val_x).reshape(len(val_x), -1)
    losses = [_log_loss(raw, val_y)]
    while len(losses) < trees.max_trees and len(losses) - 1 - _best_round(losses) < trees.patience:
        done = len(losses)
        model.set_params(n_estimators=min(done + ROUNDS_PER_STEP, trees.max_trees)).fit(train_x, train_y)
        for stage in model.estimators_[done:]:  # each new round's trees (one per class; one for two classes)
            raw = raw + trees.learning_rate * np.column_stack([tree.predict(val_x) for tree in stage])
            losses.append(_log_loss(raw, val_y))
    _keep_rounds(model, _best_round(losses) + 1)
    return model, losses


def trees_to_onnx(model: GradientBoostingClassifier, width: int, opset: int):
    """skl2onnx's TreeEnsembleClassifier with ``features`` [batch, width] in and log-probabilities as ``logits`` out."""
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    converted = convert_sklearn(model, initial_types=[(INPUT_NAME, FloatTensorType([None, width]))],
                                options={id(model): {"zipmap": False}}, target_opset={"": opset, "ai.onnx.ml": ML_OPSET})
    graph = converted.graph
    probabilities = next(value.name for value in graph.output if value.name == "probabilities")
    del graph.output[:]  # the label output goes: a device reads the logits (argmax is the label)
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(LOG_FLOOR, dtype=np.float32), "log_floor"))
    graph.node.extend([onnx.helper.make_node("Clip", [probabilities, "log_floor"], ["clipped_probabilities"], name="clip_probabilities"),
                       onnx.helper.make_node("Log", ["clipped_probabilities"], ["logits"], name="log_probabilities")])
    graph.output.append(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", len(model.classes_)]))
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(converted)
    return converted


def _tree_parity(model_path: Path, model: GradientBoostingClassifier, features: np.ndarray) -> float:
    """Largest |softmax(ONNX logits) - scikit-learn's predict_proba| over ``features``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {INPUT_NAME: features})
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return float(np.max(np.abs(shifted / shifted.sum(axis=1, keepdims=True) - model.predict_proba(features))))


class TabularClassification:
    """The tabular task: see the module docstring."""

    kind = KIND
    bundle_kind = "tabular-classification"
    graph_fusion = None
    builtin_sources = (MLP, GBT)
    onnx_sources = (GBT,)  # trained straight to ONNX in the load-to-onnx pass: no PyTorch stage
    definitions = (Path(__file__), Path(tabular_data.__file__), Path(preprocess.__file__))  # the models and the encoding
    search_space = SEARCH_SPACE
    search_starts: tuple[dict, ...] = ()
    quantization_aware_schemes: tuple[str, ...] = ()

    def settings(self, config: BuildConfig) -> TableSettings:
        if config.model.source == GBT:  # only what the trees read, so a change to the MLP's settings retrains nothing
            train = TrainSection(seed=config.train.seed, max_train_rows=config.train.max_train_rows)
            return TableSettings(train=train, widths=None, table=config.task.table, label_column=config.data.label_column,
                                 trees=config.model.trees)
        return TableSettings(train=config.train, widths=config.model.widths, table=config.task.table,
                             label_column=config.data.label_column)

    def config_problems(self, config: BuildConfig) -> list[str]:
        problems = []
        if config.model.source not in self.builtin_sources:
            problems.append(f"model.source {config.model.source!r} is not a table model; {KIND} takes "
                            f"{', '.join(self.builtin_sources)}")
        if config.model.source == GBT:
            enabled = [name for name in ("finetune", "prune", "qat") if getattr(config, name).enabled]
            if enabled:
                problems.append(f"{GBT} is trained straight to ONNX and has no PyTorch stage to "
                                f"{', '.join(enabled)}; set {', '.join(f'{name}.enabled: false' for name in enabled)} "
                                f"(tune the trees with model.trees), or use {MLP}")
            return problems
        if config.finetune.enabled and config.finetune.method == "lora":
            problems.append("finetune.method lora adapts Hugging Face text models; table models are fine-tuned fully: "
                            "set finetune.method: full")
        if config.prune.enabled:
            problems.append(f"prune does not support {KIND} models yet; set prune.enabled: false")
        return problems

    def load_data(self, config: BuildConfig) -> TaskData:
        from edgekit.tasks.tabular_data import load_task_data

        return load_task_data(config.data.path, config.data.test_path, config.data.label_column, config.task.table)

    def spec(self, labels: tuple[str, ...], table: TablePreprocessing) -> TaskSpec:
        from edgekit.artifact import TaskSpec

        return TaskSpec(KIND, labels, 0, None, (INPUT_NAME,), "logits", None, table)

    def load(self, source: str, digest: str, settings: TableSettings, ctx: PassContext) -> Artifact:
        """Describe the table from the training rows, build the MLP with their feature statistics, train it from scratch."""
        import torch

        from edgekit.artifact import Artifact, Stage
        from edgekit.results import LoadResult, PassResults
        from edgekit.tasks.tabular_data import table_spec

        if source != MLP:
            raise EdgekitError(f"model.source {source!r} is not a table model; {KIND} takes {MLP}")
        train_rows = list(ctx.data.train.inputs)
        table = table_spec(train_rows, list(train_rows[0]) if train_rows else [], settings.table, settings.label_column)
        train_x = encode(table, train_rows)
        mean, std = feature_statistics(table, train_x)
        record = TableModelRecord(source, len(ctx.data.labels), list(settings.widths or DEFAULT_WIDTHS), mean, std,
                                  table.model_dump(mode="json"))
        torch.manual_seed(settings.train.seed)
        model = build_model(record)
        metrics = train_classifier(model, ctx, settings.train, "train", keep_initial=False, input_name=INPUT_NAME,
                                   train_x=train_x, val_x=encode(table, ctx.data.val.inputs))
        save_model(model, record, ctx.work_dir)
        parameters = sum(p.numel() for p in model.parameters())
        ctx.say(f"trained {source} on {len(table.columns)} columns ({table.width} features, {parameters / 1e3:.1f} k "
                f"parameters): validation accuracy {metrics['val_accuracy']:.4f}")
        return Artifact(Stage.TORCH, ctx.work_dir, ".", digest, self.spec(ctx.data.labels, table),
                        results=PassResults(load=LoadResult(model=source, parameters=parameters, widths=record.widths, **metrics)))

    def train_onnx(self, source: str, digest: str, settings: TableSettings, export: ExportOptions, ctx: PassContext) -> Artifact:
        """builtin:gbt: describe the table from the training rows, boost trees on its encoded features with early stopping
        on validation, convert them with skl2onnx and check ONNX Runtime against scikit-learn on validation rows."""
        from edgekit.artifact import Artifact, Stage
        from edgekit.results import ExportResult, LoadResult, PassResults
        from edgekit.tasks.tabular_data import table_spec

        require_tree_libraries()
        train_rows = list(ctx.data.train.inputs)
        table = table_spec(train_rows, list(train_rows[0]) if train_rows else [], settings.table, settings.label_column)
        rows = settings.train.max_train_rows or len(train_rows)  # as the MLP: the table is described from every row
        train_x, val_x = encode(table, train_rows[:rows]), encode(table, ctx.data.val.inputs)
        train_y, classes = ctx.data.train.labels[:rows], len(ctx.data.labels)
        missing = sorted(set(range(classes)) - set(np.unique(train_y).tolist()))
        if missing:
            raise EdgekitError(f"class(es) {[ctx.data.labels[i] for i in missing]} have no training rows; {GBT} learns "
                               "only the classes it sees: add rows of them, or drop them from the table")
        started = time.perf_counter()
        model, losses = fit_boosted_trees(train_x, train_y, val_x, ctx.data.val.labels, settings.trees, settings.train.seed)
        seconds = time.perf_counter() - started
        output = ctx.work_dir / "model.onnx"
        output.write_bytes(trees_to_onnx(model, table.width, export.opset).SerializeToString())
        parity_rows = val_x[:export.parity_samples]
        error = _tree_parity(output, model, parity_rows)
        if error > export.parity_atol:
            raise EdgekitError(f"the ONNX trees' probabilities differ from scikit-learn's by up to {error:.3g} on "
                               f"{len(parity_rows)} validation rows (tolerance {export.parity_atol:g}); the conversion is "
                               "not faithful, so the build stops: report this with your scikit-learn and skl2onnx versions")
        accuracy = float(np.mean(model.predict(val_x) == ctx.data.val.labels))
        nodes = int(sum(tree.tree_.node_count for stage in model.estimators_ for tree in stage))
        (ctx.work_dir / TREES_FILE).write_text(json.dumps({"rounds_kept": model.n_estimators_, "val_log_loss": losses,
                                                           "settings": settings.trees.model_dump()}, indent=2) + "\n")
        ctx.say(f"trained {GBT} on {len(table.columns)} columns ({table.width} features): {model.n_estimators_} of "
                f"{len(losses)} rounds kept ({nodes} nodes), validation accuracy {accuracy:.4f}; ONNX matches scikit-learn "
                f"within {error:.2g}")
        load = LoadResult(model=source, parameters=nodes, val_accuracy=accuracy, best_epoch=model.n_estimators_,
                          epochs_run=len(losses), seconds=round(seconds, 2), device="cpu",
                          kept=f"the best of {len(losses)} boosting rounds by validation log-loss")
        parity = ExportResult(parity_max_abs_error=error, parity_samples=len(parity_rows), opset=export.opset)
        return Artifact(Stage.ONNX, ctx.work_dir, "model.onnx", digest, self.spec(ctx.data.labels, table),
                        results=PassResults(load=load, export=parity))

    def finetune(self, artifact: Artifact, settings: FinetuneSection, task_settings: TableSettings, ctx: PassContext) -> Artifact:
        """Every weight trained further with the finetune settings; the loaded model competes."""
        from edgekit.artifact import Artifact, Stage
        from edgekit.results import FinetuneResult

        model, record = load_model(artifact.directory)
        table = record.preprocessing()
        train = finetune_as_train(settings)
        metrics = train_classifier(model, ctx, train, "finetune", keep_initial=True, input_name=INPUT_NAME,
                                   train_x=encode(table, ctx.data.train.inputs), val_x=encode(table, ctx.data.val.inputs))
        save_model(model, record, ctx.work_dir)
        return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, artifact.task,
                        results=artifact.recording(finetune=FinetuneResult(method="full", **metrics)))

    def prune(self, artifact: Artifact, settings: PruneSection, task_settings: TableSettings, ctx: PassContext) -> Artifact:
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
        import torch

        model, record = load_model(folder)
        export_with_torch_onnx(model, torch.zeros(1, len(record.mean)), output, INPUT_NAME, ["logits"], opset, say)

    def feeds(self, spec: TaskSpec, inputs, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Raw rows (dicts) → the ``features`` tensor, as the device encodes them; an FP32 array passes as it is."""
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
        """Per column: the value (numeric) or the category (categorical) of the raw rows, and the output features."""
        from edgekit.drift_reference import reference_from_splits

        return reference_from_splits(model_path, spec, splits, table=spec.table)


TASK = TabularClassification()
