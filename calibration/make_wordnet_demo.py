#!/usr/bin/env python3
"""Build the WordNet noun-supersense demo dataset from WordNet 3.0's data.noun.

Each row is one noun synset: its gloss definition (the text) and its
lexicographer file, the "supersense" (the label), e.g. ``animal`` or ``food``.
The output is deterministic: running the script twice on the same data.noun
gives byte-identical files.

Regenerate the committed copy from the repository root with::

    apt-get install wordnet-base          # Debian's WordNet 3.0 database
    python calibration/make_wordnet_demo.py

Only the standard library is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

SEED = 20240601
MAX_PER_CLASS = 500
MIN_WORDS = 3
CALIBRATION_PER_CLASS = 25
# Fractions of each class's rows; train takes what is left after val and test.
VAL_FRACTION = 0.10
TEST_FRACTION = 0.20
SPLITS = ("train", "val", "test")
CLASSES = ("animal", "plant", "food", "artifact", "person", "location", "substance", "body")

# lex_filenum -> lexicographer file, as listed in WordNet 3.0's lexnames(5WN)
# (only the noun files, 03-28). If the WordNet folder has a ``lexnames`` file,
# it is read and checked against this table.
NOUN_LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact",
    7: "noun.attribute", 8: "noun.body", 9: "noun.cognition", 10: "noun.communication",
    11: "noun.event", 12: "noun.feeling", 13: "noun.food", 14: "noun.group",
    15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person",
    19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process",
    23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state",
    27: "noun.substance", 28: "noun.time",
}  # fmt: skip

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
DEFAULT_OUT = Path(__file__).resolve().parent / "wordnet-supersenses"
REGENERATE = "python calibration/make_wordnet_demo.py"


class DemoDataError(Exception):
    """A problem with the input that the user can fix."""


def check_lexnames(wordnet_dir: Path) -> None:
    """If WordNet ships a lexnames file, make sure it agrees with NOUN_LEXNAMES."""
    path = wordnet_dir / "lexnames"
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].startswith("noun."):
            number, name = int(fields[0]), fields[1]
            if NOUN_LEXNAMES.get(number) != name:
                raise DemoDataError(f"{path}: lexicographer file {number:02d} is {name}, expected {NOUN_LEXNAMES.get(number)}")


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: its ';'-separated parts up to the first quoted example."""
    parts = []
    for part in gloss.split(";"):
        part = part.strip()
        if part.startswith('"'):
            break
        if part:
            parts.append(part)
    return "; ".join(parts)


def read_data_noun(path: Path) -> tuple[list[str], list[dict]]:
    """The license header lines and one record per synset (offset, label, text)."""
    header, synsets = [], []
    with path.open(encoding="utf-8", newline="\n") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if line.startswith("  "):
                # "  12 text of the notice  " -> "text of the notice"
                fields = line.strip().split(" ", 1)
                header.append(fields[1].rstrip() if len(fields) == 2 else "")
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 4 or fields[2] != "n":
                raise DemoDataError(f"{path}:{number}: not a noun synset line: {line[:80]!r}")
            lexname = NOUN_LEXNAMES.get(int(fields[1]))
            if lexname is None:
                raise DemoDataError(f"{path}:{number}: unknown noun lexicographer file {fields[1]}")
            synsets.append({
                "offset": fields[0],
                "label": lexname.removeprefix("noun."),
                "text": definition_of(gloss),
            })  # fmt: skip
    return header, synsets


def order_key(seed: int, offset: str, purpose: str) -> str:
    """A seeded pseudo-random sort key that is the same on every Python version and platform."""
    return hashlib.sha256(f"{seed}:{purpose}:{offset}".encode()).hexdigest()


def build(synsets: list[dict], seed: int) -> tuple[list[dict], list[dict], dict]:
    """Select, de-duplicate, sample and split; returns (rows, calibration rows, stats)."""
    candidates = [s for s in synsets if s["label"] in CLASSES and len(s["text"].split()) >= MIN_WORDS]
    # Exact-duplicate texts: keep the lowest offset when all copies share a class,
    # drop every copy when they disagree (the text cannot tell the classes apart).
    by_text = defaultdict(list)
    for synset in candidates:
        by_text[synset["text"]].append(synset)
    kept, dropped_conflicts, dropped_copies = [], 0, 0
    for copies in by_text.values():
        if len({s["label"] for s in copies}) > 1:
            dropped_conflicts += len(copies)
            continue
        kept.append(min(copies, key=lambda s: int(s["offset"])))
        dropped_copies += len(copies) - 1

    rows, calibration, available = [], [], {}
    for label in CLASSES:
        pool = sorted((s for s in kept if s["label"] == label), key=lambda s: order_key(seed, s["offset"], "sample"))
        available[label] = len(pool)
        sample = pool[:MAX_PER_CLASS]
        n_val = round(len(sample) * VAL_FRACTION)
        n_test = round(len(sample) * TEST_FRACTION)
        n_train = len(sample) - n_val - n_test
        parts = {"train": sample[:n_train], "val": sample[n_train : n_train + n_val], "test": sample[n_train + n_val :]}
        chosen = {s["offset"] for s in sorted(parts["train"], key=lambda s: order_key(seed, s["offset"], "calibration"))[:CALIBRATION_PER_CLASS]}
        for split in SPLITS:
            for synset in sorted(parts[split], key=lambda s: int(s["offset"])):
                row = {"text": synset["text"], "label": label, "synset": synset["offset"], "split": split}
                rows.append(row)
                if synset["offset"] in chosen:
                    calibration.append(row)
    stats = {"candidates": len(candidates), "dropped_conflicts": dropped_conflicts, "dropped_copies": dropped_copies, "available": available}
    return rows, calibration, stats


def dump_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def package_version() -> str:
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "wordnet-base"], check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown (dpkg-query not available)"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown (wordnet-base not installed via dpkg)"


def readme(header: list[str], rows: list[dict], calibration: list[dict], stats: dict, seed: int, data_sha256: str, version: str) -> str:
    counts = Counter((row["label"], row["split"]) for row in rows)
    calib = Counter(row["label"] for row in calibration)
    table = ["| class | available | train | val | test | total | calibration (from train) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label in CLASSES:
        per = [counts[label, split] for split in SPLITS]
        table.append(f"| {label} | {stats['available'][label]} | {per[0]} | {per[1]} | {per[2]} | {sum(per)} | {calib[label]} |")
    totals = [sum(counts[label, split] for label in CLASSES) for split in SPLITS]
    table.append(f"| **all** | {sum(stats['available'].values())} | {totals[0]} | {totals[1]} | {totals[2]} | {sum(totals)} | {len(calibration)} |")
    notice = "\n".join(("    " + line) if line else "" for line in header)
    return f"""# WordNet noun supersenses: a small labelled text-classification set

Generated by `calibration/make_wordnet_demo.py`; do not edit by hand.

Each row is one WordNet 3.0 noun synset. The **text** is the synset's gloss
definition (the part of the gloss before its first quoted example); the
**label** is the synset's lexicographer file ("supersense") without the
`noun.` prefix. Eight classes: {", ".join(f"`{label}`" for label in CLASSES)}.

## Files

- `data.jsonl`: {len(rows)} rows, one JSON object per line:
  `{{"text": ..., "label": ..., "synset": <data.noun offset>, "split": "train" | "val" | "test"}}`.
- `calibration.jsonl`: {len(calibration)} rows ({CALIBRATION_PER_CLASS} per class) drawn from the
  train split, for post-training quantization calibration. These rows are
  byte-identical copies of lines in `data.jsonl` and stay in the train split.

## Counts

{chr(10).join(table)}

"available" is the number of distinct glosses of that class after filtering.

## How it was made

- Source: `/usr/share/wordnet/data.noun` from Debian's `wordnet-base` package,
  version `{version}` (WordNet 3.0); sha256 of data.noun:
  `{data_sha256}`.
- Glosses with fewer than {MIN_WORDS} words are dropped. Texts shared by several
  synsets are kept once (lowest offset) when all copies have the same class,
  and dropped entirely when the classes disagree ({stats["dropped_copies"]} copies and
  {stats["dropped_conflicts"]} conflicting rows dropped here).
- Per class, synsets are ordered by `sha256("<seed>:sample:<offset>")` with seed
  `{seed}`, and the first {MAX_PER_CLASS} are kept. Of those, the first 70% go to
  train, the next 10% to val, the last 20% to test. The calibration rows are
  the first {CALIBRATION_PER_CLASS} train rows of each class ordered by
  `sha256("<seed>:calibration:<offset>")`.
- Within each file rows are ordered by class, split, then synset offset.

Regenerate (from the repository root; the output is byte-identical for the
same data.noun):

    apt-get install wordnet-base
    {REGENERATE}

## License

WordNet 3.0 is distributed by Princeton University under the license below,
which permits redistribution provided the notice appears on all copies. It is
copied verbatim from the header of data.noun:

{notice}

WordNet citation: George A. Miller (1995). WordNet: A Lexical Database for
English. Communications of the ACM 38(11): 39-41. Christiane Fellbaum (1998,
ed.) WordNet: An Electronic Lexical Database. Cambridge, MA: MIT Press.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR, help="folder holding WordNet 3.0's data.noun (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: calibration/wordnet-supersenses)")
    parser.add_argument("--seed", type=int, default=SEED, help="sampling seed (default: %(default)s; the committed data uses the default)")
    args = parser.parse_args(argv)

    data_noun = args.wordnet_dir / "data.noun"
    if not data_noun.is_file():
        print(f"make_wordnet_demo: {data_noun} not found; install Debian's wordnet-base: apt-get install wordnet-base", file=sys.stderr)
        return 2
    try:
        check_lexnames(args.wordnet_dir)
        header, synsets = read_data_noun(data_noun)
    except DemoDataError as exc:
        print(f"make_wordnet_demo: {exc}", file=sys.stderr)
        return 1
    rows, calibration, stats = build(synsets, args.seed)
    data_sha256 = hashlib.sha256(data_noun.read_bytes()).hexdigest()

    args.out.mkdir(parents=True, exist_ok=True)
    outputs = {
        "data.jsonl": dump_jsonl(rows),
        "calibration.jsonl": dump_jsonl(calibration),
        "README.md": readme(header, rows, calibration, stats, args.seed, data_sha256, package_version()),
    }
    for name, text in outputs.items():
        (args.out / name).write_text(text, encoding="utf-8", newline="\n")
    print(f"make_wordnet_demo: wrote {len(rows)} rows and {len(calibration)} calibration rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
