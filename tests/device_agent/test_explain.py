"""Occlusion explanations with the bundle alone (device_agent.explain): words, table columns, their cost, and the
deletion check; against real signed bundles run by ONNX Runtime."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle import open_bundle
from device_agent.classifier import Classifier, ModelRunFailed, WrongInput, classifier_of_bundle, softmax
from device_agent.explain import NothingToExplain, deletion_drop, explain, read_groups, without_spans, words
from device_agent.keys import Keyring
from tests.support.bundles import (
    tiny_table_rows, tiny_table_spec, write_table_classifier, write_tiny_image_bundle, write_tiny_table_bundle, write_tiny_text_bundle,
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from cryptography.hazmat.primitives import serialization

    root = tmp_path_factory.mktemp("explain")
    key = Ed25519PrivateKey.generate()
    (root / "keyring").mkdir()
    (root / "keyring" / "build.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    write_tiny_text_bundle(root / "text.ekb", key)
    write_tiny_table_bundle(root / "table.ekb", key)
    write_tiny_image_bundle(root / "image.ekb", key)
    return root


@pytest.fixture
def text_model(bundles):
    with open_bundle(bundles / "text.ekb", Keyring.load(bundles / "keyring")) as bundle:
        yield classifier_of_bundle(bundle)


@pytest.fixture
def table_model(bundles):
    with open_bundle(bundles / "table.ekb", Keyring.load(bundles / "keyring")) as bundle:
        yield classifier_of_bundle(bundle)


@pytest.fixture
def image_model(bundles):
    with open_bundle(bundles / "image.ekb", Keyring.load(bundles / "keyring")) as bundle:
        yield classifier_of_bundle(bundle)


class CountingSession:
    """The bundle's session, recording the rows of every run."""

    def __init__(self, session) -> None:
        self.session, self.manifest, self.providers, self.runs = session, session.manifest, session.providers, []

    def run(self, feeds):
        self.runs.append(len(next(iter(feeds.values()))))
        return self.session.run(feeds)


def test_words_keep_contractions_and_split_punctuation():
    assert [w for w, _, _ in words("Don't stop—the dog's 2 bones!")] == ["Don't", "stop", "—", "the", "dog's", "2", "bones", "!"]



@pytest.mark.parametrize(("text", "deleted", "left"), [
    ("one two three", ["two"], "one three"),  # between two spaces: the one after goes with it
    ("one two three", ["one"], "two three"),  # at the start: the space after
    ("one two three", ["three"], "one two"),  # at the end: the space before
    ("one two three", ["one", "three"], "two"),
    ("one two three", ["two", "three"], "one"),  # words apart by whitespace alone go as one
    ("Hello, world!", [","], "Hello world!"),  # the space between words stays
    ("Hello, world!", ["!"], "Hello, world"),
    ("Hello, world!", ["world"], "Hello, !"),  # between symbols, the space keeps them apart as they were
    ("Hello, world!", ["Hello"], ", world!"),
    ("a  b\n\nc", ["b"], "a  c"),  # one whitespace run goes, the rest of the text stays as it is
    ("solo", ["solo"], ""),
])
def test_a_deleted_word_takes_one_whitespace_run_with_it(text: str, deleted: list[str], left: str):
    spans = [(start, end) for word, start, end in words(text) if word in deleted]
    assert without_spans(text, spans) == left


def test_words_under_one_piece_are_scored_as_one_and_unread_words_cost_nothing():
    found = words("what?! no ​ way")
    # A BPE tokenizer reads "?!" as one piece, "way" as two and drops the zero-width space.
    groups = read_groups(found, [(0, 4), (4, 6), (7, 9), (12, 14), (14, 15)])
    assert [[found[i][0] for i in group] for group in groups] == [["what"], ["?", "!"], ["no"], ["way"]]


def test_a_symbol_the_tokenizer_drops_is_not_read_and_costs_no_run(text_model):
    explained = explain(text_model, "hello ​ world")
    assert [(p.token, p.read) for p in explained.pieces] == [("hello", True), ("​", False), ("world", True)]
    assert explained.rows_run == 3 and explained.pieces[1].score == 0.0


class LengthSession:
    """A stand-in model whose first logit grows with the tokens it reads: every read word's deletion lowers it."""

    def __init__(self, manifest) -> None:
        self.manifest, self.providers = manifest, ["CPUExecutionProvider"]

    def run(self, feeds):
        tokens = feeds["attention_mask"].sum(axis=1).astype(np.float32)
        return {"logits": np.stack([tokens / 100, np.zeros_like(tokens), np.zeros_like(tokens)], axis=1)}


def test_every_word_a_long_model_reads_is_scored_not_only_the_first_256(text_model):
    spec = text_model.manifest.preprocessing.model_copy(update={"max_length": 512})
    manifest = text_model.manifest.model_copy(update={"preprocessing": spec})
    text = " ".join(["cat", "dog", "sun", "tree", "house"] * 60)  # 300 words of one piece each: all within 512 tokens
    explained = explain(Classifier(manifest, LengthSession(manifest), text_model.root), text)
    assert len(explained.pieces) == 300 and all(p.read for p in explained.pieces)
    assert explained.rows_run == 301 and all(p.score > 0 for p in explained.pieces)


def test_a_words_score_is_the_drop_of_the_predicted_class_probability_without_it(text_model):
    text = "a small brown dog sleeps under the old wooden table"
    explained = explain(text_model, text)
    assert [p.token for p in explained.pieces] == text.split()
    assert explained.rows_run == 1 + len(text.split()) and explained.method == "occlusion"
    probabilities = softmax(text_model.logits_of_texts([text, without_spans(text, [(2, 7)])]))
    assert explained.probability == pytest.approx(probabilities[0].max())
    assert explained.label == text_model.labels[int(probabilities[0].argmax())]
    assert explained.pieces[1].score == pytest.approx(probabilities[0, explained.class_index] - probabilities[1, explained.class_index], abs=1e-9)
    assert any(abs(p.score) > 0 for p in explained.pieces), "deleting words changes a BERT's output"


def test_words_past_the_models_cut_are_not_read_and_cost_nothing(text_model):
    text = " ".join(f"word{i}" for i in range(200))  # far past the tiny bundle's 64 tokens
    explained = explain(text_model, text)
    read = [p for p in explained.pieces if p.read]
    assert 0 < len(read) < 64 and explained.rows_run == len(read) + 1
    assert all(p.score == 0.0 for p in explained.pieces if not p.read)
    assert explained.to_json()["tokens"][-1] == {"token": "word199", "score": 0.0, "read": False}


def test_a_bundle_that_runs_a_row_at_a_time_is_explained_a_row_at_a_time(text_model):
    one_at_a_time = text_model.manifest.model_copy(update={"runtime": text_model.manifest.runtime.model_copy(update={"max_rows_per_run": 1})})
    counting = CountingSession(text_model.session)
    model = Classifier(one_at_a_time, counting, text_model.root)
    explained = explain(model, "the cat sat on the mat")
    assert counting.runs == [1] * 7 and explained.rows_run == 7
    batched = CountingSession(text_model.session)
    explain(Classifier(text_model.manifest, batched, text_model.root), "the cat sat on the mat")
    assert batched.runs == [7]
    # Alone, unpadded, a row's scores equal the batched ones here (float models do not care); the cost differs.
    assert explained.pieces[1].score == pytest.approx(explain(text_model, "the cat sat on the mat").pieces[1].score, abs=1e-5)


@pytest.mark.parametrize("text", ["", "   ", "\u200b\u200b"])
def test_a_text_with_nothing_the_model_reads_is_refused(text_model, text):
    with pytest.raises(NothingToExplain, match="no words the model reads"):
        explain(text_model, text)


def test_inputs_of_another_kind_are_refused_naming_what_the_bundle_takes(text_model, table_model):
    with pytest.raises(WrongInput, match="takes text input, not image; give it texts") as refused:
        text_model.logits_of_images(np.zeros((1, 4, 4, 1), np.uint8))
    assert "labelled" not in str(refused.value)  # not a compare-only hint
    with pytest.raises(WrongInput, match="give it --text TEXT"):
        text_model.expect("image", "--text TEXT")
    with pytest.raises(WrongInput, match="takes table input, not text"):
        table_model.logits_of_texts(["a row?"])


def test_a_column_that_decides_the_class_gets_the_attribution_and_deleting_it_matters_most(table_model):
    rows = tiny_table_rows(40, seed=4)
    explained = [explain(table_model, row) for row in rows]
    assert all(e.rows_run == 1 + len(table_model.manifest.preprocessing.columns) for e in explained)
    # The tiny table model's first weights read age: the strongest column, on average, is age.
    mean = {name: np.mean([next(p.score for p in e.pieces if p.token == name) for e in explained])
            for name in ("age", "hours per week", "job")}
    assert max(mean, key=lambda name: abs(mean[name])) == "age", mean
    rng = np.random.default_rng(0)
    drops = np.array([deletion_drop(table_model, row, e, 1, rng) for row, e in zip(rows, explained)])
    assert drops[:, 0].mean() > drops[:, 1].mean(), "deleting the top column lowers the prediction more than a random one"


def test_an_explanation_as_json_lists_the_strongest_first(table_model):
    explained = explain(table_model, tiny_table_rows(1, seed=2)[0])
    document = explained.to_json(top=2)
    assert set(document) == {"label", "class_index", "probability", "method", "rows_run", "milliseconds", "columns"}
    scores = [c["score"] for c in document["columns"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert replace(explained, pieces=[]).to_json()["columns"] == []


def test_the_classifier_refuses_a_bundle_without_raw_input(tmp_path: Path, bundles):
    with open_bundle(bundles / "text.ekb", Keyring.load(bundles / "keyring")) as bundle:
        from device_agent.bundle import NoPreprocessing

        manifest = bundle.manifest.model_copy(update={"preprocessing": NoPreprocessing()})
        with pytest.raises(WrongInput, match="takes raw tensors"):
            Classifier(manifest, classifier_of_bundle(bundle).session, bundle.root)


def test_the_classifier_says_a_spectral_bundle_takes_raw_windows(bundles):
    from tests.support.bundles import tiny_spectral_spec

    with open_bundle(bundles / "table.ekb", Keyring.load(bundles / "keyring")) as bundle:
        manifest = bundle.manifest.model_copy(update={"preprocessing": tiny_spectral_spec()})
        with pytest.raises(WrongInput, match="takes raw windows of a time series") as refused:
            Classifier(manifest, classifier_of_bundle(bundle).session, bundle.root)
    assert "tensors" not in str(refused.value) and "text, image and table bundles" in str(refused.value)


# --------------------------------------------------------------------------- runs the model's batch dimension takes


def _table_model_with_batch(table_model: Classifier, tmp_path: Path, batch: int | str, declared: int | str | None = None) -> Classifier:
    """The tiny table model exported with first dimension ``batch`` (a fixed size, or a name), its manifest
    declaring ``declared`` (default: the same)."""
    import onnx

    from device_agent.runtime import load_session

    path = write_table_classifier(tmp_path / f"batch-{batch}.onnx", tiny_table_spec().width)
    model = onnx.load(str(path))
    for tensor in (model.graph.input[0], model.graph.output[0]):
        dim = tensor.type.tensor_type.shape.dim[0]
        if isinstance(batch, int):
            dim.dim_value = batch
        else:
            dim.dim_param = batch
    onnx.save(model, str(path))
    declared = batch if declared is None else declared
    manifest = table_model.manifest.model_copy(update={
        "inputs": [spec.model_copy(update={"shape": [declared, *spec.shape[1:]]}) for spec in table_model.manifest.inputs],
        "outputs": [spec.model_copy(update={"shape": [declared, *spec.shape[1:]]}) for spec in table_model.manifest.outputs],
    })
    return Classifier(manifest, CountingSession(load_session(manifest, path)), table_model.root)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_model_exported_with_a_fixed_batch_runs_exactly_that_many_rows(table_model, tmp_path: Path, batch: int):
    fixed = _table_model_with_batch(table_model, tmp_path, batch)
    rows = tiny_table_rows(7, seed=3)
    np.testing.assert_allclose(fixed.logits(rows), table_model.logits(rows), rtol=1e-5, atol=1e-6)
    assert set(fixed.session.runs) == {batch}  # 7 rows by 3: the last run filled up with copies, their answers dropped
    explained = explain(fixed, rows[0])
    assert explained.rows_run == 4 and explained.pieces == explain(table_model, rows[0]).pieces


def test_a_model_that_fails_to_run_is_a_clear_error_naming_it_and_the_runtimes_words(table_model, tmp_path: Path):
    from edgekit.compare import LabelledSlice, predicted_labels
    from edgekit.errors import EdgekitError

    wrong = _table_model_with_batch(table_model, tmp_path, 2, declared="batch")  # the manifest claims any batch
    rows = tiny_table_rows(5, seed=3)
    with pytest.raises(ModelRunFailed, match=r"tiny-table 1\.0\.0 failed to run on 4 row\(s\).*Expected: 2") as failed:
        explain(wrong, rows[0])
    assert failed.value.exit_code == 2 and "\n" not in str(failed.value)
    with pytest.raises(EdgekitError, match=r"tiny-table 1\.0\.0 failed to run.*Expected: 2") as compared:
        predicted_labels(wrong, LabelledSlice("slice.csv", rows, ["low"] * 5))
    assert compared.value.exit_code == 2 and "slice.csv" in str(compared.value)


# --------------------------------------------------------------------------- memory: a run's rows at a time


def test_an_images_occluded_copies_are_made_a_run_at_a_time(image_model, monkeypatch: pytest.MonkeyPatch):
    image = np.random.default_rng(5).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    whole = explain(image_model, image)
    small = Classifier(image_model.manifest, image_model.session, image_model.root, max_rows=4)
    made = []
    real = small.logits_of_pixels
    monkeypatch.setattr(small, "logits_of_pixels", lambda pixels: made.append(len(pixels)) or real(pixels))
    explained = explain(small, image)
    assert max(made) == 4 and sum(made) == explained.rows_run == whole.rows_run
    np.testing.assert_allclose(explained.heatmap, whole.heatmap, atol=1e-6)


def test_images_are_resized_and_cropped_a_run_at_a_time(image_model, monkeypatch: pytest.MonkeyPatch):
    images = np.random.default_rng(6).integers(0, 256, size=(70, 12, 10, 3), dtype=np.uint8)
    whole = image_model.logits(images)
    sizes = []
    real = image_model.images.geometry
    monkeypatch.setattr(image_model.images, "geometry", lambda batch: sizes.append(len(batch)) or real(batch))
    np.testing.assert_allclose(image_model.logits(images), whole)
    assert sizes == [32, 32, 6]
