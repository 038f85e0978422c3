"""The device's half of a fleet rollout: pull the desired state, fetch and install what it names, report back.

A :class:`DesiredStatePuller` thread asks the fleet collector every
``poll_seconds`` what this device should serve (``device_agent.desired_schema``)
and, per model:

- serves that version already: nothing to do;
- still holds that version (a slot on disk, e.g. the one before an upgrade):
  activates it, no download (outcome ``rolled_back`` when it is older than what
  served, else ``installed``);
- otherwise downloads the bundle into ``<state_dir>/downloads/<sha256>.part``
  (a folder the repository's start does not empty, so a cut download resumes
  with ``Range`` even after a restart), streamed to disk and bounded by the
  announced size, checks its sha256 against the desired state, asks the
  collector once more whether the model still names that sha256 (a rollout may
  have moved on during a long download: then it is not installed, and neither
  when the collector cannot say) and installs it through
  :meth:`Repository.install`: signature, target, golden check and anti-rollback
  stay the repository's business. The part is deleted once installed or refused
  for good; after a failure that may pass (disk, a load error) the verified file
  stays, and the next try installs it without downloading it again.

A bundle that failed is tried again with backoff (``poll_seconds`` doubling per
failure in a row, at most ``backoff_max_s``); a ``failed`` outcome is recorded
only when its reason differs from the last one recorded for that sha256, not at
every try. This is kept in memory only: after a restart the next failure is
recorded once more. A success, a refusal or a new desired sha256 starts afresh.

Then it POSTs a report: what serves now, and the outcomes the collector has not
acknowledged yet, oldest first, as many as keep the body under
``MAX_REPORT_BODY_BYTES``; the rest go in the next poll's report. Outcomes and
the bundles refused for good are kept in ``<state_dir>/desired/state.json``
(written atomically), so a restart neither loses an outcome nor downloads a
refused bundle again. A collector that is down or refuses the token is logged
and retried with backoff; the agent keeps serving.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_agent.bundle import BundleError, read_manifest_unverified
from device_agent.desired_schema import (
    MAX_MODELS,
    MAX_OUTCOMES,
    MAX_REASON_CHARS,
    DesiredModel,
    DesiredState,
    DeviceReport,
    InstallOutcome,
    Outcome,
    ReportAck,
    Sha256,
)
from device_agent.errors import UserError
from device_agent.files import sha256_file, write_atomically
from device_agent.repository import InstallRefused, ModelNotFound, Repository, version_key
from device_agent.telemetry_schema import escape_unprintable

log = logging.getLogger("edgekit.agent.desired")

OUTCOMES: tuple[Outcome, ...] = ("installed", "refused", "rolled_back", "failed")
DOWNLOAD_CHUNK = 1 << 20
# A download cut this many times within one poll waits for the next try (the part is kept).
DOWNLOAD_ATTEMPTS = 3
_MAX_CHECK_CHARS = 64
_MAX_ERROR_BODY = 2048
_MAX_DESIRED_BYTES = 4 << 20
_MAX_ACK_BYTES = 64 << 10
# The collector answers 413 to a report over its MAX_REPORT_BYTES (256 KiB, edgekit/fleet/collector.py), and would
# at every poll. device_agent cannot import edgekit, so the limit is repeated here with a margin: a collector built
# with a somewhat lower limit, or a proxy in front of it, still takes the report. One outcome (a reason of at most
# MAX_REASON_CHARS, under 12 KiB escaped) and what serves always fit, so a report always makes progress.
MAX_REPORT_BODY_BYTES = 192 << 10


class CollectorError(Exception):
    """The collector could not be reached (``status`` None) or did not answer as the contract says."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.status = status


class DownloadFailed(Exception):
    """A bundle could not be fetched or did not match the desired state; tried again with backoff."""


class _Stopping(Exception):
    """The agent is stopping: leave the download where it is (the part resumes at the next start)."""


class _NotNow(Exception):
    """Not installed now, and no fault of the bundle (no longer desired, or the collector cannot confirm it): no outcome."""


# --------------------------------------------------------------------------- what survives a restart


class _MemoryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keyring: list[str] = Field(default_factory=list)
    refused: dict[Sha256, str] = Field(default_factory=dict)
    pending: list[InstallOutcome] = Field(default_factory=list)


class PullerMemory:
    """Outcomes not yet acknowledged by the collector, and bundles refused for good, in one JSON file.

    Refusals are kept with the keyring's key ids: a bundle refused by one keyring
    (an untrusted signer, say) is tried again once the keyring changes.
    """

    def __init__(self, path: Path, keyring_ids: list[str]) -> None:
        self.path = path
        self.keyring = sorted(keyring_ids)
        self.pending: list[InstallOutcome] = []
        self.refused: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        try:
            stored = _MemoryFile.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:  # pydantic's ValidationError is a ValueError
            log.warning("cannot read %s (%s); starting with no pending outcomes and no refused bundles; "
                        "it is rewritten at the next change", self.path, type(error).__name__)
            return
        self.pending = stored.pending[-MAX_OUTCOMES:]
        if stored.keyring == self.keyring:
            self.refused = dict(stored.refused)
        elif stored.refused:
            log.info("the keyring changed: %d bundle(s) refused before will be tried again", len(stored.refused))

    def record(self, outcome: InstallOutcome) -> None:
        """Keep ``outcome`` until the collector acknowledges it; past MAX_OUTCOMES the oldest go."""
        self.pending.append(outcome)
        if len(self.pending) > MAX_OUTCOMES:
            dropped = self.pending[: len(self.pending) - MAX_OUTCOMES]
            self.pending = self.pending[-MAX_OUTCOMES:]
            log.warning("%d install outcome(s) were never acknowledged by the collector and are dropped (oldest first; "
                        "at most %d are kept)", len(dropped), MAX_OUTCOMES)
        self._save()

    def acknowledge(self, sent: list[InstallOutcome]) -> None:
        if sent:
            acknowledged = {_outcome_key(outcome) for outcome in sent}
            self.pending = [outcome for outcome in self.pending if _outcome_key(outcome) not in acknowledged]
            self._save()

    def refuse(self, sha256: str, why: str) -> None:
        self.refused[sha256] = why
        self._save()

    def keep_refusals_of(self, desired: set[str]) -> None:
        """Forget refusals of bundles no longer desired: told to run one again later, the device tries it again."""
        kept = {sha: why for sha, why in self.refused.items() if sha in desired}
        if kept != self.refused:
            self.refused = kept
            self._save()

    def _save(self) -> None:
        document = _MemoryFile(keyring=self.keyring, refused=self.refused, pending=self.pending)
        try:
            write_atomically(self.path, document.model_dump_json(indent=1).encode())
        except OSError as error:  # disk full: the memory still holds them, the file catches up at the next change
            log.warning("cannot write %s (%s); pending outcomes are kept in memory only", self.path, error.strerror)


def _outcome_key(outcome: InstallOutcome) -> tuple[str, str, float]:
    return outcome.sha256, outcome.outcome, outcome.at


# --------------------------------------------------------------------------- the puller


@dataclass
class PullerStats:
    polls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_status: int | None = None  # of the last failure (None: unreachable)
    last_success_at: float | None = None
    outcomes: Counter[str] = field(default_factory=lambda: Counter({outcome: 0 for outcome in OUTCOMES}))


@dataclass(frozen=True)
class _Retry:
    """A desired bundle that failed ``failures`` times in a row: the reason last reported, and when to try again."""

    failures: int
    reason: str
    not_before: float


@dataclass(frozen=True)
class PollResult:
    """What one poll did: the outcomes it produced and how many pending outcomes the collector acknowledged."""

    desired: DesiredState
    outcomes: list[InstallOutcome]
    acknowledged: int


class DesiredStatePuller:
    """Pulls the desired state from the collector and makes the repository match it (see the module docstring).

    ``on_change(name)`` is called from the puller's thread after a model's served
    version changed. :meth:`poll_once` does one full round; :meth:`start` runs
    rounds in a background thread until :meth:`stop`.
    """

    def __init__(
        self,
        repository: Repository,
        url: str,
        device_id: str,
        token: str,
        *,
        poll_seconds: float = 30.0,
        timeout_s: float = 10.0,
        backoff_max_s: float = 300.0,
        on_change: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repository = repository
        self.base_url = url.rstrip("/")
        self.device_id = device_id
        self._token = token
        self.poll_seconds = poll_seconds
        self.timeout_s = timeout_s
        self.backoff_max_s = backoff_max_s
        self.on_change = on_change
        self.clock = clock
        self.downloads_dir = repository.state_dir / "downloads"
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        self.memory = PullerMemory(repository.state_dir / "desired" / "state.json", list(repository.keyring.keys))
        self.stats = PullerStats()
        self._retries: dict[str, _Retry] = {}  # by sha256; only for bundles still desired
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgekit-desired-state", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; a download in progress stops at its next chunk and resumes at the next start."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.poll_once()
            except CollectorError as error:
                self._failed(error)
            except Exception as error:  # noqa: BLE001 - a bug must not stop the agent serving: log it, back off, retry
                log.exception("desired-state poll failed")
                self._failed(CollectorError(None, f"{type(error).__name__}: {error}"))
            self._stopping.wait(self._next_wait())

    def _next_wait(self) -> float:
        failures = self.stats.consecutive_failures
        if failures == 0:
            return self.poll_seconds
        if self.stats.last_status in (401, 403):  # a configuration problem: no use asking often
            return random.uniform(0.5, 1.0) * max(self.backoff_max_s, self.poll_seconds)
        # Full jitter (uniform over [0, capped exponential]): a fleet that lost its collector does not return in step.
        ceiling = min(max(self.backoff_max_s, self.poll_seconds), self.poll_seconds * 2 ** min(failures - 1, 30))
        return random.uniform(0, ceiling)

    def _failed(self, error: CollectorError) -> None:
        self.stats.failures += 1
        self.stats.consecutive_failures += 1
        self.stats.last_status = error.status
        if error.status == 401:
            log.error("the collector refused this device's token (%s); register the device with `edgekit fleet devices "
                      "add %s` or issue a new token with `edgekit fleet devices rotate-token %s`, save it in "
                      "device_token_file and restart the agent; retrying slowly", error, self.device_id, self.device_id)
        elif error.status == 403:
            log.error("the collector says this token belongs to another device than %r (%s); check device_id and "
                      "device_token_file; retrying slowly", self.device_id, error)
        else:
            log.warning("desired-state poll failed (%s); the agent keeps serving and retries with backoff", error,
                        extra={"collector": self.base_url})

    # ----------------------------------------------------------------- one poll

    def poll_once(self) -> PollResult:
        """Fetch the desired state, apply each model, report. Raises CollectorError when the collector fails us."""
        self.stats.polls += 1
        desired = self._fetch_desired()
        wanted = {model.sha256 for model in desired.models}
        self.memory.keep_refusals_of(wanted)
        self._drop_stale_downloads(wanted)
        self._retries = {sha: retry for sha, retry in self._retries.items() if sha in wanted}
        outcomes = []
        for model in desired.models:
            if self._stopping.is_set():
                break
            outcome = self._apply(model)
            if outcome is not None:
                outcomes.append(outcome)
        acknowledged = self._report()
        self.stats.consecutive_failures = 0
        self.stats.last_success_at = self.clock()
        return PollResult(desired, outcomes, acknowledged)

    def _fetch_desired(self) -> DesiredState:
        status, body = self._call("GET", f"/v1/devices/{self.device_id}/desired", limit=_MAX_DESIRED_BYTES)
        try:
            desired = DesiredState.model_validate_json(body)
        except ValidationError as error:
            raise CollectorError(status, f"the collector's answer is not a DesiredState ({error.error_count()} problems, "
                                      f"first: {error.errors()[0]['msg']}); is telemetry_url the fleet collector?") from None
        if desired.device_id != self.device_id:
            raise CollectorError(status, f"the collector sent the desired state of {desired.device_id!r} to {self.device_id!r}")
        return desired

    def _apply(self, model: DesiredModel) -> InstallOutcome | None:
        """Bring one model to its desired version; the outcome to report, or None when there was nothing to do."""
        serving = self._serving_version(model.name)
        if serving == model.version:
            return None
        if model.sha256 in self.memory.refused:
            log.debug("%s %s (sha256 %s) was refused before; not trying again", model.name, model.version, model.sha256)
            return None
        retry = self._retries.get(model.sha256)
        if retry is not None and self.clock() < retry.not_before:
            return None
        try:
            outcome = self._activate(model, serving) if self._holds(model) else self._download_and_install(model)
        except (_Stopping, _NotNow):
            return None
        except InstallRefused as refusal:
            log.warning("desired %s %s refused: %s", model.name, model.version, refusal, extra={"sha256": model.sha256})
            self._retries.pop(model.sha256, None)
            self.memory.refuse(model.sha256, f"{model.name} {model.version}: {refusal}")
            return self._outcome(model, "refused", str(refusal), check=refusal.check)
        except (DownloadFailed, UserError, OSError) as error:
            return self._install_failed(model, str(error))
        except Exception as error:  # noqa: BLE001 - a bug in one model's install must not block the others
            log.exception("installing desired %s %s failed", model.name, model.version)
            return self._install_failed(model, f"internal error ({type(error).__name__}: {error}); see the agent's log")
        self._retries.pop(model.sha256, None)
        self._changed(model.name)
        return self._outcome(model, outcome)

    def _install_failed(self, model: DesiredModel, reason: str) -> InstallOutcome | None:
        """Back off from ``model``'s bundle; its ``failed`` outcome, or None when it failed as it did last time.

        A failure that persists would otherwise add an outcome, a row at the collector, at every poll.
        """
        previous = self._retries.get(model.sha256)
        failures = previous.failures + 1 if previous is not None else 1
        delay = min(self.backoff_max_s, self.poll_seconds * 2 ** min(failures - 1, 30))
        self._retries[model.sha256] = _Retry(failures, reason, self.clock() + delay)
        repeated = previous is not None and previous.reason == reason
        log.warning("desired %s %s not installed (%s); trying again in %.3g s%s", model.name, model.version, reason, delay,
                    " (failed as last time: not reported again)" if repeated else "", extra={"sha256": model.sha256})
        return None if repeated else self._outcome(model, "failed", reason)

    def _activate(self, model: DesiredModel, serving: str | None) -> Outcome:
        """Serve a version the device still holds: no download, the repository loads and golden-checks it again."""
        self.repository.activate(model.name, model.version)
        older = serving is not None and version_key(model.version) < version_key(serving)
        log.info("desired state: %s %s %s", "rolled back to" if older else "activated", model.name, model.version)
        return "rolled_back" if older else "installed"

    def _download_and_install(self, model: DesiredModel) -> Outcome:
        bundle = self._download(model)
        self._confirm_still_desired(model)
        try:
            identity = _bundle_identity(bundle)
            if identity is not None and identity != (model.name, model.version):
                raise InstallRefused("desired-state", f"bundle {model.sha256} holds {identity[0]} {identity[1]}, but the "
                                     f"desired state names it {model.name} {model.version}; correct the collector's record")
            self.repository.install(bundle)
        except InstallRefused:
            bundle.unlink(missing_ok=True)  # refused for good: never tried again
            raise
        # Only now: after any other failure (disk, a load error that may pass) the complete, verified file stays, and
        # the next try installs it without downloading it again (_download re-checks its sha256).
        bundle.unlink(missing_ok=True)
        log.info("desired state: installed %s %s", model.name, model.version, extra={"sha256": model.sha256})
        return "installed"

    def _confirm_still_desired(self, model: DesiredModel) -> None:
        """Return when the collector still names ``model``'s bundle; raise _NotNow otherwise, or when it cannot say.

        A download can take long, and a rollout move on (paused, rolled back) meanwhile: installing what stopped being
        desired would serve it until the next poll undoes it.
        """
        try:
            desired = self._fetch_desired()
        except CollectorError as error:
            log.info("cannot confirm that %s %s is still desired (%s); the verified bundle is kept and installed at the "
                     "next poll", model.name, model.version, error, extra={"sha256": model.sha256})
            raise _NotNow() from None
        if any(other.name == model.name and other.sha256 == model.sha256 for other in desired.models):
            return
        self._drop_stale_downloads({other.sha256 for other in desired.models})
        log.info("%s %s stopped being desired during its download; not installed", model.name, model.version,
                 extra={"sha256": model.sha256})
        raise _NotNow()

    def _outcome(self, model: DesiredModel, outcome: Outcome, reason: str = "", check: str | None = None) -> InstallOutcome:
        recorded = InstallOutcome(model=model.name, version=model.version, sha256=model.sha256, outcome=outcome,
                                  check=check[:_MAX_CHECK_CHARS] if check else None, reason=escape_unprintable(reason)[:MAX_REASON_CHARS],
                                  at=self.clock())
        self.stats.outcomes[outcome] += 1
        self.memory.record(recorded)
        return recorded

    def _drop_stale_downloads(self, wanted: set[str]) -> None:
        """Delete parts of bundles no longer desired: only a desired bundle's part is worth resuming."""
        for part in self.downloads_dir.glob("*.part"):
            if part.name.removesuffix(".part") not in wanted:
                part.unlink(missing_ok=True)

    def _changed(self, name: str) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(name)
        except Exception:  # noqa: BLE001 - the install happened; a failing hook must not turn it into a failure
            log.exception("the model-changed hook failed for %s", name)

    # ----------------------------------------------------------------- the repository, as the puller sees it

    def _serving_version(self, name: str) -> str | None:
        try:
            return self.repository.served(name).version
        except ModelNotFound:
            return None

    def _holds(self, model: DesiredModel) -> bool:
        return any(info.name == model.name and info.version == model.version for info in self.repository.index())

    def serving(self) -> dict[str, str]:
        """Every model's serving version now (at most MAX_MODELS, by name)."""
        ready = sorted((info.name, info.version) for info in self.repository.index() if info.state == "READY")
        if len(ready) > MAX_MODELS:
            log.warning("this device serves %d models; the report names the first %d", len(ready), MAX_MODELS)
        return dict(ready[:MAX_MODELS])

    # ----------------------------------------------------------------- the report

    def _report(self) -> int:
        """POST what serves and the oldest pending outcomes that fit; a 2xx acknowledges all that was sent. How many."""
        pending = list(self.memory.pending)
        body, count = self._report_body(pending)
        sent = pending[:count]
        status, answer = self._call("POST", f"/v1/devices/{self.device_id}/reports", body=body,
                                    headers={"Content-Type": "application/json"}, limit=_MAX_ACK_BYTES)
        try:
            ReportAck.model_validate_json(answer)
        except ValidationError:
            log.warning("the collector answered the report with %d but not a ReportAck; taking it as acknowledged", status)
        self.memory.acknowledge(sent)
        return len(sent)

    def _report_body(self, pending: list[InstallOutcome]) -> tuple[bytes, int]:
        """The report with the most of the oldest ``pending`` outcomes under MAX_REPORT_BODY_BYTES, and how many."""
        serving = self.serving()

        def body(count: int) -> bytes:
            return DeviceReport(device_id=self.device_id, serving=serving, outcomes=pending[:count]).model_dump_json().encode()

        whole = body(len(pending))
        if len(whole) <= MAX_REPORT_BODY_BYTES:
            return whole, len(pending)
        fits, too_many = 1, len(pending)  # one outcome always fits (see MAX_REPORT_BODY_BYTES)
        while too_many - fits > 1:
            middle = (fits + too_many) // 2
            if len(body(middle)) <= MAX_REPORT_BODY_BYTES:
                fits = middle
            else:
                too_many = middle
        log.info("the report carries the oldest %d of %d pending outcomes (at most %d bytes); the rest go in the next "
                 "poll's report", fits, len(pending), MAX_REPORT_BODY_BYTES)
        return body(fits), fits

    # ----------------------------------------------------------------- HTTP

    def _call(self, method: str, path: str, *, limit: int, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """Status and body (at most ``limit`` bytes) of the collector's 2xx answer; CollectorError for anything else."""
        response = self._open(method, path, body=body, headers=headers)
        try:
            with response:
                return response.status, response.read(limit)
        except (OSError, http.client.HTTPException) as error:
            raise CollectorError(None, f"the collector's answer to {method} {path} was cut ({_reason(error)})") from None

    def _open(self, method: str, path: str, *, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        """The collector's 2xx response to ``method path`` (close it); CollectorError for anything else."""
        request = urllib.request.Request(self.base_url + path, data=body, method=method,
                                         headers={"Authorization": f"Bearer {self._token}", **(headers or {})})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            raise CollectorError(error.code, _error_detail(error)) from None
        except (OSError, http.client.HTTPException) as error:  # URLError, refused, reset, timeout, a broken answer
            raise CollectorError(None, f"cannot reach the collector at {self.base_url} ({_reason(error)})") from None

    # ----------------------------------------------------------------- downloads

    def _download(self, model: DesiredModel) -> Path:
        """The bundle of ``model``, complete and matching its sha256, under downloads/ (resuming a part left before)."""
        part = self.downloads_dir / f"{model.sha256}.part"
        for _ in range(DOWNLOAD_ATTEMPTS):
            have = part.stat().st_size if part.exists() else 0
            if have > model.size:  # longer than the bundle: not a prefix of it
                part.unlink()
                have = 0
            if have == model.size or not self._receive(model, part, have):
                return _verified(part, model)
        raise DownloadFailed(f"the download of {model.sha256} was cut {DOWNLOAD_ATTEMPTS} times "
                             f"({part.stat().st_size} of {model.size} bytes kept); it resumes at the next try")

    def _receive(self, model: DesiredModel, part: Path, have: int) -> bool:
        """Append the bundle's bytes from ``have`` on to ``part``; whether bytes are still missing (a cut connection)."""
        free = shutil.disk_usage(self.downloads_dir).free
        if free < model.size - have:
            raise DownloadFailed(f"not enough disk for the bundle: {model.size - have} bytes to fetch, {free} free "
                                 f"under {self.downloads_dir}; free space or lower keep_versions")
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            response = self._open("GET", f"/v1/bundles/{model.sha256}", headers=headers)
        except CollectorError as error:
            if error.status == 416 and have:  # the collector has nothing past our part: the hash tells if it is right
                return False
            raise DownloadFailed(f"cannot fetch bundle {model.sha256}: {error}") from None
        with response:
            start = _start_of(response, have)
            if start == 0 and have:
                log.info("the collector sent %s whole instead of resuming at byte %d; starting over", model.sha256, have)
            return self._stream(response, part, start, model)

    def _stream(self, response: http.client.HTTPResponse, part: Path, start: int, model: DesiredModel) -> bool:
        """Write the response body to ``part`` from ``start``, in chunks, never past ``model.size``."""
        received = start
        with part.open("r+b" if start else "wb") as handle:
            handle.truncate(start)
            handle.seek(start)
            while True:
                if self._stopping.is_set():
                    raise _Stopping()
                try:
                    chunk = response.read(DOWNLOAD_CHUNK)
                except (OSError, http.client.HTTPException) as error:
                    log.info("download of %s cut at byte %d (%s)", model.sha256, received, _reason(error))
                    break
                if not chunk:
                    break
                received += len(chunk)
                if received > model.size:
                    handle.close()
                    part.unlink(missing_ok=True)
                    raise DownloadFailed(f"the collector sent more than the {model.size} bytes the desired state "
                                         f"announces for bundle {model.sha256}; discarded")
                handle.write(chunk)
        if received == start:
            raise DownloadFailed(f"the collector sent no bytes of bundle {model.sha256} past byte {start}")
        return received < model.size

    # ----------------------------------------------------------------- metrics

    def metric_lines(self) -> list[str]:
        """``edgekit_desired_*`` counters for /metrics."""
        from device_agent.metrics import metric_family, metric_labels

        stats = self.stats
        outcomes = [(metric_labels(outcome=outcome), count) for outcome, count in sorted(stats.outcomes.items())]
        lines: list[str] = []
        lines += metric_family("edgekit_desired_polls_total", "counter", "Desired-state polls (since the agent started)", [("", stats.polls)])
        lines += metric_family("edgekit_desired_poll_failures_total", "counter",
                         "Desired-state polls that failed: collector unreachable, token refused, bad answer", [("", stats.failures)])
        lines += metric_family("edgekit_desired_installs_total", "counter",
                         "What the device did with each desired bundle it acted on, by outcome", outcomes)
        lines += metric_family("edgekit_desired_pending_outcomes", "gauge",
                         "Install outcomes not yet acknowledged by the collector", [("", len(self.memory.pending))])
        return lines


# --------------------------------------------------------------------------- helpers


def _start_of(response: http.client.HTTPResponse, have: int) -> int:
    """Where the response's body starts in the bundle: ``have`` for a 206 resuming there, 0 for a whole 200."""
    if response.status != 206:
        return 0
    content_range = response.headers.get("Content-Range", "")
    if not content_range.startswith(f"bytes {have}-"):
        raise DownloadFailed(f"asked for bytes {have}- the collector answered Content-Range {content_range!r}; "
                             "trying again later")
    return have


def _verified(part: Path, model: DesiredModel) -> Path:
    """``part`` when its size and sha256 are the desired state's; otherwise it is deleted and DownloadFailed raised."""
    digest, size = sha256_file(part, DOWNLOAD_CHUNK)
    if size == model.size and digest == model.sha256:
        return part
    part.unlink(missing_ok=True)
    raise DownloadFailed(f"the downloaded bundle ({size} bytes, sha256 {digest}) does not match the desired "
                         f"state ({model.size} bytes, sha256 {model.sha256}); deleted, fetched again at the next try")


def _bundle_identity(bundle: Path) -> tuple[str, str] | None:
    """The model name and version in the bundle's manifest, read without unpacking anything; None when the bundle
    cannot be read (the install then says what is wrong with it)."""
    try:
        manifest, _names = read_manifest_unverified(bundle)
    except BundleError:
        return None
    return manifest.model.name, manifest.model.version


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return str(reason if reason is not None else error) or type(error).__name__


def _error_detail(error: urllib.error.HTTPError) -> str:
    detail = error.read(_MAX_ERROR_BODY).decode("utf-8", "replace")
    try:
        detail = json.loads(detail).get("error", detail)
    except (ValueError, AttributeError):
        pass
    return str(detail)
