"""Image classifiers edgekit builds itself: a small CNN defined here, and Hugging Face ResNet / MobileNetV2 from a config.

Every model here maps a float image batch (the preprocessed ``pixel_values``)
to class logits, so one training loop, one exporter and one parity check serve
all of them. A model at the torch stage is a folder:

- ``image_model.json``: which model it is (source, family, channels, classes, widths);
- ``model.pt``: the small CNN's state dict, or a Hugging Face folder (``config.json`` + weights) for the others.

The small CNN is a plain ``nn.Sequential``: ``features`` (Conv2d → BatchNorm2d →
ReLU [→ MaxPool2d] per stage), then ``classifier`` (global average pool →
flatten → Linear), so channel pruning can walk it without knowing the class.
torch is imported inside the functions (``edgekit --help`` stays instant).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    import torch

SMALL_CNN = "builtin:small-cnn"
HF_CONFIG_FAMILIES = ("config:resnet", "config:mobilenet_v2")
KNOWN_SOURCES = (SMALL_CNN, *HF_CONFIG_FAMILIES)
RECORD_FILE = "image_model.json"
WEIGHTS_FILE = "model.pt"
HF_FOLDER = "hf"
DEFAULT_WIDTHS = {SMALL_CNN: [16, 32, 64, 128], "config:resnet": [32, 64, 128], "config:mobilenet_v2": [16, 24, 32]}


@dataclass(frozen=True)
class ImageModelRecord:
    """Enough to rebuild the module before loading its weights."""

    source: str  # builtin:small-cnn, config:<family>, or the Hugging Face folder it came from
    family: str  # "small-cnn" or "hf"
    channels: int
    classes: int
    widths: list[int]
    image_size: list[int]  # height, width the model sees


def record_for(source: str, channels: int, classes: int, widths: list[int] | None, image_size: tuple[int, int]) -> ImageModelRecord:
    """The record of a new model; a clear error for a source that names no image model."""
    if source.startswith(("builtin:", "config:")) and source not in KNOWN_SOURCES:
        raise EdgekitError(f"unknown image model {source!r}; known: {', '.join(KNOWN_SOURCES)}, or a Hugging Face image model folder")
    if not source.startswith(("builtin:", "config:")) and not (Path(source) / "config.json").is_file():
        raise EdgekitError(f"{source} is not a Hugging Face model folder (no config.json); or use one of {', '.join(KNOWN_SOURCES)}")
    family = "small-cnn" if source == SMALL_CNN else "hf"
    return ImageModelRecord(source, family, channels, classes, list(widths or DEFAULT_WIDTHS.get(source, [])), list(image_size))


def small_cnn(channels: int, classes: int, widths: list[int]) -> torch.nn.Sequential:
    """Conv-BN-ReLU stages, max-pooled between stages (not after the last), then global pooling and one Linear."""
    from torch import nn

    layers: list[nn.Module] = []
    previous = channels
    for stage, width in enumerate(widths):
        layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if stage < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        previous = width
    features = nn.Sequential(*layers)
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, classes))
    return nn.Sequential(features, classifier)


def _hf_wrapper(model):
    import torch

    class HfImageClassifier(torch.nn.Module):
        """A Hugging Face image classifier as ``pixels -> logits`` (what the loop and the exporter call)."""

        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values=pixel_values).logits

    return HfImageClassifier(model)


def _hf_config(record: ImageModelRecord):
    """A small configuration of the family (random init), or the folder's own config with this task's labels."""
    from transformers import AutoConfig, MobileNetV2Config, ResNetConfig

    id2label = {i: str(i) for i in range(record.classes)}
    if record.source == "config:resnet":
        return ResNetConfig(num_channels=record.channels, embedding_size=record.widths[0], hidden_sizes=record.widths,
                            depths=[1] * len(record.widths), layer_type="basic", downsample_in_first_stage=False,
                            num_labels=record.classes, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if record.source == "config:mobilenet_v2":
        return MobileNetV2Config(num_channels=record.channels, image_size=max(record.image_size), depth_multiplier=0.35,
                                 num_labels=record.classes, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    config = AutoConfig.from_pretrained(record.source)
    config.num_labels = record.classes
    config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
    if hasattr(config, "num_channels"):
        config.num_channels = record.channels
    return config


def build(record: ImageModelRecord) -> torch.nn.Module:
    """A freshly initialised model (a Hugging Face folder with weights loads them; its classifier is re-sized)."""
    if record.family == "small-cnn":
        return small_cnn(record.channels, record.classes, record.widths)
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: it is trained next
    config = _hf_config(record)
    folder = Path(record.source)
    has_weights = folder.is_dir() and any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
    try:
        if has_weights:
            model = AutoModelForImageClassification.from_pretrained(folder, config=config, ignore_mismatched_sizes=True)
        else:
            model = AutoModelForImageClassification.from_config(config)
    except (ValueError, KeyError) as exc:
        raise EdgekitError(f"cannot build an image classifier from {record.source} ({exc}); use a ResNet, MobileNetV2 or another "
                           "AutoModelForImageClassification architecture") from None
    return _hf_wrapper(model)


def save(model: torch.nn.Module, record: ImageModelRecord, folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")
    if record.family == "small-cnn":
        torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    else:
        model.inner.save_pretrained(folder / HF_FOLDER)


def load(folder: Path) -> tuple[torch.nn.Module, ImageModelRecord]:
    """The model saved in ``folder`` (eval mode) and its record."""
    import torch

    record = ImageModelRecord(**json.loads((folder / RECORD_FILE).read_text()))
    if record.family == "small-cnn":
        model = small_cnn(record.channels, record.classes, record.widths)
        model.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    else:
        from transformers import AutoModelForImageClassification

        model = _hf_wrapper(AutoModelForImageClassification.from_pretrained(folder / HF_FOLDER))
    return model.eval(), record


def export_onnx(model: torch.nn.Module, record: ImageModelRecord, input_name: str, output: Path, opset: int) -> None:
    """ONNX with a symbolic ``batch`` axis; the TorchScript exporter folds BatchNorm into the convolutions in eval mode."""
    import warnings

    import torch

    example = torch.zeros(1, record.channels, *record.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice: it is the exporter that folds BatchNorm
        torch.onnx.export(model.eval(), (example,), str(output), dynamo=False, input_names=[input_name], output_names=["logits"],
                          dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset)
