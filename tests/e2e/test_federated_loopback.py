"""`edgekit federated server` and `client` as real processes on loopback, over Flower's gRPC transport with TLS and
site keys: a site with labels the coordinator does not know, a site with another base model and a site whose key the
coordinator does not hold are refused (each told why), three sites train, the coordinator builds a signed bundle; a
client whose coordinator is not there retries and then exits with a clear error.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.edgekit.test_federated import demo_subset, federated_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tls_files(folder: Path) -> dict[str, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost (EC P-256, one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: x509.Name, signer, *, ca: bool, names=()):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgekit test CA")])
    ca = certificate("edgekit test CA", ca_key, ca_name, ca_key, ca=True)
    server = certificate("localhost", server_key, ca_name, ca_key, ca=False,
                         names=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca": folder / "ca.pem", "certificate": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["certificate"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return files


def _edgekit(*args, log: Path) -> subprocess.Popen:
    """An edgekit process writing to ``log`` (never an unread pipe, which would block it)."""
    handle = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", "edgekit", *map(str, args)], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return log.read_text(errors="replace")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """The federation's base model, and another one (other weights: another digest)."""
    from tests.support.tiny_bert import tiny_hf_folder

    root = tmp_path_factory.mktemp("federated-loopback-models")
    return tiny_hf_folder(root / "tiny"), tiny_hf_folder(root / "other", seed=1)


def test_a_coordinator_and_three_sites_over_tls_build_a_bundle_and_strangers_are_refused(tmp_path, tiny_models):
    from device_agent.bundle import open_bundle
    from device_agent.keys import Keyring, generate_keypair

    model, other_model = tiny_models
    tls = _tls_files(tmp_path / "tls")
    config = federated_config(tmp_path, model, demo_subset(tmp_path / "coordinator.jsonl", 300), rounds=2,
                              join_timeout_s=120)
    other_root = tmp_path / "other-site"
    other_root.mkdir()
    other_config = federated_config(other_root, other_model, tmp_path / "coordinator.jsonl")
    keyring = tmp_path / "sites"
    keyring.mkdir()
    site_keys = {}
    for name in ("site-0", "site-1", "site-2", "weather-station", "other-model", "unknown-key"):
        site_keys[name], public = generate_keypair(tmp_path / "keys" / name)
        if name != "unknown-key":
            shutil.copy(public, keyring / f"{name}.pub")
    rows = [json.loads(line) for line in demo_subset(tmp_path / "strange.jsonl", 30, offset=5).read_text().splitlines()]
    for row in rows[:4]:
        row["label"] = "weather"
    (tmp_path / "strange.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    server_log = tmp_path / "server.log"
    server = _edgekit("federated", "server", config, "--address", address, "--min-clients", 3, "--sites", keyring,
                      "--certificate", tls["certificate"], "--private-key", tls["key"], "--ca-certificate", tls["ca"],
                      "--out", out, "--cache-dir", tmp_path / "cache", "--json", log=server_log)
    common = ["--server", address, "--ca-certificate", tls["ca"], "--max-wait", 120]
    for index in range(3):
        demo_subset(tmp_path / f"site-{index}.jsonl", 150, offset=index + 1)
    # The strangers first: the coordinator judges them while it waits for its three sites (a site arriving once the
    # rounds have started would only be judged at the next round).
    strangers = {
        "weather-station": _edgekit("federated", "client", config, "--data", tmp_path / "strange.jsonl", "--name",
                                    "weather-station", "--site-key", site_keys["weather-station"], *common,
                                    log=tmp_path / "weather-station.log"),
        "other-model": _edgekit("federated", "client", other_config, "--data", tmp_path / "site-0.jsonl", "--name",
                                "other-model", "--site-key", site_keys["other-model"], *common, log=tmp_path / "other-model.log"),
        "unknown-key": _edgekit("federated", "client", config, "--data", tmp_path / "site-1.jsonl", "--name", "unknown-key",
                                "--site-key", site_keys["unknown-key"], *common, log=tmp_path / "unknown-key.log"),
    }
    outputs = {name: _wait(process, tmp_path / f"{name}.log", 300) for name, process in strangers.items()}
    sites = {name: _edgekit("federated", "client", config, "--data", tmp_path / f"{name}.jsonl", "--name", name, "--site-key",
                            site_keys[name], *common, log=tmp_path / f"{name}.log") for name in ("site-0", "site-1", "site-2")}

    server_output = _wait(server, server_log, 600)
    outputs |= {name: _wait(process, tmp_path / f"{name}.log", 120) for name, process in sites.items()}
    assert server.returncode == 0, server_output[-4000:]
    for name in sites:
        assert sites[name].returncode == 0, outputs[name][-3000:]
        assert "trained 2 round(s) on 150 rows" in outputs[name]
    assert strangers["weather-station"].returncode == 2
    assert "refused this site" in outputs["weather-station"] and "weather" in outputs["weather-station"]
    assert strangers["other-model"].returncode == 2
    assert "refused this site" in outputs["other-model"] and "base model" in outputs["other-model"]
    assert strangers["unknown-key"].returncode == 2, outputs["unknown-key"][-2000:]
    assert "refused this site" in outputs["unknown-key"] and "not in the coordinator's sites keyring" in outputs["unknown-key"]

    (report,) = json.loads(server_output[server_output.index("[\n"):])
    federated = report["federated"]
    assert sorted(c["client"] for c in federated["per_client"]) == ["site-0", "site-1", "site-2"]
    assert all(c["key_id"] for c in federated["per_client"]), "each site proved its key"
    assert sorted(r["site"] for r in federated["refused"]) == ["other-model", "unknown-key", "weather-station"]
    assert [r["round"] for r in federated["per_round"]] == [0, 1, 2]
    assert federated["per_round"][-1]["accuracy"] > federated["per_round"][0]["accuracy"]
    # After the rounds every site sent its feature statistics over the same TLS streams for the head.
    assert federated["head_calibration"]["sites"] == ["site-0", "site-1", "site-2"], federated["head_calibration"]
    assert federated["head_calibration"]["problems"] == [] and "val_accuracy_after" in federated["head_calibration"]
    with open_bundle(Path(report["bundle"]), Keyring.load(tmp_path / "cache" / "dev-key")) as bundle:
        assert bundle.manifest.model.name == "tiny-federated"


def test_a_client_retries_an_unreachable_coordinator_then_exits_with_a_clear_error(tmp_path, tiny_models):
    model, _ = tiny_models
    config = federated_config(tmp_path, model, demo_subset(tmp_path / "data.jsonl", 60))
    started = time.monotonic()
    client = _edgekit("federated", "client", config, "--server", f"127.0.0.1:{_free_port()}", "--data", tmp_path / "data.jsonl",
                      "--name", "lonely", "--max-wait", 4, log=tmp_path / "client.log")
    output = _wait(client, tmp_path / "client.log", 120)
    assert client.returncode == 2, output[-3000:]
    assert "retrying for up to 4 s" in output
    assert "could not reach the coordinator" in output and "UNAVAILABLE" in output
    assert "Traceback" not in output
    assert time.monotonic() - started < 90


def test_a_coordinator_whose_sites_never_come_fails_clearly_and_exits(tmp_path, tiny_models):
    model, _ = tiny_models
    config = federated_config(tmp_path, model, demo_subset(tmp_path / "data.jsonl", 120), join_timeout_s=3)
    server = _edgekit("federated", "server", config, "--address", f"127.0.0.1:{_free_port()}", "--min-clients", 2,
                      "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", log=tmp_path / "server.log")
    output = _wait(server, tmp_path / "server.log", 180)
    assert server.returncode == 2, output[-3000:]
    assert "0 of the 2 sites a round needs are connected after waiting 3 s" in output
    assert "Traceback" not in output


def test_three_sites_over_grpc_send_masked_updates_and_the_coordinator_builds_from_their_sum(tmp_path, tiny_models):
    """Secure aggregation over the real transport: the key and share exchanges and the unmasking ride the same
    properties messages as admission, the masked 64-bit updates (and the head's statistics) the fit replies."""
    model, _ = tiny_models
    config = federated_config(tmp_path, model, demo_subset(tmp_path / "coordinator.jsonl", 300), rounds=2,
                              join_timeout_s=120, secure_aggregation=True)
    address = f"127.0.0.1:{_free_port()}"
    server = _edgekit("federated", "server", config, "--address", address, "--min-clients", 3, "--out", tmp_path / "out",
                      "--cache-dir", tmp_path / "cache", "--json", log=tmp_path / "server.log")
    sites = {}
    for index in range(3):
        name = f"site-{index}"
        demo_subset(tmp_path / f"{name}.jsonl", 150, offset=index + 1)
        sites[name] = _edgekit("federated", "client", config, "--data", tmp_path / f"{name}.jsonl", "--name", name,
                               "--server", address, "--max-wait", 120, log=tmp_path / f"{name}.log")
    server_output = _wait(server, tmp_path / "server.log", 600)
    outputs = {name: _wait(process, tmp_path / f"{name}.log", 120) for name, process in sites.items()}
    assert server.returncode == 0, server_output[-4000:]
    for name, process in sites.items():
        assert process.returncode == 0, outputs[name][-3000:]
        assert "trained 2 round(s) on 150 rows" in outputs[name]
    (report,) = json.loads(server_output[server_output.index("[\n"):])
    federated = report["federated"]
    assert federated["secure_aggregation"]["enabled"] and federated["secure_aggregation"]["threshold"] == 3
    assert [r["round"] for r in federated["per_round"]] == [0, 1, 2]
    assert federated["per_round"][-1]["accuracy"] > federated["per_round"][0]["accuracy"]
    for trained in federated["per_round"][1:]:  # every stage of every round went through at the first attempt
        assert trained["attempts"] == 1 and sorted(trained["sites"]) == ["site-0", "site-1", "site-2"], trained
        assert trained["bytes_from_each_site"] == 8 * federated["adapter_parameters"]  # masked 64-bit words
    calibrated = federated["head_calibration"]  # the head's statistics went through one more masked exchange
    assert calibrated["secure_aggregation"] and calibrated["sites"] == ["site-0", "site-1", "site-2"], calibrated
    assert calibrated["problems"] == [] and "val_accuracy_after" in calibrated
