"""Text classifiers: Hugging Face sequence classifiers, read the way their encoder was trained to be read.

Sentence encoders (sentence-transformers models such as all-MiniLM-L6-v2) were
trained so that the mean of their token vectors carries the sentence; their
[CLS] vector was never asked to. A classifier on [CLS] starts from weaker
features: on the demo, a logistic regression on mean-pooled embeddings beats
the [CLS] head by about seven points (``bench/results/search-wordnet.json``).

``head.pooling: auto`` reads the model folder's sentence-transformers pooling
config (``1_Pooling/config.json``) and mean-pools when it says so; ``cls`` and
``mean`` force one. A mean-pooled classifier is the family's sequence
classifier whose forward averages the last hidden states over the attention
mask and feeds its classifier directly (the pretrained pooler is dropped). Its
``config.json`` records ``edgekit_pooling: mean``, and :func:`load_classifier`
reads it back, so every pass (fine-tuning, pruning, quantization-aware
training, export) gets the same model. Only BERT-layout models are mean-pooled
so far.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    import torch

POOLING_KEY = "edgekit_pooling"  # in config.json: how the classifier reads the encoder
MEAN_POOLED_FAMILIES = ("bert",)


def pooling_of(folder: Path, setting: str) -> str:
    """``cls`` or ``mean`` for the model in ``folder``: ``setting``, or (auto) what its sentence-transformers config says."""
    from transformers import AutoConfig

    family = AutoConfig.from_pretrained(folder).model_type
    if setting == "mean" and family not in MEAN_POOLED_FAMILIES:
        raise EdgekitError(f"head.pooling mean is built for {', '.join(MEAN_POOLED_FAMILIES)} models, not {family!r}; "
                           "set head.pooling: cls (or auto)")
    if setting != "auto":
        return setting
    pooling = folder / "1_Pooling" / "config.json"
    try:
        mean = json.loads(pooling.read_text()).get("pooling_mode_mean_tokens") is True if pooling.is_file() else False
    except (OSError, ValueError):
        mean = False  # an unreadable pooling config says nothing: the family's own head
    return "mean" if mean and family in MEAN_POOLED_FAMILIES else "cls"


def new_classifier(source: Path, labels: tuple[str, ...], pooling: str) -> torch.nn.Module:
    """The pretrained encoder in ``source`` with a fresh classifier for ``labels``, pooled as ``pooling`` says.

    ``source`` may already be a classifier (a champion's model being retrained): its head is kept only when it was
    trained for exactly ``labels``, by name and order. Any other head is initialised afresh, as for a bare encoder,
    even when it has as many rows: a head for labels a, b, c would otherwise answer for a, b, d with the row it
    learned for c."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    saved = AutoConfig.from_pretrained(source)
    config = AutoConfig.from_pretrained(source, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                        label2id={label: i for i, label in enumerate(labels)})
    setattr(config, POOLING_KEY, pooling)
    model_class = mean_pooled_class() if pooling == "mean" else AutoModelForSequenceClassification
    model = model_class.from_pretrained(source, config=config, ignore_mismatched_sizes=True)
    if _is_classifier(saved) and _labels_of(saved) != list(labels):
        _reset_head(model)
    return model


def _is_classifier(config) -> bool:
    """Whether a saved model's ``config`` is a sequence classifier's (its head then holds trained rows per label)."""
    return any(name.endswith("ForSequenceClassification") for name in getattr(config, "architectures", None) or [])


def _labels_of(config) -> list[str]:
    """The class names of a saved classifier's head, in the order of its rows."""
    return [label for _, label in sorted((int(index), label) for index, label in config.id2label.items())]


def _reset_head(model: torch.nn.Module) -> None:
    """Initialise every module of ``model`` outside its encoder (the classifier, and DistilBERT's pre-classifier) as
    the family initialises a new model's."""
    prefix = model.base_model_prefix
    for name, module in model.named_modules():
        inside = name == prefix or name.startswith(f"{prefix}.")
        if name and not inside and any(True for _ in module.parameters(recurse=False)):
            model._init_weights(module)


def load_classifier(folder: Path) -> torch.nn.Module:
    """A classifier saved by a pass, as it was trained (mean-pooled or not)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    mean = getattr(AutoConfig.from_pretrained(folder), POOLING_KEY, "cls") == "mean"
    return (mean_pooled_class() if mean else AutoModelForSequenceClassification).from_pretrained(folder)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of each row's token vectors over its real tokens."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@functools.cache
def mean_pooled_class():
    """BertForSequenceClassification read by mean pooling (defined on first use: transformers is a heavy import)."""
    import torch.nn.functional as F
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPooledBertForSequenceClassification(BertForSequenceClassification):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.bert.pooler = None  # the [CLS] pooler is not read: its weights stay out of the model

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
            kwargs.pop("return_dict", None)
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               return_dict=True, **kwargs).last_hidden_state
            logits = self.classifier(self.dropout(mean_pool(hidden, attention_mask)))
            loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return MeanPooledBertForSequenceClassification
