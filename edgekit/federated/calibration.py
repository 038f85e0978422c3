"""Head calibration after the last round: the classifier refitted from the sites' per-class feature statistics.

Under label skew FedAvg's head is the weak part of the federated model: each site's local epochs pull the head
toward its own classes, and the average of those heads is biased against classes few sites hold. The encoder's
features are less affected. So, when the rounds are over, every site runs its rows once through the final global
model and sends three sums over them, taken at the classifier's input: the row count per class, the feature sum per
class, and the feature scatter (the sum of outer products). Those are what a centralised linear discriminant needs,
summed over sites exactly as if the rows were in one place. They are exact sums, not noised. Without secure
aggregation the coordinator sees each site's; with it (``federated.secure_aggregation``) they travel masked like an
update and the coordinator unmasks only their sum over the sites. Either way a site leaves out the rows of any class
it holds fewer than ``MIN_CLASS_ROWS`` of: a class sum over one row would be that row's features. The coordinator fits the head in closed
form (shared-covariance LDA, with the covariance shrunk toward its mean variance) and keeps it only when its own
validation rows score it higher than FedAvg's head (the shrinkage is chosen there too, so the kept head's validation
score is slightly optimistic; the build's test split judges it).

A site sends statistics only when its own config allows (``federated.head_calibration`` on, privacy off: with
client-side privacy on the sums would leave un-noised) and says so when it joins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from edgekit.data import Split
    from edgekit.federated.site import AdapterModel

PHASE = "head-statistics"  # the fit instruction that asks a site for statistics instead of training
SHRINKAGES = (0.01, 0.05, 0.2, 0.5)  # covariance shrinkage toward a multiple of the identity, chosen on validation
MIN_CLASS_ROWS = 10  # a site's class with fewer rows stays out of its statistics


def classifier_layer(adapter: AdapterModel) -> torch.nn.Linear:
    """The trained linear layer that turns features into the labels' logits (inside peft's copy of the head)."""
    import torch

    for name, module in adapter.model.named_modules():
        if (isinstance(module, torch.nn.Linear) and "classifier" in name.split(".") and module.weight.requires_grad
                and module.out_features == len(adapter.labels)):
            return module
    raise RuntimeError("the adapter model has no trainable classifier layer with one row per label")


def features(adapter: AdapterModel, rows: Split) -> np.ndarray:
    """Each row's features at the classifier's input under the adapter's current weights (float64, rows × width)."""
    from edgekit import training
    from edgekit.tasks.text_classification import TASK

    captured: list[np.ndarray] = []
    layer = classifier_layer(adapter)
    hook = layer.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0].detach().cpu().double().numpy()))
    try:
        # fp32 as the exported model computes (no bf16 autocast on a GPU)
        training.predict(adapter.model, TASK.torch_batches(adapter.spec, rows), TASK.forward, bf16_autocast=False)
    finally:
        hook.remove()
    return np.concatenate(captured) if captured else np.zeros((0, layer.in_features))


def statistics(adapter: AdapterModel, rows: Split) -> list[np.ndarray]:
    """What a site sends: per-class row counts, per-class feature sums, and the feature scatter, over its rows of the
    classes it holds at least ``MIN_CLASS_ROWS`` of (none: empty sums)."""
    classes = len(adapter.labels)
    kept = np.flatnonzero(np.bincount(rows.labels, minlength=classes)[rows.labels] >= MIN_CLASS_ROWS)
    width = classifier_layer(adapter).in_features
    if not len(kept):
        return [np.zeros(classes), np.zeros((classes, width)), np.zeros((width, width))]
    x, labels = features(adapter, rows.subset(kept)), rows.labels[kept]
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    sums = np.zeros((classes, width))
    np.add.at(sums, labels, x)
    return [counts, sums, x.T @ x]


def statistics_shapes(classes: int, width: int) -> list[tuple[int, ...]]:
    """The shapes of what :func:`statistics` returns: counts, per-class sums, scatter."""
    return [(classes,), (classes, width), (width, width)]


def check_statistics(arrays: list[np.ndarray], classes: int, width: int, rows: int) -> str | None:
    """Why a site's reply is not a statistics reply of this federation's shapes and the site's ``rows``, or None."""
    shapes = [tuple(a.shape) for a in arrays]
    if shapes != statistics_shapes(classes, width):
        return f"it sent tensors of shapes {shapes[:3]}, not per-class statistics (is it an edgekit site of this version?)"
    if not all(np.isfinite(a).all() for a in arrays):
        return "it sent statistics that are not finite"
    counts, scatter = arrays[0], arrays[2]
    if (counts < 0).any() or not np.array_equal(counts, np.round(counts)) or counts.sum() > rows:
        return f"its class counts {counts.tolist()} are not whole numbers within its {rows} rows"
    scale = max(float(np.abs(scatter).max(initial=0.0)), 1.0)
    if not np.allclose(scatter, scatter.T, rtol=0, atol=1e-9 * scale) or (np.diag(scatter) < -1e-9 * scale).any():
        return "its feature scatter is not a symmetric matrix with a non-negative diagonal"
    return None


@dataclass(frozen=True)
class LinearHead:
    weight: np.ndarray  # classes × width
    bias: np.ndarray  # classes

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


def discriminant_head(counts: np.ndarray, sums: np.ndarray, scatter: np.ndarray, shrinkage: float) -> LinearHead:
    """Shared-covariance LDA from summed statistics: w_c = S⁻¹ μ_c, b_c = −½ μ_cᵀ S⁻¹ μ_c + log prior_c, with the
    within-class covariance shrunk toward its mean variance. A class no site holds gets a bias that never wins."""
    present = counts > 0
    total, width = counts.sum(), scatter.shape[0]
    means = np.zeros_like(sums)
    means[present] = sums[present] / counts[present, None]
    within = scatter - (means[present].T * counts[present]) @ means[present]
    covariance = within / max(total - present.sum(), 1.0)
    covariance = (1 - shrinkage) * covariance + shrinkage * np.trace(covariance) / width * np.eye(width)
    solved = np.linalg.solve(covariance, means.T).T  # classes × width
    bias = np.full(len(counts), -1e4)
    bias[present] = -0.5 * np.einsum("cd,cd->c", solved[present], means[present]) + np.log(counts[present] / total)
    weight = np.where(present[:, None], solved, 0.0)
    # The rows share a large common part (S⁻¹ times the mean of the means) that moves every logit alike: taken out, the
    # softmax is unchanged and the weights' range, which sets their int8 scales, is the part that tells classes apart.
    weight -= weight[present].mean(axis=0)
    bias[present] -= bias[present].mean()
    return LinearHead(weight, bias)


def tempered(head: LinearHead, x: np.ndarray, labels: np.ndarray) -> tuple[LinearHead, float]:
    """The head with its logits divided by the temperature that fits ``labels`` best (least cross-entropy on these rows).

    LDA's logits are Gaussian log-likelihood ratios, far sharper than a softmax head's (hundreds, not units): the
    probabilities the device reports would be near 0 or 1, and large logits carry larger float error through the
    export. The argmax is unchanged."""
    def cross_entropy(temperature: float) -> float:
        logits = head.logits(x) / temperature
        logits -= logits.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(labels)), labels]))

    temperature = min(np.logspace(-1, 3, 81), key=cross_entropy)
    return LinearHead(head.weight / temperature, head.bias / temperature), float(temperature)


def set_head(adapter: AdapterModel, head: LinearHead) -> None:
    import torch

    layer = classifier_layer(adapter)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(head.weight.astype(np.float32)))
        layer.bias.copy_(torch.from_numpy(head.bias.astype(np.float32)))


def current_head(adapter: AdapterModel) -> LinearHead:
    layer = classifier_layer(adapter)
    return LinearHead(layer.weight.detach().cpu().double().numpy(), layer.bias.detach().cpu().double().numpy())
