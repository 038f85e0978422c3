"""Printing for the command line: JSON for machines, rich tables for people."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def print_json(document: Any) -> None:
    """Write ``document`` as indented JSON on stdout, nothing else (no colour, no wrapping)."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, overflow="fold", no_wrap=index == 0)
    for row in rows:
        table.add_row(*row)
    console.print(table)
