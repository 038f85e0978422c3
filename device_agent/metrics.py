"""The agent's counters, written in the Prometheus text format under Triton's metric names.

Existing dashboards scrape Triton's names (``nv_inference_*`` with labels
``model`` and ``version``), so the agent uses them; what Triton has no name for
is prefixed ``edgekit_``. The format is simple enough to write by hand, which
keeps prometheus_client off the device.

Counters are only touched from the server's event loop, so they need no lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from device_agent.batching import BatchStats


@dataclass
class RequestStats:
    """What the server measures around each inference request (the batcher measures the rest)."""

    success: int = 0
    failure: int = 0
    request_duration_us: int = 0
    compute_input_duration_us: int = 0  # decoding the request's tensors
    compute_output_duration_us: int = 0  # encoding the response's tensors


@dataclass
class ModelStats:
    requests: RequestStats = field(default_factory=RequestStats)
    batches: BatchStats = field(default_factory=BatchStats)


INSTALL_RESULTS = ("success", "refused", "error")

_Getter = Callable[[ModelStats], int]

# (name, type, help, value): one line per model version each.
_PER_MODEL: list[tuple[str, str, str, _Getter]] = [
    ("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes", lambda s: s.requests.success),
    ("nv_inference_request_failure", "counter", "Number of failed inference requests, all batch sizes", lambda s: s.requests.failure),
    ("nv_inference_count", "counter", "Number of inferences performed (a batch of n counts n)", lambda s: s.batches.inference_count),
    ("nv_inference_exec_count", "counter", "Number of model executions performed (a batch counts once)", lambda s: s.batches.exec_count),
    ("nv_inference_request_duration_us", "counter", "Cumulative inference request duration in microseconds", lambda s: s.requests.request_duration_us),
    ("nv_inference_queue_duration_us", "counter", "Cumulative inference queuing duration in microseconds", lambda s: s.batches.queue_duration_us),
    ("nv_inference_compute_input_duration_us", "counter", "Cumulative compute input duration in microseconds", lambda s: s.requests.compute_input_duration_us),
    ("nv_inference_compute_infer_duration_us", "counter", "Cumulative compute inference duration in microseconds", lambda s: s.batches.compute_infer_duration_us),
    ("nv_inference_compute_output_duration_us", "counter", "Cumulative inference compute output duration in microseconds", lambda s: s.requests.compute_output_duration_us),
    ("nv_inference_pending_request_count", "gauge", "Instantaneous number of pending requests awaiting execution", lambda s: s.batches.pending),
]


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metric_labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{_label_value(value)}"' for key, value in labels.items()) + "}"


def metric_family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, int | float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines.extend(f"{name}{labels} {value}" for labels, value in samples)
    return lines


class Metrics:
    """All of the agent's counters, by model version."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], ModelStats] = {}
        # Every result starts at 0, so a rate() over the first failure sees it.
        self.installs: Counter[str] = Counter({result: 0 for result in INSTALL_RESULTS})
        self.rollbacks = 0
        # Inference requests refused for the client's mistake (4xx), by status: never counted as model failures.
        self.refused: Counter[int] = Counter()

    def for_model(self, name: str, version: str) -> ModelStats:
        return self._models.setdefault((name, version), ModelStats())

    def render(self, active_versions: Iterable[tuple[str, str]]) -> str:
        """The Prometheus text exposition of every counter; ``active_versions`` are (model, version) pairs."""
        models = sorted(self._models.items())
        lines: list[str] = []
        for name, kind, help_text, value in _PER_MODEL:
            samples = [(metric_labels(model=model, version=version), value(stats)) for (model, version), stats in models]
            lines += metric_family(name, kind, help_text, samples)
        active = [(metric_labels(model=model, version=version), 1) for model, version in sorted(active_versions)]
        lines += metric_family("edgekit_active_version_info", "gauge", "The version each model serves (always 1)", active)
        installs = [(metric_labels(result=result), count) for result, count in sorted(self.installs.items())]
        lines += metric_family("edgekit_installs_total", "counter", "Bundle installs through the admin API, by result", installs)
        lines += metric_family("edgekit_rollbacks_total", "counter", "Rollbacks through the admin API", [("", self.rollbacks)])
        refused = [(metric_labels(code=str(code)), count) for code, count in sorted(self.refused.items())]
        lines += metric_family("edgekit_inference_refused_total", "counter",
                         "Inference requests refused as the client's mistake (4xx), by status code", refused)
        return "\n".join(lines) + "\n"
