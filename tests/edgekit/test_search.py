"""The build's search (edgekit.search): real Optuna studies on SQLite and PostgreSQL, trials through the real passes of a
tiny BERT, the chosen trial built into a bundle; resuming after kill -9; every bad input a clear error."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.config import BuildConfig, SearchRange
from edgekit.search import TrialRecord, pareto_front, wanted
from edgekit.search_space import apply, current_values, resolve, starting_parameters
from edgekit.tasks.text_classification import SEARCH_SPACE
from tests.support.builds import relaxed_target, tiny_text_build_config

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
# Small and fast: every trial fine-tunes the tiny BERT for at most two epochs on 320 rows.
FAST_SPACE = {"finetune.epochs": 2, "finetune.max_train_rows": 320}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.support.tiny_bert import tiny_hf_folder

    return tiny_hf_folder(tmp_path_factory.mktemp("search-model") / "tiny")


def _config(root: Path, model: Path, **search) -> Path:
    """The tiny build with a search section; the head/finetune sections the test helper writes are dropped so that the
    config says nothing about training (what a user who leaves it to the search writes)."""
    # No latency budget: a busy CI host must not mark a tiny model's trial over budget.
    target = relaxed_target(root, "x86-64-cpu", max_accuracy_drop_points=100.0, min_top1_agreement=0.0, p95_latency_ms=None)
    path = tiny_text_build_config(root, model, [target])
    document = yaml.safe_load(path.read_text())
    document.pop("head", None)
    document["search"] = {"enabled": True, "space": dict(FAST_SPACE), **search}
    path.write_text(yaml.safe_dump(document))
    return path


def _build(config: Path, root: Path, *extra: str):
    return runner.invoke(app, ["build", str(config), "--out", str(root / "out"), "--cache-dir", str(root / "cache"), *extra])


def _trials(db: Path) -> list[tuple[int, str]]:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
    except sqlite3.OperationalError:  # the study's tables are not there yet
        return []


# ------------------------------------------------------------------ the space


def test_the_config_as_written_is_the_first_trial_and_apply_turns_methods_on_and_off():
    config = BuildConfig()
    dimensions = resolve(config, SEARCH_SPACE)
    first = current_values(config, dimensions)
    assert first == {"finetune.method": "none", "head.learning_rate [none]": config.head.learning_rate}
    tuned = apply(config, {"finetune.method": "full", "finetune.learning_rate": 4e-5, "finetune.lora_r": 16})
    assert tuned.finetune.enabled and tuned.finetune.method == "full" and tuned.finetune.learning_rate == 4e-5
    assert not apply(tuned, {"finetune.method": "none"}).finetune.enabled
    pruned = apply(config, {"prune.ratio": 0.25})
    assert pruned.prune.enabled and pruned.prune.ratio == 0.25
    assert not apply(pruned, {"prune.ratio": 0.0}).prune.enabled


def test_overrides_replace_ranges_fix_values_and_add_keys_not_searched_by_default():
    config = BuildConfig.model_validate({"search": {"space": {
        "finetune.learning_rate": {"low": 1e-5, "high": 2e-5, "log": True}, "finetune.epochs": 3, "prune.ratio": [0.0, 0.3]}}})
    dimensions = {(d.key, d.when): d for d in resolve(config, SEARCH_SPACE)}
    rates = [d for (key, _), d in dimensions.items() if key == "finetune.learning_rate"]
    assert len(rates) == 2 and all(d.values == SearchRange(low=1e-5, high=2e-5, log=True) for d in rates)
    assert dimensions[("finetune.epochs", ("finetune.method", ("lora", "full")))].values == 3
    assert ("prune.ratio", None) in dimensions and ("finetune.max_train_rows", None) not in dimensions
    # A start outside a range is left to the sampler; a conditional key is named with its condition.
    start = starting_parameters({"finetune.method": "full", "finetune.learning_rate": 5e-5, "finetune.batch_size": 32},
                                tuple(dimensions.values()))
    assert start == {"finetune.method": "full", "finetune.batch_size [lora/full]": 32}


def test_an_unknown_space_key_is_one_error_listing_the_allowed_keys(tmp_path, tiny_model):
    config = _config(tmp_path, tiny_model)
    document = yaml.safe_load(config.read_text())
    document["search"]["space"]["finetune.lr"] = 1e-4
    config.write_text(yaml.safe_dump(document))
    result = _build(config, tmp_path)
    assert result.exit_code == 2, result.output
    assert "unknown key(s) finetune.lr" in result.output and "finetune.learning_rate" in result.output
    assert "Traceback" not in result.output


def test_build_help_lists_every_key_each_task_may_search():
    from edgekit.cli.build import build
    from edgekit.tasks import TASKS

    help_text = " ".join(build.__doc__.split())
    missing = {d.key for task in TASKS.values() for d in task.search_space} - {k for k in help_text.replace(",", " ").replace(";", " ").split()}
    assert not missing, f"edgekit build --help does not name {missing}"


def test_auto_searches_only_the_users_own_data_when_the_config_leaves_training_to_it():
    assert not wanted(BuildConfig(), own_data=False)
    assert wanted(BuildConfig(), own_data=True)
    assert not wanted(BuildConfig.model_validate({"finetune": {"enabled": True}}), own_data=True), "the user said how to train"
    assert not wanted(BuildConfig.model_validate({"model": {"source": "/models/model.onnx"}}), own_data=True), "an ONNX file cannot train"
    assert wanted(BuildConfig.model_validate({"search": {"enabled": True}}), own_data=False)
    assert not wanted(BuildConfig.model_validate({"search": {"enabled": False}}), own_data=True)


def test_the_pareto_front_keeps_trials_no_other_beats_on_every_axis():
    def trial(number, accuracy, latency, size=10.0):
        return TrialRecord(number, "COMPLETE", {}, accuracy, None, latency, size)

    trials = [trial(0, 0.80, 1.0), trial(1, 0.90, 2.0), trial(2, 0.85, 2.5), trial(3, 0.90, 1.5), TrialRecord(4, "PRUNED", {})]
    assert pareto_front(trials) == [0, 3]


def test_the_targets_budgets_become_the_searchs_constraints(tmp_path, monkeypatch):
    from edgekit.passes import evaluate
    from edgekit.search import SearchBudgets, SizeBudget

    # Which targets this host is decides which latency budgets it can judge; pinned so the test reads alike anywhere.
    monkeypatch.setattr(evaluate, "host_is_target", lambda target: target.cpu_arch == "x86_64")
    x86 = relaxed_target(tmp_path, "x86-64-cpu", p95_latency_ms=20.0, max_model_size_mb=30.0)
    gpu = relaxed_target(tmp_path, "x86-64-nvidia-gpu", p95_latency_ms=12.0, max_model_size_mb=None)
    jetson = relaxed_target(tmp_path, "jetson-orin-nano-8gb", p95_latency_ms=5.0, max_model_size_mb=40.0)
    budgets = SearchBudgets.of(BuildConfig(targets=[str(x86), str(jetson)]))
    # Each size at its target's preferred precision; latency only where this host is the target (a Jetson's 5 ms is
    # not measurable here: it is left to the device).
    assert budgets.sizes == (SizeBudget("x86-64-cpu-test", 30.0, 1), SizeBudget("jetson-orin-nano-8gb-test", 40.0, 1))
    assert (budgets.latency_p95_ms, budgets.latency_target) == (20.0, "x86-64-cpu-test")
    excess = budgets.violations(size_mb=100.0, latency_p95_ms=10.0, quantizable=True)  # 100 fp32 MB: 25 MB at int8
    assert excess == pytest.approx({"p95 latency 20 ms (x86-64-cpu-test)": 10 / 20 - 1,
                                    "size 30 MB (x86-64-cpu-test)": 25 / 30 - 1, "size 40 MB (jetson-orin-nano-8gb-test)": 25 / 40 - 1})
    # A model trained straight to ONNX (trees) is not quantized: its file counts as it is. No latency given: not judged.
    assert budgets.violations(size_mb=100.0, latency_p95_ms=None, quantizable=False) == pytest.approx(
        {"size 30 MB (x86-64-cpu-test)": 100 / 30 - 1, "size 40 MB (jetson-orin-nano-8gb-test)": 100 / 40 - 1})
    # Of two targets this host is (the GPU profile is x86_64 but not a CPU target in reality; pinned as one here), the
    # smaller latency budget holds.
    both = SearchBudgets.of(BuildConfig(targets=[str(x86), str(gpu)]))
    assert (both.latency_p95_ms, both.latency_target) == (12.0, "x86-64-nvidia-gpu-test")
    assert SearchBudgets.of(BuildConfig(targets=[str(jetson), str(x86)])).study_key() == budgets.study_key(), \
        "the targets' order does not rename the study"
    assert SearchBudgets().study_key() is None


def test_the_most_accurate_trial_within_every_budget_is_chosen_else_the_closest():
    import optuna

    from edgekit.search import SearchBudgets, _outcome

    def study(*trials: tuple[float, float]) -> optuna.Study:
        made = optuna.create_study(direction="maximize")
        for accuracy, excess in trials:
            made.add_trial(optuna.trial.create_trial(
                value=accuracy, constraints={"size": excess},
                user_attrs={"params": {}, "val_accuracy": accuracy, "latency_p50_ms": 1.0, "size_mb": 1.0}))
        return made

    config = BuildConfig()
    within = _outcome(config, study((0.9, 0.5), (0.8, -0.1), (0.7, 0.0)), "s", "memory", SearchBudgets())
    assert (within.chosen, within.within_budgets) == (1, True)
    assert within.report()["selection"].startswith("the highest validation accuracy among finished trials within every")
    over = _outcome(config, study((0.9, 0.5), (0.6, 0.2), (0.8, 0.2)), "s", "memory", SearchBudgets())
    assert (over.chosen, over.within_budgets) == (2, False), "the least excess, then the more accurate"
    assert over.report()["chosen_within_budgets"] is False


# ------------------------------------------------------------------ a search end to end


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("search")
    config = _config(root, tiny_model, max_trials=3)
    result = _build(config, root)
    assert result.exit_code == 0, result.output
    return root, config, result.output


@pytest.mark.slow
def test_the_search_compares_trials_on_validation_and_builds_the_best(searched):
    root, _, output = searched
    report = json.loads((root / "out" / "x86-64-cpu-test" / "report.json").read_text())
    search = report["search"]
    finished = [t for t in search["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3, search["trials"]
    assert search["trials"][0]["params"]["finetune.method"] == "none", "the config as written goes first"
    assert search["trials"][1]["params"]["finetune.method"] == "full", "then the task's starting recipe"
    complete = [t for t in search["trials"] if t["state"] == "COMPLETE"]
    best = max(t["val_accuracy"] for t in complete)
    chosen = next(t for t in complete if t["number"] == search["chosen"])
    assert chosen["val_accuracy"] == best and search["chosen"] in search["pareto"]
    for trial in complete:
        assert 0 <= trial["val_accuracy"] <= 1 and trial["latency_p50_ms"] > 0 and trial["size_mb"] > 0 and trial["seconds"] > 0
    # The shipped model is the chosen trial's: its fine-tuning (or none) is what the build ran.
    ran_finetune = "finetune" in [p["name"] for p in report["passes"]]
    assert ran_finetune == (chosen["params"]["finetune.method"] != "none")
    page = (root / "out" / "x86-64-cpu-test" / "report.html").read_text()
    assert "<h2>Search</h2>" in page and "validation accuracy against latency" in page and "(chosen)" in page
    assert "search: trial 0" in output and "chosen trial" in output


@pytest.mark.slow
def test_a_rerun_of_a_finished_search_trains_nothing(searched):
    root, config, _ = searched
    before = _trials(root / "out" / "search" / "study.db")
    result = _build(config, root)
    assert result.exit_code == 0, result.output
    assert _trials(root / "out" / "search" / "study.db") == before
    report = json.loads((root / "out" / "x86-64-cpu-test" / "report.json").read_text())
    assert all(p["cached"] for p in report["passes"])


@pytest.mark.slow
def test_a_candidate_model_that_does_not_load_fails_its_trial_and_the_search_goes_on(tmp_path, tiny_model):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    config = _config(tmp_path, tiny_model, max_trials=2, models=[str(broken)],
                     space={**FAST_SPACE, "finetune.method": "none"})
    result = _build(config, tmp_path)
    assert result.exit_code == 0, result.output
    trials = json.loads((tmp_path / "out" / "x86-64-cpu-test" / "report.json").read_text())["search"]["trials"]
    failed = [t for t in trials if t["state"] == "FAIL"]
    assert failed and all(t["params"]["model.source"] == str(broken) and t["note"] for t in failed), trials
    assert any(t["state"] == "COMPLETE" and t["params"]["model.source"] == str(tiny_model) for t in trials)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    from tests.support.tiny_bert import tiny_hf_folder

    return tiny_hf_folder(tmp_path_factory.mktemp("search-wide") / "wide", hidden_size=96)


def _size_budget_between(root: Path, wide: Path, tiny: Path) -> float:
    """Set the test target's size budget between the two models' int8 weights (fp32 / 4): the wide one over, the tiny within."""
    def fp32_mb(folder: Path) -> float:
        return (folder / "model.safetensors").stat().st_size / 1e6

    budget = round((fp32_mb(wide) + fp32_mb(tiny)) / 8, 2)
    target = root / "x86-64-cpu-test.yaml"
    document = yaml.safe_load(target.read_text())
    document["budgets"]["max_model_size_mb"] = budget
    target.write_text(yaml.safe_dump(document))
    return budget


@pytest.mark.slow
def test_a_candidate_over_the_targets_size_budget_is_marked_and_the_build_is_the_one_within_it(tmp_path, tiny_model, wide_model):
    # Only the model is searched (the head's rate fixed, no fine-tuning): the search ends when the sampler draws tried
    # values three times in a row (seeded: the same draws on every run).
    config = _config(tmp_path, wide_model, models=[str(tiny_model)],
                     space={**FAST_SPACE, "finetune.method": "none", "head.learning_rate": 3e-3})
    budget = _size_budget_between(tmp_path, wide_model, tiny_model)
    result = _build(config, tmp_path)
    assert result.exit_code == 0, result.output
    search = json.loads((tmp_path / "out" / "x86-64-cpu-test" / "report.json").read_text())["search"]
    complete = {t["params"]["model.source"]: t for t in search["trials"] if t["state"] == "COMPLETE"}
    assert set(complete) == {str(wide_model), str(tiny_model)}, search["trials"]
    assert [b.split(":")[0] for b in complete[str(wide_model)]["over_budget"]] == [f"size {budget:g} MB (x86-64-cpu-test)"]
    assert complete[str(tiny_model)]["over_budget"] == []
    assert search["chosen"] == complete[str(tiny_model)]["number"] and search["chosen_within_budgets"] is True
    assert search["budgets"]["sizes"] == [{"target": "x86-64-cpu-test", "mb": budget, "bytes_per_weight": 1}]
    assert "over budget: size" in result.output
    page = (tmp_path / "out" / "x86-64-cpu-test" / "report.html").read_text()
    assert "hollow: over a target budget" in page and 'fill="white"' in page, "the over-budget trial is drawn hollow"


@pytest.mark.slow
def test_a_candidate_over_budget_is_stopped_before_fine_tuning_trains_it(tmp_path, tiny_model, wide_model):
    fixed = {"finetune.method": "full", "finetune.learning_rate": 5e-5, "finetune.head_learning_rate": 1e-3,
             "finetune.epochs": 1, "finetune.batch_size": 32, "finetune.warmup_ratio": 0.0, "finetune.schedule": "linear",
             "finetune.weight_decay": 0.0, "finetune.label_smoothing": 0.0, "finetune.max_train_rows": 320}
    config = _config(tmp_path, wide_model, models=[str(tiny_model)], space=fixed)
    _size_budget_between(tmp_path, wide_model, tiny_model)
    result = _build(config, tmp_path)
    assert result.exit_code == 0, result.output
    search = json.loads((tmp_path / "out" / "x86-64-cpu-test" / "report.json").read_text())["search"]
    wide = [t for t in search["trials"] if t["params"]["model.source"] == str(wide_model) and not (t["note"] or "").startswith("the same values")]
    assert len(wide) == 1 and wide[0]["state"] == "PRUNED", search["trials"]
    assert wide[0]["note"].startswith("over budget before fine-tuning (size") and wide[0]["epochs"] == {}, wide[0]
    assert wide[0]["size_mb"] > 0 and wide[0]["over_budget"]
    chosen = next(t for t in search["trials"] if t["number"] == search["chosen"])
    assert chosen["params"]["model.source"] == str(tiny_model) and chosen["state"] == "COMPLETE" and chosen["epochs"]
    # The stopped trial trained nothing: no fine-tuning pass of the wide model is in the cache.
    runs = [json.loads(f.read_text()) for f in (tmp_path / "cache" / "finetune").glob("*/artifact.json")]
    assert len(runs) == 1, "only the tiny model was fine-tuned"


# ------------------------------------------------------------------ bad input


def test_a_budget_below_the_minimum_is_refused_before_anything_runs(tmp_path, tiny_model):
    result = _build(_config(tmp_path, tiny_model), tmp_path, "--search-budget", "0.5")
    assert result.exit_code == 2 and "minimum of 1 minute" in result.output, result.output
    assert not (tmp_path / "out" / "search").exists()


def test_a_storage_that_cannot_be_reached_is_a_clear_error(tmp_path, tiny_model):
    result = _build(_config(tmp_path, tiny_model), tmp_path, "--study-db", "postgresql://nobody@127.0.0.1:1/test")
    assert result.exit_code == 2, result.output
    assert "cannot open the search storage postgresql+psycopg://nobody@127.0.0.1:1/test" in result.output
    assert "Traceback" not in result.output
    result = _build(_config(tmp_path, tiny_model), tmp_path, "--study-db", "not a url")
    assert result.exit_code == 2 and "is not a database URL" in result.output, result.output


def test_data_too_small_to_compare_trials_is_a_clear_error(tmp_path, tiny_model):
    rows = [{"text": f"sample text number {i} about {label}", "label": label} for i in range(20) for label in ("a", "b", "c")]
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    result = _build(_config(tmp_path, tiny_model), tmp_path, "--data", str(data))
    assert result.exit_code == 2, result.output
    assert "validation split has" in result.output and "--no-search" in result.output


# ------------------------------------------------------------------ interrupted and shared searches


def _has_begun_training(db: Path) -> bool:
    """Whether a running trial has reported a training epoch (so a kill lands in the middle of its training)."""
    try:
        with sqlite3.connect(db) as conn:
            return bool(conn.execute(
                "SELECT 1 FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND t.number >= 1 AND a.key = 'epoch_scores'").fetchall())
    except sqlite3.OperationalError:  # the study's tables are not there yet
        return False


def test_a_trial_whose_process_died_before_it_began_is_failed_and_queued_again(tmp_path):
    import optuna

    from edgekit.search import fail_trials_that_died_starting

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, direction="maximize")
    study.enqueue_trial({"finetune.method": "full"})
    dead = study.ask()  # running, never given its values or a heartbeat: as a process killed at that moment leaves it
    assert dead.params == {} and study.get_trials()[0].state.name == "RUNNING"
    assert fail_trials_that_died_starting(study, storage, stale_after_seconds=3600) == [], "too recent to call dead"
    assert fail_trials_that_died_starting(study, storage, stale_after_seconds=0) == [dead.number]
    states = [(t.state.name, t.system_attrs.get("fixed_params")) for t in study.get_trials()]
    assert states == [("FAIL", {"finetune.method": "full"}), ("WAITING", {"finetune.method": "full"})]


def _search_process(config: Path, root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgekit", "build", str(config), "--out", str(root / "out"),
                             "--cache-dir", str(root / "cache"), "--json", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_search_killed_during_a_trial_resumes_without_repeating_finished_trials(tmp_path, tiny_model):
    # Trials long enough (1,500 rows, three epochs) to be caught mid-training.
    config = _config(tmp_path, tiny_model, max_trials=4, stale_after_seconds=2,
                     space={"finetune.epochs": 3, "finetune.max_train_rows": 1500})
    db = tmp_path / "out" / "search" / "study.db"
    process = _search_process(config, tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = _trials(db) if db.is_file() else []
        if any(number >= 1 and state == "RUNNING" for number, state in states) and _has_begun_training(db):
            break
        if process.poll() is not None:
            pytest.fail(f"the search ended before a second trial ran: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = {number: state for number, state in _trials(db)}
    finished_before = {n for n, s in before.items() if s in ("COMPLETE", "PRUNED")}

    rerun = _search_process(config, tmp_path)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    report = json.loads(out)[0]["search"]
    finished = [t for t in report["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4, report["trials"]
    assert finished_before <= {t["number"] for t in finished}, "trials finished before the kill are kept as they were"
    params = [json.dumps(t["params"], sort_keys=True) for t in finished]
    assert len(set(params)) == len(params), "no finished trial was run twice"
    killed = [t for t in report["trials"] if t["number"] in before and before[t["number"]] == "RUNNING"]
    assert killed and all(t["state"] == "FAIL" for t in killed)
    assert any(json.dumps(k["params"], sort_keys=True) in params for k in killed), "the killed trial ran again"


@pytest.mark.slow
def test_two_build_hosts_share_one_study_through_postgresql(tmp_path, tiny_model):
    from tests.fleet.conftest import postgres_schema

    with postgres_schema() as url:
        hosts = []
        for host in ("a", "b"):
            (tmp_path / host).mkdir()
            config = _config(tmp_path / host, tiny_model, max_trials=4, storage=url)
            hosts.append(_search_process(config, tmp_path / host))
            time.sleep(8)  # the second host joins a study the first one made (and queued its starting trials in)
        results = [host.communicate(timeout=600) for host in hosts]
        assert all(host.returncode == 0 for host in hosts), [err[-2000:] for _, err in results]
        reports = [json.loads(out)[0]["search"] for out, _ in results]
    assert reports[0]["study"] == reports[1]["study"]
    # Each host's report is the study as that host last read it: a trial the other host finished later shows there
    # as still running, so the study is the union of both reports, a trial's state its furthest one.
    finished_states = ("COMPLETE", "PRUNED")
    trials = {}
    for report in reports:
        for trial in report["trials"]:
            if trial["number"] not in trials or trial["state"] in finished_states:
                trials[trial["number"]] = trial
    trials = list(trials.values())
    finished = [t for t in trials if t["state"] in finished_states]
    # Each host checks the count before it starts a trial, so two hosts may overshoot the cap by one between them.
    assert 4 <= len(finished) <= 5, trials
    assert len({json.dumps(t["params"], sort_keys=True) for t in finished}) == len(finished)
    assert {reports[0]["chosen"], reports[1]["chosen"]} <= {t["number"] for t in finished}


def test_the_fine_tuning_schedule_is_searched_and_reaches_the_training_loop(monkeypatch, tmp_path, tiny_model):
    from rich.progress import Progress

    from edgekit import training
    from edgekit.artifact import Artifact, PassContext, Stage, TaskSpec
    from edgekit.passes import finetune
    from edgekit.tasks.text_classification import load_task_data
    from tests.support.tiny_bert import MAX_LENGTH

    assert any(d.key == "finetune.schedule" and d.values == ["linear", "cosine", "constant"] for d in resolve(BuildConfig(), SEARCH_SPACE))
    config = apply(BuildConfig(), {"finetune.method": "full", "finetune.schedule": "constant", "finetune.epochs": 1,
                                   "finetune.max_train_rows": 64})
    seen = []
    real_fit = training.fit
    monkeypatch.setattr(training, "fit", lambda *args, **kwargs: seen.append(args[3].schedule) or real_fit(*args, **kwargs))
    data = load_task_data(BuildConfig().data)
    artifact = Artifact(Stage.TORCH, tiny_model, ".", "tiny", TaskSpec("text-classification", data.labels, MAX_LENGTH,
                                                                    tiny_model / "tokenizer.json"))
    (tmp_path / "work").mkdir()
    ctx = PassContext(tmp_path / "work", data, Progress(disable=True), tmp_path / "k", print)
    finetune.run(artifact, finetune.options_for(config, None), ctx)
    assert seen == ["constant"]


def test_model_source_auto_searches_among_the_tasks_built_in_models():
    from edgekit.config import BuildConfig
    from edgekit.tasks import task_for

    config = BuildConfig.model_validate({"task": {"kind": "image-classification"}, "model": {"source": "auto"},
                                         "search": {"models": ["config:resnet"]}})
    sources = task_for("image-classification").builtin_sources
    assert config.model.source == sources[0] and config.search.enabled is True
    assert set(config.search.models) == set(sources[1:]) and len(config.search.models) == len(sources) - 1
    with pytest.raises(ValueError, match="text-classification has none: name a model"):
        BuildConfig.model_validate({"model": {"source": "auto"}})
    with pytest.raises(ValueError, match="model.source auto needs the search"):
        BuildConfig.model_validate({"task": {"kind": "image-classification"}, "model": {"source": "auto"},
                                    "search": {"enabled": False}})
