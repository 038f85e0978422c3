"""Pushing signed bundles to device agents over their admin API.

A flash streams the bundle to ``POST {device}/admin/models`` with the device's
bearer token; the agent verifies, proves and switches (or refuses and keeps
serving its old model). Only the standard library is used, so flashing needs
no extra dependency on the build host.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from edgekit.errors import EdgekitError
from device_agent.validation import load_yaml_model


class FlashError(EdgekitError):
    """A bundle could not be delivered to a device, or the device refused it."""


class Device(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://")
    token_file: Path


class Fleet(BaseModel):
    """The ``--devices`` file: the devices to flash, each with its agent URL and admin token file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[Device] = Field(min_length=1)


@dataclass(frozen=True)
class FlashResult:
    device: str
    ok: bool
    detail: str


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise FlashError(f"cannot read token file {path} ({exc.strerror}); pass the file the agent's admin token is in") from None
    if not token:
        raise FlashError(f"token file {path} is empty")
    return token


def flash(bundle: Path, url: str, token: str, *, force: bool = False, timeout_s: float = 600.0) -> dict:
    """Upload one bundle to one agent; return the agent's JSON answer or raise FlashError with its reason."""
    if not bundle.is_file():
        raise FlashError(f"bundle {bundle} does not exist; build one with `edgekit build`")
    endpoint = url.rstrip("/") + "/admin/models" + ("?force=true" if force else "")
    with bundle.open("rb") as body:
        request = urllib.request.Request(
            endpoint,
            data=body,
            method="POST",
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/octet-stream",
                "Content-Length": str(bundle.stat().st_size),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise FlashError(f"{url} refused the bundle (HTTP {error.code}): {_error_text(error)}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise FlashError(f"cannot reach {url} ({reason}); is `edgekit-agent serve` running there?") from None


def _error_text(error: urllib.error.HTTPError) -> str:
    raw = error.read()
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:500] or error.reason


def flash_fleet(bundle: Path, devices_file: Path, *, force: bool = False) -> list[FlashResult]:
    """Flash every device of a ``--devices`` file; one device's failure does not stop the others."""
    fleet = load_yaml_model(devices_file, Fleet)
    results = []
    for device in fleet.devices:
        token_file = device.token_file if device.token_file.is_absolute() else devices_file.parent / device.token_file
        try:
            answer = flash(bundle, device.url, read_token(token_file), force=force)
        except FlashError as error:
            results.append(FlashResult(device.name, False, str(error)))
        else:
            results.append(FlashResult(device.name, True, f"serves {answer.get('name')} {answer.get('version')}"))
    return results
