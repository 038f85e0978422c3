"""Bad build inputs: each gets a clear error naming the problem and the fix, before any work is done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekit.config import BuildConfig, DataSection, load_build_config
from edgekit.data import DataError
from edgekit.errors import ConfigError, EdgekitError
from edgekit.passes.load import resolve_source
from edgekit.tasks.text_classification import load_task_data


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(labels=("a", "b"), per_split=20) -> list[dict]:
    return [{"text": f"{split} text {i} about {label}", "label": label, "split": split}
            for split in ("train", "val", "test") for label in labels for i in range(per_split)]


def test_demo_data_loads_stratified():
    data = load_task_data(BuildConfig().data)
    assert len(data.labels) == 8
    assert (len(data.train), len(data.val), len(data.test), len(data.calibration)) == (2800, 400, 800, 200)
    assert sorted(set(data.val.head(8).labels.tolist())) == list(range(8)), "any prefix is stratified"


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(EdgekitError, match="does not exist"):
        resolve_source(str(tmp_path / "no-model"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(EdgekitError, match="no config.json"):
        resolve_source(str(tmp_path / "folder"))


def test_unknown_embedded_model_lists_the_known_ones():
    with pytest.raises(EdgekitError, match="known: embedded:all-minilm-l6-v2"):
        resolve_source("embedded:gpt-5")


def test_labels_the_model_never_learned_are_refused(tmp_path):
    rows = _rows() + [{"text": "a stranger", "label": "zebra", "split": "test"}]
    with pytest.raises(DataError, match=r"test has label\(s\) \['zebra'\] that train does not"):
        load_task_data(DataSection(path=_jsonl(tmp_path / "d.jsonl", rows), calibration_path=None))


def test_too_small_calibration_set_is_refused(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", _rows())
    calibration = _jsonl(tmp_path / "c.jsonl", _rows()[:3])
    with pytest.raises(DataError, match="calibration set has 3 rows"):
        load_task_data(DataSection(path=data, calibration_path=calibration))


def test_empty_calibration_file_is_refused(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", _rows())
    (tmp_path / "c.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no rows"):
        load_task_data(DataSection(path=data, calibration_path=tmp_path / "c.jsonl"))


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json\n", "d.jsonl:1 is not JSON"), ('{"text": "x"}\n', "has no column 'label'"), ("", "holds no rows")],
)
def test_malformed_data_files_are_named_with_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        load_task_data(DataSection(path=tmp_path / "d.jsonl", calibration_path=None))


def test_one_class_only_is_refused(tmp_path):
    with pytest.raises(DataError, match="at least 2"):
        load_task_data(DataSection(path=_jsonl(tmp_path / "d.jsonl", _rows(labels=("a",))), calibration_path=None))


def test_build_config_unknown_key_names_field_and_allowed(tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text("model:\n  sorce: x\nquantization:\n  time_limit: 3\n")
    with pytest.raises(ConfigError) as raised:
        load_build_config(path)
    message = str(raised.value)
    assert "model.sorce: unknown field; did you mean 'source'?" in message
    assert "quantization.time_limit: unknown field; did you mean 'time_limit_s'?" in message


def test_build_config_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "build.yaml"
    path.write_text("data:\n  path: rows.jsonl\n  calibration_path: null\ntargets: [x86-64-cpu, mine.yaml]\n")
    config = load_build_config(path)
    assert config.data.path == tmp_path / "sub" / "rows.jsonl"
    assert config.targets == ["x86-64-cpu", str(tmp_path / "sub" / "mine.yaml")]


def _context(tmp_path, data=None):
    from rich.progress import Progress

    from edgekit.artifact import PassContext

    config = BuildConfig()
    return PassContext(tmp_path / "work", data or load_task_data(config.data), Progress(disable=True), tmp_path / "k", print)


def test_corrupt_onnx_source_is_named(tmp_path):
    from edgekit.artifact import Artifact, Stage, TaskSpec
    from edgekit.passes import load

    (tmp_path / "work").mkdir()
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"\x08\x07 this is not a protobuf")
    (tmp_path / "tokenizer.json").write_text("{}")
    source = Artifact(Stage.SOURCE, tmp_path, "", "d", TaskSpec("text-classification", ("a", "b"), 8, tmp_path))
    options = load.options_for(BuildConfig(model={"source": str(broken)}, task={"max_length": 8}), None)
    with pytest.raises(EdgekitError, match="is not a valid ONNX model"):
        load.run_onnx(source, options, _context(tmp_path))


def test_a_model_the_exporter_cannot_trace_is_a_clear_error(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from edgekit.artifact import Artifact, Stage, TaskSpec
    from edgekit.passes import export

    folder = tmp_path / "short-bert"
    # Four positions: the exporter's example sequence does not fit, as a real model with too few positions would not.
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=8,
                        max_position_embeddings=4)
    BertForSequenceClassification(config).save_pretrained(folder)
    (tmp_path / "work").mkdir()
    artifact = Artifact(Stage.TORCH, folder, ".", "d", TaskSpec("text-classification", tuple("abcdefgh"), 8, tmp_path / "tok.json"))
    with pytest.raises(EdgekitError, match="PyTorch cannot export this model to ONNX"):
        export.run(artifact, export.Options(opset=17, parity_atol=1e-4, parity_samples=2), _context(tmp_path))
