"""An attribution heat map drawn over the image the model saw, as PNG bytes (Pillow and numpy).

Red where the pixels support the predicted class, blue where they speak against it, transparent where they do not
matter; the image underneath in grey. Scores are scaled by the largest magnitude, so maps of one image compare, and
the image is enlarged by whole pixels (nearest neighbour) so a 28x28 input is readable.
"""

from __future__ import annotations

import io

import numpy as np

MIN_SIDE = 224  # pixels: small inputs are enlarged to at least this by an integer factor


def overlay(pixels: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """``pixels`` float ``[h, w, channels]`` in 0..255 and ``heatmap`` ``[h, w]`` → uint8 RGB ``[h, w, 3]``."""
    grey = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
    low, high = float(grey.min()), float(grey.max())
    grey = (grey - low) / ((high - low) or 1.0) * 0.6 + 0.2  # dimmed, so the colours stand out
    base = np.repeat(grey[..., None], 3, axis=-1)
    scale = float(np.abs(heatmap).max()) or 1.0
    strength = np.clip(np.abs(heatmap) / scale, 0, 1)[..., None]
    colour = np.where((heatmap >= 0)[..., None], np.array([1.0, 0.1, 0.1]), np.array([0.1, 0.3, 1.0]))
    mixed = base * (1 - 0.75 * strength) + colour * 0.75 * strength
    return (np.clip(mixed, 0, 1) * 255).round().astype(np.uint8)


def heatmap_png(pixels: np.ndarray, heatmap: np.ndarray) -> bytes:
    """The overlay as PNG bytes, enlarged to at least ``MIN_SIDE`` pixels on its shorter side."""
    from PIL import Image

    rgb = overlay(pixels, heatmap)
    factor = max(1, -(-MIN_SIDE // min(rgb.shape[:2])))
    rgb = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
