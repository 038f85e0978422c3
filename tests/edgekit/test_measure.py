"""edgekit.measure: the one place numbers are computed."""

from __future__ import annotations

import numpy as np
import pytest


def test_average_precision_of_the_positive_class():
    from edgekit.measure import average_precision

    assert average_precision([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2]) == 1.0, "every positive ranked first"
    # Ranked 1, 0, 1: precision 1/1 at the first positive, 2/3 at the second.
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([1, 0], [0.5, 0.5]) == 0.5, "a tie with a negative counts the negative first"
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    true, scores = rng.integers(0, 2, 500), rng.random(500)
    assert average_precision(true, scores) == pytest.approx(sklearn.average_precision_score(true, scores))
    with pytest.raises(ValueError, match="at least one positive"):
        average_precision([0, 0], [0.1, 0.2])
