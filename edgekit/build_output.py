"""A build's output folder (``edgekit build --out``): the pass cache entries its latest build used.

``<out>/passes`` holds a link ``NN-<pass>`` per shared pass, but a rebuild into the same folder with another plan leaves
the old build's links beside the new ones (a build with fine-tuning links ``03-export``; a rebuild without it links
``02-export`` and leaves ``03-export`` pointing at the old model). So the links alone do not say which model the
bundles came from. Each target's ``report.json`` does: its ``passes`` list every pass the build ran with its cache
key (``[{name, key, ...}]``). The newest ``report.json`` is the latest finished build's (a build writes its reports
when it finishes), and a pass's output is the linked cache entry named by that key.

``edgekit explain OUT_DIR`` (the export pass's PyTorch model) and ``edgekit retrain --from OUT_DIR`` (the finetune or
load pass's) both find a build's model here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    from edgekit.artifact import Artifact

REPORT_FILE = "report.json"


class BuildOutputError(EdgekitError):
    """The folder holds no finished build to read passes from."""


@dataclass(frozen=True)
class PassRun:
    """A pass the latest build ran, and the cache key of its output."""

    name: str
    key: str


@dataclass(frozen=True)
class PassOutput:
    """A pass's output in the pass cache, as the latest build into an output folder used it."""

    name: str
    key: str
    entry: Path | None  # the cache entry the folder links, None when no link in <out>/passes names it
    artifact: Artifact | None  # None when the entry is gone from the cache (evicted, cleared, moved)


def latest_passes(out_dir: Path) -> list[PassRun]:
    """The passes of the latest finished build into ``out_dir`` (the shared ones, then its target's), in order."""
    reports = sorted(out_dir.glob(f"*/{REPORT_FILE}"), key=lambda path: path.stat().st_mtime_ns)
    if not reports:
        raise BuildOutputError(f"{out_dir} holds no {REPORT_FILE} of a finished build (<out>/<target>/{REPORT_FILE}); "
                               "give the --out folder of a finished `edgekit build`")
    try:
        recorded = json.loads(reports[-1].read_text(encoding="utf-8"))["passes"]
        return [PassRun(str(run["name"]), str(run["key"])) for run in recorded]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BuildOutputError(f"{reports[-1]} does not list the build's passes ({type(error).__name__}: {error}); "
                               "rebuild into this folder with `edgekit build`") from None


def pass_output(out_dir: Path, names: tuple[str, ...]) -> PassOutput | None:
    """The output of the last pass among ``names`` that the latest build into ``out_dir`` ran (None when it ran none
    of them), found through the link in ``<out>/passes`` to its cache entry: the entry whose name is the key the
    build's report records, so a link left by an earlier build is never taken."""
    from edgekit.pipeline import read_artifact

    runs = [run for run in latest_passes(out_dir) if run.name in names]
    if not runs:
        return None
    run = runs[-1]
    links = out_dir / "passes"
    entries = [link.resolve() for link in sorted(links.iterdir()) if link.is_symlink()] if links.is_dir() else []
    entry = next((entry for entry in entries if (entry.parent.name, entry.name) == (run.name, run.key)), None)
    return PassOutput(run.name, run.key, entry, read_artifact(entry) if entry is not None else None)
