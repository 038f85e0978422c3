"""Write examples/data/breast-cancer-wisconsin.csv from the copy scikit-learn ships (no download).

The Breast Cancer Wisconsin (Diagnostic) data set: 569 fine-needle aspirates of breast masses, 30 numeric features
of the cell nuclei in each image, diagnosed malignant (212) or benign (357). Source: W. N. Street, W. H. Wolberg and
O. L. Mangasarian, UCI Machine Learning Repository (CC BY 4.0), https://doi.org/10.24432/C5DW2B.
Run once with scikit-learn installed: python examples/data/make_breast_cancer.py
"""

from __future__ import annotations

import csv
from pathlib import Path

from sklearn.datasets import load_breast_cancer

OUT = Path(__file__).with_name("breast-cancer-wisconsin.csv")


def main() -> None:
    data = load_breast_cancer()
    with OUT.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*data.feature_names, "diagnosis"])
        for features, target in zip(data.data, data.target, strict=True):
            writer.writerow([*(f"{value:g}" for value in features), data.target_names[target]])
    print(f"wrote {OUT} ({len(data.target)} rows)")


if __name__ == "__main__":
    main()
