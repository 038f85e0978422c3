"""edgekit federated: partitions, client-side privacy, admission of sites, Flower's rounds with a site that drops, and
`edgekit federated simulate` from a tiny BERT to a signed bundle a device verifies.

The rounds run Flower's own server loop (flwr.server.Server with FedAvg / FedProx) over in-process proxies; the gRPC
transport between real processes is tests/e2e/test_federated_loopback.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.config import DEMO_DATA, BuildConfig, PrivacySection, load_build_config
from edgekit.errors import EdgekitError
from edgekit.federated.partition import parse_partition, partition_rows
from edgekit.federated.privacy import epsilon, privatise

runner = CliRunner()


# ---------------------------------------------------------------------- head calibration


def _gaussian_classes(rows_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes of 6-dimensional points around well-separated means, with a shared, correlated covariance (the
    same classes for every seed; the seed draws the points)."""
    classes = np.random.default_rng(0)
    means, mixing = classes.normal(0, 3, size=(4, 6)), classes.normal(0, 1, size=(6, 6))
    labels = np.repeat(np.arange(4), rows_per_class)
    return means[labels] + np.random.default_rng(seed).normal(size=(len(labels), 6)) @ mixing, labels


def _statistics(x: np.ndarray, labels: np.ndarray, classes: int) -> list[np.ndarray]:
    sums = np.zeros((classes, x.shape[1]))
    np.add.at(sums, labels, x)
    return [np.bincount(labels, minlength=classes).astype(float), sums, x.T @ x]


def test_a_head_from_statistics_summed_over_skewed_sites_is_the_head_of_all_rows_together():
    from edgekit.federated.calibration import discriminant_head

    x, labels = _gaussian_classes(200, seed=1)
    # Label skew: each site holds mostly one or two classes; its statistics alone would know nothing of the others.
    sites = [np.flatnonzero(labels <= 1), np.flatnonzero(labels == 2), np.flatnonzero(labels == 3)]
    summed = [sum(parts) for parts in zip(*(_statistics(x[rows], labels[rows], 4) for rows in sites))]
    together = discriminant_head(*_statistics(x, labels, 4), shrinkage=0.01)
    federated = discriminant_head(*summed, shrinkage=0.01)
    np.testing.assert_allclose(federated.weight, together.weight, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(federated.bias, together.bias, rtol=1e-6, atol=1e-9)
    held_out, truth = _gaussian_classes(100, seed=2)
    assert np.mean(federated.logits(held_out).argmax(-1) == truth) > 0.95


def test_the_head_is_lda_with_the_pooled_within_class_covariance_of_the_raw_rows():
    from edgekit.federated.calibration import discriminant_head

    x, labels = _gaussian_classes(40, seed=4)
    means = np.stack([x[labels == c].mean(0) for c in range(4)])
    centred = x - means[labels]
    covariance = centred.T @ centred / (len(x) - 4)
    covariance = 0.8 * covariance + 0.2 * np.trace(covariance) / 6 * np.eye(6)
    weight = np.linalg.solve(covariance, means.T).T
    bias = -0.5 * np.einsum("cd,cd->c", weight, means) + np.log(np.bincount(labels) / len(labels))
    head = discriminant_head(*_statistics(x, labels, 4), shrinkage=0.2)
    # Up to what moves every logit alike (the common part taken out of the rows and the biases): the same softmax.
    reference = x @ weight.T + bias
    got = head.logits(x)
    np.testing.assert_allclose(got - got.mean(1, keepdims=True), reference - reference.mean(1, keepdims=True), rtol=1e-7, atol=1e-7)
    assert np.abs(head.weight.mean(0)).max() < 1e-9, "the common part is out of the weights"


def test_a_class_no_site_holds_never_wins_and_bad_replies_are_named():
    from edgekit.federated.calibration import check_statistics, discriminant_head

    x, labels = _gaussian_classes(50, seed=3)
    seen = labels != 2
    head = discriminant_head(*_statistics(x[seen], labels[seen], 4), shrinkage=0.05)
    assert 2 not in set(head.logits(x).argmax(-1).tolist())
    assert check_statistics(_statistics(x, labels, 4), 4, 6, len(x)) is None
    assert "not per-class statistics" in check_statistics([np.zeros((4, 6))], 4, 6, len(x))
    broken = _statistics(x, labels, 4)
    broken[2][0, 0] = np.nan
    assert "not finite" in check_statistics(broken, 4, 6, len(x))
    assert "not whole numbers within its" in check_statistics(_statistics(x, labels, 4), 4, 6, len(x) - 1)


# ---------------------------------------------------------------------- partitions


def _labels(per_class: int = 60, classes: int = 6) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)


def _skew(parts, labels: np.ndarray, classes: int) -> float:
    """Mean over sites of the largest class's share of the site's rows (1/classes: balanced; 1: one class)."""
    return float(np.mean([np.bincount(labels[p.rows], minlength=classes).max() / len(p.rows) for p in parts]))


def test_iid_deals_every_row_once_in_near_equal_parts():
    labels = _labels()
    parts = partition_rows(parse_partition("iid"), labels, 4, seed=0)
    rows = np.concatenate([p.rows for p in parts])
    assert sorted(rows.tolist()) == list(range(len(labels)))
    assert max(len(p.rows) for p in parts) - min(len(p.rows) for p in parts) <= 1
    assert _skew(parts, labels, 6) < 0.35


def test_a_small_dirichlet_alpha_skews_labels_more_and_every_site_keeps_rows():
    labels = _labels()
    skewed = partition_rows(parse_partition("dirichlet:0.1"), labels, 3, seed=0)
    mild = partition_rows(parse_partition("dirichlet:100"), labels, 3, seed=0)
    for parts in (skewed, mild):
        assert sorted(np.concatenate([p.rows for p in parts]).tolist()) == list(range(len(labels)))
        assert all(len(p.rows) >= 1 for p in parts)
    assert _skew(skewed, labels, 6) > 0.5 > _skew(mild, labels, 6)
    again = partition_rows(parse_partition("dirichlet:0.1"), labels, 3, seed=0)
    assert [p.rows.tolist() for p in again] == [p.rows.tolist() for p in skewed], "seeded: the same split every run"


def test_by_column_makes_one_site_per_value_and_names_the_count_it_needs():
    labels = _labels(per_class=4, classes=2)
    values = ["north", "south"] * 4
    parts = partition_rows(parse_partition("by-column:region"), labels, 2, seed=0, column_values=values)
    assert [p.name for p in parts] == ["north", "south"]
    with pytest.raises(EdgekitError, match="pass --clients 2"):
        partition_rows(parse_partition("by-column:region"), labels, 3, seed=0, column_values=values)


def test_by_column_reads_each_training_rows_value_from_the_data_file(tmp_path):
    from edgekit.federated.partition import column_values

    path = tmp_path / "rows.csv"
    path.write_text("text,label,region\nfirst text,1.0,north\nsecond text,2,south\nthird text,1,north\n")
    assert column_values(path, "text", "label", "region", ("third text", "first text", "second text"), ("1", "1", "2")) == [
        "north", "north", "south"]
    with pytest.raises(EdgekitError, match="has no column 'site'"):
        column_values(path, "text", "label", "site", ("first text",), ("1",))


@pytest.mark.parametrize("text", ["iid", "dirichlet:0.5", "by-column:region"])
def test_a_partition_reads_back_as_written(text):
    assert str(parse_partition(text)) == text


@pytest.mark.parametrize("text, message", [("dirichlet:0", "above 0"), ("dirichlet:x", "above 0"), ("random", "unknown --partition")])
def test_a_bad_partition_says_what_is_accepted(text, message):
    with pytest.raises(EdgekitError, match=message):
        parse_partition(text)


def test_local_rates_decay_across_rounds_as_the_schedule_says_and_hold_within_one():
    from edgekit.federated.site import round_rate

    assert [round_rate("linear", r, 3) for r in (1, 2, 3)] == pytest.approx([1, 2 / 3, 1 / 3])
    assert [round_rate("cosine", r, 2) for r in (1, 2)] == pytest.approx([1, 0.5])
    assert {round_rate("constant", r, 3) for r in (1, 2, 3)} == {1.0}


# ---------------------------------------------------------------------- privacy


def test_an_update_leaves_a_site_clipped_to_the_norm_and_noised():
    rng = np.random.default_rng(0)
    start = [np.zeros((20, 10), np.float32), np.zeros(7, np.float32)]
    trained = [np.full((20, 10), 3.0, np.float32), np.full(7, -3.0, np.float32)]
    quiet = PrivacySection(enabled=True, clipping_norm=0.5, noise_multiplier=1e-6)
    arrays, clipped = privatise(start, trained, quiet, rng)
    assert clipped
    norm = np.sqrt(sum(float(np.sum((a - s) ** 2)) for a, s in zip(arrays, start)))
    assert norm == pytest.approx(0.5, rel=1e-3)
    noisy, _ = privatise(start, trained, PrivacySection(enabled=True, clipping_norm=0.5, noise_multiplier=2.0), rng)
    assert np.std(noisy[0] - arrays[0]) == pytest.approx(1.0, rel=0.2), "noise std = noise_multiplier x clipping_norm"


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert epsilon(3, 1.0, 1e-5) < epsilon(10, 1.0, 1e-5)
    assert epsilon(3, 4.0, 1e-5) < epsilon(3, 1.0, 1e-5)
    # one Gaussian release at noise 4 x C with sensitivity 2C: min over alpha of alpha/8 + ln(1e5)/(alpha - 1) = 2.52
    # (sensitivity C would give 1.23)
    assert epsilon(1, 4.0, 1e-5) == pytest.approx(2.52, abs=0.01)


# ---------------------------------------------------------------------- sites and rounds on a tiny BERT


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tests.support.tiny_bert import tiny_hf_folder

    return tiny_hf_folder(tmp_path_factory.mktemp("federated-model") / "tiny")


def demo_subset(path: Path, rows: int, *, offset: int = 0, labels: tuple[str, ...] | None = None, split: bool = False) -> Path:
    """``rows`` spread over the embedded demo data (optionally only some labels), as JSONL; without a split column unless
    asked."""
    chosen = []
    lines = DEMO_DATA.read_text().splitlines()
    step = max(1, len(lines) // (rows * (8 // len(labels) if labels else 1)))  # the file is sorted by label: stride over it
    for line in lines[offset::step]:
        row = json.loads(line)
        if labels is None or row["label"] in labels:
            chosen.append({"text": row["text"], "label": row["label"], **({"split": row["split"]} if split and "split" in row else {})})
        if len(chosen) == rows:
            break
    path.write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return path


def federated_config(root: Path, model: Path, data: Path, **federated) -> Path:
    from tests.support.builds import relaxed_target

    target = relaxed_target(root, "x86-64-cpu", max_accuracy_drop_points=100.0, min_top1_agreement=0.0)
    document = {
        "model": {"source": str(model), "name": "tiny-federated", "version": "1.0.0"},
        "task": {"max_length": 32},
        "data": {"path": str(data), "calibration_path": None},
        "finetune": {"lora_r": 4, "lora_alpha": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3, "batch_size": 32},
        "federated": {"rounds": 2, "join_timeout_s": 5, **federated},
        "quantization": {"time_limit_s": 20, "evaluation_samples": 60},
        "evaluation": {"latency_iterations": 5, "throughput_seconds": 0.2},
        "targets": [str(target)],
    }
    path = root / "federated.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class _Silent:
    """A progress display that shows nothing (the training loop adds and removes its bars)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass

    def remove_task(self, *args, **kwargs):
        pass


def _federation(config: BuildConfig, sites: int, *, adapter=None, partition: str = "iid"):
    from edgekit.federated.coordinator import Coordinator
    from edgekit.federated.site import AdapterModel, Site, SiteIdentity, base_model
    from edgekit.tasks import load_task_data

    base = base_model(config)
    data = load_task_data(config)
    shared = adapter or AdapterModel(base, data.labels, config)
    messages: list[str] = []
    coordinator = Coordinator(config, base, data.labels, data.val, sites_expected=sites, say=messages.append, adapter=shared)
    parts = partition_rows(parse_partition(partition), data.train.labels, sites, seed=0)
    made = [Site(SiteIdentity(f"site-{i}"), base, tuple(data.train.texts[r] for r in p.rows),
                 tuple(data.labels[data.train.labels[r]] for r in p.rows), config, _Silent(), adapter=shared)
            for i, p in enumerate(parts)]
    return coordinator, made, messages


class _DropsAfter:
    """A site's Flower client that trains ``rounds`` rounds, then fails (``times`` times) as a site whose connection
    broke would."""

    def __init__(self, client, rounds: int, times: int = 10**6) -> None:
        self.client, self.rounds, self.times, self.fits, self.sent = client, rounds, times, 0, []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def fit(self, ins):
        self.fits += 1
        if self.rounds < self.fits <= self.rounds + self.times:
            raise ConnectionError("the site went away mid-round")
        result = self.client.fit(ins)
        self.sent.append(dict(result.metrics))
        return result


def test_a_site_that_drops_is_left_out_when_min_fit_clients_allows(tmp_path, tiny_model):
    from edgekit.federated.coordinator import InProcessSite, SiteRegistry

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 300),
                                                rounds=3, min_fit_clients=2))
    coordinator, sites, messages = _federation(config, 3)
    registry = SiteRegistry(coordinator)
    for index, site in enumerate(sites):
        client = site.client() if index else _DropsAfter(site.client(), 1)
        registry.register(InProcessSite(site.identity.name, client))
    coordinator.run(registry, 3, max_workers=1)
    report = coordinator.report("iid")
    rounds = report["per_round"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[1]["dropped"] == [] and len(rounds[1]["sites"]) == 3
    assert rounds[2]["dropped"] == ["site-0"] and sorted(rounds[2]["sites"]) == ["site-1", "site-2"]
    assert rounds[3]["accuracy"] > rounds[0]["accuracy"]
    # The dropped site is gone for the head's statistics too: the two others are enough (min_fit_clients 2).
    calibrated = report["head_calibration"]
    # Each site's classes of fewer than 10 rows stay home (a class sum over a few rows would nearly give them away).
    counted = sum(n for site in sites[1:] for n in site.label_counts.values() if n >= 10)
    assert calibrated["sites"] == ["site-1", "site-2"] and calibrated["rows"] == counted < sum(len(s.texts) for s in sites[1:])
    assert calibrated["val_accuracy_before"] == pytest.approx(rounds[3]["accuracy"], abs=1e-4)
    # The model now holds the head the record names, as the validation rows score it.
    accuracy, _ = coordinator.adapter.accuracy_and_loss(coordinator.validation)
    kept = calibrated["val_accuracy_after"] if calibrated["applied"] else calibrated["val_accuracy_before"]
    assert accuracy == pytest.approx(kept, abs=1.5 / len(coordinator.validation)), calibrated
    assert any(item.startswith("after the last round (head calibration") for item in report["left_each_site"])


class _WithoutProperty:
    """A site's client from an older version: its properties lack ``dropped``."""

    def __init__(self, client, dropped: str) -> None:
        self.client, self.dropped = client, dropped

    def __getattr__(self, name):
        return getattr(self.client, name)

    def get_properties(self, ins):
        answer = self.client.get_properties(ins)
        answer.properties.pop(self.dropped, None)
        return answer


class _FromBeforeCalibration(_WithoutProperty):
    """A site's client from before head calibration: its properties do not offer statistics, and it would take a
    statistics request as a round of training."""

    def __init__(self, client) -> None:
        from edgekit.federated.site import HEAD_STATISTICS

        super().__init__(client, HEAD_STATISTICS)

    def fit(self, ins):
        from flwr.common import FitIns

        return self.client.fit(FitIns(ins.parameters, {k: v for k, v in ins.config.items() if k != "phase"}))


def test_sites_that_cannot_send_statistics_are_not_asked_and_fedavgs_head_stays(tmp_path, tiny_model):
    from edgekit.federated.coordinator import InProcessSite, SiteRegistry

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 200), rounds=1))
    coordinator, sites, messages = _federation(config, 2)
    registry = SiteRegistry(coordinator)
    for site in sites:
        registry.register(InProcessSite(site.identity.name, _FromBeforeCalibration(site.client())))
    coordinator.run(registry, 1, max_workers=1)
    before = coordinator.adapter.arrays()
    calibrated = coordinator.report("iid")["head_calibration"]
    assert not calibrated["applied"] and calibrated["reason"].startswith("0 of the 2 sites needed are connected and allowed")
    assert all(site.rounds_done == 1 for site in sites), "nobody trained an extra round"
    assert any(m.startswith("head calibration: skipped") for m in messages)
    assert all(np.array_equal(a, b) for a, b in zip(before, coordinator.adapter.arrays()))


def test_a_site_whose_own_config_forbids_statistics_refuses_when_asked(tmp_path, tiny_model):
    from flwr.common import Code, FitIns, ndarrays_to_parameters

    from edgekit.federated.calibration import PHASE

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 100), rounds=1,
                                                head_calibration=False))
    _, (site, *_), _ = _federation(config, 2)
    assert not site.sends_head_statistics()
    answer = site.client().fit(FitIns(ndarrays_to_parameters(site.adapter.arrays()), {"phase": PHASE}))
    assert answer.status.code == Code.FIT_NOT_IMPLEMENTED and "does not let it send head statistics" in answer.status.message


def test_the_refitted_head_ships_in_the_merged_model(tmp_path, tiny_model):
    """FedAvg's head spoiled on purpose: the statistics' head wins on validation, and the saved model computes it."""
    import torch

    from edgekit.federated.calibration import classifier_layer, current_head, features
    from edgekit.federated.coordinator import InProcessSite, SiteRegistry
    from edgekit.tasks.text_models import load_classifier

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 400), rounds=1))
    coordinator, sites, _ = _federation(config, 2)
    registry = SiteRegistry(coordinator)
    for site in sites:
        registry.register(InProcessSite(site.identity.name, site.client()))
    coordinator.run(registry, 1, max_workers=1)  # calibrates too: undone below, to calibrate a spoiled head
    with torch.no_grad():
        classifier_layer(coordinator.adapter).weight.zero_()
        classifier_layer(coordinator.adapter).bias.copy_(torch.arange(len(coordinator.labels), dtype=torch.float32))
    coordinator.calibrate_head(registry, 1)
    calibrated = coordinator.calibration
    assert calibrated["applied"] and calibrated["val_accuracy_after"] > calibrated["val_accuracy_before"], calibrated
    assert calibrated["temperature"] > 0 and calibrated["min_class_rows"] == 10
    validation = coordinator.validation
    expected = current_head(coordinator.adapter).logits(features(coordinator.adapter, validation))
    folder = coordinator.adapter.save_merged(tmp_path / "merged")
    from edgekit import training
    from edgekit.tasks.text_classification import TASK

    saved = training.predict(load_classifier(folder), TASK.torch_batches(coordinator.adapter.spec, validation), TASK.forward)
    np.testing.assert_allclose(saved, expected, atol=1e-3, rtol=1e-3)
    assert np.mean(saved.argmax(-1) == validation.labels) == pytest.approx(calibrated["val_accuracy_after"], abs=1.5 / len(validation))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_features_are_what_the_head_reads(tmp_path, tiny_model, pooling):
    from edgekit import training
    from edgekit.federated.calibration import current_head, features
    from edgekit.tasks.text_classification import TASK

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 100), rounds=1))
    config = config.model_copy(update={"head": config.head.model_copy(update={"pooling": pooling})})
    _, (site, *_), _ = _federation(config, 2)
    assert site.adapter.base.pooling == pooling
    rows = site.rows().head(20)
    logits = training.predict(site.adapter.model, TASK.torch_batches(site.adapter.spec, rows), TASK.forward)
    np.testing.assert_allclose(current_head(site.adapter).logits(features(site.adapter, rows)), logits, atol=1e-4, rtol=1e-4)




def test_a_round_short_of_min_fit_clients_waits_for_sites_then_fails_clearly(tmp_path, tiny_model):
    from edgekit.federated.coordinator import FederationError, InProcessSite, SiteRegistry

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 300),
                                                rounds=2, join_timeout_s=2))
    coordinator, sites, messages = _federation(config, 2)
    registry = SiteRegistry(coordinator)
    dropping = InProcessSite("site-0", _DropsAfter(sites[0].client(), 1))
    registry.register(dropping)
    registry.register(InProcessSite("site-1", sites[1].client()))
    original_fit = dropping.fit

    def fit_and_leave(ins, timeout, group_id):  # the site's connection closes as it fails, as gRPC's does
        try:
            return original_fit(ins, timeout, group_id)
        except ConnectionError:
            registry.unregister(dropping)
            raise

    dropping.fit = fit_and_leave
    with pytest.raises(FederationError, match=r"1 of the 2 sites a round needs are connected after waiting 2 s"):
        coordinator.run(registry, 2, max_workers=1)
    assert any("waiting up to 2 s for sites to rejoin" in m for m in messages)


def test_a_round_that_came_back_short_runs_again_when_the_site_is_back(tmp_path, tiny_model):
    from edgekit.federated.coordinator import InProcessSite, SiteRegistry

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 300), rounds=2))
    coordinator, sites, messages = _federation(config, 2)
    registry = SiteRegistry(coordinator)
    registry.register(InProcessSite("site-0", _DropsAfter(sites[0].client(), 1, times=1)))
    registry.register(InProcessSite("site-1", sites[1].client()))
    coordinator.run(registry, 2, max_workers=1)
    rounds = coordinator.report("iid")["per_round"]
    assert [(r["round"], r["attempts"]) for r in rounds] == [(0, 1), (1, 1), (2, 2)]
    assert sorted(rounds[2]["sites"]) == ["site-0", "site-1"]
    assert any("ConnectionError: the site went away" in m for m in messages), "the failure is said"


def test_a_site_that_keeps_failing_ends_the_run_after_three_attempts(tmp_path, tiny_model):
    from edgekit.federated.coordinator import MAX_ROUND_ATTEMPTS, FederationError, InProcessSite, SiteRegistry

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 300), rounds=2))
    coordinator, sites, _ = _federation(config, 2)
    registry = SiteRegistry(coordinator)
    failing = _DropsAfter(sites[0].client(), 0)
    registry.register(InProcessSite("site-0", failing))
    registry.register(InProcessSite("site-1", sites[1].client()))
    with pytest.raises(FederationError, match=f"round 1 came back short {MAX_ROUND_ATTEMPTS} times"):
        coordinator.run(registry, 2, max_workers=1)
    assert failing.fits == MAX_ROUND_ATTEMPTS


def test_the_coordinators_privacy_applies_at_every_site_and_no_loss_leaves_one(tmp_path, tiny_model):
    from edgekit.federated.coordinator import InProcessSite, SiteRegistry

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 300), rounds=2))
    private = config.model_copy(update={"federated": config.federated.model_copy(update={
        "privacy": PrivacySection(enabled=True, clipping_norm=0.5, noise_multiplier=0.5)})})
    coordinator, sites, _ = _federation(config, 2)  # the sites' own configs say nothing of privacy
    coordinator.config = private
    registry = SiteRegistry(coordinator)
    wrapped = [_DropsAfter(site.client(), 10**6) for site in sites]
    for site, client in zip(sites, wrapped):
        registry.register(InProcessSite(site.identity.name, client))
    before = coordinator.adapter.arrays()
    coordinator.run(registry, 2, max_workers=1)
    assert all("loss" not in metrics and "clipped" not in metrics for client in wrapped for metrics in client.sent)
    report = coordinator.report("iid")
    assert report["dp"]["enabled"] and report["dp"]["releases"] == 2
    assert report["dp"]["epsilon"] == pytest.approx(epsilon(2, 0.5, 1e-5), abs=1e-3)
    assert all(r["loss"] is None for r in report["per_round"])
    after = coordinator.adapter.arrays()
    # two rounds of averaged noise at 0.5 x 0.5 per coordinate, over two sites: far from the clipped drift alone
    moved = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
    assert 0.1 < float(np.std(moved)) < 1.0
    assert not report["head_calibration"]["applied"] and "privacy is on" in report["head_calibration"]["reason"]
    assert not any("head calibration" in item for item in report["left_each_site"]), "no statistics were asked for"


def test_a_site_refused_by_the_coordinator_is_told_why(tmp_path, tiny_model, keyring):
    from edgekit.federated.coordinator import InProcessSite, SiteRegistry

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 200)))
    coordinator, sites, _ = _federation(config, 1)
    coordinator.keyring = keyring
    registry = SiteRegistry(coordinator)
    registry.register(InProcessSite("site-0", sites[0].client()))
    registry._admit_new()
    assert registry.num_available() == 0
    assert sites[0].refusal and "admits only sites with a key" in sites[0].refusal


def test_the_coordinator_refuses_other_labels_another_base_model_other_lora_shapes_and_bad_site_keys(tmp_path, tiny_model, key_dir, keyring):
    from device_agent.keys import generate_keypair
    from edgekit.federated.site import SiteIdentity

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 200)))
    coordinator, sites, _ = _federation(config, 1)
    site = sites[0]
    expected = coordinator.expectations()
    assert coordinator.judge(site.properties(expected), expected["challenge"]) is None

    strange = type(site)(SiteIdentity("strange"), site.base, ("a text",), ("weather",), config, _Silent())
    problem = coordinator.judge(strange.properties(expected), expected["challenge"])
    assert "weather" in problem and "not the federation's" in problem and strange.refusal == problem

    other = type(site)(SiteIdentity("other"), site.base, site.texts, site.row_labels, config, _Silent())
    changed = {**expected, "base_digest": "0" * 64}
    assert "base model" in coordinator.judge(other.properties(changed), expected["challenge"])

    smaller = load_build_config(federated_config(tmp_path, tiny_model, tmp_path / "data.jsonl"))
    smaller = smaller.model_copy(update={"finetune": smaller.finetune.model_copy(update={"lora_r": 2})})
    narrow = type(site)(SiteIdentity("narrow"), site.base, site.texts, site.row_labels, smaller, _Silent())
    assert "adapter tensors differ" in coordinator.judge(narrow.properties(expected), expected["challenge"])

    coordinator.keyring = keyring
    signed = type(site)(SiteIdentity("signed", key_dir / "edgekit.key"), site.base, site.texts, site.row_labels, config, _Silent())
    assert coordinator.judge(signed.properties(expected), expected["challenge"]) is None
    assert "admits only sites with a key" in coordinator.judge(site.properties(expected), expected["challenge"])
    stranger_key, _ = generate_keypair(tmp_path / "stranger")
    stranger = type(site)(SiteIdentity("stranger", stranger_key), site.base, site.texts, site.row_labels, config, _Silent())
    assert "not in the coordinator's sites keyring" in coordinator.judge(stranger.properties(expected), expected["challenge"])
    replayed = signed.properties(expected)
    assert "does not verify" in coordinator.judge(replayed, coordinator.expectations()["challenge"]), "a fresh challenge each time"


def _exchanged(names, threshold: int):
    """The sites and the coordinator's exchange of one round, after the key and share exchanges."""
    from edgekit.federated.secure_aggregation import RoundExchange, SiteProtocol

    sites = {name: SiteProtocol(name) for name in names}
    exchange = RoundExchange(7, threshold)
    for name, site in sites.items():
        exchange.took_keys(name, site.answer(exchange.keys_request()))
    for name, site in sites.items():
        exchange.took_shares(name, site.answer(exchange.shares_request()))
    return sites, exchange


def _secure_round(updates: dict[str, list[np.ndarray]], threshold: int, *, drop: tuple[str, ...] = ()):
    """One round of the protocol between its two sides, in memory: the sites, the exchange, the unmasked sum of the
    sites that did not ``drop`` after the share exchange, each site's masked update and the unmask request."""
    from edgekit.federated.secure_aggregation import STAGE

    sites, exchange = _exchanged(updates, threshold)
    masked = {name: site.masked({STAGE: exchange.fit_orders(name)}, updates[name]) for name, site in sites.items() if name not in drop}
    request = exchange.unmask_request(sorted(masked))
    revealed = {name: json.loads(sites[name].answer(request)[STAGE]) for name in masked}
    return sites, exchange, exchange.unmasked_sum(masked, revealed), masked, request


def test_secure_aggregation_unmasks_the_sum_and_only_the_sum_even_when_a_site_drops_after_sharing():
    from edgekit.federated.secure_aggregation import STAGE, SecureAggregationError, decode

    rng = np.random.default_rng(0)
    updates = {f"site-{i}": [rng.normal(0, 40, (5, 3)), rng.normal(0, 1e-3, (4,)), np.array(2.5)] for i in range(4)}
    _, _, total, masked, _ = _secure_round(updates, threshold=3)
    plain = [sum(u[k] for u in updates.values()) for k in range(3)]
    for got, want in zip(total, plain):
        assert np.allclose(got, want, atol=4 * 2.0 ** -24)
    # One masked update alone tells nothing: its words look uniform, far from the encoded update. Even the sum of all
    # of them is noise until each site's private mask is removed with the seeds the unmask stage rebuilds.
    words = masked["site-0"][0].astype(np.float64)
    assert words.mean() == pytest.approx(2.0 ** 63, rel=0.5) and np.all(np.abs(words) > 2.0 ** 40)
    summed = decode([sum(m[k] for m in masked.values()) for k in range(3)])
    assert not np.allclose(summed[0], plain[0], atol=1.0)
    # site-3 shares its secrets, then drops: the three others rebuild its pairwise masks and unmask their own sum.
    sites, exchange, total, masked, request = _secure_round(updates, threshold=3, drop=("site-3",))
    for k in range(3):
        assert np.allclose(total[k], sum(updates[n][k] for n in ("site-0", "site-1", "site-2")), atol=4 * 2.0 ** -24)
    # What a curious coordinator might try next is refused: asking again, naming a survivor dropped (to a survivor that
    # has not answered yet), masking a second update under the same masks.
    with pytest.raises(SecureAggregationError, match="asked for twice"):
        sites["site-0"].answer(request)
    fresh, exchange = _exchanged(updates, threshold=3)
    orders = {name: {STAGE: exchange.fit_orders(name)} for name in fresh}
    for name, site in fresh.items():
        site.masked(orders[name], updates[name])
    sneaky = exchange.unmask_request(["site-0", "site-1"]) | {"survivors": json.dumps(["site-0", "site-1", "site-2"])}
    with pytest.raises(SecureAggregationError, match="both survivor and dropped"):
        fresh["site-1"].answer(sneaky)
    with pytest.raises(SecureAggregationError, match="used already"):
        fresh["site-2"].masked(orders["site-2"], updates["site-2"])
    # Too few shares of a secret rebuild nothing, and the error says how many are needed.
    honest = exchange.unmask_request(sorted(fresh))
    two = {name: json.loads(fresh[name].answer(honest)[STAGE]) for name in ("site-0", "site-1")}
    with pytest.raises(SecureAggregationError, match="3 are needed"):
        exchange.unmasked_sum(masked, two)
    two["site-2"] = {"seeds": {"site-0": "not a share"}, "keys": {}}  # a garbled share counts as none
    with pytest.raises(SecureAggregationError, match="2 shares of site-0's seed arrived; 3 rebuild it"):
        exchange.unmasked_sum({n: masked[n] for n in ("site-0", "site-1", "site-2")}, two)
    # A ciphertext swapped on the way is caught when the shares are opened.
    tampered, exchange = _exchanged(updates, threshold=3)
    orders = json.loads(exchange.fit_orders("site-0"))
    orders["incoming"]["site-1"] = orders["incoming"]["site-2"]
    tampered["site-0"].masked({STAGE: json.dumps(orders)}, updates["site-0"])
    with pytest.raises(SecureAggregationError, match="do not decrypt"):
        tampered["site-0"].answer(exchange.unmask_request(["site-0", "site-1", "site-2"]))
    # A malformed request is refused, never a crash of the site.
    with pytest.raises(SecureAggregationError, match="malformed"):
        tampered["site-1"].answer({"stage": "shares", "round": 7, "public_keys": "{not json"})


class _FailsKeysStage:
    """A site's Flower client that fails secure aggregation's key exchange from its ``after``-th one on."""

    def __init__(self, client, after: int) -> None:
        self.client, self.after, self.exchanges = client, after, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def get_properties(self, ins):
        if ins.config.get("stage") == "keys":
            self.exchanges += 1
            if self.exchanges >= self.after:
                raise ConnectionError("the site went away during the key exchange")
        return self.client.get_properties(ins)


def _run_with_a_drop(tmp_path: Path, tiny_model: Path, secure: bool, fails_at: str = "fit", calibrate: bool = False):
    """Three sites of unequal rows, two rounds; site-0 leaves in round 2 (and stays away). Head calibration only when
    ``calibrate``, so the rounds' models can be compared on their own."""
    from edgekit.federated.coordinator import InProcessSite, SiteRegistry

    root = tmp_path / f"{'secure' if secure else 'plain'}-{fails_at}{'-calibrated' if calibrate else ''}"
    root.mkdir()
    config = load_build_config(federated_config(root, tiny_model, demo_subset(root / "data.jsonl", 300), rounds=2,
                                                min_fit_clients=2, secure_aggregation=secure, head_calibration=calibrate))
    coordinator, sites, messages = _federation(config, 3, partition="dirichlet:0.5")  # sites of unequal rows
    registry = SiteRegistry(coordinator)
    for index, site in enumerate(sites):
        client = site.client()
        if index == 0:  # site-0 takes part in round 1, then drops
            client = _DropsAfter(client, 1) if fails_at == "fit" else _FailsKeysStage(client, 2)
        registry.register(InProcessSite(site.identity.name, client))
    coordinator.run(registry, 2, max_workers=1)
    return coordinator, sites, messages


def test_a_secure_federation_reaches_fedavgs_model_when_a_site_drops_and_the_report_says_what_left(tmp_path, tiny_model):
    plain, sites, _ = _run_with_a_drop(tmp_path, tiny_model, secure=False)
    assert len({len(site.texts) for site in sites}) == 3  # the weights matter
    secure, _, _ = _run_with_a_drop(tmp_path, tiny_model, secure=True)
    for a, b in zip(plain.adapter.arrays(), secure.adapter.arrays()):
        assert np.allclose(a, b, atol=1e-5)
    assert secure.rounds[-1].val_accuracy > secure.rounds[0].val_accuracy  # it trained
    report = secure.report("dirichlet:0.5")
    assert report["secure_aggregation"]["enabled"] and report["secure_aggregation"]["threshold"] == 2
    assert report["per_round"][2]["dropped"] == ["site-0"]
    # What crossed the wire from each site were the masked 64-bit words, not the float32 tensors sent to it.
    plain_round = plain.report("iid")["per_round"][1]
    assert report["per_round"][1]["bytes_from_each_site"] == 2 * plain_round["bytes_from_each_site"]
    assert report["per_round"][1]["bytes_to_each_site"] == plain_round["bytes_to_each_site"]
    assert any("masked" in item for item in report["left_each_site"])
    assert plain.report("iid")["secure_aggregation"] == {"enabled": False}


def test_secure_head_calibration_refits_fedavgs_head_from_masked_statistics_when_a_site_drops_after_sharing(
        tmp_path, tiny_model, monkeypatch):
    from edgekit.federated import calibration

    summed = []  # the statistics each run fitted its head from
    fit = calibration.discriminant_head
    monkeypatch.setattr(calibration, "discriminant_head", lambda *args, **kw: (summed.append(args[:3]), fit(*args, **kw))[1])
    plain, _, _ = _run_with_a_drop(tmp_path, tiny_model, secure=False, calibrate=True)
    open_sums = summed[-1]
    secure, sites, messages = _run_with_a_drop(tmp_path, tiny_model, secure=True, calibrate=True)
    # The same sums: the two runs' models agree to about 1e-5 (float sums in another order), and fixed point adds
    # 2^-24 per site and value.
    for exact_sum, unmasked_sum in zip(open_sums, summed[-1]):
        assert unmasked_sum.shape == exact_sum.shape and np.allclose(unmasked_sum, exact_sum, rtol=1e-6, atol=1e-6)
    assert np.array_equal(open_sums[0], summed[-1][0]) and open_sums[0].sum() > 0  # whole class counts
    exact, masked = plain.report("dirichlet:0.5")["head_calibration"], secure.report("dirichlet:0.5")["head_calibration"]
    # site-0 took part in the statistics' key exchange, then did not answer: its masks were removed with the
    # others' shares, and the sum of the two other sites' statistics is what the plain run summed in the open.
    assert masked["problems"] == ["ConnectionError: the site went away mid-round"], masked
    assert masked["sites"] == exact["sites"] == ["site-1", "site-2"] and masked["rows"] == exact["rows"]
    assert masked["secure_aggregation"] and not exact["secure_aggregation"]
    # With two sites left and a threshold of 2, a class only one of them holds 10 rows of is that site's sum: named.
    held = [{label for label, n in site.label_counts.items() if n >= 10} for site in sites[1:]]
    assert masked["classes_summed_over_fewer_sites"] == [label for label in secure.labels if sum(label in h for h in held) == 1]
    assert (masked["applied"], masked["shrinkage"]) == (exact["applied"], exact["shrinkage"]), (masked, exact)
    assert masked["val_accuracy_after"] == pytest.approx(exact["val_accuracy_after"], abs=1.5 / len(plain.validation))
    assert masked["bytes_from_each_site"] == exact["bytes_from_each_site"]  # float64 sums and 64-bit masked words alike
    for a, b in zip(plain.adapter.arrays(), secure.adapter.arrays()):  # the refitted head too, up to fixed point
        assert np.allclose(a, b, atol=1e-4)
    assert any("unmasks only their sum" in item for item in secure.report("dirichlet:0.5")["left_each_site"])
    assert any("refitted from 2 sites' statistics" in m for m in messages), messages


class _PlainStatistics:
    """A site's client that answers a masked statistics request with its plain statistics (float64, unmasked)."""

    def __init__(self, client, site) -> None:
        self.client, self.site = client, site

    def __getattr__(self, name):
        return getattr(self.client, name)

    def fit(self, ins):
        from flwr.common import FitRes, Status, Code, ndarrays_to_parameters, parameters_to_ndarrays

        from edgekit.federated import calibration

        if ins.config.get("phase") != calibration.PHASE:
            return self.client.fit(ins)
        self.site.adapter.load(parameters_to_ndarrays(ins.parameters))
        plain = calibration.statistics(self.site.adapter, self.site.rows())
        return FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(plain),
                      num_examples=len(self.site.texts), metrics={"site": self.site.identity.name})


def test_secure_head_calibration_takes_no_plain_statistics_and_keeps_fedavgs_head_when_too_few_sites_mask_them(tmp_path, tiny_model):
    from edgekit.federated.coordinator import InProcessSite, SiteRegistry
    from edgekit.federated.site import MASKED_STATISTICS

    config = load_build_config(federated_config(tmp_path, tiny_model, demo_subset(tmp_path / "data.jsonl", 300), rounds=1,
                                                min_fit_clients=2, secure_aggregation=True))
    coordinator, sites, messages = _federation(config, 3)
    registry = SiteRegistry(coordinator)
    # site-0 is from before masked statistics: it offers statistics, but not masked ones
    wrapped = [_WithoutProperty(sites[0].client(), MASKED_STATISTICS), _PlainStatistics(sites[1].client(), sites[1]), sites[2].client()]
    for site, client in zip(sites, wrapped):
        registry.register(InProcessSite(site.identity.name, client))
    coordinator.run(registry, 1, max_workers=1)
    before = coordinator.adapter.arrays()
    calibrated = coordinator.report("iid")["head_calibration"]
    # site-0 is not asked (it would send them plain); site-1's plain reply is refused, never summed; one site is left.
    assert not calibrated["applied"] and calibrated["sites"] == ["site-2"], calibrated
    assert any(problem.startswith("site-1: it sent") for problem in calibrated["problems"]), calibrated
    assert calibrated["reason"] == "1 of the 2 sites needed sent masked statistics", calibrated
    assert any(m.startswith("head calibration: skipped") for m in messages), messages
    assert all(np.array_equal(a, b) for a, b in zip(before, coordinator.adapter.arrays()))


def test_a_site_that_fails_the_key_exchange_sits_the_round_out_and_the_others_finish_it(tmp_path, tiny_model):
    plain, _, _ = _run_with_a_drop(tmp_path, tiny_model, secure=False)
    secure, _, messages = _run_with_a_drop(tmp_path, tiny_model, secure=True, fails_at="keys")
    rounds = secure.report("dirichlet:0.5")["per_round"]
    assert sorted(rounds[2]["sites"]) == ["site-1", "site-2"] and rounds[2]["dropped"] == ["site-0"]
    assert any("did not answer secure aggregation's keys stage" in m for m in messages), messages
    for a, b in zip(plain.adapter.arrays(), secure.adapter.arrays()):  # the same two sites averaged as FedAvg would
        assert np.allclose(a, b, atol=1e-5)


def test_a_site_that_requires_secure_aggregation_refuses_a_coordinator_without_it_and_sends_no_plain_update(tmp_path, tiny_model):
    from edgekit.federated.calibration import PHASE
    from edgekit.federated.site import IncompatibleSite

    data = demo_subset(tmp_path / "data.jsonl", 200)
    (tmp_path / "plain").mkdir()
    plain_coordinator, _, _ = _federation(load_build_config(federated_config(tmp_path / "plain", tiny_model, data)), 2)
    config = load_build_config(federated_config(tmp_path, tiny_model, data, secure_aggregation=True))
    coordinator, sites, _ = _federation(config, 2)
    site = sites[0]
    expected = plain_coordinator.expectations()
    assert "masked updates only" in plain_coordinator.judge(site.properties(expected), expected["challenge"])
    assert "masked updates only" in site.refusal
    with pytest.raises(IncompatibleSite, match="masked updates only"):  # and were it asked to train anyway
        site.fit(site.adapter.arrays(), {"round": 1, "rounds": 2})
    assert site.sends_head_statistics()  # masked: a plain request for them is refused like a plain update
    with pytest.raises(IncompatibleSite, match="masked updates only"):
        site.fit(site.adapter.arrays(), {"phase": PHASE, "round": 3, "rounds": 2})
    expected = coordinator.expectations()
    assert coordinator.judge(sites[1].properties(expected), expected["challenge"]) is None
    with pytest.raises(EdgekitError, match="at least 2"):
        _federation(config, 1)


@pytest.mark.slow
def test_simulate_builds_a_signed_bundle_with_the_federation_in_its_report(tmp_path, tiny_model):
    from device_agent.bundle import open_bundle
    from device_agent.keys import Keyring

    data = demo_subset(tmp_path / "data.jsonl", 900)
    config = federated_config(tmp_path, tiny_model, data, strategy="fedprox", privacy={"enabled": False})
    result = runner.invoke(app, ["federated", "simulate", str(config), "--clients", "3", "--partition", "dirichlet:0.5",
                                 "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert result.exit_code == 0, result.output[-3000:]
    (report,) = json.loads(result.stdout)
    federated = report["federated"]
    assert federated["clients"] == 3 and federated["rounds"] == 2 and federated["strategy"] == "fedprox"
    assert federated["partition"] == "dirichlet:0.5"
    assert [r["round"] for r in federated["per_round"]] == [0, 1, 2]
    assert federated["per_round"][-1]["accuracy"] > federated["per_round"][0]["accuracy"] + 0.2
    train_rows = sum(c["rows"] for c in federated["per_client"])
    assert train_rows == sum(sum(c["label_counts"].values()) for c in federated["per_client"])
    assert federated["per_round"][1]["bytes_from_each_site"] == 4 * federated["adapter_parameters"]
    assert report["passed"] and report["bundle"]
    keyring = Keyring.load(tmp_path / "cache" / "dev-key")
    with open_bundle(Path(report["bundle"]), keyring) as bundle:
        assert bundle.manifest.model.name == "tiny-federated" and bundle.signer in keyring.keys
    settled = load_build_config(tmp_path / "out" / "build-config.yaml")
    assert Path(settled.model.source) == tmp_path / "out" / "federated" / "model" and not settled.finetune.enabled
    html = (tmp_path / "out" / "x86-64-cpu-test" / "report.html").read_text()
    assert "Federated fine-tuning" in html and "validation accuracy per round" in html and "head calibration:" in html
    calibrated = federated["head_calibration"]
    counted = sum(n for c in federated["per_client"] for n in c["label_counts"].values() if n >= 10)
    assert calibrated["sites"] == ["site-0", "site-1", "site-2"] and calibrated["rows"] == counted, calibrated


def test_grpcs_closed_channel_poller_error_is_kept_off_the_terminal_and_others_are_not():
    import threading
    from types import SimpleNamespace

    from edgekit.federated.runs import _quiet_closed_channel_pollers

    previous, seen = threading.excepthook, []
    threading.excepthook = lambda args: seen.append(str(args.exc_value))
    try:
        _quiet_closed_channel_pollers()
        _quiet_closed_channel_pollers()  # once is enough: a second call does not wrap again
        threading.excepthook(SimpleNamespace(exc_value=ValueError("Cannot monitor channel state: Channel closed!")))
        threading.excepthook(SimpleNamespace(exc_value=RuntimeError("a real failure in a thread")))
    finally:
        threading.excepthook = previous
    assert seen == ["a real failure in a thread"]
