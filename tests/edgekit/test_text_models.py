"""Mean pooling (edgekit.tasks.text_models): chosen from the model's sentence-transformers config, kept by every pass that
loads the model, exported so that ONNX Runtime gives PyTorch's logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from rich.progress import Progress

from edgekit.artifact import Artifact, PassContext, Stage
from edgekit.config import BuildConfig, FinetuneSection, HeadSection
from edgekit.errors import EdgekitError
from edgekit.passes import finetune
from edgekit.tasks.text_classification import TASK, TextSettings, fit_head, load_task_data
from edgekit.tasks.text_models import POOLING_KEY, mean_pooled_class, pooling_of
from tests.support.tiny_bert import MAX_LENGTH


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny BERT as a plain folder and as a sentence-transformers folder that says it is read by mean pooling."""
    from tests.support.tiny_bert import tiny_hf_folder

    root = tmp_path_factory.mktemp("pooling")
    plain = tiny_hf_folder(root / "plain")
    sentence = root / "sentence"
    shutil.copytree(plain, sentence)
    (sentence / "1_Pooling").mkdir()
    (sentence / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return plain, sentence


@pytest.fixture(scope="module")
def data():
    return load_task_data(BuildConfig().data)


def _head(source, data, tmp_path, pooling="auto"):
    work = tmp_path / f"head-{pooling}"
    work.mkdir()
    ctx = PassContext(work, data, Progress(disable=True), tmp_path / "k", print)
    metrics = fit_head(source, data, TextSettings(max_length=MAX_LENGTH, head=HeadSection(epochs=5, pooling=pooling)), ctx)
    return work, metrics


def test_auto_pooling_follows_the_sentence_transformers_config(folders):
    plain, sentence = folders
    assert pooling_of(plain, "auto") == "cls" and pooling_of(sentence, "auto") == "mean"
    assert pooling_of(sentence, "cls") == "cls" and pooling_of(plain, "mean") == "mean"


def test_mean_pooling_is_refused_for_a_family_it_is_not_built_for(tmp_path, folders):
    plain, _ = folders
    other = tmp_path / "roberta"
    shutil.copytree(plain, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(EdgekitError, match="head.pooling mean is built for bert models, not 'roberta'"):
        pooling_of(other, "mean")
    assert pooling_of(other, "auto") == "cls"


def test_a_mean_pooled_head_is_fitted_saved_and_loaded_back_as_mean_pooled(folders, data, tmp_path):
    _, sentence = folders
    work, metrics = _head(sentence, data, tmp_path)
    assert metrics["pooling"] == "mean" and 0 < metrics["val_accuracy"] <= 1
    assert json.loads((work / "config.json").read_text())[POOLING_KEY] == "mean"
    model = TASK.load_torch(work)
    assert isinstance(model, mean_pooled_class()) and model.bert.pooler is None
    # The prediction is the classifier on the mean of the real tokens' vectors: padding does not move it.
    from tests.support.tiny_bert import minilm_tokenizer_file

    texts = data.val.texts[:3]
    spec = TASK.spec(data.labels, MAX_LENGTH, minilm_tokenizer_file())
    alone = [TASK.forward(model, {k: torch.from_numpy(v) for k, v in TASK.feeds(spec, [t]).items()}) for t in texts]
    together = TASK.forward(model, {k: torch.from_numpy(v) for k, v in TASK.feeds(spec, texts).items()})
    assert torch.allclose(torch.cat(alone), together, atol=1e-5)


def test_the_mean_pooled_model_exports_with_parity_and_without_the_cls_pooler(folders, data, tmp_path):
    from tests.support.tiny_bert import minilm_tokenizer_file

    _, sentence = folders
    work, _ = _head(sentence, data, tmp_path)
    output = tmp_path / "onnx" / "model.onnx"
    output.parent.mkdir()
    TASK.export_onnx(work, output, 17, print)
    graph = onnx.load(str(output)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert "Tanh" not in {node.op_type for node in graph.node}, "the [CLS] pooler is not in the graph"
    spec = TASK.spec(data.labels, MAX_LENGTH, minilm_tokenizer_file())
    feeds = TASK.feeds(spec, data.val.texts[:16])
    onnx_logits = ort.InferenceSession(str(output)).run(None, feeds)[0]
    with torch.inference_mode():
        torch_logits = TASK.forward(TASK.load_torch(work), {k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4


def test_lora_fine_tuning_keeps_the_model_mean_pooled(folders, data, tmp_path):
    from tests.support.tiny_bert import minilm_tokenizer_file

    _, sentence = folders
    work, _ = _head(sentence, data, tmp_path)
    spec = TASK.spec(data.labels, MAX_LENGTH, minilm_tokenizer_file())
    shutil.copy(spec.tokenizer_file, work / "tokenizer.json")
    artifact = Artifact(Stage.TORCH, work, ".", "mean", TASK.spec(data.labels, MAX_LENGTH, work / "tokenizer.json"))
    (tmp_path / "tuned").mkdir()
    config = BuildConfig(finetune=FinetuneSection(enabled=True, max_train_rows=160, epochs=1, learning_rate=2e-3))
    ctx = PassContext(tmp_path / "tuned", data, Progress(disable=True), tmp_path / "k", print)
    tuned = finetune.run(artifact, finetune.options_for(config, None), ctx)
    model = TASK.load_torch(tuned.directory)
    assert isinstance(model, mean_pooled_class()) and not any("lora" in name for name, _ in model.named_parameters())
