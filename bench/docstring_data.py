"""A second labelled text set, not from WordNet: the first paragraph of public docstrings, labelled by library.

    python bench/docstring_data.py OUT.csv [--per-class 500]

Six classes, the libraries installed with edgekit's test dependencies: numpy,
scipy, torch, pandas, sklearn (scikit-learn) and sympy. For each, public
functions, classes and methods reachable from its submodules give the first
paragraph of their docstring (40 to 400 characters, whitespace collapsed).
Duplicated texts are dropped everywhere (a text seen in two libraries goes),
then each class keeps ``--per-class`` texts drawn with a fixed seed, and the
rows are written as ``text,label`` (the build splits them 70/10/20). The
texts depend on the installed versions, which the CSV's companion
``.versions.json`` records.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.metadata
import inspect
import json
import pkgutil
import random
import re
import warnings
from pathlib import Path

LIBRARIES = {"numpy": "numpy", "scipy": "scipy", "torch": "torch", "pandas": "pandas", "sklearn": "scikit-learn", "sympy": "sympy"}
MIN_CHARS, MAX_CHARS = 40, 400
SKIPPED_MODULE_PARTS = ("test", "tests", "testing", "_private", "conftest", "benchmarks")


def _first_paragraph(doc) -> str | None:
    if not isinstance(doc, str) or not doc:
        return None
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc), maxsplit=1)[0]
    # A docstring rendered from an object's repr may hold its memory address, which differs from run to run.
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(paragraph.split()))
    return text if MIN_CHARS <= len(text) <= MAX_CHARS else None


def _modules(package: str) -> list:
    root = importlib.import_module(package)
    found = [root]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        parts = info.name.split(".")
        if any(part.startswith("_") or part in SKIPPED_MODULE_PARTS for part in parts[1:]):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found.append(importlib.import_module(info.name))
        except Exception:  # noqa: BLE001 - optional submodules whose own dependencies are missing
            continue
    return found


def _texts(package: str) -> set[str]:
    texts = set()
    for module in _modules(package):
        for name, value in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value)):
                continue
            if not (getattr(value, "__module__", None) or "").startswith(package):
                continue
            members = [value] + ([v for k, v in vars(value).items() if not k.startswith("_") and callable(v)] if inspect.isclass(value) else [])
            for member in members:
                text = _first_paragraph(getattr(member, "__doc__", None))
                if text:
                    texts.add(text)
    return texts


def build(out: Path, per_class: int, seed: int = 0) -> dict[str, int]:
    by_library = {label: _texts(package) for label, package in ((label, label) for label in LIBRARIES)}
    seen: dict[str, int] = {}
    for texts in by_library.values():
        for text in texts:
            seen[text] = seen.get(text, 0) + 1
    generator = random.Random(seed)
    rows = []
    for label, texts in by_library.items():
        unique = sorted(text for text in texts if seen[text] == 1)
        generator.shuffle(unique)
        rows += [(text, label) for text in unique[:per_class]]
    generator.shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    versions = {name: importlib.metadata.version(dist) for name, dist in LIBRARIES.items()}
    out.with_suffix(".versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    return {label: sum(1 for _, l in rows if l == label) for label in LIBRARIES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=500)
    args = parser.parse_args()
    counts = build(args.out, args.per_class)
    print(f"wrote {sum(counts.values())} rows to {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
