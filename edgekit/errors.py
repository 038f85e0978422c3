"""User errors of the build host.

``EdgekitError`` and its children are problems the user can fix; the CLI prints
their message on one line and exits 2. Any other exception is a bug in edgekit
and keeps its traceback.
"""

from __future__ import annotations

from device_agent.errors import UserError
from device_agent.validation import ConfigError

__all__ = ["ConfigError", "EdgekitError", "UnknownTargetError"]


class EdgekitError(UserError):
    """A problem with the user's input, named together with how to fix it."""


class UnknownTargetError(EdgekitError):
    """A --target value is neither a built-in profile nor a YAML file."""
