"""edgekit explain OUT_DIR: Integrated Gradients (Captum) on the fp32 PyTorch model of a tiny text build and a tiny CNN
build, checked for completeness (attributions add up to the logit's change from the baseline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from device_agent.explain import words
from edgekit.cli import app
from tests.support.builds import relaxed_target, tiny_text_build_config
from tests.support.images import build_tiny_cnn, pattern

runner = CliRunner()
# Word pieces: "grazes" and "savanna" are split by the MiniLM vocabulary, so scores are summed per word.
TEXT = "A striped zebra grazes on the savanna grasses."
LOOSE = {"max_accuracy_drop_points": 100.0, "min_top1_agreement": 0.0}


@pytest.fixture(scope="module")
def text_build(tmp_path_factory) -> Path:
    from tests.support.tiny_bert import tiny_hf_folder

    root = tmp_path_factory.mktemp("gradients-text")
    config = tiny_text_build_config(root, tiny_hf_folder(root / "tiny-model"), [relaxed_target(root, "x86-64-cpu", **LOOSE)])
    result = runner.invoke(app, ["build", str(config), "--out", str(root / "out"), "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture(scope="module")
def image_build(tmp_path_factory) -> Path:
    """The small CNN (widths 8, 16) trained on 12x12 images of two horizontal or two vertical lines."""
    root = build_tiny_cnn(tmp_path_factory.mktemp("gradients-image"), ("x86-64-cpu",), classes=("horizontal", "vertical"),
                          budgets=LOOSE)
    return root / "out"


@pytest.mark.slow
def test_explain_an_output_folder_scores_each_word_with_integrated_gradients(text_build):
    result = runner.invoke(app, ["explain", str(text_build), "--text", TEXT, "--json"])
    assert result.exit_code == 0, result.output
    explained = json.loads(result.stdout)
    assert explained["method"] == "integrated-gradients"
    assert [t["token"] for t in explained["tokens"]] == [word for word, _, _ in words(TEXT)], "one score per word, in order"
    assert any(t["score"] != 0 for t in explained["tokens"])
    assert explained["rows_run"] == 1 + 32 + 2, "the prediction, 32 steps, and the two rows of the completeness check"
    assert explained["milliseconds"] > 0 and 0 < explained["probability"] <= 1


@pytest.mark.slow
def test_word_scores_add_up_to_the_logit_change_from_the_pad_baseline(text_build):
    import torch

    from device_agent.preprocess import TextTokenizer
    from edgekit.gradients import GradientExplainer, parent_model

    parent = parent_model(text_build)
    explainer = GradientExplainer(parent)
    attributed = explainer.text(TEXT, steps=64)
    explanation = attributed.explanation
    tokenizer = TextTokenizer(parent.task.tokenizer_file, parent.task.max_length)
    spans = tokenizer.piece_spans(TEXT)
    assert sum(span is not None for span in spans) > len(words(TEXT)), "some words are several pieces"
    # The baseline by hand: [CLS] and [SEP] kept, [PAD] everywhere else, the same attention mask.
    feeds = {name: torch.from_numpy(value) for name, value in tokenizer.encode([TEXT]).items()}
    baseline = {**feeds, "input_ids": torch.tensor([[ids if span is None else tokenizer.pad_id
                                                     for ids, span in zip(feeds["input_ids"][0].tolist(), spans)]])}
    with torch.no_grad():
        logits = [explainer.task.forward(explainer.model, inputs)[0, explanation.class_index].item() for inputs in (feeds, baseline)]
    expected = logits[0] - logits[1]
    total = sum(piece.score for piece in explanation.pieces)
    assert abs(attributed.convergence_delta) < 0.02 * max(1.0, abs(expected)), attributed.convergence_delta
    assert total == pytest.approx(expected, abs=0.02 * max(1.0, abs(expected))), "completeness: the words carry the whole change"


@pytest.mark.slow
def test_integrated_gradients_heat_the_lines_a_pattern_is_recognised_by(image_build, tmp_path):
    from edgekit.gradients import GradientExplainer, parent_model

    image = pattern("horizontal", np.random.default_rng(7))
    lines = [row for row in range(12) if (image[row] == 255).all()]
    Image.fromarray(image).save(tmp_path / "lines.png")
    heat_png = tmp_path / "heat.png"
    result = runner.invoke(app, ["explain", str(image_build), "--image", str(tmp_path / "lines.png"), "--out", str(heat_png), "--json"])
    assert result.exit_code == 0, result.output
    explained = json.loads(result.stdout)
    assert explained["method"] == "integrated-gradients" and explained["label"] == "horizontal"
    assert explained["heatmap"]["shape"] == [12, 12] and heat_png.is_file()
    attributed = GradientExplainer(parent_model(image_build)).image(image[:, :, None])
    heat = attributed.explanation.heatmap
    others = [row for row in range(12) if row not in lines]
    assert heat[lines].mean() > heat[others].mean(), (lines, heat.mean(axis=1).round(3))
    gap = float(heat.sum()) - attributed.convergence_delta  # Captum's delta = sum - (f(x) - f(baseline))
    assert abs(attributed.convergence_delta) < 0.05 * max(1.0, abs(gap))


@pytest.mark.slow
def test_a_text_build_refuses_an_image(text_build, tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    result = runner.invoke(app, ["explain", str(text_build), "--image", str(tmp_path / "black.png")])
    assert result.exit_code == 2 and "give it --text" in result.output


@pytest.mark.slow
def test_the_model_explained_is_the_one_the_latest_build_exported_not_a_stale_link(text_build, tmp_path):
    """A rebuild into the same --out with another plan leaves the old build's links: a build with fine-tuning links
    03-export, one without it 02-export. The export entry is the one the latest build's report.json names."""
    from edgekit.gradients import parent_model

    out = tmp_path / "out"
    shutil.copytree(text_build, out, symlinks=True)
    report = json.loads(next(out.glob("*/report.json")).read_text())
    (export_key,) = [run["key"] for run in report["passes"] if run["name"] == "export"]
    (link,) = [link for link in (out / "passes").iterdir() if link.name.endswith("-export")]
    real = link.resolve()
    assert real.name == export_key
    expected = parent_model(out).folder

    # An earlier build's export, at a higher step number, pointing at another model.
    document = json.loads((real / "artifact.json").read_text())
    stale_model = tmp_path / "stale-model"
    shutil.copytree(expected, stale_model)
    document["trained_model"] = str(stale_model)
    if document["task"]["tokenizer_file"].startswith("@/"):
        document["task"]["tokenizer_file"] = str(real / document["task"]["tokenizer_file"][2:])
    stale = tmp_path / "cache" / "export" / ("0" * 32)
    stale.mkdir(parents=True)
    (stale / "artifact.json").write_text(json.dumps(document))
    (out / "passes" / "09-export").symlink_to(stale, target_is_directory=True)

    assert parent_model(out).folder == expected != stale_model


def _report(folder: Path, *passes: tuple[str, str]) -> None:
    (folder / "x86-64-cpu").mkdir(parents=True, exist_ok=True)
    (folder / "x86-64-cpu" / "report.json").write_text(json.dumps({"passes": [
        {"name": name, "key": key, "seconds": 0.1, "cached": False} for name, key in passes]}))


def _not_built(folder: Path) -> None:
    folder.mkdir()


def _cache_cleared(folder: Path) -> None:
    (folder / "passes").mkdir(parents=True)
    (folder / "passes" / "01-load").symlink_to(folder / "cache" / "load" / "k1", target_is_directory=True)
    (folder / "passes" / "02-export").symlink_to(folder / "cache" / "export" / "k2", target_is_directory=True)
    _report(folder, ("load", "k1"), ("export", "k2"), ("optimize", "k3"))


def _unfinished(folder: Path) -> None:
    (folder / "passes").mkdir(parents=True)
    (folder / "passes" / "01-load").symlink_to(folder / "cache" / "load" / "k1", target_is_directory=True)


def _trees(folder: Path) -> None:
    (folder / "passes" / "01-load-to-onnx").mkdir(parents=True)
    _report(folder, ("load-to-onnx", "k1"), ("optimize", "k2"))


@pytest.mark.parametrize(("make", "message"), [
    (_not_built, "is not a build's output folder"),
    (_cache_cleared, "is gone from the pass cache"),
    (_unfinished, "holds no report.json of a finished build"),
    (_trees, "there is no PyTorch model to take gradients of"),
])
def test_a_folder_without_a_pytorch_model_is_a_clear_error(tmp_path, make, message):
    folder = tmp_path / "out"
    make(folder)
    result = runner.invoke(app, ["explain", str(folder), "--text", "a dog"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "with occlusion" in result.output and "Traceback" not in result.output
