"""User errors, and how both command lines turn them into one line and exit code 2.

A ``UserError`` is a problem the user can fix (a bad file, a missing key, a
tampered bundle). The CLIs print its message and exit with code 2; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup


class UserError(Exception):
    """A problem with the user's input, named together with how to fix it."""

    exit_code = 2


class UserErrorGroup(TyperGroup):
    """A command group that reports a UserError from any sub-command as ``error: ...`` and exit code 2."""

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None
