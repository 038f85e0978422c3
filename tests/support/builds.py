"""Build configurations for tests: shipped target profiles with budgets a toy model can be judged by, and tiny-BERT builds."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def relaxed_target(folder: Path, name: str, **budgets: float) -> Path:
    """The shipped profile ``name`` saved as ``<name>-test`` with ``budgets`` overriding its own (a tiny model cannot meet MiniLM's)."""
    document = yaml.safe_load((ROOT / "targets" / f"{name}.yaml").read_text())
    document["name"] = f"{name}-test"
    document["budgets"].update(budgets)
    path = folder / f"{name}-test.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def tiny_text_build_config(root: Path, model: Path, targets: list[Path]) -> Path:
    """A build of the tiny BERT at ``model`` on the embedded demo data, short on every budget of time."""
    document = {
        "model": {"source": str(model), "name": "tiny", "version": "1.0.0"},
        "task": {"max_length": 64},
        "head": {"epochs": 5},
        "quantization": {"time_limit_s": 20, "evaluation_samples": 100},
        "evaluation": {"latency_iterations": 5, "throughput_seconds": 0.2},
        "targets": [str(t) for t in targets],
    }
    path = root / "build.yaml"
    path.write_text(yaml.safe_dump(document))
    return path
