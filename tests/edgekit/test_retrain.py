"""edgekit retrain: the recorded build config, the merge rule, the champion's weights, and bad input, through the real CLI.

The end-to-end tests build a tiny BERT champion on the embedded demo data (LoRA for one short epoch, so that its
finetune pass's output is what the challenger starts from), then retrain it with new labelled glosses.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from device_agent.bundle import read_manifest_unverified
from edgekit.cli import app
from edgekit.config import BUILD_CONFIG_FILE, DEMO_DATA, BuildConfig, load_build_config, save_build_config
from edgekit.data import Example, assign_splits
from edgekit.retrain import MERGED_DATA, Champion, champion_dataset, merge_labelled, trained_model
from tests.support.builds import relaxed_target, tiny_text_build_config

runner = CliRunner()
DEMO_LABELS = ("animal", "artifact", "body", "food", "location", "person", "plant", "substance")


def _new_glosses(per_label: int = 6) -> list[dict]:
    """Labelled texts the demo data does not hold, in the shape `edgekit fleet export-samples` writes."""
    return [{"text": f"a {label} seen in the field notes of survey {index} by the new devices", "label": label,
             "captured_at": 1700000000.0 + index} for label in DEMO_LABELS for index in range(per_label)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _demo_rows() -> list[dict]:
    return [json.loads(line) for line in DEMO_DATA.read_text().splitlines() if line.strip()]


def _retrain(*args: str):
    return runner.invoke(app, ["retrain", *map(str, args)])


# ---------------------------------------------------------------------- the merge rule (no build)


def test_merge_keeps_the_champion_splits_and_splits_new_rows_by_the_build_hash_rule():
    champion = champion_dataset(BuildConfig())
    test_row = champion.test[0]
    relabel_to = next(label for label in champion.labels if label != test_row.label)
    new = [Example(row["text"], row["label"], "") for row in _new_glosses()]
    labelled = [*new, Example(champion.train[0].text, champion.train[0].label, ""), Example(test_row.text, relabel_to, "")]

    merge = merge_labelled(champion, labelled)

    champion_rows = [row for row in merge.rows if row.origin != "added"]
    expected = [(e.text, e.split) for name in ("train", "val", "test") for e in champion.split(name)]
    assert [(row.text, row.split) for row in champion_rows] == expected, "every champion row keeps its split"
    (relabelled,) = [row for row in merge.rows if row.origin == "relabelled"]
    assert (relabelled.text, relabelled.label, relabelled.split) == (test_row.text, relabel_to, "test"), "the new label wins"
    split_by_rule = {e.text: e.split for e in assign_splits(new, 0)[0]}
    assert {row.text: row.split for row in merge.rows if row.origin == "added"} == split_by_rule
    assert (merge.added_rows, merge.relabelled, merge.duplicates, merge.unknown_labels) == (48, 1, 1, ())
    assert merge.added == {"train": dict.fromkeys(DEMO_LABELS, 4), "val": dict.fromkeys(DEMO_LABELS, 1),
                           "test": dict.fromkeys(DEMO_LABELS, 1)}


def test_a_champion_without_a_split_column_keeps_its_hash_split(tmp_path):
    from edgekit.tasks.text_data import load_dataset

    rows = [{"text": f"row {i} of class {label}", "label": label} for label in ("a", "b", "c") for i in range(20)]
    data = _jsonl(tmp_path / "data.jsonl", rows)
    champion = champion_dataset(BuildConfig.model_validate({"data": {"path": data, "calibration_path": None}}))
    new = [Example(f"a new row {i} of class {label}", label, "") for label in ("a", "b") for i in range(5)]

    merge = merge_labelled(champion, new)

    merged = tmp_path / "merged.jsonl"
    _jsonl(merged, [{"text": r.text, "label": r.label, "split": r.split} for r in merge.rows])
    reread = load_dataset(merged)
    for name in ("train", "val", "test"):
        assert {e.text for e in champion.split(name)} <= {e.text for e in reread.split(name)}, name
    assert merge.added == {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}


def test_new_rows_with_their_own_split_column_keep_it():
    champion = champion_dataset(BuildConfig())
    new = [Example(row["text"], row["label"], "test") for row in _new_glosses(1)]
    merge = merge_labelled(champion, new)
    assert merge.added == {"train": {}, "val": {}, "test": dict.fromkeys(DEMO_LABELS, 1)}


# ---------------------------------------------------------------------- the recorded config


def test_the_recorded_build_config_has_absolute_paths_and_no_search(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    config = BuildConfig.model_validate({
        "model": {"source": "model", "version": "2.3"}, "data": {"path": "data.jsonl", "calibration_path": None},
        "targets": ["x86-64-cpu", "mine.yaml"], "search": {"enabled": True}})

    path = save_build_config(config, tmp_path / "out")

    recorded = load_build_config(path)
    assert recorded.search.enabled is False
    assert recorded.model.source == str(tmp_path / "model") and recorded.data.path == tmp_path / "data.jsonl"
    assert recorded.targets == ["x86-64-cpu", str(tmp_path / "mine.yaml")]
    assert recorded.model_dump(exclude={"search", "model", "data", "targets"}) == config.model_dump(exclude={"search", "model", "data", "targets"})
    assert not [p for p in path.parent.iterdir() if p.name != BUILD_CONFIG_FILE], "written atomically, no temporary left"


# ---------------------------------------------------------------------- bad input (no build)


@pytest.fixture
def demo_config(tmp_path) -> Path:
    """A champion config YAML on the demo data (retrain fails on the input before it would build anything)."""
    path = tmp_path / "champion.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "demo", "version": "1.0.0"}}))
    return path


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a glowing cloud of plasma far away", "label": "star"}, {"text": "a red dwarf", "label": "star"}],
     "label(s) star that the champion does not know"),
    ([{"text": "an unlabelled sample", "label": None}], "no usable labelled rows (0 of 1 rows kept; dropped: 1 missing label)"),
    ([{"text": "a domestic animal (especially a young steer or heifer) kept as stock until fattened or matured and "
               "suitable for a breeding establishment", "label": "animal"}], "adds nothing"),
    ([{"words": "a text under another column", "label": "animal"}], "has no column 'text'"),
])
def test_bad_labelled_rows_are_one_line_errors(tmp_path, demo_config, rows, message):
    result = _retrain("--from", demo_config, "--add-data", _jsonl(tmp_path / "new.jsonl", rows), "--out", tmp_path / "challenger")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "challenger").exists(), "nothing is written before the input is checked"


def test_unknown_labels_say_that_the_head_changes(tmp_path, demo_config):
    new = _jsonl(tmp_path / "new.jsonl", [{"text": "a distant galaxy", "label": "star"}])
    result = _retrain("--from", demo_config, "--add-data", new)
    assert result.exit_code == 2
    assert "changes the model's head and its outputs" in result.stderr and "--new-classes" in result.stderr


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "absent.jsonl", "does not exist"),
    (lambda root: _jsonl(root / "empty.jsonl", []), "holds no rows"),
    (lambda root: (root / "images" / "animal").mkdir(parents=True) or root / "images", "class folders are image data"),
    (lambda root: _file(root / "new.png", b"\x89PNG"), "unknown data format '.png'"),
    (lambda root: _file(root / "new.csv", b"text,label\n\xff\xfe,animal\n"), "is not UTF-8"),
])
def test_unusable_add_data_files_are_one_line_errors(tmp_path, demo_config, make, message):
    result = _retrain("--from", demo_config, "--add-data", make(tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.startswith("error: --add-data")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_add_data_file_is_a_one_line_error(tmp_path, demo_config):
    new = _jsonl(tmp_path / "new.jsonl", _new_glosses(1))
    new.chmod(0)
    result = _retrain("--from", demo_config, "--add-data", new)
    assert result.exit_code == 2 and "cannot be read" in result.stderr


@pytest.mark.parametrize("make, message", [
    (lambda root: root, "is not a build output (no build-config.yaml)"),
    (lambda root: (root / "passes").mkdir() or root, "built before edgekit recorded its config"),
    (lambda root: root / "absent", "does not exist"),
    (lambda root: _jsonl(root / "data.jsonl", []), "neither a build output folder nor a build config YAML"),
])
def test_bad_from_is_a_one_line_error(tmp_path, make, message):
    new = _jsonl(tmp_path / "new.jsonl", _new_glosses(1))
    champion = tmp_path / "champion"
    champion.mkdir()
    result = _retrain("--from", make(champion), "--add-data", new)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_the_version_must_rise_and_the_out_dir_differ_from_the_champions(tmp_path):
    champion = tmp_path / "champion"
    save_build_config(BuildConfig(), champion)
    new = _jsonl(tmp_path / "new.jsonl", _new_glosses(1))
    lower = _retrain("--from", champion, "--add-data", new, "--version", "0.9")
    assert lower.exit_code == 2 and "not above the champion's 1.0.0" in lower.stderr and "1.0.1" in lower.stderr
    assert "not a version" in _retrain("--from", champion, "--add-data", new, "--version", "v2").stderr
    same = _retrain("--from", champion, "--add-data", new, "--out", champion)
    assert same.exit_code == 2 and "the champion's own build output" in same.stderr


def test_an_out_dir_that_holds_files_is_refused_without_force(tmp_path, demo_config):
    """Two retrains from one champion into one folder would give two different bundles of the same version."""
    out = tmp_path / "challenger"
    (out / "x86-64-cpu").mkdir(parents=True)
    (out / "x86-64-cpu" / "demo-1.0.1.ekb").write_bytes(b"an earlier challenger")
    new = _jsonl(tmp_path / "new.jsonl", _new_glosses(1))
    refused = _retrain("--from", demo_config, "--add-data", new, "--out", out)
    assert refused.exit_code == 2 and "already holds files" in refused.stderr and "--force" in refused.stderr
    assert sorted(path.name for path in out.rglob("*")) == ["demo-1.0.1.ekb", "x86-64-cpu"], "nothing written"
    # --force gets past the check (this input then fails on its own: it adds nothing).
    duplicate = json.loads(DEMO_DATA.read_text().splitlines()[0])
    same = _jsonl(tmp_path / "same.jsonl", [{"text": duplicate["text"], "label": duplicate["label"]}])
    forced = _retrain("--from", demo_config, "--add-data", same, "--out", out, "--force")
    assert forced.exit_code == 2 and "adds nothing" in forced.stderr


def test_an_out_dir_holding_the_champions_config_or_data_is_refused_even_with_force(tmp_path):
    (tmp_path / "data").mkdir()
    data = _jsonl(tmp_path / "data" / "rows.jsonl",
                  [{"text": f"row {i} of class {label}", "label": label} for label in ("a", "b") for i in range(10)])
    config = tmp_path / "configs" / "champion.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"model": {"name": "demo", "version": "1.0.0"},
                                      "data": {"path": str(data), "calibration_path": None}}))
    new = _jsonl(tmp_path / "new.jsonl", [{"text": "a new row of class a", "label": "a"}])
    for out, message in ((config.parent, "is the folder of the champion's config"),
                         (tmp_path, "holds the champion's data"), (data.parent, "holds the champion's data")):
        result = _retrain("--from", config, "--add-data", new, "--out", out, "--force")
        assert result.exit_code == 2, result.output
        assert message in result.stderr, (out, result.stderr)
    assert not (config.parent / "data").exists() and sorted(p.name for p in data.parent.iterdir()) == ["rows.jsonl"]


def test_a_champion_head_is_kept_only_for_the_same_labels_in_the_same_order(tmp_path):
    """Relabelling that drops one class and adds another keeps the label count: the champion's head rows must not be
    reused for other labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from edgekit.tasks.text_models import new_classifier

    labels = ("a", "b", "c")
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                        max_position_embeddings=16, num_labels=3, id2label=dict(enumerate(labels)),
                        label2id={label: index for index, label in enumerate(labels)})
    champion = BertForSequenceClassification(config)
    with torch.no_grad():
        champion.classifier.weight.fill_(7.0)
        champion.classifier.bias.fill_(7.0)
    champion.save_pretrained(tmp_path / "champion")
    for pooling in ("cls", "mean"):
        kept = new_classifier(tmp_path / "champion", labels, pooling)
        assert torch.equal(kept.classifier.weight, champion.classifier.weight), "same labels: the trained head"
        for other in (("a", "b", "d"), ("b", "a", "c"), ("a", "b")):
            fresh = new_classifier(tmp_path / "champion", other, pooling)
            assert fresh.classifier.weight.abs().max() < 1.0 and fresh.classifier.bias.abs().max() == 0.0, (other, pooling)
            assert torch.equal(fresh.bert.embeddings.word_embeddings.weight, champion.bert.embeddings.word_embeddings.weight)
            assert fresh.config.id2label == dict(enumerate(other))


def test_other_tasks_say_how_to_rebuild_by_hand(tmp_path):
    table = tmp_path / "table.csv"
    table.write_text("x,label\n1,a\n2,b\n")
    config = tmp_path / "champion.yaml"
    config.write_text(yaml.safe_dump({"task": {"kind": "tabular-classification"}, "model": {"source": "builtin:mlp"},
                                      "data": {"path": str(table)}}))
    result = _retrain("--from", config, "--add-data", table)
    assert result.exit_code == 2
    assert "retrain merges labelled texts; this champion is a tabular-classification model" in result.stderr
    assert "edgekit build" in result.stderr


# ---------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A tiny BERT champion built through the CLI: head fitted, then one short epoch of LoRA."""
    from tests.support.tiny_bert import tiny_hf_folder

    root = tmp_path_factory.mktemp("retrain")
    target = relaxed_target(root, "x86-64-cpu", max_accuracy_drop_points=100.0, min_top1_agreement=0.0)
    config = tiny_text_build_config(root, tiny_hf_folder(root / "tiny-model"), [target])
    document = yaml.safe_load(config.read_text())
    document["finetune"] = {"enabled": True, "method": "lora", "epochs": 1, "max_train_rows": 400}
    config.write_text(yaml.safe_dump(document))
    built = runner.invoke(app, ["build", str(config), "--out", str(root / "out"), "--cache-dir", str(root / "cache")])
    assert built.exit_code == 0, built.output
    return root


@pytest.fixture(scope="module")
def challenger(champion):
    new = _jsonl(champion / "new.jsonl", [*_new_glosses(), {"text": "waiting for a person", "label": None}])
    result = runner.invoke(app, ["retrain", "--from", str(champion / "out"), "--add-data", str(new),
                                 "--cache-dir", str(champion / "cache"), "--json"])
    assert result.exit_code == 0, result.output
    return champion / "out-challenger", json.loads(result.stdout)


def test_a_build_records_the_config_its_bundles_came_from(champion):
    recorded = load_build_config(champion / "out" / BUILD_CONFIG_FILE)
    assert recorded.search.enabled is False and recorded.finetune.enabled and recorded.model.version == "1.0.0"
    assert recorded.data.path == DEMO_DATA and Path(recorded.model.source).is_absolute()


def test_the_merged_data_keeps_the_champions_splits_and_splits_new_rows_by_the_rule(challenger):
    out, _ = challenger
    merged = [json.loads(line) for line in (out / MERGED_DATA).read_text().splitlines()]
    champion_rows = {(row["text"], row["label"], row["split"]) for row in _demo_rows()}
    assert {(r["text"], r["label"], r["split"]) for r in merged if r["origin"] == "champion"} == champion_rows
    added = [r for r in merged if r["origin"] == "added"]
    expected = assign_splits([Example(row["text"], row["label"], "") for row in _new_glosses()], 0)[0]
    assert {(r["text"], r["split"]) for r in added} == {(e.text, e.split) for e in expected}


def test_the_challenger_is_the_same_model_one_version_up_from_the_champions_weights(champion, challenger):
    out, document = challenger
    (champion_manifest, _), (challenger_manifest, _) = (
        read_manifest_unverified(folder / "x86-64-cpu-test" / f"tiny-{version}.ekb")
        for folder, version in ((champion / "out", "1.0.0"), (out, "1.0.1")))
    assert (challenger_manifest.model.name, challenger_manifest.model.version) == ("tiny", "1.0.1")
    assert challenger_manifest.task.labels == champion_manifest.task.labels

    config = load_build_config(out / BUILD_CONFIG_FILE)
    assert config.model.source == str((out / "champion-model").resolve()) and config.data.path == (out / MERGED_DATA).resolve()
    assert config.head.pooling == "cls" and config.finetune.method == "lora" and config.finetune.epochs == 1
    assert config.finetune.lora_target_modules == ["query", "key", "value", "dense", "word_embeddings"]
    assert config.targets == load_build_config(champion / "out" / BUILD_CONFIG_FILE).targets, "the champion's targets and budgets"
    summary = document["retrain"]
    assert summary["challenger"]["training"].startswith("from the champion's trained model (its finetune pass)")
    assert summary["merge"]["added_rows"] == 48 and summary["merge"]["dropped"]["missing_label"] == 1
    assert [p["name"] for p in document["reports"][0]["passes"]][:3] == ["load", "finetune", "export"]
    assert json.loads((out / "data" / "retrain-summary.json").read_text()) == summary


def test_without_the_cache_entry_the_challenger_trains_as_the_champion_did(champion, challenger):
    entry = (champion / "out" / "passes" / "02-finetune").resolve()
    aside = entry.with_name(f"aside-{entry.name}")
    entry.rename(aside)
    try:
        folder, why = trained_model(Champion(load_build_config(champion / "out" / BUILD_CONFIG_FILE), champion / "out", champion / "out"))
    finally:
        aside.rename(entry)
    assert folder is None and "no longer in the pass cache" in why and why.startswith("as the champion did, from ")


def test_new_classes_are_accepted_with_the_flag(champion, challenger):
    rows = [*_new_glosses(1), *({"text": f"a bright star of the {name} constellation, seen at night", "label": "star"}
                                for name in ("northern", "southern", "winter", "summer", "autumn", "polar"))]
    new = _jsonl(champion / "with-stars.jsonl", rows)
    out = champion / "with-stars"
    result = runner.invoke(app, ["retrain", "--from", str(champion / "out"), "--add-data", str(new), "--new-classes",
                                 "--out", str(out), "--cache-dir", str(champion / "cache")])
    assert result.exit_code == 0, result.output
    assert "new classes: star" in result.output and "new classes change the head" in result.output
    manifest, _ = read_manifest_unverified(out / "x86-64-cpu-test" / "tiny-1.0.1.ekb")
    assert manifest.task.labels == sorted([*DEMO_LABELS, "star"])
    shutil.rmtree(out)
