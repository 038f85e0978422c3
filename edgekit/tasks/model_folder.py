"""What every model edgekit builds itself (series, tables, anomalies) shares: its folder at the torch stage, its export
to ONNX, and the training settings its fine-tuning runs with.

A folder holds a JSON record (a dataclass: enough to rebuild the module) and the module's state dict. torch is imported
inside the functions.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgekit.config import FinetuneSection, TrainSection

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.pt"
Record = TypeVar("Record")


def save_model_folder(model: torch.nn.Module, record: Any, folder: Path, record_file: str) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / record_file).write_text(json.dumps(asdict(record), indent=2) + "\n")
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)


def load_model_folder(folder: Path, record_file: str, record_type: Callable[..., Record],
                      build: Callable[[Record], torch.nn.Module]) -> tuple[torch.nn.Module, Record]:
    """The module (in eval mode) and its record."""
    import torch

    record = record_type(**json.loads((folder / record_file).read_text()))
    model = build(record)
    model.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), record


def export_with_torch_onnx(model: torch.nn.Module, example: torch.Tensor, output: Path, input_name: str,
                           output_names: list[str], opset: int, say) -> None:
    """torch.onnx (TorchScript exporter: BatchNorm folded; every input and output with a symbolic batch), checked by
    onnx.checker."""
    import onnx
    import torch

    say(f"exporting to ONNX (opset {opset}) with torch.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice says nothing about these models
        torch.onnx.export(model.eval(), (example,), str(output), input_names=[input_name], output_names=output_names,
                          dynamic_axes={name: {0: "batch"} for name in [input_name, *output_names]}, opset_version=opset,
                          dynamo=False)
    onnx.checker.check_model(str(output))


def finetune_as_train(settings: FinetuneSection) -> TrainSection:
    """The finetune section's numbers as the train section a model built here trains with."""
    return TrainSection(epochs=settings.epochs, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                        weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
                        early_stopping_patience=settings.early_stopping_patience, max_train_rows=settings.max_train_rows,
                        seed=settings.seed)
