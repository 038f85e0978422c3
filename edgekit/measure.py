"""The one place where edgekit computes numbers: task metrics, fidelity, latency, throughput, size.

Build gates, reports and benchmarks all call these functions, so a number means
the same thing wherever it appears.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ClassificationMetrics:
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    def to_dict(self) -> dict:
        return asdict(self)


def classification_metrics(true: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> ClassificationMetrics:
    """Accuracy, macro and per-class precision/recall/F1, and the confusion matrix (a class never predicted scores 0)."""
    true_array, predicted_array = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if true_array.shape != predicted_array.shape or true_array.size == 0:
        raise ValueError(f"need equal, non-empty label arrays; got {true_array.shape} and {predicted_array.shape}")
    count = len(labels)
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (true_array, predicted_array), 1)
    per_class = {}
    for index, label in enumerate(labels):
        hits = confusion[index, index]
        predicted_total, true_total = confusion[:, index].sum(), confusion[index, :].sum()
        precision = hits / predicted_total if predicted_total else 0.0
        recall = hits / true_total if true_total else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(true_total)}
    present = [label for label in labels if per_class[label]["support"] > 0]
    return ClassificationMetrics(
        accuracy=float(np.mean(true_array == predicted_array)),
        precision_macro=float(np.mean([per_class[label]["precision"] for label in present])),
        recall_macro=float(np.mean([per_class[label]["recall"] for label in present])),
        f1_macro=float(np.mean([per_class[label]["f1"] for label in present])),
        per_class=per_class,
        confusion=confusion.tolist(),
    )


def average_precision(true: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the precision-recall curve of the positive class (label 1) by average precision: the mean of the
    precision at each positive's rank, ties broken pessimistically. For imbalanced binary tasks (fraud, faults), where
    accuracy says little."""
    true_array, score_array = np.asarray(true, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    positives = int(true_array.sum())
    if true_array.shape != score_array.shape or positives == 0:
        raise ValueError("need one score per row and at least one positive row")
    # Negatives before positives among equal scores: a tie never flatters the model.
    order = np.lexsort((true_array, -score_array))
    hits = np.cumsum(true_array[order])
    ranks = np.arange(1, len(order) + 1)
    return float(np.sum((hits / ranks)[true_array[order] == 1]) / positives)


def rare_class_pr_auc(labels: np.ndarray, probabilities: np.ndarray, names: Sequence[str]) -> tuple[float | None, str | None]:
    """Two classes: the average precision of the rarer one in ``labels`` (the second on a tie: fraud, faults and
    anomalies are the rare ones) from its column of ``probabilities`` ``[n, 2]``, and its name; (None, None) when it
    has no row."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=2)
    positive = 0 if counts[0] < counts[1] else 1
    if counts[positive] == 0:
        return None, None
    return average_precision((labels == positive).astype(np.int64), np.asarray(probabilities)[:, positive]), names[positive]


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate model's outputs follow its float reference."""

    top1_agreement: float
    max_abs_error: float
    mean_abs_error: float
    flips: int  # rows whose top-1 class differs from the reference's
    top1_agreement_lower_95: float  # one-sided 95% Wilson lower bound of the agreement

    def to_dict(self) -> dict:
        return asdict(self)


Z_TWO_SIDED_95 = 1.96
Z_ONE_SIDED_95 = 1.6449


def wilson_lower_bound(successes: int, trials: int, z: float = Z_ONE_SIDED_95) -> float:
    """The Wilson score interval's lower end for a proportion: unlike the normal approximation, sound near 100%.

    At 400 rows and no flips it is 0.9933 (z 1.645); one flip lowers it to 0.9888.
    """
    if trials == 0:
        return float("nan")
    p, n = successes / trials, trials
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def predicted_pass_probability(flips: int, rows: int, future_rows: int, min_agreement: float) -> float:
    """The probability that ``future_rows`` new rows agree at least ``min_agreement`` of the time, having seen
    ``flips`` in ``rows``: the flip rate's Jeffreys posterior Beta(flips + 1/2, rows - flips + 1/2) and the
    beta-binomial count of flips it predicts, summed up to the most the budget allows."""
    if rows <= 0 or future_rows <= 0:
        return float("nan")
    a, b = flips + 0.5, rows - flips + 0.5
    allowed = math.floor(future_rows * (1 - min_agreement) + 1e-9)

    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    total = sum(math.exp(math.lgamma(future_rows + 1) - math.lgamma(f + 1) - math.lgamma(future_rows - f + 1)
                         + log_beta(f + a, future_rows - f + b) - log_beta(a, b)) for f in range(allowed + 1))
    return min(1.0, total)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    """Compare logits of shape [n, classes] (or any matching shapes: agreement then uses the last axis)."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"outputs differ in shape: {reference.shape} vs {candidate.shape}")
    error = np.abs(reference - candidate)
    mean_error = float(error.mean()) if error.size else 0.0
    if reference.ndim < 2:
        return Fidelity(float("nan"), float(error.max(initial=0.0)), mean_error, 0, float("nan"))
    same = reference.argmax(-1) == candidate.argmax(-1)
    agreement = float(np.mean(same))
    return Fidelity(agreement, float(error.max(initial=0.0)), mean_error, int(same.size - same.sum()),
                    wilson_lower_bound(int(same.sum()), int(same.size)))


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    samples: int


def latency(call: Callable[[], object], *, iterations: int = 100, warmup: int = 10) -> Latency:
    """Wall-clock latency of ``call`` (p50, p95) after a warm-up."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return Latency(statistics.median(samples), samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))], len(samples))


def latency_rounds(calls: dict[str, Callable[[], object]], *, rounds: int = 3, iterations: int = 30, warmup: int = 5) -> dict[str, Latency]:
    """Latency of several calls measured in alternating rounds: the median of each call's per-round p50 and p95.

    Timing on shared hosts drifts by tens of percent within a minute; measuring
    every call in every round makes a before/after comparison see the same drift.
    """
    per_round: dict[str, list[Latency]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            per_round[name].append(latency(call, iterations=iterations, warmup=warmup))
    return {
        name: Latency(statistics.median(r.p50_ms for r in results), statistics.median(r.p95_ms for r in results), sum(r.samples for r in results))
        for name, results in per_round.items()
    }


def throughput(call: Callable[[], object], items_per_call: int, *, seconds: float = 2.0, warmup: int = 3) -> float:
    """Items per second when ``call`` (processing ``items_per_call`` items) runs back to back for ``seconds``."""
    for _ in range(warmup):
        call()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls == 0:
        call()
        calls += 1
    return calls * items_per_call / elapsed


def size_mb(*paths: Path) -> float:
    """Size on disk in MB (10^6 bytes) of files and folders."""
    total = 0
    for path in paths:
        total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return total / 1e6


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mcnemar_p_value(champion_only: int, challenger_only: int) -> float:
    """McNemar's exact test, two-sided: under "neither is better" each discordant row is a fair coin.

    ``champion_only``: rows only the champion gets right (b); ``challenger_only``: rows only the challenger gets right
    (c). p = min(1, 2 · P(X ≤ min(b, c))) with X ~ Binomial(b + c, ½); 1 when there is no discordant row. Summed in log
    space, so a slice of a million rows neither overflows nor underflows to a wrong answer.
    """
    if champion_only < 0 or challenger_only < 0:
        raise ValueError(f"discordant counts must be non-negative, got {champion_only} and {challenger_only}")
    trials, fewer = champion_only + challenger_only, min(champion_only, challenger_only)
    if trials == 0:
        return 1.0
    log_terms = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) - trials * math.log(2)
                 for k in range(fewer + 1)]
    top = max(log_terms)
    log_tail = top + math.log(math.fsum(math.exp(term - top) for term in log_terms))
    return min(1.0, 2 * math.exp(log_tail))


def paired_accuracy_gain_interval(champion_only: int, challenger_only: int, rows: int,
                                  z: float = Z_TWO_SIDED_95) -> tuple[float, float]:
    """The 95% (Wald) interval of challenger accuracy minus champion accuracy for paired predictions on ``rows`` rows."""
    gain = (challenger_only - champion_only) / rows
    spread = z * math.sqrt(max(0.0, (champion_only + challenger_only) / rows - gain * gain) / rows)
    return max(-1.0, gain - spread), min(1.0, gain + spread)


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given: the k-th smallest (k from 0, of m) times m − k, made
    non-decreasing in that order, at most 1. An adjusted p below alpha is exactly a rejection by Holm's step-down
    procedure at alpha, which keeps the chance of any false claim over the m slices at most alpha."""
    count = len(p_values)
    adjusted = [1.0] * count
    running = 0.0
    for rank, index in enumerate(sorted(range(count), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (count - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted
