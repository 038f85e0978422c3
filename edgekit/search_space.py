"""What a search may tune: dimensions named by config path, each task's catalogue of them, and the config a trial builds.

A dimension is written as a build YAML writes ``search.space`` (``edgekit.config.SearchValue``): a
``SearchRange``, a list of choices or one fixed value. Each task lists its catalogue (``Task.search_space``):
every key a search may tune for it, whether it is searched by default, and when it applies (a LoRA rank only
when the method is LoRA). ``search.space`` overrides an entry's values by key, adds a catalogue key that is not
searched by default, or fixes one; ``search.models`` adds ``model.source``. Two catalogue entries may share a key
under different conditions (the encoder's learning rate has one range for LoRA and one for full fine-tuning): each is
its own Optuna parameter: a conditional key is named ``key [values of its condition]``.

Two keys do more than set one field: ``finetune.method: none`` turns fine-tuning off (the head fitted on the
frozen encoder is the model), and ``prune.ratio`` turns pruning on (0: off).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edgekit.config import BuildConfig, SearchRange, SearchValue

if TYPE_CHECKING:
    import optuna

NO_FINETUNE = "none"


@dataclass(frozen=True)
class Dimension:
    key: str  # a config path, e.g. finetune.learning_rate
    values: SearchValue
    when: tuple[str, tuple[Any, ...]] | None = None  # applies only while another key has one of these values
    searched: bool = True  # False: in the catalogue, searched only when search.space names it

    @property
    def parameter(self) -> str:
        """The Optuna parameter name: the key, and for a conditional one the values it applies under."""
        return self.key if self.when is None else f"{self.key} [{'/'.join(map(str, self.when[1]))}]"

    def applies(self, chosen: dict[str, Any]) -> bool:
        return self.when is None or chosen.get(self.when[0]) in self.when[1]

    def suggest(self, trial: optuna.Trial) -> Any:
        values = self.values
        if isinstance(values, SearchRange):
            if values.integer:
                return trial.suggest_int(self.parameter, int(values.low), int(values.high), log=values.log)
            return trial.suggest_float(self.parameter, values.low, values.high, log=values.log)
        if isinstance(values, list):
            # Optuna's choices must be plain scalars: a list value (image widths) travels as its JSON text.
            picked = trial.suggest_categorical(self.parameter, [self.encoded(v) for v in values])
            return json.loads(picked) if isinstance(picked, str) and picked[:1] in "[{" else picked
        return values  # one fixed value

    def holds(self, value: Any) -> bool:
        """Whether ``value`` is one this dimension can draw (a starting point must be)."""
        if isinstance(self.values, SearchRange):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and self.values.low <= value <= self.values.high
        if isinstance(self.values, list):
            return value in self.values
        return value == self.values

    def encoded(self, value: Any) -> Any:
        return json.dumps(value) if isinstance(value, (list, dict)) else value


def resolve(config: BuildConfig, catalogue: tuple[Dimension, ...]) -> tuple[Dimension, ...]:
    """The dimensions this build searches: the catalogue's defaults, with ``search.space`` and ``search.models`` applied."""
    overrides = dict(config.search.space)
    if config.search.models and "model.source" not in overrides:
        overrides["model.source"] = list(dict.fromkeys([config.model.source, *config.search.models]))
    elif "model.source" not in overrides and any(d.when and d.when[0] == "model.source" for d in catalogue):
        overrides["model.source"] = config.model.source  # fixed: the dimensions of one model only read it
    dimensions = []
    for dimension in catalogue:
        if dimension.key in overrides:
            dimensions.append(replace(dimension, values=overrides[dimension.key], searched=True))
        elif dimension.searched:
            dimensions.append(dimension)
    named = {d.key for d in catalogue}
    dimensions[:0] = [Dimension(key, values) for key, values in overrides.items() if key not in named]  # model.source first
    return tuple(dimensions)


def sample(trial: optuna.Trial, dimensions: tuple[Dimension, ...]) -> dict[str, Any]:
    """One trial's values by config path (conditions read the values drawn before them)."""
    chosen: dict[str, Any] = {}
    for dimension in dimensions:
        if dimension.applies(chosen):
            chosen[dimension.key] = dimension.suggest(trial)
    return chosen


def current_values(config: BuildConfig, dimensions: tuple[Dimension, ...]) -> dict[str, Any]:
    """The config's own values of the searched keys, as Optuna parameters: the first trial is the build as written."""
    return starting_parameters({d.key: read(config, d.key) for d in dimensions}, dimensions)


def starting_parameters(values: dict[str, Any], dimensions: tuple[Dimension, ...]) -> dict[str, Any]:
    """Values by config path as the Optuna parameters of a queued trial; those a dimension cannot draw are left to the sampler."""
    chosen: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    for dimension in dimensions:
        if not dimension.applies(chosen) or dimension.key not in values:
            continue
        value = values[dimension.key]
        if isinstance(dimension.values, (SearchRange, list)) and dimension.holds(value):
            chosen[dimension.key] = value
            parameters[dimension.parameter] = dimension.encoded(value)
        elif dimension.holds(value):  # a fixed value: no Optuna parameter, but later conditions read it
            chosen[dimension.key] = value
    return parameters


def read(config: BuildConfig, key: str) -> Any:
    if key == "finetune.method" and not config.finetune.enabled:
        return NO_FINETUNE
    if key == "prune.ratio" and not config.prune.enabled:
        return 0.0
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def apply(config: BuildConfig, chosen: dict[str, Any]) -> BuildConfig:
    """The config with a trial's values set, validated as a YAML file would be (a bad combination is a clear error)."""
    document = config.model_dump()
    for key, value in chosen.items():
        if key == "finetune.method":
            document["finetune"]["enabled"] = value != NO_FINETUNE
            if value == NO_FINETUNE:
                continue
        if key == "prune.ratio":
            document["prune"]["enabled"] = bool(value)
            if not value:
                continue
        section, *path, field = key.split(".")
        node = document[section]
        for part in path:
            node = node[part]
        node[field] = value
    return BuildConfig.model_validate(document)
