"""Time-series classifiers edgekit builds itself: ``builtin:cnn1d``, ``builtin:minirocket`` and ``builtin:spectral-mlp``.

The first two map raw windows ``[batch, channels, steps]`` to class logits and normalise
each channel with the training series' mean and std inside the model; the third maps the
windows' spectral features (``device_agent.preprocess.spectral_features``, which the
device runs too) to logits. One training loop, one exporter and one parity check serve
all three. A model at the torch
stage is a folder: ``series_model.json`` (:class:`SeriesModelRecord`) and
``model.pt`` (the state dict). torch is imported inside the functions.

``builtin:cnn1d``: a fully convolutional network in the style of Wang et al. (2017):
Conv1d → BatchNorm1d → ReLU stages with "same" padding, global average pooling over
time, one Linear; ``model.widths`` are the stages' channels (default 32, 64, 64).

``builtin:minirocket``: the MiniRocket transform (Dempster, Schmidt & Webb, KDD 2021)
as fixed convolutions, then a trained linear head:

- kernels: MiniRocket's 84 kernels of length 9, weight 2 at three positions (every
  choice of 3 of 9) and -1 elsewhere (each sums to 0);
- dilations: MiniRocket's ``_fit_dilations``: up to 32, exponentially spaced from 1 to
  ``(steps - 1) / 8`` so the receptive field fits the series, ``model.widths: [n]``
  features in all (default 10,000 as the paper; 84 × 119 = 9,996 are used) spread
  over them;
- padding alternates as in the paper: for half the kernels at a dilation (which half
  alternates with the dilation) the PPV counts every step of the zero-padded output,
  for the others only the steps computed without padding: two ONNX Convs per
  dilation, one padded and one not;
- channels (MiniRocket multivariate): each (dilation, kernel) pair is applied to its
  own random subset of 1 to min(channels, 9) channels and summed over them: the
  Conv's weights are the kernel on the chosen channels and 0 on the others;
- biases: for each pair, quantiles (the golden-ratio sequence, as the paper) of its
  whole padded output on one random training series; fixed after fitting, like
  everything before the head;
- features: PPV, the proportion of counted steps where the output exceeds a bias
  (Conv → Greater → Cast → ReduceMean), standardised with the training features'
  mean and std; in the graph's order: per dilation, the padded kernels, then the others;
- head: one ``nn.Linear``, the only parameters, trained by cross-entropy in the one
  training loop (logistic regression; the paper fits a ridge classifier), from zero,
  on the standardised features computed once (:func:`trainable_part`).

``builtin:spectral-mlp``: per channel the mean, std, RMS, skewness and kurtosis, and the
log energy of ``SPECTRAL_BANDS`` (16, at most steps / 2) equal-width frequency bands,
computed in numpy on the build host and on the device (the bundle's
``SpectralPreprocessing``), standardised inside the model with the training
features' mean and std, then Linear → ReLU stages (``model.widths``, default 64, 32)
and one Linear: the Edge Impulse style of a small network on hand-made features.

The normalised input is rounded to a grid of 2^-10 before the convolutions. The
kernels' weights are small integers, so every convolution sum is then exact in
float32 in any order of summation, and PyTorch, ONNX Runtime on any CPU and the
device make the same comparisons against the biases, bit for bit: one flipped
comparison moves a logit by far more than the export's parity tolerance. (Without
the grid, recomputing GunPoint's features in float64 changed 36 of 1.5 M.) The sums
stay exact while under 2^14: normalised values within about 1,365 / (channels summed)
standard deviations. Differences from the reference implementation: the convolutions
see the normalised series (so zero padding is the channel's training mean), and the
random draws are numpy's ``default_rng(train.seed)``, not the reference's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.tasks.model_folder import load_model_folder, save_model_folder

if TYPE_CHECKING:
    import torch

CNN1D = "builtin:cnn1d"
MINIROCKET = "builtin:minirocket"
SPECTRAL_MLP = "builtin:spectral-mlp"
KNOWN_SOURCES = (CNN1D, MINIROCKET, SPECTRAL_MLP)
RECORD_FILE = "series_model.json"
DEFAULT_WIDTHS = {CNN1D: [32, 64, 64], MINIROCKET: [10_000], SPECTRAL_MLP: [64, 32]}
SPECTRAL_BANDS = 16  # frequency bands per channel (fewer for windows under 32 steps)
SPECTRAL_MIN_BANDS = 4
CNN_KERNELS = [7, 5, 3]  # per stage; later stages reuse the last
KERNEL_LENGTH = 9
KERNEL_COUNT = 84  # C(9, 3)
MAX_DILATIONS = 32  # the paper's max_dilations_per_kernel
INPUT_GRID = 2.0 ** -10  # see the module docstring: exact convolution sums
FIT_BATCH = 64


@dataclass(frozen=True)
class SeriesModelRecord:
    """Enough to rebuild the module before loading its weights."""

    source: str
    channels: int
    steps: int
    classes: int
    widths: list[int]  # cnn1d: channels per stage; minirocket: [features]
    mean: list[float]  # per channel, of the training series
    std: list[float]
    bands: int = 0  # spectral-mlp: frequency bands per channel (0: the model takes raw windows)

    def spectral(self):  # -> device_agent.bundle.SpectralPreprocessing | None
        """The features a spectral model takes, as its bundle records them; None for a model of raw windows."""
        from device_agent.bundle import SpectralPreprocessing

        return SpectralPreprocessing(channels=self.channels, steps=self.steps, bands=self.bands) if self.bands else None


def widths_problem(source: str, widths: list[int] | None) -> str | None:
    """Why ``model.widths`` does not fit ``source``, with the fix; None when it does."""
    if source == MINIROCKET and widths is not None and (len(widths) != 1 or widths[0] < KERNEL_COUNT):
        return (f"model.widths for {MINIROCKET} is [number of features] (at least {KERNEL_COUNT}, default "
                f"{DEFAULT_WIDTHS[MINIROCKET]}); got {widths}")
    return None


def new_model(record: SeriesModelRecord, train_x: np.ndarray, seed: int) -> torch.nn.Module:
    """``record``'s model, freshly initialised (seeded); MiniRocket's fixed stage fitted on ``train_x``."""
    import torch

    if record.source == SPECTRAL_MLP and record.steps < 2 * SPECTRAL_MIN_BANDS:
        raise EdgekitError(f"{SPECTRAL_MLP} needs series of at least {2 * SPECTRAL_MIN_BANDS} steps (its frequency bands); "
                           f"these have {record.steps}: use {CNN1D}, or longer series (task.series_length, task.window.length)")
    if record.source == MINIROCKET and record.steps < KERNEL_LENGTH:
        raise EdgekitError(f"{MINIROCKET} needs series of at least {KERNEL_LENGTH} steps (its kernels' length); these have "
                           f"{record.steps}: use {CNN1D}, or longer series (task.series_length, task.window.length)")
    torch.manual_seed(seed)
    model = build_model(record)
    if record.source == MINIROCKET:
        fit_minirocket(model, train_x, seed)
    elif record.source == SPECTRAL_MLP:
        features = spectral_input(record, train_x)
        model.mean.copy_(torch.from_numpy(features.mean(axis=0)).view(1, -1))
        model.std.copy_(torch.from_numpy(np.maximum(features.std(axis=0), 1e-6)).view(1, -1))
    return model


def spectral_input(record: SeriesModelRecord, windows: np.ndarray) -> np.ndarray:
    """A spectral model's FP32 input for raw windows, with the device's own function."""
    from device_agent.preprocess import spectral_features

    return spectral_features(windows, record.bands)


def trainable_part(model: torch.nn.Module, record: SeriesModelRecord, train_x: np.ndarray,
                   val_x: np.ndarray) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    """What the training loop trains, and its train and validation inputs: the whole CNN on the series; MiniRocket's
    head on the standardised features, computed once (the stage before the head is fixed), not in every epoch."""
    import torch

    if record.source == SPECTRAL_MLP:
        return model, spectral_input(record, train_x), spectral_input(record, val_x)
    if record.source != MINIROCKET:
        return model, train_x, val_x
    with torch.no_grad():
        features = [torch.cat([model.standardised(batch) for batch in torch.from_numpy(x).split(FIT_BATCH)]).numpy()
                    for x in (train_x, val_x)]
    return model.classifier, features[0], features[1]


def build_model(record: SeriesModelRecord) -> torch.nn.Module:
    """The module of ``record``, its weights not yet loaded."""
    if record.source == MINIROCKET:
        return _minirocket(record)
    if record.source == SPECTRAL_MLP:
        return _spectral_mlp(record)
    return _cnn1d(record)


def save_model(model: torch.nn.Module, record: SeriesModelRecord, folder: Path) -> None:
    save_model_folder(model, record, folder, RECORD_FILE)


def load_model(folder: Path) -> tuple[torch.nn.Module, SeriesModelRecord]:
    return load_model_folder(folder, RECORD_FILE, SeriesModelRecord, build_model)


def _cnn1d(record: SeriesModelRecord) -> torch.nn.Module:
    import torch
    from torch import nn

    class SeriesCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(record.mean, dtype=torch.float32).view(1, -1, 1))
            self.register_buffer("std", torch.tensor(record.std, dtype=torch.float32).view(1, -1, 1))
            layers: list[nn.Module] = []
            previous = record.channels
            for stage, width in enumerate(record.widths):
                kernel = CNN_KERNELS[min(stage, len(CNN_KERNELS) - 1)]
                layers += [nn.Conv1d(previous, width, kernel, padding=kernel // 2, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
                previous = width
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(previous, record.classes)

        def forward(self, series: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features((series - self.mean) / self.std).mean(dim=-1))

    return SeriesCNN()


def _spectral_mlp(record: SeriesModelRecord) -> torch.nn.Module:
    import torch
    from torch import nn

    width = record.spectral().width

    class SpectralMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(1, width))  # of the training features: set by new_model
            self.register_buffer("std", torch.ones(1, width))
            layers: list[nn.Module] = []
            previous = width
            for size in record.widths:
                layers += [nn.Linear(previous, size), nn.ReLU()]
                previous = size
            self.hidden = nn.Sequential(*layers)
            self.classifier = nn.Linear(previous, record.classes)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.hidden((features - self.mean) / self.std))

    return SpectralMLP()


# ---------------------------------------------------------------- MiniRocket


def minirocket_kernels() -> np.ndarray:
    """The 84 kernels ``[84, 9]``: weight 2 at three positions (every choice of 3 of 9, in order), -1 elsewhere."""
    kernels = np.full((KERNEL_COUNT, KERNEL_LENGTH), -1.0, np.float32)
    for row, chosen in enumerate(itertools.combinations(range(KERNEL_LENGTH), 3)):
        kernels[row, list(chosen)] = 2.0
    return kernels


def minirocket_dilations(steps: int, features: int) -> list[tuple[int, int]]:
    """(dilation, biases per kernel) for series of ``steps``: the paper's ``_fit_dilations``."""
    per_kernel = max(features, KERNEL_COUNT) // KERNEL_COUNT
    count = min(per_kernel, MAX_DILATIONS)
    max_exponent = max(math.log2((steps - 1) / (KERNEL_LENGTH - 1)), 0.0)
    dilations, repeats = np.unique(np.logspace(0, max_exponent, count, base=2).astype(np.int32), return_counts=True)
    biases = (repeats * (per_kernel / count)).astype(np.int32)
    for index in range(per_kernel - int(biases.sum())):  # the remainder, one each from the smallest dilation on
        biases[index % len(biases)] += 1
    return [(int(d), int(b)) for d, b in zip(dilations, biases, strict=True)]


def golden_quantiles(count: int) -> np.ndarray:
    """The paper's bias quantiles: the fractional parts of i × golden ratio, i = 1..count."""
    return np.array([(i * (math.sqrt(5) + 1) / 2) % 1 for i in range(1, count + 1)], dtype=np.float32)


def _minirocket(record: SeriesModelRecord) -> torch.nn.Module:
    import torch
    from torch import nn

    class Dilation(nn.Module):
        """The 84 kernels at one dilation as two convolutions: PPV features ``[batch, 84 × biases]``.

        Padding alternates (the paper): kernels ``first_padded``, +2, +4, ... count every step of the zero-padded
        output; the others only the steps computed without padding, so their convolution has no padding.
        """

        def __init__(self, index: int, dilation: int, biases: int) -> None:
            super().__init__()
            self.dilation = dilation
            self.first_padded = index % 2
            for part in ("padded", "valid"):
                self.register_buffer(f"{part}_weight", torch.zeros(KERNEL_COUNT // 2, record.channels, KERNEL_LENGTH))
                self.register_buffer(f"{part}_bias", torch.zeros(KERNEL_COUNT // 2, biases, 1))

        def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Rows in kernel order → (the padded kernels', the others')."""
            return rows[self.first_padded::2], rows[1 - self.first_padded::2]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            padded = nn.functional.conv1d(x, self.padded_weight, padding=(KERNEL_LENGTH - 1) * self.dilation // 2,
                                          dilation=self.dilation)
            valid = nn.functional.conv1d(x, self.valid_weight, dilation=self.dilation)
            return torch.cat([_ppv(padded, self.padded_bias), _ppv(valid, self.valid_bias)], dim=1)

    class MiniRocket(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(record.mean, dtype=torch.float32).view(1, -1, 1))
            self.register_buffer("std", torch.tensor(record.std, dtype=torch.float32).view(1, -1, 1))
            layout = minirocket_dilations(record.steps, record.widths[0])
            self.dilations = nn.ModuleList(Dilation(i, d, b) for i, (d, b) in enumerate(layout))
            self.biases = sum(b for _, b in layout)  # per kernel, over the dilations
            features = KERNEL_COUNT * self.biases
            self.register_buffer("feature_mean", torch.zeros(features))
            self.register_buffer("feature_std", torch.ones(features))
            self.classifier = nn.Linear(features, record.classes)
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

        def normalise(self, series: torch.Tensor) -> torch.Tensor:
            """Per channel, then onto the 2^-10 grid: exact convolution sums (module docstring)."""
            return torch.round((series - self.mean) / self.std / INPUT_GRID) * INPUT_GRID

        def features(self, series: torch.Tensor) -> torch.Tensor:
            with torch.autocast(series.device.type, enabled=False):  # comparisons against the biases need float32
                x = self.normalise(series.float())
                return torch.cat([dilation(x) for dilation in self.dilations], dim=1)

        def standardised(self, series: torch.Tensor) -> torch.Tensor:
            return (self.features(series) - self.feature_mean) / self.feature_std

        def forward(self, series: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.standardised(series))

    return MiniRocket()


def _ppv(convolved: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[batch, kernels, steps]`` against ``[kernels, biases, 1]`` → the proportion of positive values, ``[batch, kernels × biases]``."""
    return (convolved.unsqueeze(2) > bias).to(convolved.dtype).mean(dim=-1).flatten(1)


def fit_minirocket(model: torch.nn.Module, train_x: np.ndarray, seed: int) -> None:
    """MiniRocket's fit, in place: each (dilation, kernel) pair's channels and biases, then the feature statistics."""
    import torch

    rng = np.random.default_rng(seed)
    kernels = torch.from_numpy(minirocket_kernels())
    quantiles = golden_quantiles(KERNEL_COUNT * model.biases)
    with torch.no_grad():
        x = model.normalise(torch.from_numpy(train_x))
        start = 0
        for dilation in model.dilations:
            weight = kernels[:, None, :] * torch.from_numpy(_channel_subsets(rng, train_x.shape[1]))[:, :, None]
            # Each kernel's biases: quantiles of its whole padded output on one random training series.
            examples = x[torch.from_numpy(rng.integers(len(x), size=KERNEL_COUNT))]
            padding = (KERNEL_LENGTH - 1) * dilation.dilation // 2
            convolved = torch.nn.functional.conv1d(examples, weight, padding=padding, dilation=dilation.dilation)
            own = convolved[torch.arange(KERNEL_COUNT), torch.arange(KERNEL_COUNT)]  # [84, steps]: kernel k on example k
            count = dilation.padded_bias.shape[1]
            wanted = torch.from_numpy(quantiles[start:start + KERNEL_COUNT * count].reshape(KERNEL_COUNT, count))
            biases = torch.stack([torch.quantile(own[k], wanted[k]) for k in range(KERNEL_COUNT)]).unsqueeze(-1)
            padded_weight, valid_weight = dilation.split(weight)
            padded_bias, valid_bias = dilation.split(biases)
            dilation.padded_weight.copy_(padded_weight)
            dilation.valid_weight.copy_(valid_weight)
            dilation.padded_bias.copy_(padded_bias)
            dilation.valid_bias.copy_(valid_bias)
            start += KERNEL_COUNT * count
        features = torch.cat([model.features(batch) for batch in torch.from_numpy(train_x).split(FIT_BATCH)])
        model.feature_mean.copy_(features.mean(0))
        std = features.std(0)
        model.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # a constant feature stays as it is


def _channel_subsets(rng: np.random.Generator, channels: int) -> np.ndarray:
    """``[84, channels]`` of 0/1: per kernel, 1 to min(channels, 9) channels, their count log-uniform (the paper)."""
    mask = np.zeros((KERNEL_COUNT, channels), np.float32)
    most = min(channels, KERNEL_LENGTH)
    for row in range(KERNEL_COUNT):
        count = int(2 ** rng.uniform(0, math.log2(most + 1)))
        mask[row, rng.choice(channels, min(count, most), replace=False)] = 1.0
    return mask
