"""Headless Chromium for tests: render a page to a PNG the way an operator's browser would draw it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def screenshot(page: Path, workdir: Path, size: tuple[int, int] = (1280, 2000)):  # -> PIL.Image.Image
    """Render ``page`` headless (no sandbox, no GPU, no background networking) and return the screenshot as RGB."""
    from PIL import Image

    browser = next(shutil.which(name) for name in BROWSERS if shutil.which(name))
    png = workdir / f"{page.stem}.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={workdir / 'chromium-profile'}", f"--screenshot={png}",
         f"--window-size={size[0]},{size[1]}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    assert png.stat().st_size > 30_000, "a rendered page, not a blank one"
    return Image.open(png).convert("RGB")
