"""Every shipped example config loads: valid keys, a model that fits its task, targets that resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.config import load_build_config
from edgekit.targets import load_target
from edgekit.tasks import TASKS

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert {path.name for path in EXAMPLES} >= {"basicmotions.yaml", "fashion-mnist.yaml", "wordnet-finetune.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_an_example_config_loads_and_names_known_targets(path):
    config = load_build_config(path)
    assert config.task.kind in TASKS
    for target in config.targets:
        load_target(target)
