"""The repository: install proves a bundle before it serves, refuses what does not fit, rolls back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle import TargetInfo, write_bundle
from device_agent.host import probe_host
from device_agent.repository import InstallRefused, ModelNotFound, NothingToRollBack, Repository
from tests.support.bundles import build_corpus, tiny_manifest, tiny_payload, write_tiny_bundle


@pytest.fixture(scope="module")
def host():
    return probe_host()


@pytest.fixture
def repo(tmp_path, keyring, host):
    repository = Repository(tmp_path / "state", keyring, host=host)
    repository.start()
    return repository


def _bundle(tmp_path: Path, key, version: str) -> Path:
    path = tmp_path / f"tiny-{version}.ekb"
    write_tiny_bundle(path, key, version=version)
    return path


def _predict(repo: Repository) -> np.ndarray:
    model = repo.served("tiny-classifier")
    return model.session.run({"x": np.ones((1, 4), np.float32)})["logits"]


def test_install_serves_after_golden_check(repo, tmp_path, signing_key):
    served = repo.install(_bundle(tmp_path, signing_key, "1.0.0"))
    assert (served.name, served.version) == ("tiny-classifier", "1.0.0")
    assert served.golden_error < 1e-5
    assert _predict(repo).shape == (1, 3)
    assert [(v.version, v.state, v.active) for v in repo.index()] == [("1.0.0", "READY", True)]
    assert list(repo.staging_dir.iterdir()) == []


def test_upgrade_then_rollback_then_restart_keeps_the_choice(repo, tmp_path, signing_key, keyring, host):
    repo.install(_bundle(tmp_path, signing_key, "1.0.0"))
    repo.install(_bundle(tmp_path, signing_key, "1.1.0"))
    assert repo.served("tiny-classifier").version == "1.1.0"
    assert repo.rollback("tiny-classifier").version == "1.0.0"
    restarted = Repository(repo.state_dir, keyring, host=host)
    restarted.start()
    assert restarted.served("tiny-classifier").version == "1.0.0"


def test_a_version_below_the_highest_installed_is_refused_even_forced(repo, tmp_path, signing_key):
    """TUF's rollback-attack rule: an old signed bundle the device does not hold never installs, forced or not."""
    repo.install(_bundle(tmp_path, signing_key, "2.0.0"))
    for force in (False, True):
        with pytest.raises(InstallRefused) as raised:
            repo.install(_bundle(tmp_path, signing_key, "1.9.9"), force=force)
        assert raised.value.status_code == 409 and "anti-rollback" in str(raised.value) and "held: 2.0.0" in str(raised.value)
    assert repo.served("tiny-classifier").version == "2.0.0"


def test_the_highest_version_outlives_rollbacks_pruning_and_restarts(repo, tmp_path, signing_key, keyring, host):
    bundles = {version: _bundle(tmp_path, signing_key, version) for version in ("1.0.0", "2.0.0")}
    for bundle in bundles.values():
        repo.install(bundle)
    assert repo.rollback("tiny-classifier").version == "1.0.0"
    for version in ("1.0.1", "1.0.2", "1.0.3"):  # above the active 1.0.0, below the highest 2.0.0, never held
        with pytest.raises(InstallRefused, match="anti-rollback"):
            repo.install(_bundle(tmp_path, signing_key, version), force=True)
    restarted = Repository(repo.state_dir, keyring, host=host)
    restarted.start()
    with pytest.raises(InstallRefused, match="older than 2.0.0, the highest"):
        restarted.install(_bundle(tmp_path, signing_key, "1.5.0"), force=True)
    assert restarted.install(bundles["2.0.0"]).version == "2.0.0"  # held: going forward again
    assert restarted.install(_bundle(tmp_path, signing_key, "2.1.0")).version == "2.1.0"


def test_only_the_newest_versions_are_kept(repo, tmp_path, signing_key):
    for minor in range(5):
        repo.install(_bundle(tmp_path, signing_key, f"1.{minor}.0"))
    versions = [v.version for v in repo.index()]
    assert versions == ["1.2.0", "1.3.0", "1.4.0"]


def test_tampered_bundles_are_refused_and_the_old_model_keeps_serving(repo, tmp_path, signing_key):
    repo.install(_bundle(tmp_path, signing_key, "1.0.0"))
    before = _predict(repo)
    for case in build_corpus(tmp_path / "corpus", signing_key, Ed25519PrivateKey.generate()):
        if case.limits != repo.limits:
            continue
        with pytest.raises(InstallRefused) as raised:
            repo.install(case.path)
        assert raised.value.check == case.check.value, case.name
    assert repo.served("tiny-classifier").version == "1.0.0"
    np.testing.assert_array_equal(_predict(repo), before)
    assert list(repo.staging_dir.iterdir()) == []


def test_bundle_for_another_device_is_refused(repo, tmp_path, signing_key):
    manifest = tiny_manifest("1.0.0")
    other_arch = "aarch64" if repo.host.cpu_arch == "x86_64" else "x86_64"
    for target in (
        TargetInfo(name="elsewhere", profile_sha256="0" * 64, cpu_arch=other_arch, accelerator="cpu"),
        TargetInfo(name="jetson", profile_sha256="0" * 64, cpu_arch=repo.host.cpu_arch, accelerator="cuda", gpu_compute_capability="8.7"),
        TargetInfo(name="future", profile_sha256="0" * 64, cpu_arch=repo.host.cpu_arch, accelerator="cpu", software={"onnxruntime": "99.0"}),
    ):
        if target.accelerator == "cuda" and repo.host.gpus:
            continue
        path = tmp_path / f"{target.name}.ekb"
        write_bundle(path, manifest.model_copy(update={"target": target}), tiny_payload(tmp_path / target.name), signing_key)
        with pytest.raises(InstallRefused) as raised:
            repo.install(path)
        assert raised.value.check == "target", str(raised.value)


def test_bundle_whose_golden_vectors_fail_here_is_refused(repo, tmp_path, signing_key):
    repo.install(_bundle(tmp_path, signing_key, "1.0.0"))
    payload = tiny_payload(tmp_path / "bad-golden")
    with np.load(payload["golden.npz"]) as data:
        arrays = dict(data)
    arrays["output:logits"] = arrays["output:logits"] + 0.5
    np.savez(payload["golden.npz"], **arrays)
    path = tmp_path / "bad-golden.ekb"
    write_bundle(path, tiny_manifest("1.1.0"), payload, signing_key)
    with pytest.raises(InstallRefused) as raised:
        repo.install(path)
    assert raised.value.check == "golden" and "logits" in str(raised.value)
    assert repo.served("tiny-classifier").version == "1.0.0"
    assert [v.version for v in repo.index()] == ["1.0.0"]


def test_same_version_with_other_content_is_refused(repo, tmp_path, signing_key):
    repo.install(_bundle(tmp_path, signing_key, "1.0.0"))
    other = tmp_path / "other.ekb"
    write_bundle(other, tiny_manifest("1.0.0").model_copy(update={"metrics": {"accuracy": 0.5}}), tiny_payload(tmp_path / "o"), signing_key)
    with pytest.raises(InstallRefused, match="different content"):
        repo.install(other)


def test_unknown_models_and_versions_are_named(repo, tmp_path, signing_key):
    with pytest.raises(ModelNotFound, match="unknown model"):
        repo.served("nope")
    repo.install(_bundle(tmp_path, signing_key, "1.0.0"))
    with pytest.raises(ModelNotFound, match="serves version 1.0.0"):
        repo.served("tiny-classifier", "7")
    with pytest.raises(NothingToRollBack, match="no previous version"):
        repo.rollback("tiny-classifier")


def test_unload_and_load(repo, tmp_path, signing_key):
    repo.install(_bundle(tmp_path, signing_key, "1.0.0"))
    repo.unload("tiny-classifier")
    with pytest.raises(ModelNotFound, match="not ready"):
        repo.served("tiny-classifier")
    assert repo.load("tiny-classifier").version == "1.0.0"


def test_active_pointer_is_small_json(repo, tmp_path, signing_key):
    repo.install(_bundle(tmp_path, signing_key, "1.0.0"))
    repo.install(_bundle(tmp_path, signing_key, "1.0.1"))
    document = json.loads((repo.models_dir / "tiny-classifier" / "active.json").read_text())
    assert document == {"version": "1.0.1", "history": ["1.0.0"], "highest": "1.0.1"}


def test_reinstalling_an_older_slot_still_needs_force(repo, tmp_path, signing_key):
    old = _bundle(tmp_path, signing_key, "1.0.0")
    repo.install(old)
    repo.install(_bundle(tmp_path, signing_key, "1.1.0"))
    with pytest.raises(InstallRefused, match="older than the active"):
        repo.install(old)
    assert repo.install(old, force=True).version == "1.0.0"


@pytest.mark.parametrize(("name", "version"), [("..", "1.0.0"), ("m", ".."), ("x" * 300, "1"), ("a/b", "1")])
def test_names_and_versions_never_reach_the_file_system_unchecked(repo, name, version):
    with pytest.raises(ModelNotFound, match="not a valid name or version"):
        repo.activate(name, version)


def test_a_damaged_slot_is_a_clear_error(repo, tmp_path, signing_key):
    from device_agent.runtime import ModelLoadError

    repo.install(_bundle(tmp_path, signing_key, "1.0.0"))
    (repo.models_dir / "tiny-classifier" / "slots" / "1.0.0" / "manifest.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="damaged"):
        repo.load("tiny-classifier")
