"""``edgekit explain``: which words, image regions or columns a model's decision rests on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from edgekit.cli.bundle import keyring_option
from edgekit.cli.output import console, print_json


def explain(
    model: Path = typer.Argument(..., help=(
        "A signed bundle (.ekb): occlusion, run with ONNX Runtime on the bundle's own model. Or a build's output "
        "folder (--out of `edgekit build`): Integrated Gradients (Captum) on the fp32 PyTorch model the bundles came "
        "from."), metavar="BUNDLE|OUT_DIR"),
    text: str | None = typer.Option(None, "--text", help="Explain this text (text bundles)."),
    image: Path | None = typer.Option(None, "--image", help="Explain this image file (image bundles): PNG, JPEG, ..."),
    row: str | None = typer.Option(None, "--row", help="Explain this table row (table bundles): a JSON object, or @FILE."),
    out: Path | None = typer.Option(None, "--out", help=(
        "Images: where the heat map PNG goes (default: <image name>.explained.png in the current folder). "
        "Text and rows: write the whole JSON explanation there too (every word or column, whatever --top says).")),
    top: int = typer.Option(10, "--top", min=1, help="How many words or columns to list, strongest support first."),
    as_json: bool = typer.Option(False, "--json", help="Print {label, probability, method, tokens: [{token, score}]} (rows: columns)."),
    keyring: Path | None = keyring_option(),
) -> None:
    """Explain one prediction: the predicted class, and how much each word, image region or column supports it.

    Occlusion (a bundle): each word (or image patch, or column) is taken away in turn and the drop of the predicted
    class's probability is its score; positive supports the prediction, negative speaks against it. It costs one model
    row per word, patch position or column, plus one (the cost is printed), and needs only numpy and ONNX Runtime:
    the device agent runs the same code (`edgekit-agent serve --explain`).

    Integrated Gradients (an output folder): gradients of the fp32 PyTorch model along a path from a baseline
    ([PAD] embeddings for text, the training mean for images), summed per word; 32 steps, one batch.
    """
    from edgekit.errors import EdgekitError

    given = [name for name, value in (("--text", text), ("--image", image), ("--row", row)) if value is not None]
    if len(given) != 1:
        raise EdgekitError("give exactly one input to explain: --text TEXT, --image FILE or --row JSON"
                           + (f" (got {', '.join(given)})" if given else ""))
    if model.is_dir():
        if row is not None:
            raise EdgekitError("Integrated Gradients covers text and image models; explain a table row with its bundle (.ekb)")
        from edgekit.gradients import explain_with_gradients

        kind = "text" if text is not None else "image"
        explanation = explain_with_gradients(model, text=text, image=_read_image_file(image) if image else None)
        _show(explanation, kind, image, out, top, as_json)
        return
    if not model.is_file():
        raise EdgekitError(f"{model} does not exist; give a bundle (.ekb) or a build's output folder")
    from device_agent.classifier import classifier_of_bundle
    from device_agent.explain import explain as explain_one
    from edgekit.cli.bundle import open_trusted

    with open_trusted(model, keyring) as bundle:
        classifier = classifier_of_bundle(bundle)
        kind = {"--text": "text", "--image": "image", "--row": "table"}[given[0]]
        classifier.expect(kind, how={"text": "--text TEXT", "image": "--image FILE", "table": "--row JSON"}[classifier.input_kind])
        item: Any = text if text is not None else _read_row(row) if row is not None else _image_for(classifier, image)
        explanation = explain_one(classifier, item)
    _show(explanation, kind, image, out, top, as_json)


def _show(explanation, kind: str, image: Path | None, out: Path | None, top: int, as_json: bool) -> None:
    document = explanation.to_json(top=None if kind == "text" and as_json else top)
    if kind == "image":
        from device_agent.files import write_atomically
        from edgekit.heatmap import heatmap_png

        assert image is not None and explanation.heatmap is not None
        png = out or Path(f"{image.stem}.explained.png")
        write_atomically(png, heatmap_png(explanation.pixels, explanation.heatmap))
        document["heatmap_png"] = str(png)
    elif out is not None:
        from device_agent.files import write_atomically

        whole = explanation.to_json()  # the file keeps every word or column; --top shortens only what is printed
        write_atomically(out, (json.dumps(whole, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    if as_json:
        print_json(document)
        return
    console.print(f"[bold]{explanation.label}[/bold] (probability {explanation.probability:.3f}), "
                  f"by {explanation.method}: {explanation.rows_run} model rows in {explanation.milliseconds:.0f} ms")
    if kind == "image":
        regions = ", ".join(f"rows {r['row']}+, cols {r['col']}+ ({r['score']:+.3f})" for r in document["heatmap"]["top_regions"][:3])
        console.print(f"strongest regions: {regions}")
        console.print(f"heat map: {document['heatmap_png']} (red supports the prediction, blue speaks against it)", highlight=False)
        return
    if kind == "text":
        console.print(_highlighted(explanation))
    for piece in explanation.top(top):
        note = "" if piece.read else "  (not read by the model: past its max_length, or dropped by its tokenizer)"
        console.print(f"  {piece.score:+.4f}  {piece.token}{note}", highlight=False, markup=False)


def _highlighted(explanation):
    """The text with each word shaded: green supports the prediction, red speaks against it."""
    from rich.text import Text

    scale = max((abs(p.score) for p in explanation.pieces), default=0.0) or 1.0
    shown = Text()
    for piece in explanation.pieces:
        strength = min(1.0, abs(piece.score) / scale)
        style = f"on {'green' if piece.score > 0 else 'red'}" if strength >= 0.25 else ""
        shown.append(piece.token, style=style)
        shown.append(" ")
    return shown


def _read_row(value: str) -> dict:
    from edgekit.errors import EdgekitError

    source = value
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise EdgekitError(f"--row {value}: {path} does not exist")
        source = path.read_text(encoding="utf-8")
    try:
        parsed = json.loads(source)
    except json.JSONDecodeError as error:
        raise EdgekitError(f"--row is not JSON ({error.msg} at character {error.pos}); give an object like "
                           "'{\"column\": value}' or @FILE") from None
    if not isinstance(parsed, dict):
        raise EdgekitError(f"--row is a JSON {type(parsed).__name__}; give one object of column name → value")
    return parsed


def _read_image_file(path: Path):
    """The file decoded by Pillow as uint8 ``[height, width, channels]``: grey stays grey, anything else becomes RGB."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from edgekit.errors import EdgekitError

    if not path.is_file():
        raise EdgekitError(f"--image {path} does not exist")
    try:
        with Image.open(path) as opened:
            picture = opened.convert("L" if opened.mode in ("L", "1", "I;16", "I") else "RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise EdgekitError(f"--image {path} is not an image Pillow can read ({error})") from None
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _image_for(classifier, path: Path | None):
    """The image as the bundle takes it (``fit_image``); a note on stderr says what changed."""
    from edgekit.tasks.image_data import fit_image

    assert path is not None
    pixels, notes = fit_image(_read_image_file(path), classifier.manifest.preprocessing)
    if notes:
        typer.echo(f"note: {path.name} {' and '.join(notes)}", err=True)
    return pixels
