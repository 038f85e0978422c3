"""Integrated Gradients (Captum) on the fp32 PyTorch model a build's bundles came from: ``edgekit explain OUT_DIR``.

Occlusion (``device_agent.explain``) needs only the bundle; this needs the build host, torch and the build's output
folder, and answers for the float parent rather than the shipped (maybe int8) model. It gives the same record
(``device_agent.explain.Explanation``), so the CLI shows both alike.

- **Text.** ``LayerIntegratedGradients`` on the word-embedding layer, from a baseline that keeps [CLS] and [SEP] and
  puts [PAD] in every other position (the attention mask unchanged), to the text as the device tokenizes it. A word
  piece's score is its attribution summed over the embedding dimension; a word's is the sum of its pieces (matched by
  character offsets to ``device_agent.explain.words``). Signed: positive supports the predicted class.
- **Images.** ``IntegratedGradients`` on the normalised input from the all-zero baseline (the training mean where the
  bundle normalises, else black), summed over channels into a heat map over the model's view of the image.

Cost: one forward row for the prediction, ``steps`` rows each with a forward and a backward pass along the path (one
batch), and two forward rows for Captum's completeness check (the sum of the attributions should equal the explained
class's logit at the input minus at the baseline; ``Attributed.convergence_delta`` is the difference).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    from device_agent.explain import Explanation
    from edgekit.artifact import TaskSpec

METHOD = "integrated-gradients"
STEPS = 32  # points on the path: enough for |convergence delta| of a few per cent of the logit gap on MiniLM and small CNNs
TEXT_KIND, IMAGE_KIND = "text-classification", "image-classification"
_BUNDLE_INSTEAD = "or explain a bundle (OUT/<target>/<name>.ekb) with occlusion, which needs no PyTorch model"


@dataclass(frozen=True)
class ParentModel:
    """The fp32 PyTorch model folder a build exported, and what it does."""

    folder: Path
    task: TaskSpec


@dataclass(frozen=True)
class Attributed:
    explanation: Explanation
    # Captum's completeness check: sum of the attributions - (logit at the input - logit at the baseline) of the
    # explained class; near 0 when the steps approximate the path integral well.
    convergence_delta: float


def parent_model(out_dir: Path) -> ParentModel:
    """The PyTorch model that the export pass of the latest build into ``out_dir`` exported: the pass and cache key its
    ``report.json`` records (``edgekit.build_output``), not whichever ``passes/NN-export`` link is highest (an earlier
    build into the same folder may have left one)."""
    from edgekit.build_output import BuildOutputError, latest_passes, pass_output

    if not (out_dir / "passes").is_dir():
        raise EdgekitError(f"{out_dir} is not a build's output folder (it has no passes/ folder); give the --out folder "
                           f"of `edgekit build`, {_BUNDLE_INSTEAD}")
    try:
        ran = [run.name for run in latest_passes(out_dir)]
        found = pass_output(out_dir, ("export",))
    except BuildOutputError as error:
        raise EdgekitError(f"{error}, {_BUNDLE_INSTEAD}") from None
    if found is None:
        if any(name in ("load-to-onnx", "load-onnx") for name in ran):
            raise EdgekitError(f"the build in {out_dir} made its model straight in ONNX (trees, or an .onnx source): there "
                               f"is no PyTorch model to take gradients of; {_BUNDLE_INSTEAD}")
        raise EdgekitError(f"the build in {out_dir} ran no export pass (its passes: {', '.join(ran) or 'none'}); give the "
                           f"--out folder of a finished `edgekit build`, {_BUNDLE_INSTEAD}")
    artifact = found.artifact
    if artifact is None:
        where = found.entry if found.entry is not None else f"cache key {found.key}, which no link in passes/ names"
        raise EdgekitError(f"the export pass output the build in {out_dir} used ({where}) is gone from the pass cache "
                           f"(it was cleared or moved); rebuild with the same config and cache to bring it back, "
                           f"{_BUNDLE_INSTEAD}")
    folder = artifact.trained_model
    if folder is None or not folder.is_dir():
        raise EdgekitError(f"the PyTorch model the build exported ({folder}) is gone from the pass cache; rebuild with the "
                           f"same config and cache to bring it back, {_BUNDLE_INSTEAD}")
    if artifact.task.kind == TEXT_KIND and (artifact.task.tokenizer_file is None or not artifact.task.tokenizer_file.is_file()):
        raise EdgekitError(f"the tokenizer of the build in {out_dir} ({artifact.task.tokenizer_file}) is gone from the pass "
                           f"cache; rebuild with the same config and cache to bring it back, {_BUNDLE_INSTEAD}")
    return ParentModel(folder, artifact.task)


def explain_with_gradients(out_dir: Path, *, text: str | None, image: np.ndarray | None, steps: int = STEPS) -> Explanation:
    """Explain ``text`` or ``image`` (uint8 ``[height, width, channels]``) with the fp32 model of the build in
    ``out_dir``."""
    explainer = GradientExplainer(parent_model(out_dir))
    if text is not None:
        return explainer.text(text, steps).explanation
    if image is None:
        raise EdgekitError("give a text or an image to explain")
    return explainer.image(image, steps).explanation


class GradientExplainer:
    """The parent model loaded once, for explaining many inputs (the benchmark's loop)."""

    def __init__(self, parent: ParentModel) -> None:
        from edgekit.tasks import task_for

        if parent.task.kind not in (TEXT_KIND, IMAGE_KIND):
            raise EdgekitError(f"Integrated Gradients covers text and image models, not {parent.task.kind}; {_BUNDLE_INSTEAD}")
        self.parent = parent
        self.task = task_for(parent.task.kind)
        self.model = self.task.load_torch(parent.folder).eval()
        self.labels = list(parent.task.labels)
        self._tokenizer = None

    def _expect(self, kind: str, flag: str) -> None:
        if self.parent.task.kind != kind:
            given = "--text" if self.parent.task.kind == TEXT_KIND else "--image"
            raise EdgekitError(f"the build's model is a {self.parent.task.kind} model; give it {given}, not {flag}")

    # ------------------------------------------------------------------ text

    def text(self, text: str, steps: int = STEPS) -> Attributed:
        import torch
        from captum.attr import LayerIntegratedGradients

        from device_agent.explain import Explanation, Piece, words
        from device_agent.preprocess import TextTokenizer

        self._expect(TEXT_KIND, "--image")
        started = time.perf_counter()
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(Path(self.parent.task.tokenizer_file), self.parent.task.max_length)
        tokenizer = self._tokenizer
        spans = tokenizer.piece_spans(text)
        found = words(text)
        read = [span for span in spans if span is not None and span[1] > span[0]]
        if not read or not found:
            raise EdgekitError("the text holds no words the model reads (it is empty, or only symbols the tokenizer "
                               "drops); give a text with words in it")
        accepted = inspect.signature(self.model.forward).parameters
        encoded = {name: torch.from_numpy(value) for name, value in tokenizer.encode([text]).items() if name in accepted}
        names = [name for name in encoded if name != "input_ids"]
        ids = encoded["input_ids"]
        baseline = torch.where(torch.tensor([span is None for span in spans])[None], ids, torch.full_like(ids, tokenizer.pad_id))

        def logits(input_ids, *others):
            return self.task.forward(self.model, {"input_ids": input_ids, **dict(zip(names, others))})

        with torch.no_grad():
            probabilities = torch.softmax(logits(ids, *(encoded[name] for name in names)).double(), dim=-1)[0]
        predicted = int(probabilities.argmax())
        integrated = LayerIntegratedGradients(logits, self.model.get_input_embeddings())
        attributions, delta = integrated.attribute(ids, baselines=baseline, target=predicted, n_steps=steps,
                                                   additional_forward_args=tuple(encoded[name] for name in names),
                                                   return_convergence_delta=True)
        per_piece = attributions.sum(dim=-1)[0].detach().double().numpy()
        last_read = read[-1][1]
        scores = [0.0] * len(found)
        for score, span in zip(per_piece, spans):
            if span is None:
                continue
            index = _word_of(found, span)
            if index is not None:
                scores[index] += float(score)
        pieces = [Piece(word, scores[index], start, end, start < last_read)
                  for index, (word, start, end) in enumerate(found)]
        explanation = Explanation(self.labels[predicted], predicted, float(probabilities[predicted]), METHOD, 1 + steps + 2,
                                  (time.perf_counter() - started) * 1e3, pieces)
        return Attributed(explanation, float(delta.sum()))

    # ------------------------------------------------------------------ images

    def image(self, image: np.ndarray, steps: int = STEPS) -> Attributed:
        import torch
        from captum.attr import IntegratedGradients

        from device_agent.explain import Explanation, patch_side
        from device_agent.preprocess import ImagePreprocessor
        from edgekit.tasks.image_data import fit_image

        self._expect(IMAGE_KIND, "--text")
        started = time.perf_counter()
        spec = self.task.bundle_preprocessing(self.parent.task)
        preprocessor = ImagePreprocessor(spec)
        pixels = preprocessor.geometry(fit_image(image, spec)[0][None])[0]
        inputs = torch.from_numpy(preprocessor.normalise(pixels[None]))
        name = self.parent.task.input_names[0]

        def logits(batch):
            return self.task.forward(self.model, {name: batch})

        with torch.no_grad():
            probabilities = torch.softmax(logits(inputs).double(), dim=-1)[0]
        predicted = int(probabilities.argmax())
        attributions, delta = IntegratedGradients(logits).attribute(inputs, baselines=torch.zeros_like(inputs), target=predicted,
                                                                   n_steps=steps, return_convergence_delta=True)
        channel_axis = 1 if spec.layout == "NCHW" else 3
        heatmap = attributions.sum(dim=channel_axis)[0].detach().double().numpy()
        height, width = heatmap.shape
        explanation = Explanation(self.labels[predicted], predicted, float(probabilities[predicted]), METHOD, 1 + steps + 2,
                                  (time.perf_counter() - started) * 1e3, heatmap=heatmap, pixels=pixels,
                                  patch=patch_side(height, width))
        return Attributed(explanation, float(delta.sum()))


def _word_of(found: list[tuple[str, int, int]], span: tuple[int, int]) -> int | None:
    """The index of the word a word piece lies in (the first it overlaps), or None (a piece past the words kept)."""
    start, end = span
    for index, (_, word_start, word_end) in enumerate(found):
        if word_start < max(end, start + 1) and start < word_end:
            return index
    return None
