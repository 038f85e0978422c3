"""Target profiles: every shipped file loads, and every kind of mistake is reported clearly and all at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from device_agent.validation import load_yaml_model
from edgekit.errors import ConfigError, UnknownTargetError
from edgekit.targets import TargetProfile, builtin_target_names, load_builtin_targets, load_target, resolve_target_file

REPO_TARGETS = Path(__file__).resolve().parents[2] / "targets"
REQUIRED = {"x86-64-cpu", "arm64-cpu", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "x86-64-nvidia-gpu"}


@pytest.mark.parametrize("path", sorted(REPO_TARGETS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_target_loads_and_is_named_after_its_file(path):
    profile = load_yaml_model(path, TargetProfile)
    assert profile.name == path.stem


def test_the_required_targets_ship_and_the_registry_sees_all_files():
    assert REQUIRED <= set(builtin_target_names())
    assert set(builtin_target_names()) == {path.stem for path in REPO_TARGETS.glob("*.yaml")}


def test_jetson_profiles_carry_the_jetpack_lock_and_tensorrt_recipe():
    for name in ("jetson-orin-nano-8gb", "jetson-agx-orin-64gb"):
        profile = load_target(name)
        assert profile.gpu_compute_capability == "8.7"
        assert (profile.software.jetpack, profile.software.cuda, profile.software.tensorrt) == ("6.2", "12.6", "10.3")
        assert profile.runtime.execution_providers[0] == "TensorrtExecutionProvider"
        quant = profile.quantization
        assert (quant.scheme, quant.activation_type, quant.symmetric_activations, quant.per_channel) == ("static_qdq", "int8", True, True)
        assert profile.input_shapes.mode == "profiles"


def test_a_users_own_file_works_where_a_name_does(tmp_path):
    document = yaml.safe_load((REPO_TARGETS / "x86-64-cpu.yaml").read_text())
    document["name"] = "my-box"
    own = tmp_path / "my-box.yaml"
    own.write_text(yaml.safe_dump(document))
    assert load_target(str(own)).name == "my-box"
    assert resolve_target_file(str(own)) == own


def test_digest_ignores_yaml_layout_but_not_values(tmp_path):
    original = load_target("x86-64-cpu")
    document = yaml.safe_load((REPO_TARGETS / "x86-64-cpu.yaml").read_text())
    reflowed = tmp_path / "reflowed.yaml"
    reflowed.write_text(yaml.safe_dump(document, default_flow_style=True))
    assert load_target(str(reflowed)).sha256() == original.sha256()
    document["max_batch"] = 16
    reflowed.write_text(yaml.safe_dump(document))
    assert load_target(str(reflowed)).sha256() != original.sha256()


def test_unknown_target_name_lists_the_known_ones():
    with pytest.raises(UnknownTargetError) as raised:
        load_target("orin-nano")
    message = str(raised.value)
    assert "unknown target 'orin-nano'" in message
    assert "jetson-orin-nano-8gb" in message and "path to a YAML file" in message


def _write_broken(tmp_path: Path, edit) -> Path:
    document = yaml.safe_load((REPO_TARGETS / "jetson-orin-nano-8gb.yaml").read_text())
    edit(document)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


BROKEN = {
    "unknown key": (lambda d: d.update(max_batchsize=4), ["max_batchsize: unknown field", "did you mean 'max_batch'", "allowed here:"]),
    "unknown nested key": (lambda d: d["budgets"].update(max_drop=1), ["budgets.max_drop: unknown field", "max_accuracy_drop_points"]),
    "wrong type": (lambda d: d.update(max_batch="eight"), ["max_batch:", "valid integer", "'eight'"]),
    "bad enum value": (lambda d: d.update(accelerator="tpu"), ["accelerator:", "'cpu' or 'cuda'", "'tpu'"]),
    "bad nested enum": (lambda d: d["runtime"].update(execution_providers=["CoreMLExecutionProvider"]), ["runtime.execution_providers.0:", "TensorrtExecutionProvider"]),
    "missing required field": (lambda d: d.pop("opset"), ["opset: required field is missing"]),
    "cuda without compute capability": (lambda d: d.pop("gpu_compute_capability"), ["needs gpu_compute_capability"]),
    "tensorrt with dynamic int8": (lambda d: d["quantization"].update(scheme="dynamic"), ["TensorRT cannot run dynamic quantization"]),
    "asymmetric QDQ for tensorrt": (lambda d: d["quantization"].update(symmetric_activations=False), ["symmetric int8 QDQ"]),
    "bad shape range": (lambda d: d["input_shapes"]["dims"].update(batch={"min": 4, "opt": 2, "max": 8}), ["min <= opt <= max"]),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_broken_target_files_name_file_field_value_and_allowed_values(tmp_path, case):
    edit, expected = BROKEN[case]
    path = _write_broken(tmp_path, edit)
    with pytest.raises(ConfigError) as raised:
        load_yaml_model(path, TargetProfile)
    message = str(raised.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, message


def test_all_problems_of_a_file_are_reported_together(tmp_path):
    def break_three_ways(document):
        document.update(max_batchsize=4, accelerator="tpu")
        document.pop("opset")

    with pytest.raises(ConfigError) as raised:
        load_yaml_model(_write_broken(tmp_path, break_three_ways), TargetProfile)
    assert len(raised.value.problems) == 3
    assert "3 problems" in str(raised.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "it is empty"), ("- a\n- b\n", "it is a list"), ("name: [unclosed\n", "line 2"), ("\tname: x\n", "not valid YAML")],
)
def test_unparseable_target_files_are_named(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_yaml_model(path, TargetProfile)


def test_missing_target_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_target(str(tmp_path / "nope.yaml"))


def test_profiles_are_frozen():
    profile = load_builtin_targets()[0]
    with pytest.raises(ValueError):
        profile.max_batch = 3  # type: ignore[misc]
