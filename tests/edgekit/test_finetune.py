"""The finetune pass: LoRA (or full) training on the build's data, adapter saved and merged, clear errors."""

from __future__ import annotations

import pytest
from rich.progress import Progress

from edgekit.artifact import Artifact, PassContext, Stage, TaskSpec
from edgekit.config import BuildConfig, FinetuneSection
from edgekit.errors import EdgekitError
from edgekit.passes import finetune
from edgekit.tasks.text_classification import load_task_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.support.tiny_bert import MAX_LENGTH, tiny_hf_folder

    folder = tiny_hf_folder(tmp_path_factory.mktemp("tiny") / "model")
    data = load_task_data(BuildConfig().data)
    task = TaskSpec("text-classification", data.labels, MAX_LENGTH, folder / "tokenizer.json")
    return Artifact(Stage.TORCH, folder, ".", "tiny", task), data


def _run(tiny, tmp_path, **settings):
    artifact, data = tiny
    work = tmp_path / "work"
    work.mkdir()
    config = BuildConfig(finetune=FinetuneSection(enabled=True, max_train_rows=320, **settings))
    ctx = PassContext(work, data, Progress(disable=True), tmp_path / "k", print)
    return finetune.run(artifact, finetune.options_for(config, None), ctx)


def test_lora_trains_saves_the_adapter_and_merges_it(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = _run(tiny, tmp_path, learning_rate=2e-3)
    assert result.stage is Stage.TORCH
    assert (result.directory / "adapter" / "adapter_config.json").is_file()
    assert (result.directory / "tokenizer.json").is_file() and result.task.tokenizer_file == result.directory / "tokenizer.json"
    merged = AutoModelForSequenceClassification.from_pretrained(result.directory)
    assert not any("lora" in name for name, _ in merged.named_parameters()), "the adapter is merged into plain weights"
    metrics = result.results.finetune.model_dump()
    assert metrics["method"] == "lora" and metrics["device"] in ("cpu", "cuda")
    assert metrics["val_accuracy"] >= metrics["val_accuracy_head_only"], "the best of head-only and fine-tuned is kept"
    assert metrics["samples_per_second"] > 0 and metrics["loss_curve"]


def test_full_fine_tuning_runs_too(tiny, tmp_path):
    assert _run(tiny, tmp_path, method="full", learning_rate=1e-3).results.finetune.model_dump()["method"] == "full"


def test_a_lora_target_module_that_does_not_exist_is_named(tiny, tmp_path):
    with pytest.raises(EdgekitError, match=r"LoRA target modules \['qkv_proj'\] do not exist .* some of: .*query"):
        _run(tiny, tmp_path, lora_target_modules=["qkv_proj"])


def test_fine_tuning_joins_the_shared_prefix_only_when_enabled():
    from edgekit.pipeline import shared_prefix

    assert [p.name for p in shared_prefix(BuildConfig())] == ["load", "export"]
    enabled = BuildConfig(finetune=FinetuneSection(enabled=True))
    assert [p.name for p in shared_prefix(enabled)] == ["load", "finetune", "export"]


def test_the_report_compares_head_only_and_fine_tuned_on_validation_and_leaves_test_alone(tiny, tmp_path):
    metrics = _run(tiny, tmp_path, learning_rate=2e-3).results.finetune.model_dump()
    for key in ("val_accuracy_head_only", "val_accuracy"):
        assert 0 <= metrics[key] <= 1, key
    assert not [key for key in metrics if key.startswith("test_")]  # a search compares runs; test judges only the shipped one


def test_an_interrupted_fine_tune_resumes_after_its_last_finished_epoch(tiny, tmp_path):
    artifact, data = tiny
    config = BuildConfig(finetune=FinetuneSection(enabled=True, max_train_rows=160, epochs=3, early_stopping_patience=5, learning_rate=2e-3))
    checkpoints = tmp_path / "checkpoints"

    def interrupt_in_epoch_two(message: str) -> None:
        if "epoch 2:" in message:
            raise KeyboardInterrupt

    first = tmp_path / "first"
    first.mkdir()
    with pytest.raises(KeyboardInterrupt):
        finetune.run(artifact, finetune.options_for(config, None),
                     PassContext(first, data, Progress(disable=True), tmp_path / "k", interrupt_in_epoch_two, checkpoints))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-1.pt"], "epoch 1 was saved, epoch 2 never finished"
    messages: list[str] = []
    second = tmp_path / "second"
    second.mkdir()
    result = finetune.run(artifact, finetune.options_for(config, None),
                          PassContext(second, data, Progress(disable=True), tmp_path / "k", messages.append, checkpoints))
    metrics = result.results.finetune.model_dump()
    assert metrics["resumed_after_epoch"] == 1 and metrics["epochs_run"] == 3
    assert any("resuming after epoch 1" in m for m in messages)
    assert not any("epoch 1:" in m for m in messages), "epoch 1 is not trained again"


def test_a_batch_too_large_for_the_memory_is_refused_before_training(tiny, tmp_path):
    with pytest.raises(EdgekitError, match=r"finetune.batch_size 100000000 .* GiB .* lower finetune.batch_size"):
        _run(tiny, tmp_path, batch_size=100_000_000)
