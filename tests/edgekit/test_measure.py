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


def test_the_wilson_lower_bound_is_sound_near_one_and_tightens_with_rows() -> None:
    from edgekit.measure import wilson_lower_bound

    assert wilson_lower_bound(400, 400) == pytest.approx(0.99328, abs=1e-5)
    assert wilson_lower_bound(399, 400) == pytest.approx(0.98888, abs=1e-5)
    assert wilson_lower_bound(990, 1000) < 0.99 < wilson_lower_bound(1000, 1000)
    assert wilson_lower_bound(9950, 10000) > wilson_lower_bound(995, 1000) > wilson_lower_bound(199, 200)
    assert wilson_lower_bound(0, 10) == 0.0


def test_fidelity_counts_flips_and_bounds_the_agreement() -> None:
    from edgekit.measure import fidelity

    reference = np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1, 2, 0]]
    candidate = reference.copy()
    candidate[[2, 5]] = np.eye(3)[[0, 0]]  # two rows now predict class 0
    measured = fidelity(reference, candidate)
    assert measured.flips == 2 and measured.top1_agreement == pytest.approx(0.8)
    assert 0 < measured.top1_agreement_lower_95 < 0.8


def test_pr_auc_is_of_the_rarer_class():
    import numpy as np

    from edgekit.measure import rare_class_pr_auc

    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.05, 0.95]])
    value, label = rare_class_pr_auc(np.array([0, 1, 1, 1, 1]), probabilities, ("fraud", "ok"))
    assert label == "fraud" and value == 1.0  # the one fraud row has the highest fraud probability
    assert rare_class_pr_auc(np.array([1, 1]), probabilities[:2], ("fraud", "ok")) == (None, None)
