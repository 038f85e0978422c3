"""A toy task written the way a newcomer adds one: this module, plus one line in ``edgekit.tasks.TASKS``.

``toy-vectors`` classifies fixed-length float vectors (a stand-in for tabular or
sensor rows) with a small MLP. Its data is an ``.npz`` file with ``features``
``[n, width]`` and ``labels`` ``[n]`` (class names); its model folder holds
``toy.json`` (widths) and ``model.pt``; its bundle is a plain tensor model (no
preprocessing on the device). It trains in the build's own loop.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgekit import training
from edgekit.artifact import Artifact, Stage, TaskSpec
from edgekit.data import DataError, Split, TaskData
from edgekit.errors import EdgekitError
from edgekit.results import LoadResult, PassResults

KIND = "toy-vectors"
INPUT = "features"


class ToySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = 40
    learning_rate: float = 0.01


def _mlp(width: int, hidden: int, classes: int):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


class ToyVectors:
    kind = KIND
    bundle_kind = "tensor"
    graph_fusion = None
    builtin_sources: tuple[str, ...] = ()
    onnx_sources: tuple[str, ...] = ()
    definitions: tuple[Path, ...] = ()
    quantization_aware_schemes: tuple[str, ...] = ()
    search_space: tuple = ()  # nothing to tune: a search of this task tries the config as written (and search.models)
    search_starts: tuple = ()

    def settings(self, config) -> ToySettings:
        return ToySettings()

    def config_problems(self, config) -> list[str]:
        return []

    def load_data(self, config) -> TaskData:
        try:
            arrays = np.load(config.data.path)
            features, names = arrays["features"].astype(np.float32), arrays["labels"].astype(str)
        except (OSError, KeyError, ValueError) as problem:
            raise DataError(f"{config.data.path}: not a toy .npz with features and labels ({problem})") from None
        labels = tuple(sorted(set(names)))
        targets = np.asarray([labels.index(n) for n in names], dtype=np.int64)
        cut = [int(len(targets) * share) for share in (0.7, 0.85)]
        train, val, test = (Split(features[a:b], targets[a:b]) for a, b in ((0, cut[0]), (cut[0], cut[1]), (cut[1], None)))
        digest = hashlib.sha256(features.tobytes() + targets.tobytes()).hexdigest()
        return TaskData(labels, train, val, test, train.head(64), digest, {"rows_read": len(targets), "rows_kept": len(targets),
                                                                          "dropped": {}, "balance": {}})

    def spec(self, labels: tuple[str, ...]) -> TaskSpec:
        return TaskSpec(KIND, labels, 0, None, (INPUT,), "logits", None)

    def load(self, source: str, digest: str, settings: ToySettings, ctx) -> Artifact:
        import torch

        shape = json.loads((Path(source) / "config.json").read_text())
        torch.manual_seed(0)
        model = _mlp(ctx.data.train.inputs.shape[1], shape["hidden"], len(ctx.data.labels))
        spec = self.spec(ctx.data.labels)
        train = ctx.data.train

        def batch(rows, _epoch):
            return training.Batch({INPUT: torch.from_numpy(train.inputs[rows])}, torch.from_numpy(train.labels[rows]))

        def validate(module) -> float:
            logits = training.predict(module, self.torch_batches(spec, ctx.data.val), self.forward)
            return float(np.mean(logits.argmax(-1) == ctx.data.val.labels))

        result = training.fit(model, training.Shuffled(len(train), 32, 0, batch), training.cross_entropy(self.forward),
                              training.FitSettings(settings.epochs, settings.learning_rate, patience=10, label="toy"),
                              progress=ctx.progress, validate=validate)
        (ctx.work_dir / "toy.json").write_text(json.dumps({"width": train.inputs.shape[1], "hidden": shape["hidden"],
                                                           "classes": len(ctx.data.labels)}))
        torch.save(model.state_dict(), ctx.work_dir / "model.pt")
        return Artifact(Stage.TORCH, ctx.work_dir, ".", digest, spec, results=PassResults(load=LoadResult(val_accuracy=result.best_score)))

    def finetune(self, artifact, settings, task_settings, ctx):
        raise EdgekitError("toy-vectors models are trained in the load pass; set finetune.enabled: false")

    def prune(self, artifact, settings, task_settings, ctx):
        raise EdgekitError("toy-vectors models are not pruned; set prune.enabled: false")

    def save_torch(self, model, source: Path, folder: Path) -> None:
        import shutil

        import torch

        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "toy.json", folder / "toy.json")
        torch.save(model.state_dict(), folder / "model.pt")

    def load_torch(self, folder: Path):
        import torch

        shape = json.loads((folder / "toy.json").read_text())
        model = _mlp(shape["width"], shape["hidden"], shape["classes"])
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        return model.eval()

    @staticmethod
    def forward(model, inputs):
        return model(inputs[INPUT])

    def torch_batches(self, spec: TaskSpec, split: Split, batch_size: int = 256) -> Iterator[dict]:
        import torch

        for start in range(0, len(split), batch_size):
            yield {INPUT: torch.from_numpy(split.inputs[start:start + batch_size])}

    def export_onnx(self, folder: Path, output: Path, opset: int, say) -> None:
        import torch

        model = self.load_torch(folder)
        example = torch.zeros(1, model[0].in_features)
        torch.onnx.export(model, (example,), str(output), input_names=[INPUT], output_names=["logits"],
                          dynamic_axes={INPUT: {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False)

    def feeds(self, spec: TaskSpec, inputs, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        return {INPUT: np.asarray(inputs, dtype=np.float32)}


    def bundle_preprocessing(self, spec: TaskSpec):
        from device_agent.bundle import NoPreprocessing

        return NoPreprocessing()

    def bundle_files(self, spec: TaskSpec) -> dict[str, Path]:
        return {}

    def input_shape(self, spec: TaskSpec) -> dict:
        return {}

    def drift_reference(self, model_path: Path, spec: TaskSpec, splits: Sequence[Split]):
        return None  # the device computes no drift features for plain tensors


TASK = ToyVectors()
