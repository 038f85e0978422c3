"""The prune pass: heads, FFN neurons and conv channels really leave the matrices; ranking follows the data; clear errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from rich.progress import Progress

from edgekit.artifact import Artifact, PassContext, Stage, TaskSpec
from edgekit.config import BuildConfig, PruneSection
from edgekit import training
from edgekit.passes import prune
from edgekit.pruning import PruneError, cnn, encoder, parameter_count
from edgekit.tasks.text_classification import load_task_data

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Training on 2 cores shared with other processes: torch's spinning OpenMP threads made these tests 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return load_task_data(BuildConfig().data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data):
    """A briefly trained BERT with 2 layers x 4 heads (head size 8) and 64 FFN neurons, saved as a build's TORCH artifact."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    from tests.support.tiny_bert import (
        MAX_LENGTH,
        VOCAB_SIZE,
        _train,
        minilm_tokenizer_file,
    )

    folder = tmp_path_factory.mktemp("tiny-prune") / "model"
    task = TaskSpec("text-classification", data.labels, MAX_LENGTH, minilm_tokenizer_file())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=MAX_LENGTH * 2, num_labels=len(data.labels),
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    _train(model, data, task, train_rows=2000, epochs=2)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_tokenizer_file().parent / name, folder / name)
    return Artifact(Stage.TORCH, folder, ".", "tiny", TaskSpec("text-classification", data.labels, MAX_LENGTH, folder / "tokenizer.json"))


def _model(artifact):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(artifact.directory).eval()


def _tokenizer(artifact):
    from device_agent.preprocess import TextTokenizer

    return TextTokenizer(artifact.task.tokenizer_file, artifact.task.max_length)


def _batches(artifact, split, rows=256):
    return encoder.ranking_batches(artifact.task, split, rows)


def _loss_and_accuracy(model, artifact, split, rows=400) -> tuple[float, float]:
    loss, hits = 0.0, 0
    with torch.no_grad():
        for batch in encoder.ranking_batches(artifact.task, split, rows, 64):
            inputs, labels = batch.inputs, batch.labels
            output = model(**inputs, labels=labels)
            loss += output.loss.item() * len(labels)
            hits += int((output.logits.argmax(-1) == labels).sum())
    return loss / min(rows, len(split)), hits / min(rows, len(split))


def _run(artifact, data, tmp_path, **settings):
    work = tmp_path / "work"
    work.mkdir()
    config = BuildConfig(prune=PruneSection(enabled=True, **{"recovery_steps": 0, **settings}), task={"kind": artifact.task.kind},
                         **({"model": {"source": "builtin:small-cnn"}} if artifact.task.image else {}))
    ctx = PassContext(work, data, Progress(disable=True), tmp_path / "k", print)
    return prune.run(artifact, prune.options_for(config, None), ctx)


# --------------------------------------------------------------------------- transformer encoders


def test_heads_and_neurons_leave_the_matrices_and_survive_save_and_reload(tiny, data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _model(tiny)
    rng = np.random.default_rng(0)
    plan = encoder.plan_encoder(encoder.EncoderImportance(rng.random((2, 4)), rng.random((2, 64))), 0.5)
    encoder.apply_encoder_plan(model, plan)
    assert sum(len(h) for h in plan.heads.values()) == 4, "half of the 8 heads"
    shape = encoder.encoder_shape(model)
    assert sum(shape["heads"]) == 4 and min(shape["heads"]) >= 1
    assert shape["intermediate"] == [32, 32]
    layer = model.bert.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (shape["heads"][0] * 8, 32)
    assert layer.attention.output.dense.weight.shape == (32, shape["heads"][0] * 8)
    assert layer.intermediate.dense.weight.shape == (32, 32) and layer.output.dense.weight.shape == (32, 32)

    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    assert encoder.encoder_shape(reloaded) == shape, "config.pruned_heads and intermediate_size rebuild the same shapes"
    inputs = _batches(tiny, data.val, 16)[0].inputs
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)

    # Pruning an already pruned model: positions count only the heads still there.
    again = encoder.plan_encoder(encoder.EncoderImportance(encoder._ragged([np.ones(n) for n in shape["heads"]]), np.ones((2, 32))), 0.3)
    encoder.apply_encoder_plan(reloaded, again)
    assert sum(encoder.encoder_shape(reloaded)["heads"]) == 4 - sum(len(h) for h in again.heads.values())


def test_heads_and_neurons_whose_output_is_zero_are_ranked_least_important(tiny, data):
    model = _model(tiny)
    dead_heads, dead_neurons = {0: [1], 1: [3]}, [5, 17, 40]
    with torch.no_grad():
        for layer, heads in dead_heads.items():
            for head in heads:
                model.bert.encoder.layer[layer].attention.output.dense.weight[:, head * 8:(head + 1) * 8] = 0
        for layer in model.bert.encoder.layer:
            layer.output.dense.weight[:, dead_neurons] = 0
    importance = encoder.encoder_importance(model, _batches(tiny, data.train), "taylor")
    assert importance.heads[0, 1] == 0 and importance.heads[1, 3] == 0
    assert (importance.heads[0, [0, 2, 3]] > 0).all() and (importance.neurons[:, dead_neurons] == 0).all()
    plan = encoder.plan_encoder(importance, 2 / 8)  # 2 heads; 64 - 16 = 48 neurons kept
    assert plan.heads == dead_heads
    for kept in plan.neurons_kept:
        assert not set(dead_neurons) & set(kept.tolist())


def test_pruning_the_least_important_units_hurts_less_than_pruning_the_most_important(tiny, data):
    model = _model(tiny)
    importance = encoder.encoder_importance(model, _batches(tiny, data.train), "taylor")
    inverted = encoder.EncoderImportance(-importance.heads, -importance.neurons)
    for ratio in (0.25, 0.5):
        calibration_loss, val_accuracy = {}, {}
        for name, scores in (("least", importance), ("most", inverted)):
            candidate = copy.deepcopy(model)
            encoder.apply_encoder_plan(candidate, encoder.plan_encoder(scores, ratio))
            calibration_loss[name] = _loss_and_accuracy(candidate, tiny, data.train, 256)[0]
            val_accuracy[name] = _loss_and_accuracy(candidate, tiny, data.val)[1]
        assert calibration_loss["least"] < calibration_loss["most"], (ratio, calibration_loss)
        assert val_accuracy["least"] > val_accuracy["most"] + 0.02, (ratio, val_accuracy)


def test_the_pass_prunes_exports_and_runs_in_onnx_runtime_like_the_pruned_torch_model(tiny, data, tmp_path):
    import onnxruntime

    from edgekit.passes import export

    result = _run(tiny, data, tmp_path, ratio=0.5)
    metrics = result.results.prune.model_dump()
    assert result.stage is Stage.TORCH and (result.directory / "tokenizer.json").is_file()
    assert metrics["heads_before"] == [4, 4] and sum(metrics["heads_after"]) == 4
    assert metrics["neurons_after"] == [32, 32] and metrics["neurons_removed_per_layer"] == [32, 32]
    assert metrics["parameters"]["after"] < metrics["parameters"]["before"]
    assert metrics["size_mb"]["after"] < metrics["size_mb"]["before"]
    assert metrics["latency_p50_ms"]["before"] > 0 and metrics["latency_p50_ms"]["after"] > 0
    assert set(metrics["val_accuracy"]) == {"before", "pruned", "recovered"} and metrics["val_accuracy"]["recovered"] is None
    assert not (result.directory / "timing").exists()

    # The real export pass (and its parity check) takes the pruned folder.
    work = tmp_path / "export"
    work.mkdir()
    config = BuildConfig()
    ctx = PassContext(work, data, Progress(disable=True), tmp_path / "k", print)
    exported = export.run(result, export.options_for(config, None), ctx)
    unpruned = tmp_path / "unpruned.onnx"
    encoder.export_encoder(_model(tiny), tiny.directory, unpruned)
    assert exported.model_path.stat().st_size < unpruned.stat().st_size
    session = onnxruntime.InferenceSession(str(exported.model_path), providers=["CPUExecutionProvider"])
    feeds = _tokenizer(tiny).encode(data.test.texts[:32])
    names = {i.name for i in session.get_inputs()}
    (logits,) = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})
    pruned = _model(result)
    with torch.no_grad():
        expected = pruned(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_recovery_fine_tuning_with_distillation_runs_and_keeps_the_better_model(tiny, data, tmp_path):
    metrics = _run(tiny, data, tmp_path, ratio=0.5, recovery_steps=15, recovery_learning_rate=1e-3).results.prune.model_dump()
    accuracy = metrics["val_accuracy"]
    assert metrics["recovery"]["steps"] == 15 and metrics["recovery"]["distillation"]
    assert accuracy["recovered"] is not None
    assert metrics["kept"] == ("pruned and recovered" if accuracy["recovered"] >= accuracy["pruned"]
                               else "pruned (recovery did not beat it on validation)")


def test_a_latency_goal_picks_the_smallest_ratio_that_meets_it(tiny, tmp_path, monkeypatch):
    from edgekit.measure import Latency

    def fake_latency(paths, feeds, **_):
        # A model that gets linearly faster as it is pruned: 10 ms unpruned, 10 * (1 - ratio) ms pruned.
        ratio = float(paths["after"].stem.removeprefix("candidate-"))
        return {"before": Latency(10.0, 10.0, 1), "after": Latency(10.0 * (1 - ratio), 10.0 * (1 - ratio), 1)}

    import edgekit.pruning

    monkeypatch.setattr(edgekit.pruning, "compare_latency", fake_latency)
    monkeypatch.setattr(encoder, "export_encoder", lambda model, source, output: output.write_bytes(b"") or output)
    model = _model(tiny)
    rng = np.random.default_rng(0)
    importance = encoder.EncoderImportance(rng.random((2, 4)), rng.random((2, 64)))
    ratio, trials = encoder.search_ratio(model, importance, PruneSection(speedup=1.25), tiny.directory, tmp_path / "b.onnx", {}, print)
    assert ratio == 0.2, trials  # 10 / 8 = 1.25
    assert len(trials) <= 5 and trials[0]["ratio"] == 0.7
    ratio, _ = encoder.search_ratio(model, importance, PruneSection(target_latency_ms=6.6), tiny.directory, tmp_path / "b.onnx", {}, print)
    assert ratio == 0.35
    with pytest.raises(PruneError, match=r"speedup 5.0x\) is out of reach: pruning max_ratio 0.7 gives 3.00 ms \(3.33x\).*raise prune.max_ratio"):
        encoder.search_ratio(model, importance, PruneSection(speedup=5), tiny.directory, tmp_path / "b.onnx", {}, print)


def test_a_latency_goal_runs_through_the_pass(tiny, data, tmp_path):
    metrics = _run(tiny, data, tmp_path, target_latency_ms=10_000, max_ratio=0.2).results.prune.model_dump()
    # 0.05 would remove no head and (rounded to whole GEMM tiles) no neuron of this tiny model, so 0.1 is the first ratio tried.
    assert metrics["goal"] == "target_latency_ms" and metrics["ratio"] == 0.1
    assert [t["ratio"] for t in metrics["search"]] == [0.2, 0.1] and all(t["meets_goal"] for t in metrics["search"])


# --------------------------------------------------------------------------- the build


def test_prune_joins_the_shared_prefix_only_when_enabled():
    from edgekit.config import FinetuneSection
    from edgekit.pipeline import shared_prefix

    assert [p.name for p in shared_prefix(BuildConfig())] == ["load", "export"]
    assert [p.name for p in shared_prefix(BuildConfig(prune=PruneSection(enabled=True)))] == ["load", "prune", "export"]
    both = BuildConfig(finetune=FinetuneSection(enabled=True), prune=PruneSection(enabled=True))
    assert [p.name for p in shared_prefix(both)] == ["load", "finetune", "prune", "export"]


def test_the_prune_pass_is_cached_like_any_other(tiny, data, tmp_path):
    from device_agent.keys import generate_keypair
    from edgekit.config import EvaluationSection, HeadSection, ModelSection, TaskSection
    from edgekit.pipeline import Build

    key, _ = generate_keypair(tmp_path / "keys")

    def prefix(ratio: float):
        config = BuildConfig(model=ModelSection(source=str(tiny.directory)), task=TaskSection(max_length=64),
                             head=HeadSection(epochs=2), evaluation=EvaluationSection(latency_iterations=5),
                             prune=PruneSection(enabled=True, ratio=ratio, recovery_steps=0, calibration_rows=64))
        build = Build(config, data, tmp_path / "out", tmp_path / "cache", key, Progress(disable=True), print)
        planned, _ = build.plan()
        artifact = Artifact(Stage.SOURCE, tiny.directory, "", build.source_digest(), TaskSpec("text-classification", data.labels, 64, None))
        records = []
        for step in planned:
            artifact, record = build._execute(step, artifact, tmp_path / "out")
            records.append(record)
        return artifact, records

    first, records = prefix(0.5)
    assert [r.name for r in records] == ["load", "prune", "export"] and not any(r.cached for r in records)
    assert first.results.prune.model_dump()["ratio"] == 0.5 and first.results.export is not None
    assert (tmp_path / "out" / "passes" / "02-prune" / "config.json").is_file(), "the pruned model stays visible"
    _, again = prefix(0.5)
    assert all(r.cached for r in again)
    _, other = prefix(0.25)
    assert [r.cached for r in other] == [True, False, False], "another ratio re-runs prune and what follows, not load"


# --------------------------------------------------------------------------- CNNs


def _tiny_cnn(flatten_spatial: bool):
    nn = torch.nn
    torch.manual_seed(0)
    tail = [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 4)] if flatten_spatial else \
        [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)]
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        *tail,
    )


def _images(count=64, seed=0):
    """Images whose class is the brightest of 4 quadrants, so a trained CNN has something to rely on."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 4, (count,), generator=generator)
    for index, label in enumerate(labels.tolist()):
        row, column = divmod(label, 2)
        images[index, :, row * 8:(row + 1) * 8, column * 8:(column + 1) * 8] += 1.0
    return images, labels


def _train_cnn(model, steps=60):
    from tests.support.train import fit_on

    return fit_on(model, [training.Batch({"images": images}, labels) for images, labels in (_images(32, seed=step + 1) for step in range(steps))],
                  learning_rate=1e-2)


@pytest.mark.parametrize("flatten_spatial", [False, True], ids=["pooled", "flatten-4x4"])
def test_conv_channels_leave_the_matrices_and_onnx_runtime_agrees(flatten_spatial, tmp_path):
    import onnxruntime

    model = _train_cnn(_tiny_cnn(flatten_spatial))
    images, labels = _images(64, seed=99)
    importance = cnn.conv_importance(model, [training.Batch({"pixel_values": images}, labels)])
    assert [len(s) for s in importance] == [8, 16]
    unpruned_parameters = parameter_count(model)
    channels = cnn.prune_sequential_cnn(model, importance, 0.5, images[:1])
    assert channels == {"channels_before": [8, 16], "channels_after": [4, 8]}
    chain = cnn.flatten_sequential(model)
    assert chain[0].weight.shape == (4, 3, 3, 3) and chain[1].running_mean.shape == (4,)
    assert chain[4].weight.shape == (8, 4, 3, 3) and chain[5].num_features == 8
    assert chain[-1].weight.shape == (4, 8 * (16 if flatten_spatial else 1))
    assert parameter_count(model) < unpruned_parameters
    with torch.no_grad():
        expected = model(images).numpy()
    torch.onnx.export(model, (images[:1],), str(tmp_path / "cnn.onnx"), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "cnn.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], expected, atol=1e-4)


def test_conv_channels_that_output_zero_are_removed_first():
    model = _train_cnn(_tiny_cnn(False))
    with torch.no_grad():
        model[1][0].weight[[2, 11]] = 0  # second conv: channels 2 and 11 see nothing ...
        model[1][0].bias[[2, 11]] = 0
        model[1][1].bias[[2, 11]] = -5  # ... and BatchNorm shifts them below ReLU's threshold
    images, labels = _images(64, seed=99)
    importance = cnn.conv_importance(model, [training.Batch({"pixel_values": images}, labels)])
    assert (importance[1][[2, 11]] == 0).all() and (np.delete(importance[1], [2, 11]) > 0).sum() >= 10
    before = model[1][1].running_mean.clone()
    cnn.prune_sequential_cnn(model, importance, 2 / 16, images[:1])
    kept = [c for c in range(16) if c not in (2, 11)]
    torch.testing.assert_close(model[1][1].running_mean, before[kept])


# --------------------------------------------------------------------------- bad input


def test_an_unsupported_architecture_is_named_with_what_is_supported(data, tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from tests.support.tiny_bert import minilm_tokenizer_file

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                                 num_labels=len(data.labels)))
    model.save_pretrained(tmp_path / "distil")
    artifact = Artifact(Stage.TORCH, tmp_path / "distil", ".", "d", TaskSpec("text-classification", data.labels, 64, minilm_tokenizer_file()))
    with pytest.raises(PruneError, match=r"does not support 'distilbert' models; supported: .*bert, roberta.*nn.Sequential CNNs"):
        _run(artifact, data, tmp_path)


def test_a_ratio_that_removes_nothing_is_refused(tiny, data, tmp_path):
    with pytest.raises(PruneError, match=r"ratio 0.01 removes nothing from this model \(8 heads, 64 FFN neurons per layer\); raise prune.ratio"):
        _run(tiny, data, tmp_path, ratio=0.01)


@pytest.mark.parametrize(("settings", "message"), [
    ({"ratio": 1.0}, "less than 1"),
    ({"ratio": 0.0}, "greater than 0"),
    ({"ratio": 0.3, "speedup": 1.5}, "set one of ratio, speedup or target_latency_ms, not ratio and speedup"),
    ({"ratio": 0.8}, "ratio 0.8 is above max_ratio 0.7; raise max_ratio"),
    ({"speedup": 0.9}, "greater than 1"),
    ({"importance": "random"}, "'taylor' or 'magnitude'"),
    ({"rate": 0.3}, "prune.rate: unknown field"),
])
def test_bad_prune_settings_are_refused_in_one_error_naming_the_field(settings, message, tmp_path):
    import yaml

    from device_agent.errors import UserError
    from edgekit.config import load_build_config

    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump({"prune": {"enabled": True, **settings}}))
    with pytest.raises(UserError, match="prune") as error:
        load_build_config(path)
    assert message in str(error.value)


def test_cnns_that_are_not_plain_chains_are_refused():
    nn = torch.nn

    class Residual(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(PruneError, match="does not support Residual modules; supported: .*nn.Sequential CNNs"):
        cnn.flatten_sequential(Residual())
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(PruneError, match="grouped/depthwise Conv2d"):
        cnn.conv_units(cnn.flatten_sequential(grouped), torch.zeros(1, 4, 8, 8))
    no_consumer = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(PruneError, match="found no prunable Conv2d"):
        cnn.conv_units(cnn.flatten_sequential(no_consumer), torch.zeros(1, 3, 8, 8))


def test_the_image_tasks_small_cnn_is_pruned_saved_and_reloaded(tmp_path):
    image_models = pytest.importorskip("edgekit.tasks.image_models")
    from edgekit.config import ImageSection
    from edgekit.data import Split, TaskData
    from edgekit.tasks import image_classification, model_feeds
    from tests.support.train import fit_on

    labels = ("a", "b", "c", "d")
    task = image_classification.task_spec(labels, ImageSection(size=(16, 16), channel_order="L"))

    def split(count, seed):
        images, classes = _images(count, seed)
        return Split((images.mean(1, keepdim=True).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), classes.numpy())

    data = TaskData(labels, split(256, 1), split(128, 2), split(64, 3), split(32, 4), "images")
    record = image_models.record_for(image_models.SMALL_CNN, 1, 4, [8, 16, 16], (16, 16))
    model = image_models.build(record)
    pixels = torch.from_numpy(model_feeds(task, data.train.inputs)[task.input_names[0]])
    fit_on(model, [training.Batch({"pixel_values": pixels}, torch.from_numpy(data.train.labels))], learning_rate=1e-2, epochs=15)
    image_models.save(model.eval(), record, tmp_path / "cnn")
    artifact = Artifact(Stage.TORCH, tmp_path / "cnn", ".", "cnn", task)

    result = _run(artifact, data, tmp_path, ratio=0.5, recovery_steps=3, recovery_batch_size=32)
    metrics = result.results.prune.model_dump()
    assert metrics["channels_before"] == [8, 16, 16] and metrics["channels_after"] == [4, 8, 8]
    assert metrics["parameters"]["after"] < metrics["parameters"]["before"] and metrics["size_mb"]["after"] < metrics["size_mb"]["before"]
    reloaded, saved = image_models.load(result.directory)
    assert saved.widths == [4, 8, 8] and cnn.flatten_sequential(reloaded)[0].out_channels == 4
    assert metrics["val_accuracy"]["recovered"] is not None
    (tmp_path / "again").mkdir()
    with pytest.raises(PruneError, match="set prune.ratio for image models"):
        _run(artifact, data, tmp_path / "again", speedup=1.5)


def test_roberta_shares_the_bert_layout_and_reloads_pruned(tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=64, max_position_embeddings=40, num_labels=3)).eval()
    rng = np.random.default_rng(1)
    encoder.apply_encoder_plan(model, encoder.plan_encoder(encoder.EncoderImportance(rng.random((2, 4)), rng.random((2, 64))), 0.5))
    model.save_pretrained(tmp_path / "roberta")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "roberta").eval()
    assert encoder.encoder_shape(reloaded) == encoder.encoder_shape(model) and sum(encoder.encoder_shape(model)["heads"]) == 4
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
