"""The device's model repository: versioned slots on disk, crash-safe install, activate and rollback.

Layout of the state directory::

    models/<name>/slots/<version>/   a verified, unpacked bundle (complete: it appears by one rename)
    models/<name>/active.json        {"version": ..., "history": [older versions, newest first], "highest": ...}
    staging/                         bundles being verified and proved (emptied at start)
    uploads/                         bundles being received (emptied at start)

An install verifies the bundle into ``staging/``, checks that its target fits
this device, loads it and runs its golden vectors here, then renames the
unpacked folder (every file and folder fsynced first) into ``slots/``, fsyncs
``slots/``, and only then rewrites ``active.json`` (temp file, fsync, rename,
fsync of the folder). A crash or a power cut at any point therefore leaves
``active.json`` naming either the old version or the new one, and every slot it
can name is complete. Serving swaps one reference per model, so requests that
already hold the old model finish on it.

Anti-rollback (TUF's rule against rollback attacks): ``highest`` is the highest
version ever installed, kept when slots are pruned. A bundle below it is
refused, forced or not, unless the device still holds that version (going back
is a rollback or an activation, never a fresh install of an old, perhaps
vulnerable, signed bundle); a held version below the active one needs force.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from device_agent.bundle import BundleError, BundleLimits, Manifest, open_bundle
from device_agent.errors import UserError
from device_agent.files import fsync_dir, fsync_tree, write_atomically
from device_agent.host import HostReport, probe_host
from device_agent.keys import Keyring
from device_agent.runtime import (
    ModelLoadError,
    RuntimeOptions,
    Session,
    open_model,
    run_golden_check,
)

log = logging.getLogger("edgekit.agent.repository")

ACTIVE_FILE = "active.json"


class ModelNotFound(UserError):
    """No such model, or no such version of it."""


class InstallRefused(UserError):
    """A bundle was not installed; the model that was serving still serves."""

    def __init__(self, check: str, message: str, status_code: int = 400) -> None:
        self.check = check
        self.status_code = status_code
        super().__init__(f"install refused [{check}]: {message}")


class NothingToRollBack(UserError):
    """A rollback was asked for, but no previous version is on disk."""

    status_code = 409


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,3}$")


def _checked(name: str, version: str | None = None) -> None:
    """Names and versions become folder names: refuse anything a manifest could not have produced."""
    if not _NAME.match(name) or (version is not None and not _VERSION.match(version)):
        raise ModelNotFound(f"no model {name!r}" + (f" version {version!r}" if version is not None else "") + ": not a valid name or version")


@dataclass(frozen=True)
class ServedModel:
    """A model version that is loaded and passed its golden check on this device."""

    name: str
    version: str
    manifest: Manifest
    session: Session
    slot_dir: Path
    golden_error: float


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    state: str  # READY (serving), AVAILABLE (on disk), UNAVAILABLE (failed to load or check)
    reason: str
    active: bool


def _highest_installed(active: dict) -> str | None:
    """The highest version ever installed, from ``active.json`` (older files lack the field: their versions tell)."""
    known = [v for v in [active.get("highest"), active.get("version"), *active.get("history", [])] if v]
    return max(known, key=version_key) if known else None


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _version_at_least(installed: str, required: str) -> bool:
    """Whether an installed library version satisfies a profile's pin (compared on the numeric parts given)."""
    def numbers(text: str) -> list[int]:
        parts = []
        for part in text.split("."):
            digits = "".join(ch for ch in part if ch.isdigit())
            if not digits:
                break
            parts.append(int(digits))
        return parts

    want = numbers(required)
    return numbers(installed)[: len(want)] >= want


def compatibility_problems(manifest: Manifest, host: HostReport) -> list[str]:
    """Why this device cannot run a bundle built for ``manifest.target``; empty when it can."""
    target, problems = manifest.target, []
    if target.cpu_arch != host.cpu_arch:
        problems.append(f"built for {target.cpu_arch}, this device is {host.cpu_arch}")
    if target.accelerator == "cuda":
        if not host.gpus:
            problems.append(f"built for a CUDA GPU (compute {target.gpu_compute_capability}), this device has none")
        elif target.gpu_compute_capability and target.gpu_compute_capability not in {g.compute_capability for g in host.gpus}:
            found = ", ".join(str(g.compute_capability) for g in host.gpus)
            problems.append(f"built for compute capability {target.gpu_compute_capability}, this device's GPU is {found}")
    runtimes = {runtime.name: runtime for runtime in host.runtimes}
    onnxruntime = runtimes.get("onnxruntime")
    if onnxruntime is None or onnxruntime.version is None:
        problems.append("onnxruntime does not import on this device; install edgekit[agent]")
    elif "onnxruntime" in target.software and not _version_at_least(onnxruntime.version, target.software["onnxruntime"]):
        problems.append(f"needs onnxruntime >= {target.software['onnxruntime']}, this device has {onnxruntime.version}")
    openvino = runtimes.get("openvino")
    # Without OpenVINO an openvino bundle runs on ONNX Runtime (open_model); an older OpenVINO is refused.
    if openvino is not None and openvino.version and "openvino" in target.software and not _version_at_least(openvino.version, target.software["openvino"]):
        problems.append(f"needs openvino >= {target.software['openvino']}, this device has {openvino.version}: "
                        "upgrade it (pip install -U openvino), or uninstall it to run the bundle on ONNX Runtime")
    return problems


class Repository:
    """Versioned models on disk and the one version of each that serves."""

    def __init__(
        self,
        state_dir: Path,
        keyring: Keyring,
        *,
        keep_versions: int = 3,
        runtime_options: RuntimeOptions = RuntimeOptions(),
        limits: BundleLimits = BundleLimits(),
        host: HostReport | None = None,
    ) -> None:
        if keep_versions < 2:
            raise UserError("keep_versions must be at least 2: rollback needs the previous version on disk")
        self.state_dir = state_dir
        self.keyring = keyring
        self.keep_versions = keep_versions
        self.runtime_options = runtime_options
        self.limits = limits
        self.host = host or probe_host(state_dir if state_dir.exists() else None)
        self._served: dict[str, ServedModel] = {}
        self._failures: dict[tuple[str, str], str] = {}
        self._lock = threading.RLock()
        for folder in (self.models_dir, self.staging_dir, self.uploads_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- layout

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"

    @property
    def uploads_dir(self) -> Path:
        return self.state_dir / "uploads"

    def new_upload_path(self) -> Path:
        """A fresh file name under uploads/ for a bundle being received (emptied at the next start)."""
        return self.uploads_dir / f"{uuid.uuid4().hex}.ekb"

    def _slots(self, name: str) -> Path:
        return self.models_dir / name / "slots"

    def _read_active(self, name: str) -> dict:
        path = self.models_dir / name / ACTIVE_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {"version": None, "history": []}

    def _write_active(self, name: str, version: str, history: list[str]) -> None:
        highest = max([version, *history, *filter(None, [_highest_installed(self._read_active(name))])], key=version_key)
        document = {"version": version, "history": [v for v in history if v != version], "highest": highest}
        write_atomically(self.models_dir / name / ACTIVE_FILE, json.dumps(document).encode())

    # ----------------------------------------------------------------- start and queries

    def start(self) -> None:
        """Recover after a restart: drop unfinished work, load and golden-check each model's active version."""
        with self._lock:
            for folder in (self.staging_dir, self.uploads_dir):
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
            for model_dir in sorted(self.models_dir.iterdir()):
                version = self._read_active(model_dir.name)["version"]
                if version is None:
                    continue
                try:
                    self._served[model_dir.name] = self._load_slot(model_dir.name, version)
                except UserError as error:
                    self._failures[(model_dir.name, version)] = str(error)
                    log.error("active version %s of %s does not serve: %s", version, model_dir.name, error)

    def model_names(self) -> list[str]:
        return sorted(path.name for path in self.models_dir.iterdir() if (path / ACTIVE_FILE).exists())

    def served(self, name: str, version: str | None = None) -> ServedModel:
        """The serving model (its active version); asking for another version of it is ModelNotFound."""
        _checked(name, version)
        model = self._served.get(name)
        if model is None:
            known = self.model_names()
            if name in known:
                reason = self._failures.get((name, self._read_active(name)["version"]), "it is unloaded")
                raise ModelNotFound(f"model {name!r} is not ready: {reason}")
            raise ModelNotFound(f"unknown model {name!r}; serving: {', '.join(self._served) or 'none'}")
        if version is not None and version != model.version:
            raise ModelNotFound(f"model {name!r} serves version {model.version}, not {version}")
        return model

    def index(self) -> list[VersionInfo]:
        infos = []
        for name in self.model_names():
            active = self._read_active(name)["version"]
            served = self._served.get(name)
            for slot in sorted(self._slots(name).iterdir(), key=lambda p: version_key(p.name)):
                version = slot.name
                failure = self._failures.get((name, version))
                if served is not None and served.version == version:
                    state, reason = "READY", ""
                elif failure:
                    state, reason = "UNAVAILABLE", failure
                else:
                    state, reason = "AVAILABLE", "unloaded" if version == active else "previous version"
                infos.append(VersionInfo(name, version, state, reason, version == active))
        return infos

    # ----------------------------------------------------------------- changes

    def install(self, bundle_path: Path, *, force: bool = False) -> ServedModel:
        """Verify, prove and switch to a bundle; on any failure the serving version is untouched."""
        with self._lock:
            try:
                bundle = open_bundle(bundle_path, self.keyring, limits=self.limits, scratch_dir=self.staging_dir)
            except BundleError as error:
                raise InstallRefused(error.check.value, error.detail) from None
            with bundle:
                manifest = bundle.manifest
                name, version = manifest.model.name, manifest.model.version
                problems = compatibility_problems(manifest, self.host)
                if problems:
                    raise InstallRefused("target", "; ".join(problems))
                active = self._read_active(name)
                slot = self._slots(name) / version
                if slot.exists() and (slot / "manifest.json").read_bytes() != bundle.manifest_bytes:
                    raise InstallRefused(
                        "version", f"{name} {version} is already installed with different content; build with a new version", 409
                    )
                highest = _highest_installed(active)
                if highest and version_key(version) < version_key(highest) and not slot.exists():
                    held = sorted((path.name for path in self._slots(name).iterdir()), key=version_key)
                    raise InstallRefused(
                        "version", f"{name} {version} is older than {highest}, the highest version installed on this device, "
                        f"and the device no longer holds it: refused, forced or not (anti-rollback); go back to a held "
                        f"version with rollback or activate (held: {', '.join(held)})", 409
                    )
                if active["version"] and version_key(version) < version_key(active["version"]) and not force:
                    raise InstallRefused(
                        "version", f"{name} {version} is older than the active {active['version']}; pass force to go back to it", 409
                    )
                candidate = self._prove(name, version, manifest, bundle.root)
                if not slot.exists():
                    _make_durable_folder(slot.parent)
                    fsync_tree(bundle.root)  # the slot's files are on disk before any name points at them
                    os.rename(bundle.root, slot)
                    fsync_dir(slot.parent)
            served = ServedModel(name, version, manifest, candidate.session, slot, candidate.golden_error)
            return self._switch(served, active)

    def activate(self, name: str, version: str) -> ServedModel:
        """Serve an installed version (after loading and golden-checking it again)."""
        _checked(name, version)
        with self._lock:
            if not (self._slots(name) / version).is_dir():
                raise ModelNotFound(f"{name} {version} is not installed; installed: {[v.version for v in self.index() if v.name == name]}")
            return self._switch(self._load_slot(name, version), self._read_active(name))

    def rollback(self, name: str) -> ServedModel:
        """Return to the newest previous version still on disk."""
        _checked(name)
        with self._lock:
            active = self._read_active(name)
            previous = [v for v in active["history"] if (self._slots(name) / v).is_dir()]
            if active["version"] is None:
                raise ModelNotFound(f"unknown model {name!r}")
            if not previous:
                raise NothingToRollBack(f"{name} has no previous version on disk to roll back to")
            served = self._load_slot(name, previous[0])
            self._served[name] = served
            self._write_active(name, served.version, previous[1:] + [active["version"]])
            log.info("rolled back %s from %s to %s", name, active["version"], served.version)
            return served

    def load(self, name: str) -> ServedModel:
        _checked(name)
        with self._lock:
            version = self._read_active(name)["version"]
            if version is None:
                raise ModelNotFound(f"unknown model {name!r}")
            self._served[name] = self._load_slot(name, version)
            return self._served[name]

    def unload(self, name: str) -> None:
        """Stop serving a model until ``load`` (not remembered across restarts, as in Triton)."""
        _checked(name)
        with self._lock:
            if self._served.pop(name, None) is None and name not in self.model_names():
                raise ModelNotFound(f"unknown model {name!r}")

    # ----------------------------------------------------------------- internals

    def _prove(self, name: str, version: str, manifest: Manifest, root: Path) -> ServedModel:
        """Load the model from ``root`` and run its golden vectors on this device."""
        try:
            session = open_model(manifest, root / manifest.runtime.model_file, self.runtime_options)
            error = run_golden_check(session, root / manifest.golden.file)
        except UserError as failure:
            raise InstallRefused("golden", str(failure)) from None
        return ServedModel(name, version, manifest, session, root, error)

    def _load_slot(self, name: str, version: str) -> ServedModel:
        slot = self._slots(name) / version
        try:
            manifest = Manifest.model_validate_json((slot / "manifest.json").read_bytes())
        except (OSError, ValueError) as error:  # pydantic's ValidationError is a ValueError
            raise ModelLoadError(f"slot {slot} is damaged ({type(error).__name__}); install the bundle again") from None
        served = self._prove(name, version, manifest, slot)
        self._failures.pop((name, version), None)
        return served

    def _switch(self, served: ServedModel, active: dict) -> ServedModel:
        name, old = served.name, active["version"]
        history = ([old] if old and old != served.version else []) + active["history"]
        self._write_active(name, served.version, history)
        self._served[name] = served
        self._prune(name)
        log.info("%s now serves %s (was %s)", name, served.version, old)
        return served

    def _prune(self, name: str) -> None:
        active = self._read_active(name)
        keep = {active["version"], *active["history"][: self.keep_versions - 1]}
        for slot in self._slots(name).iterdir():
            if slot.name not in keep:
                shutil.rmtree(slot, ignore_errors=True)
        if len(active["history"]) > self.keep_versions - 1:
            self._write_active(name, active["version"], active["history"][: self.keep_versions - 1])


def _make_durable_folder(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each new entry made durable in its parent."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        fsync_dir(created.parent)
