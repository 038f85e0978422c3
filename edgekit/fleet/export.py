"""Captured samples → a dataset file ``edgekit build`` reads: the retraining loop's first step.

Text: JSONL rows ``{"text", "label", "captured_at"}`` (``edgekit.tasks.text_data`` reads the
text and label columns; a sample without a predicted label gets ``label: null``,
which the build's cleaning counts and drops). Images: one sub-folder per label
with PNG files, the layout image datasets use. Labels are the model's own
predictions: pseudo-labels for a person to review, not ground truth.

With the bundle of the model that answered them, each sample is also explained (``device_agent.explain``, occlusion):
a text row gains ``"attributions": [{"token", "score"}]``, the words that support the explained class, at most five,
strongest first (only positive scores: a word that speaks against it, or that the model did not read, is not support),
and ``"explained_label"``, the class the bundle explained: its own prediction, which can differ from the device's
``label`` (another runtime, or int8 rounding on a close call). The readers of the build and of ``edgekit retrain
--add-data`` take only the text and label columns. Images get ``attributions.jsonl`` at the folder's root, one line
per explained PNG (its ``label`` is the explained class; the class folder is the device's), where the image reader
does not look (it reads only class folders); its ``top_regions`` are likewise the supporting ones, at most five. A
sample captured with another model or version than the bundle's is written without attributions and counted:
another model's explanation would say nothing about why the device answered as it did.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from device_agent.telemetry_schema import CapturedSample
from edgekit.fleet.store import FleetError, WindowedSample

if TYPE_CHECKING:
    import numpy as np

    from device_agent.classifier import Classifier
    from device_agent.explain import Explanation

UNLABELLED = "_unlabelled"
ATTRIBUTIONS_FILE = "attributions.jsonl"  # an image export's explanations, beside (not inside) the class folders
TOP_ATTRIBUTIONS = 5  # at most this many supporting words (texts) or regions (images) written per sample
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


# --------------------------------------------------------------------------- captured images


def captured_image(sample: CapturedSample) -> np.ndarray:
    """A captured image's uint8 pixels, ``[height, width, channels]`` as the device received it; a FleetError when its
    bytes are not base64 or do not fill its shape."""
    import numpy as np

    assert sample.image is not None
    shape = tuple(sample.image.shape)
    try:
        pixels = np.frombuffer(base64.b64decode(sample.image.data_base64), dtype=np.uint8)
    except binascii.Error as error:
        raise FleetError(f"a captured image is not valid base64 ({error})") from None
    if pixels.size != int(np.prod(shape)):
        raise FleetError(f"a captured image holds {pixels.size} bytes but its shape {list(shape)} needs {int(np.prod(shape))}")
    return pixels.reshape(shape)


# --------------------------------------------------------------------------- explaining samples


class SampleExplainer:
    """Explains the samples the bundle's own model version answered, counting what it leaves out and why."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.model = (classifier.manifest.model.name, classifier.manifest.model.version)
        self.counts: Counter[str] = Counter()  # explained | other_model | unexplained
        self.first_problem: str | None = None

    def explain(self, windowed: WindowedSample, item: Any) -> Explanation | None:
        """The explanation of ``item`` (the sample's text or pixels), or None: another model or version answered it, or
        the model finds nothing in it to explain (an empty text, an image smaller than its crop)."""
        from device_agent.errors import UserError
        from device_agent.explain import explain

        if (windowed.model_name, windowed.model_version) != self.model:
            self.counts["other_model"] += 1
            return None
        try:
            explanation = explain(self.classifier, item)
        except UserError as error:
            self.counts["unexplained"] += 1
            self.first_problem = self.first_problem or str(error)
            return None
        self.counts["explained"] += 1
        return explanation


@dataclass(frozen=True)
class Exported:
    kind: str  # "text" | "image"
    count: int
    unlabelled: int
    explained: int = 0  # written with attributions (a bundle given)
    other_model: int = 0  # captured with another model or version than the bundle's: written without
    unexplained: int = 0  # the model found nothing to explain in them: written without
    problem: str | None = None  # why the first unexplained one was


def export_samples(samples: list[WindowedSample], out: Path, *, device: str, force: bool = False,
                   explainer: SampleExplainer | None = None) -> Exported:
    """Write ``samples`` to ``out`` (a .jsonl file for texts, a folder for images); with ``explainer``, each with the
    attributions of the bundle's model (module docstring)."""
    if not samples:
        raise FleetError(
            f"device {device!r} has no captured samples; turn on sampled capture on its agent, "
            "let it serve traffic, and export again"
        )
    texts = [windowed for windowed in samples if windowed.sample.text is not None]
    images = [windowed for windowed in samples if windowed.sample.image is not None]
    if texts and images:
        raise FleetError(f"device {device!r} captured both texts and images; a dataset holds one kind")
    if out.exists() and not force:
        raise FleetError(f"--out {out} exists; choose a new path or pass --force to replace it")
    kind = "text" if texts else "image"
    if explainer is not None and explainer.classifier.input_kind != kind:
        raise FleetError(f"--bundle: {explainer.classifier.name} takes {explainer.classifier.input_kind} input, but "
                         f"{device!r} captured {kind}s; give the bundle of the model the device served")
    if texts:
        if out.suffix.lower() not in (".jsonl", ".ndjson"):
            raise FleetError(f"--out {out}: text samples are written as JSONL; name the file {out.with_suffix('.jsonl').name}")
        exported = _write_texts(texts, out, explainer)
    else:
        exported = _write_images(images, out, explainer)
    if explainer is None:
        return exported
    counts = explainer.counts
    return Exported(exported.kind, exported.count, exported.unlabelled, counts["explained"], counts["other_model"],
                    counts["unexplained"], explainer.first_problem)


def _write_texts(samples: list[WindowedSample], out: Path, explainer: SampleExplainer | None) -> Exported:
    from device_agent.files import write_atomically

    lines = []
    for windowed in samples:
        sample = windowed.sample
        row: dict[str, Any] = {"text": sample.text, "label": sample.predicted, "captured_at": sample.captured_at}
        explanation = explainer.explain(windowed, sample.text) if explainer is not None else None
        if explanation is not None:
            row["explained_label"] = explanation.label
            scored = [{"token": piece.token, "score": round(piece.score, 6)} for piece in explanation.top(TOP_ATTRIBUTIONS)]
            row["attributions"] = [item for item in scored if item["score"] > 0]
        lines.append(json.dumps(row, ensure_ascii=False))
    write_atomically(out, ("\n".join(lines) + "\n").encode("utf-8"))
    return Exported("text", len(samples), sum(1 for windowed in samples if windowed.sample.predicted is None))


def _write_images(samples: list[WindowedSample], out: Path, explainer: SampleExplainer | None) -> Exported:
    from PIL import Image

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    counts: dict[str, int] = {}
    attributions = []
    for windowed in samples:
        sample = windowed.sample
        array = captured_image(sample)
        explanation = explainer.explain(windowed, array) if explainer is not None else None
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        label = (_UNSAFE.sub("_", sample.predicted).strip(" .") if sample.predicted else "") or UNLABELLED
        folder = staging / label
        folder.mkdir(parents=True, exist_ok=True)
        index = counts.get(label, 0)
        counts[label] = index + 1
        Image.fromarray(array).save(folder / f"{index:06d}.png")
        if explanation is not None:
            attributions.append(_image_attributions(f"{label}/{index:06d}.png", explanation))
    if explainer is not None:
        (staging / ATTRIBUTIONS_FILE).write_text("".join(json.dumps(line) + "\n" for line in attributions), encoding="utf-8")
    # The finished folder appears at once: a reader never sees half an export.
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.rename(out)
    return Exported("image", len(samples), counts.get(UNLABELLED, 0))


def _image_attributions(file: str, explanation: Explanation) -> dict:
    """One line of ``attributions.jsonl``: the regions are cells of ``patch`` pixels in the model's view of the image
    (after its resize and crop, ``view`` = [height, width]), not of the PNG as captured."""
    heatmap = explanation.to_json(top=TOP_ATTRIBUTIONS)["heatmap"]
    return {"file": file, "label": explanation.label, "probability": round(explanation.probability, 6),
            "view": heatmap["shape"], "patch": heatmap["patch"],
            "top_regions": [region for region in heatmap["top_regions"] if region["score"] > 0]}
