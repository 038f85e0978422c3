"""``edgekit compare``: real signed bundles run on labelled slices through the CLI; McNemar's test; every bad input.

The table bundles here classify by age alone with thresholds the test sets (``_age_bundle``), so which rows each bundle
gets right, and hence every number in the report, is known exactly.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from device_agent.bundle import ImagePreprocessing, ModelInfo, TaskInfo, TensorSpec, write_bundle
from device_agent.keys import generate_keypair, load_private_key
from edgekit.cli import app
from edgekit.measure import mcnemar_p_value, paired_accuracy_gain_interval
from tests.support.bundles import TABLE_LABELS, tiny_manifest, tiny_table_spec, write_tiny_text_bundle

runner = CliRunner()
TRUE_THRESHOLDS = (35.0, 45.0)  # age < 35: low, 35..45: medium, > 45: high
OLD_THRESHOLDS = (30.0, 50.0)  # the champion's: wrong on ages 30..35 and 45..50


def invoke(*args: object):
    return runner.invoke(app, ["compare", *map(str, args)])


# --------------------------------------------------------------------------- bundles and data


def _onnx_model(path: Path, nodes, input_info, weight: np.ndarray, bias: np.ndarray) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [*nodes, helper.make_node("MatMul", [nodes[-1].output[0] if nodes else input_info.name, "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["logits"])],
        "compare-test", [input_info], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W"), numpy_helper.from_array(bias.astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _signed(out: Path, key, *, name: str, version: str, model: Path, feeds: dict[str, np.ndarray], **manifest_fields) -> Path:
    import onnxruntime

    (logits,) = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)
    golden = model.parent / "golden.npz"
    np.savez(golden, **{f"input:{k}": v for k, v in feeds.items()}, **{"output:logits": logits})
    manifest = tiny_manifest(version).model_copy(update={"model": ModelInfo(name=name, version=version), **manifest_fields})
    write_bundle(out, manifest, {"model.onnx": model, "golden.npz": golden}, key)
    return out


def _age_bundle(out: Path, key, *, thresholds: tuple[float, float], version: str = "1.0.0",
                labels: tuple[str, ...] = tuple(TABLE_LABELS)) -> Path:
    """A table bundle predicting low below thresholds[0], high above thresholds[1], medium between; its classes are
    ``labels`` in that order (a name it does not know is never predicted)."""
    from device_agent.preprocess import TableEncoder
    from onnx import TensorProto, helper

    spec = tiny_table_spec()  # features: age, hours per week, job one-hot (3 + other)
    low, high = thresholds
    slope_and_bias = {"low": (-1.0, low), "medium": (0.0, 0.0), "high": (1.0, -high)}
    weight, bias = np.zeros((spec.width, len(labels))), np.zeros(len(labels))
    for column, label in enumerate(labels):
        weight[0, column], bias[column] = slope_and_bias.get(label, (0.0, -1000.0))
    payload = out.parent / f"{out.stem}-payload"
    payload.mkdir(parents=True, exist_ok=True)
    model = _onnx_model(payload / "model.onnx", [], helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", spec.width]),
                        weight, bias)
    features = TableEncoder(spec)([{"age": 20.0, "hours per week": 40.0, "job": "clerk"}])
    return _signed(out, key, name="ages", version=version, model=model, feeds={"features": features},
                   inputs=[TensorSpec(name="features", datatype="FP32", shape=["batch", spec.width])],
                   outputs=[TensorSpec(name="logits", datatype="FP32", shape=["batch", len(labels)])],
                   task=TaskInfo(kind="tabular-classification", labels=list(labels)), preprocessing=spec)


def _brightness_bundle(out: Path, key, *, side: int = 8, inverted: bool = False, version: str = "1.0.0") -> Path:
    """A grayscale image bundle: "light" when the mean pixel is above mid-grey, "dark" below (the other way round when
    ``inverted``); it resizes and crops to ``side``."""
    from onnx import TensorProto, helper

    payload = out.parent / f"{out.stem}-payload"
    payload.mkdir(parents=True, exist_ok=True)
    sign = -1.0 if inverted else 1.0
    nodes = [helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"])]
    model = _onnx_model(payload / "model.onnx", nodes,
                        helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 1, side, side]),
                        np.array([[-sign, sign]]), np.zeros(2))
    return _signed(out, key, name="brightness", version=version, model=model,
                   feeds={"pixel_values": np.zeros((1, 1, side, side), np.float32)},
                   inputs=[TensorSpec(name="pixel_values", datatype="FP32", shape=["batch", 1, side, side])],
                   outputs=[TensorSpec(name="logits", datatype="FP32", shape=["batch", 2])],
                   task=TaskInfo(kind="image-classification", labels=["dark", "light"]),
                   preprocessing=ImagePreprocessing(resize=side, crop=(side, side), channel_order="L", mean=[0.5], std=[0.25]))


def _truth(age: float) -> str:
    return "low" if age < TRUE_THRESHOLDS[0] else "high" if age > TRUE_THRESHOLDS[1] else "medium"


def _table(path: Path, ages: list[float], *, label_column: str = "label", labels: list[str] | None = None) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["age", "hours per week", "job", label_column])
        for number, age in enumerate(ages):
            writer.writerow([age, 38 + number % 5, ["clerk", "manager", "technician"][number % 3],
                             labels[number] if labels else _truth(age)])
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[object, Path]:
    """A signing key and a keyring folder that trusts it."""
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder)
    return load_private_key(folder / "edgekit.key"), folder


@pytest.fixture(scope="module")
def bundles(keys, tmp_path_factory) -> dict[str, Path]:
    key, _ = keys
    folder = tmp_path_factory.mktemp("bundles")
    return {
        "old": _age_bundle(folder / "old.ekb", key, thresholds=OLD_THRESHOLDS),
        "new": _age_bundle(folder / "new.ekb", key, thresholds=TRUE_THRESHOLDS, version="1.1.0"),
        "new-reordered": _age_bundle(folder / "new-reordered.ekb", key, thresholds=TRUE_THRESHOLDS,
                                     labels=("high", "low", "medium")),
        "other-classes": _age_bundle(folder / "other-classes.ekb", key, thresholds=TRUE_THRESHOLDS,
                                     labels=("low", "medium", "urgent")),
        "bright": _brightness_bundle(folder / "bright.ekb", key),
        "bright-inverted": _brightness_bundle(folder / "bright-inverted.ekb", key, inverted=True),
        "bright-16": _brightness_bundle(folder / "bright-16.ekb", key, side=16),
    }


@pytest.fixture(scope="module")
def text_bundle(keys, tmp_path_factory) -> Path:
    key, _ = keys
    out = tmp_path_factory.mktemp("text") / "text.ekb"
    write_tiny_text_bundle(out, key)
    return out


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> dict[str, Path]:
    """test.csv: 40 rows both bundles get right, 2 only the new one does (not significant); drifted.csv: 20 rows only
    the new one gets right (p = 2 / 2**20)."""
    folder = tmp_path_factory.mktemp("slices")
    agreed = [20.5 + i * 0.5 for i in range(14)] + [36.5 + i * 0.5 for i in range(13)] + [51.5 + i * 0.5 for i in range(13)]
    drifted = [30.5 + i * 0.4 for i in range(10)] + [45.5 + i * 0.4 for i in range(10)]
    return {"test": _table(folder / "test.csv", agreed + [32.0, 48.0]), "drifted": _table(folder / "drifted.csv", drifted)}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """dark/ and light/ grayscale PNGs of several sizes, three each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images") / "photos"
    for label, value in (("dark", 40), ("light", 215)):
        (root / label).mkdir(parents=True)
        for number, size in enumerate([(8, 8), (12, 20), (31, 9)]):
            Image.fromarray(np.full(size, value + number, np.uint8), mode="L").save(root / label / f"{number}.png")
    return root


def _keyring(keys) -> str:
    return str(keys[1])


# --------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize(("champion_only", "challenger_only", "expected"), [
    (10, 0, 2 / 1024), (0, 10, 2 / 1024), (3, 7, 0.34375), (7, 3, 0.34375), (5, 5, 1.0), (0, 0, 1.0), (1, 0, 1.0),
    (0, 5, 0.0625),
])
def test_mcnemar_exact_p_values(champion_only, challenger_only, expected):
    assert mcnemar_p_value(champion_only, challenger_only) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("champion_only", "challenger_only"), [(40, 60), (120, 170), (333, 301)])
def test_mcnemar_matches_exact_binomial_sums(champion_only, challenger_only):
    trials = champion_only + challenger_only
    tail = Fraction(sum(math.comb(trials, k) for k in range(min(champion_only, challenger_only) + 1)), 2 ** trials)
    assert mcnemar_p_value(champion_only, challenger_only) == pytest.approx(float(min(1, 2 * tail)), rel=1e-9)


def test_mcnemar_stays_finite_on_huge_slices():
    assert mcnemar_p_value(500_000, 500_000) == 1.0
    assert 0.0 < mcnemar_p_value(49_000, 50_000) < 0.01


def test_paired_interval_holds_the_gain_and_widens_with_discordant_rows():
    low, high = paired_accuracy_gain_interval(2, 12, 100)
    assert low < 0.10 < high and low > 0
    wide_low, wide_high = paired_accuracy_gain_interval(30, 40, 100)
    assert wide_high - wide_low > high - low


# --------------------------------------------------------------------------- verdicts through the CLI


def test_promotes_a_challenger_significantly_better_on_one_slice_and_worse_on_none(bundles, slices, keys):
    result = invoke(bundles["old"], bundles["new"], "--data", slices["test"], "--data", slices["drifted"],
                    "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "promote"
    assert report["champion"]["version"] == "1.0.0" and report["challenger"]["version"] == "1.1.0"
    assert len(report["champion"]["sha256"]) == 64
    test, drifted = report["slices"]
    assert test["data"] == str(slices["test"]) and test["rows"] == 42
    assert test["discordant"] == {"champion_only": 0, "challenger_only": 2}
    assert test["p_value"] == pytest.approx(0.5) and test["significant"] is False and test["better"] == "challenger"
    assert test["champion"]["accuracy"] == pytest.approx(40 / 42) and test["challenger"]["accuracy"] == 1.0
    assert test["challenger"]["f1_macro"] == 1.0 and test["champion"]["f1_macro"] < 1.0
    assert test["agreement"] == pytest.approx(40 / 42)
    assert drifted["rows"] == 20 and drifted["champion"]["accuracy"] == 0.0 and drifted["agreement"] == 0.0
    assert drifted["discordant"] == {"champion_only": 0, "challenger_only": 20}
    assert drifted["p_value"] == pytest.approx(2 / 2 ** 20) and drifted["significant"] is True
    assert "drifted.csv" in report["reason"] and "better" in report["reason"]


def test_keeps_a_challenger_significantly_worse_on_a_slice(bundles, slices, keys):
    result = invoke(bundles["new"], bundles["old"], "--data", slices["test"], "--data", slices["drifted"],
                    "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "keep"
    assert report["slices"][1]["better"] == "champion" and report["slices"][1]["significant"] is True
    assert "significantly worse on" in report["reason"] and "drifted.csv" in report["reason"]


def test_keeps_the_champion_when_no_slice_shows_a_significant_gain(bundles, slices, keys):
    result = invoke(bundles["old"], bundles["new"], "--data", slices["test"], "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "keep"
    assert "significantly better on no slice" in report["reason"] and "0.5" in report["reason"]


def test_alpha_decides_what_counts_as_significant(bundles, slices, keys):
    result = invoke(bundles["old"], bundles["new"], "--data", slices["test"], "--alpha", "0.6",
                    "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["slices"][0]["significant"] is True


def test_classes_in_another_order_are_paired_by_name(bundles, slices, keys):
    result = invoke(bundles["new"], bundles["new-reordered"], "--data", slices["drifted"], "--data", slices["test"],
                    "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 1, result.output
    for part in json.loads(result.stdout)["slices"]:
        assert part["agreement"] == 1.0 and part["challenger"]["accuracy"] == 1.0
        assert part["discordant"] == {"champion_only": 0, "challenger_only": 0} and part["p_value"] == 1.0


def test_people_get_a_table_the_verdict_and_the_rule(bundles, slices, keys):
    result = invoke(bundles["old"], bundles["new"], "--data", slices["drifted"], "--keyring", _keyring(keys))
    assert result.exit_code == 0, result.output
    assert "drifted.csv" in result.stdout and "0 / 20" in result.stdout and "1.91e-06" in result.stdout
    assert "verdict: PROMOTE: the challenger is significantly better on" in result.stdout
    assert "rule: promote when" in result.stdout


def test_help_states_the_rule_and_the_exit_codes():
    result = runner.invoke(app, ["compare", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "promote when the challenger is significantly better" in text
    assert "Holm-Bonferroni adjusted over the slices" in text and "two slices each with p just under alpha do not promote" in text
    assert "0 for promote, 1 for keep, 2 for bad input" in text
    options = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())  # the option table's borders taken away
    assert "Every labelled row" not in options and "repeats and texts given two labels" in options, "cleaned rows are dropped"


@pytest.mark.parametrize(("p_values", "adjusted"), [
    ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),  # 0.01 x 3, then 0.03 x 2, then 0.04 x 1 raised to the 0.06 before it
    ([0.03125, 0.03125], [0.0625, 0.0625]),
    ([0.2], [0.2]),
    ([0.6, 0.5, 0.9], [1.0, 1.0, 1.0]),
])
def test_holm_adjusted_p_values(p_values, adjusted):
    from edgekit.measure import holm_adjusted

    assert holm_adjusted(p_values) == pytest.approx(adjusted)


def _six_only_the_new_one_gets(path: Path, offset: float) -> Path:
    """Six rows only the new bundle gets right (McNemar p = 2 / 2**6 = 0.031: under 0.05, over 0.05 / 2) and ten both do."""
    return _table(path, [30.5 + offset, 31.5 + offset, 32.5 + offset, 45.5 + offset, 46.5 + offset, 47.5 + offset]
                  + [20.0 + i for i in range(5)] + [55.0 + i for i in range(5)])


def test_gains_just_under_alpha_on_two_slices_do_not_promote(bundles, keys, tmp_path):
    """Each slice alone would promote; over two slices, Holm-Bonferroni asks the smallest p to be under alpha / 2."""
    first, second = (_six_only_the_new_one_gets(tmp_path / f"{name}.csv", offset) for name, offset in (("a", 0.0), ("b", 0.25)))
    alone = invoke(bundles["old"], bundles["new"], "--data", first, "--keyring", _keyring(keys), "--json")
    assert alone.exit_code == 0, alone.output
    assert json.loads(alone.stdout)["slices"][0]["p_value"] == pytest.approx(2 / 2 ** 6)

    both = invoke(bundles["old"], bundles["new"], "--data", first, "--data", second, "--keyring", _keyring(keys), "--json")
    assert both.exit_code == 1, both.output
    report = json.loads(both.stdout)
    assert report["verdict"] == "keep"
    for part in report["slices"]:
        assert part["p_value"] == pytest.approx(2 / 2 ** 6) and part["significant"] is True
        assert part["p_value_holm"] == pytest.approx(4 / 2 ** 6) and part["counts_as"] is None
    assert "significantly better on no slice" in report["reason"] and "Holm-adjusted over the 2 slices 0.0625" in report["reason"]
    assert "Holm-Bonferroni" in report["rule"]


def test_a_loss_counts_at_plain_alpha_beside_other_slices(bundles, keys, tmp_path):
    """The cautious side is not corrected: a loss with p just under alpha keeps the champion whatever else holds."""
    loss = _six_only_the_new_one_gets(tmp_path / "loss.csv", 0.0)
    result = invoke(bundles["new"], bundles["old"], "--data", loss, "--data", loss, "--data", loss,
                    "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [part["counts_as"] for part in report["slices"]] == ["worse"] * 3
    assert "significantly worse on" in report["reason"]


def test_images_of_several_sizes_are_compared(bundles, image_folder, keys):
    result = invoke(bundles["bright"], bundles["bright-inverted"], "--data", image_folder,
                    "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 1, result.output
    (part,) = json.loads(result.stdout)["slices"]
    assert part["rows"] == 6 and part["champion"]["accuracy"] == 1.0 and part["challenger"]["accuracy"] == 0.0
    assert part["discordant"] == {"champion_only": 6, "challenger_only": 0} and part["p_value"] == pytest.approx(2 / 64)


def test_images_are_read_at_each_bundles_own_size(bundles, image_folder, keys):
    from device_agent.bundle import open_bundle
    from device_agent.classifier import classifier_of_bundle
    from device_agent.keys import Keyring
    from edgekit.compare import Columns, read_for_both

    keyring = Keyring.load(keys[1])
    with open_bundle(bundles["bright"], keyring) as small, open_bundle(bundles["bright-16"], keyring) as large:
        read = read_for_both(image_folder, classifier_of_bundle(small), classifier_of_bundle(large), Columns())
    assert [part.inputs.shape[1:3] for part in read] == [(8, 8), (16, 16)]
    assert read[0].labels == read[1].labels == ["dark"] * 3 + ["light"] * 3


def test_texts_are_cleaned_as_the_build_cleans_them(text_bundle, keys, tmp_path):
    data = tmp_path / "texts.csv"
    data.write_text("text,label\nthe cat sat,cat\nthe cat sat,cat\na dog barked,dog\n,bird\nbirds sing,bird\n")
    result = invoke(text_bundle, text_bundle, "--data", data, "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 1, result.output
    (part,) = json.loads(result.stdout)["slices"]
    assert part["rows"] == 3 and part["dropped"] == {"duplicates": 1, "missing_text": 1}
    assert part["agreement"] == 1.0 and part["p_value"] == 1.0


# --------------------------------------------------------------------------- bad input


def test_bundles_of_different_classes_are_refused_naming_them(bundles, slices, keys):
    result = invoke(bundles["new"], bundles["other-classes"], "--data", slices["test"], "--keyring", _keyring(keys))
    assert result.exit_code == 2
    assert "only the champion has ['high']" in result.stderr and "only the challenger has ['urgent']" in result.stderr
    assert "cannot be compared row for row" in result.stderr and "Traceback" not in result.output


def test_bundles_of_different_tasks_are_refused(bundles, text_bundle, slices, keys):
    result = invoke(text_bundle, bundles["new"], "--data", slices["test"], "--keyring", _keyring(keys))
    assert result.exit_code == 2
    assert "text-classification" in result.stderr and "tabular-classification" in result.stderr
    assert "same task" in result.stderr


@pytest.mark.parametrize(("labels", "named", "count"), [
    (["low", "extreme", "extreme", "none"], "'extreme', 'none'", "3 row(s)"),
    (["a", "b", "c", "d", "e", "f", "g"], "'a', 'b', 'c', 'd', 'e' and 2 more", "7 row(s)"),
])
def test_rows_with_labels_the_bundles_do_not_know_are_refused(bundles, keys, tmp_path, labels, named, count):
    data = _table(tmp_path / "odd.csv", [30.0 + i for i in range(len(labels))], labels=labels)
    result = invoke(bundles["old"], bundles["new"], "--data", data, "--keyring", _keyring(keys))
    assert result.exit_code == 2
    assert named in result.stderr and count in result.stderr and "low, medium, high" in result.stderr


def test_an_image_folder_given_to_a_text_bundle_is_refused(text_bundle, image_folder, keys):
    result = invoke(text_bundle, text_bundle, "--data", image_folder, "--keyring", _keyring(keys))
    assert result.exit_code == 2
    assert "is a folder of images" in result.stderr and "file of labelled texts" in result.stderr


def test_an_image_folder_given_to_a_table_bundle_is_refused(bundles, image_folder, keys):
    result = invoke(bundles["old"], bundles["new"], "--data", image_folder, "--keyring", _keyring(keys))
    assert result.exit_code == 2
    assert "is a folder of images" in result.stderr and "CSV or Parquet table" in result.stderr


def test_a_table_given_to_an_image_bundle_is_refused(bundles, slices, keys):
    result = invoke(bundles["bright"], bundles["bright-inverted"], "--data", slices["test"], "--keyring", _keyring(keys))
    assert result.exit_code == 2
    assert "is a file" in result.stderr and "one sub-folder of images per class" in result.stderr


def test_a_split_image_folder_points_at_its_test_split(bundles, image_folder, keys, tmp_path):
    shutil.copytree(image_folder, tmp_path / "split" / "test")
    shutil.copytree(image_folder, tmp_path / "split" / "train")
    result = invoke(bundles["bright"], bundles["bright-inverted"], "--data", tmp_path / "split", "--keyring", _keyring(keys))
    assert result.exit_code == 2
    assert f"--data {tmp_path / 'split' / 'test'}" in result.stderr


def test_a_text_table_given_to_a_table_bundle_names_the_bundle_and_the_column(bundles, keys, tmp_path):
    data = tmp_path / "texts.csv"
    data.write_text("text,label\nhello,low\n")
    result = invoke(bundles["old"], bundles["new"], "--data", data, "--keyring", _keyring(keys))
    assert result.exit_code == 2
    assert "ages 1.0.0 cannot read" in result.stderr and "'text'" in result.stderr


def test_a_table_without_text_column_given_to_a_text_bundle_names_the_option(text_bundle, slices, keys):
    result = invoke(text_bundle, text_bundle, "--data", slices["test"], "--keyring", _keyring(keys))
    assert result.exit_code == 2
    assert "--text-column" in result.stderr and "build config" not in result.stderr


def test_the_label_column_is_chosen_with_an_option(bundles, keys, tmp_path):
    data = _table(tmp_path / "graded.csv", [32.0, 40.0], label_column="grade")
    result = invoke(bundles["old"], bundles["new"], "--data", data, "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 2 and "no label column 'label'" in result.stderr and "--label-column" in result.stderr
    result = invoke(bundles["old"], bundles["new"], "--data", data, "--label-column", "grade", "--keyring", _keyring(keys), "--json")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["slices"][0]["rows"] == 2


@pytest.mark.parametrize("make", ["missing", "binary-table", "folder"])
def test_missing_or_unreadable_data_is_a_user_error(bundles, keys, tmp_path, make):
    data = tmp_path / "data.csv"
    if make == "binary-table":
        data.write_bytes(b"age,label\n1,low\n\xff\xfe\x00\x01,\x00\x00,\x00,\x00\n")
    elif make == "folder":
        data.mkdir()
    result = invoke(bundles["old"], bundles["new"], "--data", data, "--keyring", _keyring(keys))
    assert result.exit_code == 2, result.output
    expected = {"missing": "does not exist", "binary-table": "cannot be read", "folder": "is not a table"}[make]
    assert expected in result.stderr and "Traceback" not in result.output


def test_text_that_is_not_utf8_is_a_user_error(text_bundle, keys, tmp_path):
    data = tmp_path / "latin1.csv"
    data.write_bytes("text,label\ncaf\xe9,cat\n".encode("latin-1"))
    result = invoke(text_bundle, text_bundle, "--data", data, "--keyring", _keyring(keys))
    assert result.exit_code == 2 and "not UTF-8" in result.stderr


def test_a_missing_bundle_is_a_user_error(bundles, slices, keys, tmp_path):
    result = invoke(tmp_path / "nope.ekb", bundles["new"], "--data", slices["test"], "--keyring", _keyring(keys))
    assert result.exit_code == 2 and "nope.ekb does not exist" in result.stderr


def test_a_bad_alpha_is_a_user_error(bundles, slices, keys):
    result = invoke(bundles["old"], bundles["new"], "--data", slices["test"], "--alpha", "5", "--keyring", _keyring(keys))
    assert result.exit_code == 2 and "--alpha 5" in result.stderr


def test_without_keyring_the_development_key_is_used_and_a_stranger_is_told_to_pass_keyring(
        bundles, slices, keys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = invoke(bundles["old"], bundles["new"], "--data", slices["test"])
    assert result.exit_code == 2 and "no development key" in result.stderr and "--keyring" in result.stderr
    generate_keypair(tmp_path / "cache" / "edgekit" / "dev-key")  # a development key that did not sign these bundles
    result = invoke(bundles["old"], bundles["new"], "--data", slices["test"])
    assert result.exit_code == 2 and "untrusted-key" in result.stderr and "pass --keyring DIR" in result.stderr
    shutil.copy(keys[1] / "edgekit.pub", tmp_path / "cache" / "edgekit" / "dev-key" / "signer.pub")
    assert invoke(bundles["old"], bundles["new"], "--data", slices["test"]).exit_code == 1
