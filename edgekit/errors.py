"""User errors of the build host.

``EdgekitError`` and its children are problems the user can fix; the CLI prints
their message on one line and exits 2. Any other exception is a bug in edgekit
and keeps its traceback.
"""

from __future__ import annotations

from device_agent.errors import UserError


class EdgekitError(UserError):
    """A problem with the user's input, named together with how to fix it."""


class ConfigError(EdgekitError):
    """A YAML file (target profile, build config) has one or more problems, all reported together."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source}: {len(problems)} {noun}:\n{lines}")


class UnknownTargetError(EdgekitError):
    """A --target value is neither a built-in profile nor a YAML file."""
