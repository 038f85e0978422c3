"""Loading YAML into pydantic models, with every problem reported at once.

One error lists each problem with its file, field, the value found and the
values allowed, so a user fixes a file in one pass instead of one error per run.
Both sides use it: target profiles and build configs on the build host, the
agent's settings on the device.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from device_agent.errors import UserError

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(UserError):
    """A YAML file (target profile, build config, agent settings) has problems, all reported together."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source}: {len(problems)} {noun}:\n{lines}")


def load_yaml_model(path: Path, model: type[ModelT]) -> ModelT:
    """Parse ``path`` as YAML and validate it as ``model``; raise ConfigError listing every problem."""
    return validate_model(read_yaml_mapping(path), model, source=str(path))


def read_yaml_mapping(path: Path, *, allow_empty: bool = False) -> dict[str, Any]:
    """The YAML mapping in ``path``; ConfigError when the file is missing, unreadable, not YAML or not a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot be read as UTF-8 text ({exc})"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    if document is None and allow_empty:
        return {}
    if not isinstance(document, dict):
        kind = "empty" if document is None else f"a {type(document).__name__}"
        raise ConfigError(str(path), [f"must be a mapping of field names to values, but it is {kind}"])
    return document


def validate_model(document: dict[str, Any], model: type[ModelT], *, source: str, missing_hints: dict[str, str] | None = None) -> ModelT:
    """Validate a parsed document; raise ConfigError naming every problem.

    ``missing_hints`` adds, per field, how else a required value can be given (e.g. a command-line flag).
    """
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(source, [describe_error(error, model, missing_hints or {}) for error in exc.errors()]) from None


def describe_error(error: Any, model: type[BaseModel], missing_hints: dict[str, str] | None = None) -> str:
    """One line for one pydantic error: field, problem, the value found, what is allowed."""
    loc = tuple(error["loc"])
    field = ".".join(str(part) for part in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"{field}: unknown field{suggestion} (allowed here: {', '.join(allowed)})"
    if kind == "missing":
        hint = (missing_hints or {}).get(field)
        return f"{field}: required field is missing" + (f"; {hint}" if hint else "")
    return f"{field}: {error['msg']} (got {error.get('input')!r})"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the sub-model found at ``loc``."""
    current: Any = model
    for part in loc:
        if _is_model(current) and part in current.model_fields:
            current = _inner_model(current.model_fields[part].annotation)
        # otherwise ``part`` is a list index or a dict key: ``current`` is already the item's model
    return list(current.model_fields) if _is_model(current) else []


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _inner_model(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as ``Model | None`` or ``dict[str, Model]``."""
    if _is_model(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if _is_model(found):
            return found
    return annotation
