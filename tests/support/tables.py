"""Synthetic tables for the tabular task's tests and bench/tabular_bench.py."""

from __future__ import annotations

import csv
import random
from pathlib import Path

COLUMNS = ["id", "amount", "age", "merchant", "country", "label"]


def write_fraud_table(path: Path, rows: int = 1200, seed: int = 0) -> Path:
    """A synthetic card-payments table: fraud when a large amount goes to an online or travel merchant, or a young
    customer pays in the US; amounts are missing now and then."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for number in range(rows):
            amount, age = round(rng.expovariate(1 / 50), 2), rng.randint(18, 80)
            merchant, country = rng.choice(["grocer", "fuel", "online", "travel", "cafe"]), rng.choice(["fr", "de", "us"])
            fraud = (amount > 80 and merchant in ("online", "travel")) or (country == "us" and age < 25)
            writer.writerow([number, "" if rng.random() < 0.05 else amount, age, merchant, country, "fraud" if fraud else "ok"])
    return path
