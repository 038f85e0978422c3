"""Lightweight simulated devices for rollout tests and the rollout bench: the device side of the desired-state
contract over real HTTP (pull, download, verify the sha256, report, send telemetry), without an agent or a model.

A simulated device "installs" a bundle by downloading it and checking its hash; it does not verify the signature or
run it (tests/e2e/test_rollout_e2e.py runs real agents for that).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import httpx

from device_agent.desired_schema import DesiredState, DeviceReport, InstallOutcome


@dataclass
class SimulatedDevice:
    url: str
    device_id: str
    token: str
    p95_ms: float = 5.0
    refuse: bool = False  # refuse every bundle, as a device whose keyring lacks the signer would
    serving: dict[str, str] = field(default_factory=dict)
    held: set[tuple[str, str]] = field(default_factory=set)  # (model, version) kept locally
    sequence: int = 0
    downloaded_bytes: int = 0
    installs: int = 0
    _client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def poll(self) -> list[InstallOutcome]:
        """One poll: fetch the desired state, act on each model, report; the outcomes reported."""
        answer = self.client.get(f"/v1/devices/{self.device_id}/desired")
        answer.raise_for_status()
        desired = DesiredState.model_validate_json(answer.content)
        outcomes = [self._apply(model) for model in desired.models if self.serving.get(model.name) != model.version]
        outcomes = [outcome for outcome in outcomes if outcome is not None]
        report = DeviceReport(device_id=self.device_id, serving=self.serving, outcomes=outcomes)
        self.client.post(f"/v1/devices/{self.device_id}/reports", content=report.model_dump_json(),
                         headers={"Content-Type": "application/json"}).raise_for_status()
        return outcomes

    def _apply(self, model) -> InstallOutcome | None:  # type: ignore[no-untyped-def]
        def outcome(kind: str, reason: str = "", check: str | None = None) -> InstallOutcome:
            return InstallOutcome(model=model.name, version=model.version, sha256=model.sha256, outcome=kind,
                                  check=check, reason=reason, at=time.time())

        if (model.name, model.version) in self.held:  # a local copy: no download
            going_back = _key(self.serving.get(model.name, "0")) > _key(model.version)
            self.serving[model.name] = model.version
            return outcome("rolled_back" if going_back else "installed")
        if self.refuse:
            return outcome("refused", "the signature's key is not in this device's keyring", "signature")
        body = self.client.get(f"/v1/bundles/{model.sha256}")
        body.raise_for_status()
        self.downloaded_bytes += len(body.content)
        if hashlib.sha256(body.content).hexdigest() != model.sha256:
            return outcome("failed", "the download does not match its sha256")
        self.serving[model.name] = model.version
        self.held.add((model.name, model.version))
        self.installs += 1
        return outcome("installed")

    def send_window(self, model: str) -> None:
        """One telemetry window of the version this device serves, with this device's p95."""
        self.sequence += 1
        now = time.time()
        window = {"sequence": self.sequence, "started_at": now - 1, "ended_at": now,
                  "model": {"name": model, "version": self.serving[model]}, "requests": 100, "errors": 0,
                  "latency": {"p50_ms": self.p95_ms / 2, "p95_ms": self.p95_ms, "p99_ms": self.p95_ms * 1.5}}
        self.client.post("/v1/telemetry", json={"device_id": self.device_id, "windows": [window]}).raise_for_status()


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))
