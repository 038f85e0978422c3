"""How ``edgekit federated simulate`` deals the build's training rows to simulated sites.

Three schemes, named on the command line:

- ``iid``: a seeded shuffle cut into N near-equal parts (every site sees every class about equally);
- ``dirichlet:ALPHA``: for each class, its rows are shared among the sites in proportions drawn from a
  Dirichlet(ALPHA) distribution, the usual way to simulate label skew (small ALPHA: each site holds a few
  classes; large ALPHA: close to iid);
- ``by-column:NAME``: one site per value of a column of the data file (a hospital, a branch, a region), the
  natural split when the data says where each row came from.

Every site ends with at least one row; a scheme that would leave one empty is an error naming the fix. Only
the training split is dealt out: validation and test stay with the coordinator, which judges each round's
global model and gates the bundles on them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

PARTITION_HELP = "iid, dirichlet:ALPHA (label skew; e.g. dirichlet:0.5) or by-column:NAME (one site per value of a data column)"
MIN_SITE_ROWS = 1


@dataclass(frozen=True)
class PartitionScheme:
    kind: str  # iid | dirichlet | by-column
    alpha: float | None = None
    column: str | None = None

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        return f"by-column:{self.column}" if self.kind == "by-column" else self.kind


def parse_partition(text: str) -> PartitionScheme:
    """``iid``, ``dirichlet:ALPHA`` or ``by-column:NAME``; anything else is an error saying what is accepted."""
    text = text.strip()
    if text == "iid":
        return PartitionScheme("iid")
    match = re.fullmatch(r"dirichlet:(.*)", text)
    if match:
        try:
            alpha = float(match.group(1))
        except ValueError:
            alpha = -1.0
        if not alpha > 0:
            raise EdgekitError(f"--partition {text}: ALPHA must be a number above 0 (0.1: strong label skew, 100: near iid)")
        return PartitionScheme("dirichlet", alpha=alpha)
    match = re.fullmatch(r"by-column:(.+)", text)
    if match:
        return PartitionScheme("by-column", column=match.group(1))
    raise EdgekitError(f"unknown --partition {text!r}; use {PARTITION_HELP}")


@dataclass(frozen=True)
class SitePart:
    """One simulated site's rows: indices into the training split, and what it is called."""

    name: str
    rows: np.ndarray

    def label_counts(self, labels: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
        counts = Counter(int(label) for label in labels[self.rows])
        return {names[index]: counts[index] for index in sorted(counts)}


def partition_rows(scheme: PartitionScheme, labels: np.ndarray, sites: int, seed: int,
                   column_values: list[str] | None = None) -> list[SitePart]:
    """Deal the rows whose class indices are ``labels`` to ``sites`` sites (``by-column``: one per distinct value of
    ``column_values``, row-aligned with ``labels``; ``sites`` is then only checked against their number)."""
    if sites < 1:
        raise EdgekitError("--clients must be at least 1")
    if len(labels) < sites * MIN_SITE_ROWS:
        raise EdgekitError(f"{len(labels)} training rows cannot be dealt to {sites} sites; use fewer --clients")
    rng = np.random.default_rng(seed)
    if scheme.kind == "iid":
        parts = np.array_split(rng.permutation(len(labels)), sites)
        return [SitePart(f"site-{i}", np.sort(part)) for i, part in enumerate(parts)]
    if scheme.kind == "dirichlet":
        return _dirichlet(labels, sites, scheme.alpha, rng)
    return _by_column(scheme.column, column_values, sites)


def _dirichlet(labels: np.ndarray, sites: int, alpha: float, rng: np.random.Generator) -> list[SitePart]:
    """Per class, cut its shuffled rows at cumulative Dirichlet(alpha) proportions; redraw (up to 100 times) while a
    site would end with no row at all, then give each empty site one row from the largest."""
    for _ in range(100):
        members: list[list[int]] = [[] for _ in range(sites)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).round().astype(int)
            for site, part in enumerate(np.split(rows, cuts)):
                members[site].extend(part.tolist())
        if all(members):
            break
    for site in range(sites):  # very small alpha on few rows: lend one row so every site can train
        if not members[site]:
            largest = max(range(sites), key=lambda s: len(members[s]))
            members[site].append(members[largest].pop())
    return [SitePart(f"site-{i}", np.sort(np.array(rows, dtype=np.int64))) for i, rows in enumerate(members)]


def _by_column(column: str | None, values: list[str] | None, sites: int) -> list[SitePart]:
    if values is None:
        raise EdgekitError(f"--partition by-column:{column}: the data file has no column {column!r}")
    distinct = sorted(set(values))
    if len(distinct) != sites:
        raise EdgekitError(f"--partition by-column:{column}: the training rows hold {len(distinct)} value(s) of {column!r} "
                           f"({', '.join(distinct[:8])}{', ...' if len(distinct) > 8 else ''}); pass --clients {len(distinct)}")
    by_value = np.array(values)
    return [SitePart(value, np.flatnonzero(by_value == value)) for value in distinct]


def column_values(path: Path, text_column: str, label_column: str, column: str, texts: tuple[str, ...],
                  labels: tuple[str, ...]) -> list[str]:
    """The value of ``column`` for each training row (``texts`` with label names ``labels``), read from the data file:
    a row is found by its text and label as the build reads them, since cleaning keeps one row per pair."""
    from edgekit.tasks.text_data import label_cell, read_rows, text_cell

    rows = read_rows(path, text_column, label_column, split_column=column)
    if not any(row.split is not None for row in rows):
        raise EdgekitError(f"--partition by-column:{column}: {path} has no column {column!r} (or it is empty)")
    where = {(text_cell(row.text), label_cell(row.label)): row.split for row in rows if row.error is None}
    found = [where.get((text, label)) for text, label in zip(texts, labels)]
    missing = sum(value is None for value in found)
    if missing:
        raise EdgekitError(f"--partition by-column:{column}: {missing} training row(s) have no value in {column!r}; "
                           "fill the column for every row or choose another partition")
    return [str(value) for value in found]
