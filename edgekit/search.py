"""AutoML: before the build, search customizations of the user's model on their data and keep the best (Optuna).

A trial is a build config: the build's own, with values drawn from its task's
search space (``edgekit.search_space``). It runs the build's PyTorch passes
(load → [finetune] → [prune]) through the pass cache, so a trial that repeats
an earlier one's values trains nothing, and the build that follows the search
finds the chosen trial's model in the cache. Each finished trial is scored on
the validation split (accuracy, macro F1) and measured: the model's fp32
parameter size and its PyTorch latency at batch 1 on this host; the front of
accuracy against latency and size is reported.

The targets' budgets are the search's constraints (``SearchBudgets``): a trial
whose model is over a target's size budget (its weights at the target's
preferred precision) or, where this host is the target, over its p95 latency
budget, is infeasible: TPE (Optuna's constrained TPE) draws away from it, and
the build is made from the most accurate trial within every budget. The
evaluate pass still judges the built bundle itself, as in any build.

Honest selection: trials are compared on validation only, and the fine-tuning
pass no longer scores test, so the test split is touched once, by the
evaluate pass of the chosen trial's build.

The engine is Optuna: a seeded TPE sampler (multivariate, grouped by the
space's conditions; a host that joins or resumes a study with trials mixes its
process id into the seed, so two hosts do not draw the same values, and a draw
equal to a finished or running trial's is skipped) and a median pruner (a trial below the median of earlier
trials stops). The first
trials are the config as written (the search never does worse on validation
than not searching) and the task's starting recipes (``Task.search_starts``);
TPE draws the rest. A trial is judged halfway through its own epochs against
earlier trials halfway through theirs (compared at the same epoch, a long
schedule still at a high learning rate would lose to a short one already
decayed).

Budget: ``search.budget_minutes`` of trial time summed over the study's trials.
A rerun of a finished search trains nothing; an interrupted one goes on with
what is left. A trial still training when the budget is spent ends its training
after the current epoch and is scored on its best epoch (its pass result is
cached as trained, and ``report.json`` says it was cut short), so the budget
never throws away a run that was going well. ``search.max_trials`` caps the
count of finished trials.

Storage: an Optuna RDB storage, by default ``<out>/search/study.db`` (SQLite);
a PostgreSQL URL lets several build hosts share one study. The study's name
hashes what trains (model, task, data, head, finetune, train, prune and the
space) and the targets' budgets, so a changed config starts a new study in the
same file. Trials beat
a heartbeat: one whose host died (kill -9, power loss) is marked failed after
``search.stale_after_seconds`` and run again from the start of its pass, which
resumes from its last epoch checkpoint (one killed before its first heartbeat
is found by :func:`fail_trials_that_died_starting`). A trial interrupted by Ctrl-C is queued
again the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.config import BuildConfig, SearchRange
from edgekit.errors import EdgekitError
from edgekit.search_space import Dimension, apply, current_values, resolve, sample, starting_parameters

if TYPE_CHECKING:
    import optuna

    from edgekit.artifact import Artifact
    from edgekit.data import TaskData

MIN_VALIDATION_ROWS = 20
MAX_REPEATS = 3  # draws in a row of values already tried before the search calls a small space exhausted
LATENCY_RUNS = 15
STORAGE_HINT = "use sqlite:///path/to/study.db or postgresql://user[:password]@host:5432/dbname"
# What decides how a trial trains: a change here starts a new study.
TRAINING_SECTIONS = ("model", "task", "head", "finetune", "train", "prune")


class _TrialFailed(Exception):
    """A trial that could not run (a candidate model that does not load, a bad combination): recorded, the search goes on."""


@dataclass
class TrialRecord:
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    params: dict[str, Any]  # config path → value
    val_accuracy: float | None = None
    val_f1_macro: float | None = None
    latency_p50_ms: float | None = None
    size_mb: float | None = None
    latency_p95_ms: float | None = None
    over_budget: list[str] = field(default_factory=list)  # the budgets its model breaks (empty: within all of them)
    seconds: float | None = None
    epochs: dict[str, float] = field(default_factory=dict)  # validation score after each epoch
    note: str | None = None  # why it stopped or failed


@dataclass(frozen=True)
class SizeBudget:
    target: str
    mb: float
    bytes_per_weight: int  # the target's preferred precision: int8 1, fp16 2, fp32 4


@dataclass(frozen=True)
class SearchBudgets:
    """The targets' budgets a trial is held to before any bundle exists: the search's constraints.

    A trial is a model on the build host, not yet a bundle, so each budget is judged on what the trial can show:
    size on its weights at each target's preferred precision (a model trained straight to ONNX, trees, is not
    quantized: its file as it is); latency only against the targets this host is (as the evaluate pass does), on the
    fp32 PyTorch model's p95 at batch 1, which overstates the int8 bundle's (ONNX Runtime's int8 ran about 4x faster on
    MiniLM): a conservative test, never a lenient one.
    """

    latency_p95_ms: float | None = None
    latency_target: str | None = None
    sizes: tuple[SizeBudget, ...] = ()

    @classmethod
    def of(cls, config: BuildConfig) -> SearchBudgets:
        from edgekit.passes.evaluate import host_is_target
        from edgekit.targets import load_target

        latency, latency_target, sizes = None, None, []
        for name in config.targets:
            target = load_target(name)
            if target.budgets.max_model_size_mb is not None:
                sizes.append(SizeBudget(target.name, target.budgets.max_model_size_mb, BYTES_PER_WEIGHT[target.precision.preferred]))
            if target.budgets.p95_latency_ms is not None and host_is_target(target) and (latency is None or target.budgets.p95_latency_ms < latency):
                latency, latency_target = target.budgets.p95_latency_ms, target.name
        return cls(latency, latency_target, tuple(sizes))

    def names(self) -> list[str]:
        return self._latency_name() + [self._size_name(size) for size in self.sizes]

    def _latency_name(self) -> list[str]:
        return [f"p95 latency {self.latency_p95_ms:g} ms ({self.latency_target})"] if self.latency_p95_ms is not None else []

    @staticmethod
    def _size_name(size: SizeBudget) -> str:
        return f"size {size.mb:g} MB ({size.target})"

    def violations(self, *, size_mb: float, latency_p95_ms: float | None, quantizable: bool) -> dict[str, float]:
        """Each budget's excess as a share of the budget (Optuna's constraint: 0 or less is within it); latency is
        judged only when given."""
        excess = {}
        if self.latency_p95_ms is not None and latency_p95_ms is not None:
            excess[self._latency_name()[0]] = latency_p95_ms / self.latency_p95_ms - 1
        for size in self.sizes:
            deployed = size_mb * (size.bytes_per_weight / 4 if quantizable else 1)
            excess[self._size_name(size)] = deployed / size.mb - 1
        return excess

    def study_key(self) -> dict | None:
        """What the study's name hashes of the budgets: none when there are none (a study without budgets keeps its
        name); sizes in a fixed order. The latency budget is this host's (a host of another architecture judges none)."""
        if not self.names():
            return None
        return {"latency_p95_ms": self.latency_p95_ms, "sizes": sorted([s.mb, s.bytes_per_weight] for s in self.sizes)}

    def report(self) -> dict:
        return {"latency_p95_ms": self.latency_p95_ms, "latency_target": self.latency_target,
                "sizes": [asdict(s) for s in self.sizes],
                "how": "size: the trial's weights at each target's preferred precision (a model trained straight to ONNX "
                       "as its file); latency: the fp32 PyTorch p95 at batch 1 on this host, judged only against a "
                       "target this host is (conservative: the int8 bundle runs faster)"}


BYTES_PER_WEIGHT = {"int8": 1, "fp16": 2, "fp32": 4}


@dataclass
class SearchOutcome:
    config: BuildConfig  # the chosen trial's config: what the build goes on to build
    trials: list[TrialRecord]
    chosen: int
    pareto: list[int]
    study: str
    storage: str
    budget_minutes: float
    spent_minutes: float
    budgets: SearchBudgets
    within_budgets: bool  # False: no finished trial met every budget; the closest was chosen

    def report(self) -> dict:
        return {
            "study": self.study, "storage": self.storage, "budget_minutes": self.budget_minutes,
            "spent_minutes": round(self.spent_minutes, 2), "chosen": self.chosen, "pareto": self.pareto,
            "selection": SELECTION if self.within_budgets else SELECTION_OVER_BUDGET,
            "budgets": self.budgets.report(), "chosen_within_budgets": self.within_budgets,
            "latency": "PyTorch fp32 p50 at batch 1 on the build host (ONNX Runtime for a model trained straight to "
                       "ONNX); size: fp32 parameters (the ONNX file)",
            "trials": [asdict(t) for t in self.trials],
        }


SELECTION = "the highest validation accuracy among finished trials within every target budget (ties: the lower latency)"
SELECTION_OVER_BUDGET = ("no finished trial met every target budget: the one closest to them (the least summed excess "
                         "over budget; ties: the higher validation accuracy)")


def wanted(config: BuildConfig, own_data: bool) -> bool:
    """search.enabled, with auto resolved: on for the user's own data when the config leaves training to the search."""
    from edgekit.passes.load import is_onnx_source

    setting = config.search.enabled
    if setting != "auto":
        return bool(setting)
    from edgekit.tasks import task_for

    says_how_to_train = bool({"head", "finetune", "train"} & config.model_fields_set) or "trees" in config.model.model_fields_set
    something_to_search = bool(task_for(config.task.kind).search_space or config.search.models)
    return own_data and not says_how_to_train and not is_onnx_source(config.model.source) and something_to_search


def run_search(config: BuildConfig, data: TaskData, out_dir: Path, cache_dir: Path, signing_key: Path, progress, say) -> SearchOutcome:
    """Run (or resume) the study within its budget and return the chosen trial's config with every trial's record."""
    import optuna

    from edgekit.tasks import task_for

    task = task_for(config.task.kind)
    _check_searchable(config, data)
    dimensions = resolve(config, task.search_space)
    budgets = SearchBudgets.of(config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, shown = _storage(config, out_dir)
    name = study_name(config, data, dimensions, budgets)
    with warnings.catch_warnings():  # multivariate, grouped TPE is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=_sampler_seed(storage, name, config.search.seed), n_startup_trials=5,
                                             multivariate=True, group=True)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True, sampler=sampler,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0, n_min_trials=2))
    for start in (current_values(config, dimensions), *(starting_parameters(s, dimensions) for s in task.search_starts)):
        study.enqueue_trial(start, skip_if_exists=True)
    trials = _Trials(config, data, dimensions, study, budgets, out_dir, cache_dir, signing_key, progress, say)
    budget = config.search.budget_minutes * 60
    say(f"search: study {name} in {shown}; budget {config.search.budget_minutes:g} min of trials"
        + (f", at most {config.search.max_trials} trials" if config.search.max_trials else "")
        + (f"; trials held to {', '.join(budgets.names())}" if budgets.names() else ""))
    # Nothing to draw (every key fixed, or a task with no space): the config as written is the only trial.
    max_trials = config.search.max_trials if any(isinstance(d.values, (SearchRange, list)) for d in dimensions) else 1
    bar = progress.add_task("search", total=budget, completed=min(budget, _spent(study)))
    try:
        while (remaining := budget - _spent(study)) > 0 and not _enough(study, max_trials):
            fail_trials_that_died_starting(study, storage, config.search.stale_after_seconds)
            if trials.repeats >= MAX_REPEATS:
                say(f"search: the sampler drew values already tried {MAX_REPEATS} times in a row; the space is exhausted")
                break
            trials.deadline = time.monotonic() + remaining
            study.optimize(trials.objective, n_trials=1, catch=(_TrialFailed,))
            progress.update(bar, completed=min(budget, _spent(study)), description=trials.describe_best())
    finally:
        progress.remove_task(bar)
    return _outcome(config, study, name, shown, budgets)


def study_name(config: BuildConfig, data: TaskData, dimensions: tuple[Dimension, ...], budgets: SearchBudgets) -> str:
    document = {
        "budgets": budgets.study_key(),  # the constraints steer the sampler: other budgets, another study
        # the bundle's name and version do not change how a trial trains
        "config": config.model_dump(mode="json", include=set(TRAINING_SECTIONS), exclude={"model": {"name", "version"}}),
        "data": data.digest, "seed": config.search.seed,
        "space": [[d.key, d.values.model_dump() if isinstance(d.values, SearchRange) else d.values, d.when, d.searched] for d in dimensions],
    }
    return "edgekit-" + hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_searchable(config: BuildConfig, data: TaskData) -> None:
    from edgekit.passes.load import is_onnx_source

    if is_onnx_source(config.model.source):
        raise EdgekitError(f"a search trains the model, and {config.model.source} is an ONNX file; give the model's "
                           "Hugging Face folder, or build without a search (--no-search)")
    if len(data.val) < MIN_VALIDATION_ROWS:
        raise EdgekitError(f"the validation split has {len(data.val)} rows; a search compares trials on it and needs at least "
                           f"{MIN_VALIDATION_ROWS}: add labelled rows (or val rows in the split column), or build without a search (--no-search)")


def _storage(config: BuildConfig, out_dir: Path) -> tuple[optuna.storages.RDBStorage, str]:
    """The study's storage, with heartbeats so a dead host's trial is failed and retried; and its URL, password hidden."""
    import optuna
    import sqlalchemy as sa

    if config.search.storage:
        text = config.search.storage
    else:
        (out_dir / "search").mkdir(parents=True, exist_ok=True)
        text = f"sqlite:///{(out_dir / 'search' / 'study.db').resolve()}"
    try:
        url = sa.make_url(text)
    except sa.exc.ArgumentError:
        raise EdgekitError(f"search storage {text!r} is not a database URL; {STORAGE_HINT}") from None
    engine_kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")  # the driver edgekit installs (psycopg 3)
        engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    elif url.get_backend_name() == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 30}}
    shown = url.render_as_string(hide_password=True)
    stale = config.search.stale_after_seconds
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental; edgekit's tests exercise them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url.render_as_string(hide_password=False), engine_kwargs=engine_kwargs,
                heartbeat_interval=max(1, int(stale // 4)), grace_period=int(stale),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
    except Exception as error:  # noqa: BLE001 - SQLAlchemy, driver and Optuna errors all mean "cannot use this storage"
        raise EdgekitError(f"cannot open the search storage {shown}: {_first_line(error)}; check the server and the URL "
                           f"(search.storage or --study-db): {STORAGE_HINT}") from None
    return storage, shown


def fail_trials_that_died_starting(study: optuna.Study, storage: optuna.storages.BaseStorage, stale_after_seconds: float) -> list[int]:
    """Fail (and queue again) running trials whose process died before the trial began: no heartbeat tells on them.

    Optuna fails a running trial whose heartbeat stopped, but a process killed between creating a trial and its first
    heartbeat leaves it running for ever. A trial here records its values the moment it starts, so a running trial
    without them, older than ``stale_after_seconds``, is one of those; an enqueued one's values are queued again.
    """
    import datetime

    import optuna

    now = datetime.datetime.now()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = trial.datetime_start
        if "params" in trial.user_attrs or started is None or (now - started).total_seconds() < stale_after_seconds:
            continue
        storage.set_trial_user_attr(trial._trial_id, "error", "its process died before the trial began")
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if trial.system_attrs.get("fixed_params"):
            study.enqueue_trial(trial.system_attrs["fixed_params"], skip_if_exists=False)
        failed.append(trial.number)
    return failed


def _sampler_seed(storage: optuna.storages.BaseStorage, name: str, seed: int) -> int:
    """``seed`` for a new study (one host's search is reproducible); mixed with this process's id when the study already
    has trials, so a second host sharing it (or a resumed run) does not draw the same values as the first."""
    import optuna

    existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    return seed if not existing.get(name) else (seed * 1_000_003 + os.getpid()) % 2**32


def _spent(study: optuna.Study) -> float:
    return sum(float(t.user_attrs.get("seconds", 0.0)) for t in study.get_trials(deepcopy=False))


def _enough(study: optuna.Study, max_trials: int | None) -> bool:
    import optuna

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return max_trials is not None and len(study.get_trials(deepcopy=False, states=finished)) >= max_trials


class _Trials:
    """The objective: one trial's config trained through the pipeline, scored on validation, measured."""

    def __init__(self, config, data, dimensions, study, budgets: SearchBudgets, out_dir: Path, cache_dir: Path,
                 signing_key: Path, progress, say) -> None:
        self.config, self.data, self.dimensions, self.study, self.budgets = config, data, dimensions, study, budgets
        self.out_dir, self.cache_dir, self.signing_key, self.progress, self.say = out_dir, cache_dir, signing_key, progress, say
        self.deadline = math.inf
        self.repeats = 0

    def objective(self, trial: optuna.Trial) -> float:
        import optuna

        from edgekit.pipeline import Build

        values = sample(trial, self.dimensions)
        trial.set_user_attr("params", values)
        # Finished or running elsewhere (another host); a failed trial's retry is no repeat.
        tried = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
        earlier = next((t for t in self.study.get_trials(deepcopy=False, states=tried)
                        if t.number != trial.number and t.user_attrs.get("params") == values), None)
        if earlier is not None:  # the sampler drew values already tried: nothing new to learn
            self.repeats += 1
            trial.set_user_attr("stopped", f"the same values as trial {earlier.number}")
            for budget, excess in earlier.constraints.items():  # a repeat of an infeasible trial is as infeasible
                trial.set_constraint(budget, excess)
            raise optuna.TrialPruned()
        self.repeats = 0
        started = time.monotonic()
        build = None
        try:
            trial_config = apply(self.config, values)
            build = Build(trial_config, self.data, self.out_dir / "search" / f"trial-{trial.number:03d}", self.cache_dir,
                          self.signing_key, self.progress, lambda message: None, on_epoch=self._judge(trial, _epochs(trial_config)))
            stop_early = trial_config.finetune.enabled and not trial_config.prune.enabled  # else nothing to save, or size changes
            trained = build.train(after_load=self._over_budget_stops(trial) if stop_early else None)
            scores = _scores(trained, self.data)
        except optuna.TrialPruned:
            build.discard_checkpoints()  # a stopped trial is never resumed
            self.say(f"search: trial {trial.number} stopped: {trial.user_attrs.get('stopped')} ({_describe(values)})")
            raise
        except KeyboardInterrupt:
            self.study.enqueue_trial(trial.params, skip_if_exists=False)  # a rerun trains it again, from its checkpoint
            raise
        except Exception as error:  # noqa: BLE001 - any trial may fail (a model that does not load); the search goes on
            reason = _first_line(error)
            trial.set_user_attr("error", reason[:500])
            self.say(f"search: trial {trial.number} failed: {reason} ({_describe(values)})")
            raise _TrialFailed(reason) from error
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - started, 2))
        for name, value in scores.items():
            trial.set_user_attr(name, value)
        from edgekit.passes.load import trained_to_onnx

        over = _hold_to_budgets(trial, self.budgets.violations(
            size_mb=scores["size_mb"], latency_p95_ms=scores["latency_p95_ms"], quantizable=not trained_to_onnx(trial_config.model.source)))
        self.say(f"search: trial {trial.number}: validation accuracy {scores['val_accuracy']:.4f} in "
                 f"{time.monotonic() - started:.0f} s ({_describe(values)})"
                 + (f"; over budget: {', '.join(over)}" if over else self._best_note(trial.number, scores['val_accuracy'])))
        return scores["val_accuracy"]

    def _over_budget_stops(self, trial: optuna.Trial):
        """Stop a trial whose loaded model is already over a size budget before fine-tuning trains it: fine-tuning does
        not change its size. (Latency is judged only on the finished trial: one noisy reading must not end it.)"""
        import optuna

        def after_load(loaded: Artifact) -> None:
            if not self.budgets.sizes:
                return
            size_mb = _parameter_mb(loaded)
            excess = self.budgets.violations(size_mb=size_mb, latency_p95_ms=None, quantizable=True)
            if any(value > 0 for value in excess.values()):
                over = _hold_to_budgets(trial, excess)
                trial.set_user_attr("size_mb", size_mb)
                trial.set_user_attr("stopped", f"over budget before fine-tuning ({', '.join(over)})")
                raise optuna.TrialPruned()

        return after_load

    def _judge(self, trial: optuna.Trial, epochs: int):
        import optuna

        halfway = max(1, math.ceil(epochs / 2))
        curve: dict[str, float] = {}

        def on_epoch(epoch: int, score: float) -> bool:
            curve[str(epoch)] = score
            trial.set_user_attr("epoch_scores", curve)
            # Judged halfway through its own schedule against earlier trials halfway through theirs: compared at the
            # same epoch, a long schedule (still at a high learning rate) would lose to a short one that has decayed.
            if epoch == halfway:
                trial.report(score, 1)
                if trial.should_prune():
                    trial.set_user_attr("stopped", f"validation {score:.4f} halfway (epoch {epoch} of {epochs}) is below "
                                                   "the median of earlier trials halfway")
                    raise optuna.TrialPruned()
            if epoch < epochs and time.monotonic() > self.deadline:  # training ends here, scored on its best epoch so far
                trial.set_user_attr("stopped", f"the search budget ended its training after epoch {epoch}; its best epoch is kept")
                return True
            return False

        return on_epoch

    def _best_note(self, number: int, accuracy: float) -> str:
        earlier = [t.value for t in _within_budgets(self.study) if t.number != number]
        return ": best so far" if not earlier or accuracy > max(earlier) else ""

    def describe_best(self) -> str:
        done = _within_budgets(self.study)
        if not done:
            return "search: no finished trial" + (" within the budgets" if self.budgets.names() else "") + " yet"
        best = max(done, key=lambda t: t.value)
        return f"search: best validation accuracy {best.value:.4f} (trial {best.number})"


def _hold_to_budgets(trial: optuna.Trial, excess: dict[str, float]) -> list[str]:
    """Record each budget's excess as an Optuna constraint, once per trial (TPE draws away from infeasible trials), and
    the budgets the trial breaks as the report shows them."""
    for budget, value in excess.items():
        trial.set_constraint(budget, value)
    over = [f"{budget}: {value:+.0%}" for budget, value in excess.items() if value > 0]
    trial.set_user_attr("over_budget", over)
    return over


def _excess(trial: optuna.trial.FrozenTrial) -> float:
    """The trial's summed excess over its budgets, as shares of them (0: within every one)."""
    return sum(max(0.0, value) for value in trial.constraints.values())


def _within_budgets(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None and _excess(t) <= 0]


def _scores(artifact: Artifact, data: TaskData) -> dict[str, float]:
    """The trained model on validation, its fp32 parameter size, and its PyTorch latency at batch 1 on this host."""
    from edgekit.artifact import Stage

    if artifact.stage is Stage.ONNX:
        return _onnx_scores(artifact, data)
    from edgekit import training
    from edgekit.measure import classification_metrics
    from edgekit.tasks import task_for

    task = task_for(artifact.task.kind)
    model = task.load_torch(artifact.directory)
    logits = training.predict(model, task.torch_batches(artifact.task, data.val), task.forward)
    metrics = classification_metrics(data.val.labels, logits.argmax(-1), artifact.task.labels)
    return {"val_accuracy": float(metrics.accuracy), "val_f1_macro": float(metrics.f1_macro), **_footprint(artifact, data, model)}


def _parameter_mb(artifact: Artifact) -> float:
    from edgekit.tasks import task_for

    model = task_for(artifact.task.kind).load_torch(artifact.directory)
    return round(sum(p.numel() * 4 for p in model.parameters()) / 1e6, 2)


def _footprint(artifact: Artifact, data: TaskData, model) -> dict[str, float]:
    """A PyTorch model's latency at batch 1 on this host and its fp32 parameter size."""
    import torch

    from edgekit.measure import latency
    from edgekit.tasks import task_for

    task = task_for(artifact.task.kind)
    one_row = next(iter(task.torch_batches(artifact.task, data.val.head(1), 1)))
    with torch.inference_mode():
        timed = latency(lambda: task.forward(model, one_row), iterations=LATENCY_RUNS, warmup=1)
    return {"latency_p50_ms": round(timed.p50_ms, 3), "latency_p95_ms": round(timed.p95_ms, 3),
            "size_mb": round(sum(p.numel() * 4 for p in model.parameters()) / 1e6, 2)}


def _onnx_scores(artifact: Artifact, data: TaskData) -> dict[str, float]:
    """A model trained straight to ONNX (trees): scored as ``_scores`` does, in ONNX Runtime; its size is the file's."""
    import numpy as np
    import onnxruntime

    from edgekit.measure import classification_metrics, latency
    from edgekit.tasks import model_feeds

    session = onnxruntime.InferenceSession(str(artifact.model_path), providers=["CPUExecutionProvider"])
    output = [artifact.task.output_name]
    logits = np.concatenate([session.run(output, model_feeds(artifact.task, data.val.inputs[start:start + 256]))[0]
                             for start in range(0, len(data.val), 256)])
    metrics = classification_metrics(data.val.labels, logits.argmax(-1), artifact.task.labels)
    one_row = model_feeds(artifact.task, data.val.inputs[:1])
    timed = latency(lambda: session.run(output, one_row), iterations=LATENCY_RUNS, warmup=1)
    return {"val_accuracy": float(metrics.accuracy), "val_f1_macro": float(metrics.f1_macro),
            "latency_p50_ms": round(timed.p50_ms, 3), "latency_p95_ms": round(timed.p95_ms, 3),
            "size_mb": round(artifact.model_path.stat().st_size / 1e6, 2)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _describe(values: dict[str, Any]) -> str:
    def short(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{key.removeprefix('finetune.')} {short(value)}" for key, value in values.items())


def _records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord(
        number=t.number, state=t.state.name, params=dict(t.user_attrs.get("params", {})),
        val_accuracy=t.user_attrs.get("val_accuracy"), val_f1_macro=t.user_attrs.get("val_f1_macro"),
        latency_p50_ms=t.user_attrs.get("latency_p50_ms"), latency_p95_ms=t.user_attrs.get("latency_p95_ms"),
        size_mb=t.user_attrs.get("size_mb"), over_budget=list(t.user_attrs.get("over_budget", [])),
        seconds=t.user_attrs.get("seconds"), epochs=dict(t.user_attrs.get("epoch_scores", {})),
        note=t.user_attrs.get("stopped") or t.user_attrs.get("error")
        or ("its host stopped answering; run again" if t.state.name == "FAIL" else None),
    ) for t in study.get_trials(deepcopy=False)]


def pareto_front(trials: list[TrialRecord]) -> list[int]:
    """Finished trials no other beats on validation accuracy, latency and size at once."""
    done = [t for t in trials if t.state == "COMPLETE"]

    def dominates(a: TrialRecord, b: TrialRecord) -> bool:
        at_least = a.val_accuracy >= b.val_accuracy and a.latency_p50_ms <= b.latency_p50_ms and a.size_mb <= b.size_mb
        better = a.val_accuracy > b.val_accuracy or a.latency_p50_ms < b.latency_p50_ms or a.size_mb < b.size_mb
        return at_least and better

    return [t.number for t in done if not any(dominates(o, t) for o in done if o is not t)]


def _outcome(config: BuildConfig, study: optuna.Study, name: str, shown: str, budgets: SearchBudgets) -> SearchOutcome:
    records = _records(study)
    done = [t for t in records if t.state == "COMPLETE"]
    if not done:
        raise _nothing_finished(records)
    excess = {t.number: _excess(t) for t in study.get_trials(deepcopy=False)}
    within = [t for t in done if excess.get(t.number, 0.0) <= 0]
    if within:
        chosen = max(within, key=lambda t: (t.val_accuracy, -t.latency_p50_ms, -t.number))
    else:
        chosen = min(done, key=lambda t: (excess.get(t.number, 0.0), -t.val_accuracy, t.number))
    return SearchOutcome(apply(config, chosen.params), records, chosen.number, pareto_front(records), name, shown,
                         config.search.budget_minutes, _spent(study) / 60, budgets, bool(within))


def _nothing_finished(records: list[TrialRecord]) -> EdgekitError:
    failures = "; ".join(f"trial {t.number}: {t.note}" for t in records if t.note) or "no trial ran"
    hint = ("; every model tried is over a target's size budget: relax the budget, add a smaller candidate "
            "(search.models) or let the search prune (prune.ratio in search.space)"
            if any(t.over_budget for t in records) and not any(t.state == "COMPLETE" for t in records) else "")
    return EdgekitError(f"no search trial finished: {failures}{hint}")


def _epochs(config: BuildConfig) -> int:
    """The epochs a trial's training runs at most: fine-tuning's when on, else the train section's (models built here)."""
    return config.finetune.epochs if config.finetune.enabled else config.train.epochs
