"""The gates a rollout can hold a new version to, by name: one catalogue for the engine (``edgekit.fleet.rollouts``)
and for ``edgekit fleet deploy --help``, which must not import SQLAlchemy to describe them."""

ABSOLUTE_GATES = {"p95_ms": "worst window p95 in ms", "error_rate": "errors / requests, 0 to 1"}
RELATIVE_GATES = {"p95_ratio": "median window p95, new version / control",
                  "prediction_shift": "total variation distance of predicted-class mixes, new / control, 0 to 1"}
FLAG_GATES = {"drift": "no drift alert", "install": "every device installed it (always on)"}
