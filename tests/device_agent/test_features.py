"""Drift features: one implementation for build and device, checked against hand-computed values and a real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent import features as F


def test_text_features_from_a_real_tokenizer():
    from device_agent.preprocess import TextTokenizer
    from tests.support.tiny_bert import minilm_tokenizer_file

    tokenizer = TextTokenizer(minilm_tokenizer_file(), 8)
    encoded = tokenizer.encode(["a cat", "one two three four five six seven eight nine", "\u2fd5\u2fd5"])
    found = F.text_features(encoded["input_ids"], encoded["attention_mask"], tokenizer.unknown_id, 8)
    assert found["input.token_count"].tolist() == [4.0, 8.0, 3.0]  # [CLS] a cat [SEP]; truncated at 8; [CLS] [UNK] [SEP]
    assert found["input.truncated"].tolist() == [0.0, 1.0, 0.0]
    assert found["input.unknown_rate"][0] == 0.0 and found["input.unknown_rate"][2] == pytest.approx(1 / 3)


def test_image_features_gray_and_colour():
    gray = np.zeros((2, 4, 4), np.uint8)
    gray[1] = 200
    gray[1, :2] = 0
    found = F.image_features(gray)
    assert found["input.brightness"].tolist() == [0.0, 100.0]
    assert found["input.contrast"].tolist() == [0.0, 100.0]
    assert "input.channel_mean.0" not in found
    colour = np.zeros((1, 300, 300, 3), np.uint8)
    colour[..., 2] = 90
    found = F.image_features(colour)  # sampled on a grid: same statistics for a uniform image
    assert [found[f"input.channel_mean.{c}"][0] for c in range(3)] == [0.0, 0.0, 90.0]
    assert found["input.brightness"][0] == pytest.approx(30.0)
    with pytest.raises(ValueError, match="images must be"):
        F.image_features(np.zeros((4, 4), np.uint8))


def test_output_features():
    found = F.output_features(np.array([[0.0, 0.0], [10.0, -10.0]]))
    assert found["output.predicted_class"].tolist() == [0, 0]
    assert found["output.top_probability"][0] == pytest.approx(0.5)
    assert found["output.entropy"][0] == pytest.approx(np.log(2))
    assert found["output.entropy"][1] == pytest.approx(0.0, abs=1e-6)
    assert F.is_categorical("output.predicted_class") and not F.is_categorical("output.entropy")


def test_tensor_features_small_rows_per_value_large_rows_summarised():
    found = F.tensor_features({"x": np.array([[1.0, 2.0], [3.0, 4.0]]), "big": np.ones((2, 100)), "s": np.array(["a", "b"])})
    assert found["input.x.1"].tolist() == [2.0, 4.0]
    assert found["input.big.mean"].tolist() == [1.0, 1.0] and found["input.big.std"].tolist() == [0.0, 0.0]
    assert not any(name.startswith("input.s") for name in found)


def test_features_do_not_depend_on_the_batch_a_row_came_in():
    # The build computes the reference in batches, the device one request at a time: a row must get the same values.
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(64, 10)) * rng.uniform(0.1, 30, (64, 1))).astype(np.float32)
    images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    batched = F.output_features(logits) | F.image_features(images)
    for row in range(64):
        alone = F.output_features(logits[row:row + 1]) | F.image_features(images[row:row + 1])
        assert all(alone[name][0] == batched[name][row] for name in batched)
    exact = images.reshape(64, -1).astype(np.float64)
    assert np.allclose(batched["input.contrast"], exact.std(axis=1), rtol=1e-12, atol=1e-9)
    assert np.array_equal(batched["input.brightness"], exact.mean(axis=1))


def test_output_features_with_an_impossible_class():
    found = F.output_features(np.array([[0.0, 0.0, -np.inf]]))
    assert found["output.top_probability"][0] == pytest.approx(0.5)
    assert found["output.entropy"][0] == pytest.approx(np.log(2))


# --------------------------------------------------------------------------- tables


def _table(*columns):
    from device_agent.bundle import TableColumn, TablePreprocessing

    return TablePreprocessing(columns=[TableColumn(**column) for column in columns])


AGE = {"name": "age", "kind": "numeric", "fill": 40.0}
JOB = {"name": "job", "kind": "categorical", "categories": ["clerk", "manager"]}


def test_table_features_fill_numbers_and_index_categories_with_other_last():
    spec = _table(AGE, JOB)
    rows = [{"age": 31.5, "job": "manager"}, {"job": "clerk"}, {"age": None, "job": "pilot"}, {"age": 7}]
    found = F.table_features(rows, spec)
    assert set(found) == {"input.column.age", "input.category.job"}
    assert found["input.column.age"].tolist() == [31.5, 40.0, 40.0, 7.0]
    assert found["input.category.job"].tolist() == [1, 0, 2, 2]  # 2: "other" (unseen or missing)
    assert F.is_categorical("input.category.job") and not F.is_categorical("input.column.age")
    layout = F.table_layout(spec)
    assert layout.categories == {"input.category.job": ["clerk", "manager", "other"]}
    # The encoded rows (a client's features tensor) give the same values; a block with nothing set is "other".
    from device_agent.preprocess import TableEncoder

    encoded = TableEncoder(spec)(rows)
    assert all(np.array_equal(F.table_features(encoded, layout)[name], found[name]) for name in found)
    assert F.table_features(np.zeros((1, 4), np.float32), layout)["input.category.job"].tolist() == [2]
    as_objects = F.table_features(np.array(rows, dtype=object), layout)  # edgekit.data.Split's table rows
    assert all(np.array_equal(as_objects[name], found[name]) for name in found)
    with pytest.raises(ValueError, match=r"must be \[batch, 4\]"):
        F.table_features(np.zeros((1, 5), np.float32), layout)


def test_table_feature_names_fit_the_contract_and_stay_unique():
    from pydantic import TypeAdapter

    from device_agent.telemetry_schema import FeatureName

    long = "x" * 200
    spec = _table({**AGE, "name": "hours per week"}, {**AGE, "name": "hours_per_week"}, {**AGE, "name": "hours_per_week:2"},
                  {**AGE, "name": "âge"}, {**AGE, "name": long}, {**AGE, "name": long + "y"}, {**JOB, "name": "hours/per/week"})
    names = F.table_layout(spec).names
    assert names == (
        "input.column.hours_per_week", "input.column.hours_per_week:2", "input.column.hours_per_week:2:2", "input.column._ge",
        "input.column." + "x" * 115, "input.column." + "x" * 113 + ":2", "input.category.hours_per_week",
    )
    assert len(set(names)) == len(names) and F.table_layout(spec).names == names  # the same columns, the same names
    assert all(TypeAdapter(FeatureName).validate_python(name) for name in names)


def test_reference_categories_are_printable_and_other_never_collides():
    assert F.reference_categories(["a\x1b[31m", "other", "(other)", "b" * 300]) == [
        "a\\u001b[31m", "other", "(other)", "b" * 256, "((other))"]


def test_a_wide_table_keeps_its_first_columns_within_the_contract(caplog):
    spec = _table(*({**AGE, "name": f"c{i}"} for i in range(F.MAX_TABLE_FEATURES + 5)))
    with caplog.at_level("WARNING", logger="edgekit.agent.features"):
        layout = F.table_layout(spec)
    assert len(layout.names) == F.MAX_TABLE_FEATURES and layout.names[-1] == f"input.column.c{F.MAX_TABLE_FEATURES - 1}"
    assert layout.dropped == tuple(f"c{i}" for i in range(F.MAX_TABLE_FEATURES, F.MAX_TABLE_FEATURES + 5))
    assert "drift is watched on the first" in caplog.text
    found = F.table_features(np.ones((2, spec.width), np.float32), layout)
    found.update(F.output_features(np.zeros((2, 3))))
    from device_agent.telemetry_schema import MAX_FEATURES

    assert len(found) == MAX_FEATURES and set(F.OUTPUT_FEATURES) <= set(found)


def test_a_windows_spectral_centroid_says_where_its_energy_lies():
    import numpy as np

    from device_agent.features import tensor_features

    time = np.arange(64) / 64
    slow, fast = np.sin(2 * np.pi * 4 * time), np.sin(2 * np.pi * 16 * time)
    windows = np.stack([np.stack([slow, fast]), np.stack([fast, np.zeros(64)])])  # [2 windows, 2 channels, 64 steps]
    features = tensor_features({"series": windows})
    assert features["input.series.0.centroid"] == pytest.approx([4 / 32, 16 / 32])
    assert features["input.series.1.centroid"] == pytest.approx([16 / 32, 0.0]), "a constant channel has none"
    assert features["input.series.0.std"] == pytest.approx([np.std(slow), np.std(fast)]), "same spread, other speed"
