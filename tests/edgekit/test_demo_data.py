"""The embedded demo dataset (calibration/wordnet-supersenses): its shape, its splits, and that it regenerates exactly."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "calibration" / "make_wordnet_demo.py"
DATA_DIR = ROOT / "calibration" / "wordnet-supersenses"
DATA_NOUN = Path("/usr/share/wordnet/data.noun")
LABELS = {"animal", "plant", "food", "artifact", "person", "location", "substance", "body"}
SPLITS = {"train", "val", "test"}
FILES = ("data.jsonl", "calibration.jsonl", "README.md")


def _lines(name: str) -> list[str]:
    return (DATA_DIR / name).read_text(encoding="utf-8").splitlines()


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in _lines(name)]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return _rows("data.jsonl")


@pytest.fixture(scope="module")
def calibration() -> list[dict]:
    return _rows("calibration.jsonl")


def test_rows_have_the_expected_fields_and_eight_labels(rows):
    assert rows, "data.jsonl is empty"
    for row in rows:
        assert set(row) == {"text", "label", "synset", "split"}
        assert isinstance(row["text"], str) and row["text"].strip() == row["text"] and len(row["text"].split()) >= 3
        assert re.fullmatch(r"\d{8}", row["synset"])
        assert row["split"] in SPLITS
    assert {row["label"] for row in rows} == LABELS
    assert len({row["synset"] for row in rows}) == len(rows), "a synset appears twice"
    assert len(rows) <= 500 * len(LABELS)


def test_each_class_is_split_about_70_10_20(rows):
    per_class = Counter(row["label"] for row in rows)
    per_split = Counter((row["label"], row["split"]) for row in rows)
    for label in LABELS:
        total = per_class[label]
        assert total >= 100, f"{label} has only {total} rows"
        for split, fraction in (("train", 0.70), ("val", 0.10), ("test", 0.20)):
            assert abs(per_split[label, split] / total - fraction) <= 0.02, (label, split, per_split[label, split], total)


def test_no_text_is_empty_duplicated_or_in_two_splits(rows):
    texts = [row["text"] for row in rows]
    assert all(text.strip() for text in texts)
    assert len(set(texts)) == len(texts), "exact-duplicate texts"
    by_split = {split: {row["text"] for row in rows if row["split"] == split} for split in SPLITS}
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]


def test_calibration_rows_are_a_stratified_subset_of_train(rows, calibration):
    train_lines = {line for line, row in zip(_lines("data.jsonl"), rows, strict=True) if row["split"] == "train"}
    calibration_lines = _lines("calibration.jsonl")
    assert len(calibration_lines) == len(set(calibration_lines)) == 200
    assert set(calibration_lines) <= train_lines, "calibration rows must be copies of train rows"
    assert Counter(row["label"] for row in calibration) == {label: 25 for label in LABELS}


def test_the_readme_carries_the_wordnet_license_and_the_counts(rows):
    readme = (DATA_DIR / "README.md").read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in readme
    assert "python calibration/make_wordnet_demo.py" in readme
    assert f"`data.jsonl`: {len(rows)} rows" in readme


def test_total_size_stays_small():
    assert sum((DATA_DIR / name).stat().st_size for name in FILES) < 2 * 1024 * 1024


def test_a_missing_wordnet_is_reported_with_the_install_hint(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--wordnet-dir", str(tmp_path), "--out", str(tmp_path / "out")],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "apt-get install wordnet-base" in result.stderr
    assert not (tmp_path / "out").exists()


def _committed_data_noun_sha256() -> str | None:
    match = re.search(r"sha256 of data\.noun:\s*`([0-9a-f]{64})`", (DATA_DIR / "README.md").read_text(encoding="utf-8"))
    return match.group(1) if match else None


def test_regenerating_gives_byte_identical_files(tmp_path):
    if not DATA_NOUN.is_file():
        pytest.skip(f"{DATA_NOUN} is absent; install Debian's wordnet-base (apt-get install wordnet-base) to regenerate")
    if hashlib.sha256(DATA_NOUN.read_bytes()).hexdigest() != _committed_data_noun_sha256():
        pytest.skip(f"{DATA_NOUN} is not the file the committed data was made from (sha256 differs from the README's)")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True, timeout=300)
    for name in FILES:
        assert (out / name).read_bytes() == (DATA_DIR / name).read_bytes(), f"{name} differs from the committed copy"
