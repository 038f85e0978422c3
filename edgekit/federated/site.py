"""A site of a federation: its own rows, the shared base model, and the adapter it trains and sends back.

``AdapterModel`` is the model every party builds the same way from the build config: the base encoder (never
sent anywhere) with LoRA adapters on its projections and a classifier head for the config's labels. Only its
trainable tensors (the adapters and the head, in ``names`` order) travel between sites and the coordinator.

``Site`` is a Flower ``Client``. Before a site trains anything the coordinator asks for its properties with its own
expectations (the labels, the base model's digest, a fresh challenge): the site says whether it can join and why not,
signs the challenge with its site key when it has one, and remembers a refusal so that its command can exit with the
reason. ``fit`` trains the global adapter for ``federated.local_epochs`` on the site's rows through the one training
loop (``edgekit.training.fit``), with FedProx's proximal term when the coordinator asks for it, clips and noises the
update when privacy is on (``edgekit.federated.privacy``), and returns the tensors with the row count and the loss.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    import torch

    from edgekit.artifact import TaskSpec
    from edgekit.config import BuildConfig, PrivacySection
    from edgekit.data import Split


class IncompatibleSite(EdgekitError):
    """A site cannot join this federation (other labels, another base model, tensors of other shapes)."""


# A site's label counts travel in its properties as JSON (Flower property and metric values are scalars).
LABEL_COUNTS = "label_counts"
HEAD_STATISTICS = "head_statistics"  # a property: 1 when the site's own config lets it answer the head calibration
MASKED_STATISTICS = "masked_statistics"  # a property: 1 when the site masks its head statistics if secure aggregation asks


@dataclass(frozen=True)
class SharedBase:
    """The base model every party starts from, named by the digest of its files."""

    folder: Path
    digest: str
    pooling: str


def base_model(config: BuildConfig) -> SharedBase:
    from edgekit.passes.load import resolve_source, source_digest
    from edgekit.tasks.text_models import pooling_of

    if config.task.kind != "text-classification":
        raise EdgekitError(f"federated fine-tuning trains LoRA adapters of text models; task.kind {config.task.kind} is not "
                           "supported yet (set task.kind: text-classification)")
    if config.model.source.endswith(".onnx"):
        raise EdgekitError("federated fine-tuning needs a PyTorch model to train: give a Hugging Face folder or "
                           "embedded:all-minilm-l6-v2 as model.source, not an .onnx file")
    folder = resolve_source(config.model.source)
    return SharedBase(folder, source_digest(config.model.source), pooling_of(folder, config.head.pooling))


class AdapterModel:
    """The base encoder with LoRA adapters and a head for ``labels``; ``arrays``/``load`` move its trainable tensors."""

    def __init__(self, base: SharedBase, labels: tuple[str, ...], config: BuildConfig) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from edgekit.tasks.text_classification import TASK, lora_model, tokenizer_of
        from edgekit.tasks.text_models import new_classifier

        hf_logging.set_verbosity_error()  # "newly initialized head": the federation trains it
        torch.manual_seed(config.federated.seed)
        settings = config.finetune.model_copy(update={"method": "lora"})
        self.base, self.labels, self.settings = base, labels, settings
        self.model = lora_model(new_classifier(base.folder, labels, base.pooling), settings)
        self.names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        self.spec: TaskSpec = TASK.spec(labels, config.task.max_length, tokenizer_of(base.folder))
        self.lock = threading.Lock()  # sites in one process share this model and take turns

    def shape_digest(self) -> str:
        """A digest of the trainable tensors' names and shapes: two parties can average updates only when theirs agree."""
        import hashlib

        named = dict(self.model.named_parameters())
        layout = ";".join(f"{name}:{tuple(named[name].shape)}" for name in self.names)
        layout += f";alpha={self.settings.lora_alpha}"  # the scale the adapters are merged with
        return hashlib.sha256(layout.encode()).hexdigest()[:16]

    def parameters(self) -> list[torch.nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[name] for name in self.names]

    def arrays(self) -> list[np.ndarray]:
        return [p.detach().cpu().numpy().copy() for p in self.parameters()]

    def load(self, arrays: list[np.ndarray]) -> None:
        import torch

        parameters = self.parameters()
        if len(arrays) != len(parameters):
            raise IncompatibleSite(f"the update holds {len(arrays)} tensors, this model trains {len(parameters)}: "
                                   "the sites use different LoRA settings (finetune.lora_r, lora_target_modules) or models")
        for name, parameter, array in zip(self.names, parameters, arrays):
            if tuple(parameter.shape) != tuple(array.shape):
                raise IncompatibleSite(f"tensor {name} is {tuple(array.shape)} in the update and {tuple(parameter.shape)} here: "
                                       "the sites use different LoRA settings or models")
            with torch.no_grad():
                parameter.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))

    def accuracy_and_loss(self, split: Split) -> tuple[float, float]:
        """The model's accuracy and mean cross-entropy on ``split`` (the coordinator's validation rows)."""
        import torch.nn.functional as F
        import torch

        from edgekit import training
        from edgekit.tasks.text_classification import TASK

        logits = training.predict(self.model, TASK.torch_batches(self.spec, split), TASK.forward)
        loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(split.labels)))
        return float(np.mean(logits.argmax(-1) == split.labels)), loss

    def save_merged(self, folder: Path) -> Path:
        """The adapters merged into a copy of the base weights: a plain Hugging Face classifier with its tokenizer,
        which ``edgekit build`` takes as ``model.source`` (its head kept: it was trained for these labels)."""
        import copy

        from edgekit.tasks.text_classification import copy_tokenizer

        merged = copy.deepcopy(self.model).merge_and_unload()
        folder.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(folder)
        copy_tokenizer(self.base.folder, folder)
        return folder


@dataclass
class LocalResult:
    arrays: list[np.ndarray]
    loss: float
    seconds: float
    clipped: bool = False


def round_rate(schedule: str, round_number: int, rounds: int) -> float:
    """The share of ``finetune.learning_rate`` a round's local training runs at: constant within the round, and across
    rounds the decay ``finetune.schedule`` names (linear: 1, 2/3, 1/3 over three rounds; cosine alike; constant: 1).
    A schedule restarted inside each round would spend half of every round at rates near zero."""
    if schedule == "constant" or rounds <= 1 or round_number < 1:
        return 1.0
    progress = (round_number - 1) / rounds
    return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RoundOrders:
    """What the coordinator asks of every site in one round (its fit config), read with defaults."""

    round_number: int
    rounds: int
    local_epochs: int
    proximal_mu: float
    privacy: PrivacySection

    @classmethod
    def read(cls, instructions: dict, config: BuildConfig) -> RoundOrders:
        from edgekit.config import PrivacySection

        clip, noise = float(instructions.get("clipping_norm", 0.0)), float(instructions.get("noise_multiplier", 0.0))
        privacy = PrivacySection(enabled=True, clipping_norm=clip, noise_multiplier=noise) if clip > 0 and noise > 0 else PrivacySection()
        return cls(int(instructions.get("round", 0)), int(instructions.get("rounds", 1)),
                   int(instructions.get("local_epochs", config.federated.local_epochs)),
                   float(instructions.get("proximal_mu", 0.0)), privacy)


def train_locally(adapter: AdapterModel, rows: Split, config: BuildConfig, orders: RoundOrders, *, progress,
                  say=lambda _: None) -> LocalResult:
    """Train the adapter (already holding the global tensors) on ``rows`` as the coordinator's ``orders`` say."""
    import torch

    from edgekit import training
    from edgekit.federated.privacy import privatise
    from edgekit.tasks.text_classification import TASK, _text_batch, token_counts

    settings = adapter.settings
    started = time.perf_counter()
    global_arrays = adapter.arrays()
    anchors = [p.detach().clone() for p in adapter.parameters()]
    cross_entropy = training.cross_entropy(TASK.forward, settings.label_smoothing)

    def loss(model, batch):
        value = cross_entropy(model, batch)
        if orders.proximal_mu > 0:  # FedProx: stay near the round's global model (on the device training runs on)
            parameters = adapter.parameters()
            if anchors[0].device != parameters[0].device:
                anchors[:] = [a.to(parameters[0].device) for a in anchors]
            value = value + orders.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(parameters, anchors))
        return value

    seed = config.federated.seed * 1000 + orders.round_number
    torch.manual_seed(seed)
    batches = training.Shuffled(len(rows), settings.batch_size, seed, lambda order, _epoch: _text_batch(adapter.spec, rows, order),
                                lengths=token_counts(adapter.spec, rows))
    factor = round_rate(settings.schedule, orders.round_number, orders.rounds)
    head_rate = (settings.head_learning_rate or settings.learning_rate) * factor
    fit_settings = training.FitSettings(orders.local_epochs, settings.learning_rate * factor, settings.weight_decay, "constant",
                                        label=f"round {orders.round_number}: local training")
    result = training.fit(adapter.model, batches, loss, fit_settings, progress=progress, say=say,
                          parameters=adapter.parameters(), learning_rates={"classifier": head_rate, "pooler": head_rate})
    arrays, clipped = adapter.arrays(), False
    if orders.privacy.enabled:
        arrays, clipped = privatise(global_arrays, arrays, orders.privacy)
    mean_loss = float(np.mean(result.losses[-max(1, len(result.losses) // orders.local_epochs):]))
    return LocalResult(arrays, mean_loss, time.perf_counter() - started, clipped)


@dataclass
class SiteIdentity:
    """Who a site says it is: a name, and the key it signs the coordinator's challenges with (optional)."""

    name: str
    key_file: Path | None = None

    def sign(self, challenge: str) -> tuple[str, str]:
        """The key id and the hex signature of ``challenge``; ("", "") without a key."""
        if self.key_file is None or not challenge:
            return "", ""
        from device_agent.keys import key_id, load_private_key

        key = load_private_key(self.key_file)
        return key_id(key.public_key()), key.sign(challenge.encode()).hex()


@dataclass
class Site:
    """One site: its rows (texts with label names) and the model it trains them on; ``client()`` is what Flower talks to.

    The model is built when the coordinator first says which labels the federation has (a site's file may hold
    only some of them); sites simulated in one process are handed one shared model instead."""

    identity: SiteIdentity
    base: SharedBase
    texts: tuple[str, ...]
    row_labels: tuple[str, ...]
    config: BuildConfig
    progress: object
    say: object = lambda _: None
    adapter: AdapterModel | None = None
    refusal: str | None = None  # why the coordinator could not take this site, once it said so
    rounds_done: int = 0
    contacts: int = 0  # messages from the coordinator (a site that was reached may lose and regain its stream)
    secure: object = None  # its side of secure aggregation (a SiteProtocol), from the first key exchange
    label_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.label_counts = dict(sorted(Counter(self.row_labels).items()))

    def rows(self) -> Split:
        from edgekit.data import Split

        index = {label: i for i, label in enumerate(self.adapter.labels)}
        return Split(self.texts, np.array([index[label] for label in self.row_labels], dtype=np.int64))

    def properties(self, expected: dict) -> dict:
        """What the coordinator checks at join: this site's labels and base model against its ``expected`` ones. The
        coordinator also uses this exchange to say why it refused the site (``refused``), and for the key and share
        exchanges of secure aggregation."""
        from edgekit.federated.secure_aggregation import STAGE, SecureAggregationError, SiteProtocol

        self.contacts += 1
        if STAGE in expected:
            self.secure = self.secure or SiteProtocol(self.identity.name)
            try:
                return {"site": self.identity.name, **self.secure.answer(expected)}
            except SecureAggregationError as error:
                return {"site": self.identity.name, "problem": str(error)}
        if expected.get("refused"):
            self.refusal = str(expected["refused"])
            return {"site": self.identity.name}
        try:
            return self._properties(expected)
        except EdgekitError as error:  # e.g. the model cannot be built here: the site cannot join, and says why
            self.refusal = str(error)
            return {"site": self.identity.name, "problem": self.refusal}

    def _properties(self, expected: dict) -> dict:
        problem = None
        if expected.get("base_digest") and expected["base_digest"] != self.base.digest:
            problem = (f"the coordinator's base model ({str(expected['base_digest'])[:12]}) differs from this site's "
                       f"{self.config.model.source} ({self.base.digest[:12]}); use the same model.source files")
        elif expected.get("labels") is not None:
            theirs = tuple(json.loads(str(expected["labels"])))
            unknown = sorted(set(self.label_counts) - set(theirs))
            if unknown:
                problem = (f"this site's label(s) {', '.join(unknown)} are not the federation's ({', '.join(theirs)}); "
                           "relabel or drop those rows")
            elif self.adapter is None:
                self.adapter = AdapterModel(self.base, theirs, self.config)
            elif self.adapter.labels != theirs:
                problem = f"this site's model has labels {list(self.adapter.labels)}, the federation {list(theirs)}"
        if not problem and self.config.federated.secure_aggregation and not expected.get("secure_aggregation"):
            problem = ("this site sends masked updates only (its federated.secure_aggregation is true) and the coordinator "
                       "does not run secure aggregation; set federated.secure_aggregation: true at the coordinator")
        if problem:
            self.refusal = problem
        key, signature = self.identity.sign(str(expected.get("challenge", "")))
        shapes = self.adapter.shape_digest() if self.adapter is not None else ""
        return {"site": self.identity.name, "rows": len(self.texts), LABEL_COUNTS: json.dumps(self.label_counts),
                HEAD_STATISTICS: int(self.sends_head_statistics()), MASKED_STATISTICS: 1, "secure_aggregation": 1,
                "base_digest": self.base.digest, "adapter_shapes": shapes, "problem": problem or "", "key_id": key,
                "signature": signature}

    def fit(self, arrays: list[np.ndarray], instructions: dict) -> tuple[list[np.ndarray], int, dict]:
        if self.adapter is None:
            raise IncompatibleSite("asked to train before the coordinator said which labels the federation has")
        self.contacts += 1
        from edgekit.federated import calibration

        masked = self._masked(instructions)
        if instructions.get("phase") == calibration.PHASE:  # after the last round: statistics for the head, no training
            if not self.sends_head_statistics():
                raise IncompatibleSite("this site's config does not let it send head statistics "
                                       "(federated.head_calibration off, or privacy on)")
            with self.adapter.lock:
                self.adapter.load(arrays)
                sent = calibration.statistics(self.adapter, self.rows())
            if masked:  # summed with the other sites' under masks: the coordinator sees the total only
                sent = self._mask(instructions, sent)
            self.say(f"{self.identity.name}: sent per-class feature statistics of {len(self.texts)} rows for the head"
                     f"{' (masked)' if masked else ''}")
            return sent, len(self.texts), {"site": self.identity.name}
        orders = RoundOrders.read(instructions, self.config)
        with self.adapter.lock:
            self.adapter.load(arrays)
            result = train_locally(self.adapter, self.rows(), self.config, orders, progress=self.progress, say=self.say)
        if masked:  # rows x (trained - global): the coordinator unmasks only the sum of these and divides by the rows
            result.arrays = self._mask(instructions, [len(self.texts) * (np.asarray(new, np.float64) - np.asarray(old, np.float64))
                                                      for new, old in zip(result.arrays, arrays)])
        self.rounds_done += 1
        self.say(f"{self.identity.name}: round {orders.round_number}: trained {len(self.texts)} rows in {result.seconds:.0f} s, "
                 f"loss {result.loss:.4f}")
        metrics = {"seconds": result.seconds, "site": self.identity.name}
        if not orders.privacy.enabled:  # with privacy on, nothing computed from the rows leaves un-noised
            metrics |= {"loss": result.loss, "clipped": int(result.clipped)}
        return result.arrays, len(self.texts), metrics

    def _masked(self, instructions: dict) -> bool:
        """Whether the coordinator asks for a masked reply; refused before any work when this site cannot give the
        reply it asks for (a site whose config says secure aggregation sends nothing unmasked)."""
        from edgekit.federated.secure_aggregation import STAGE, SecureAggregationError

        masked = STAGE in instructions
        if self.config.federated.secure_aggregation and not masked:
            raise IncompatibleSite("this site's config (federated.secure_aggregation) lets it send masked updates only, "
                                   "and the coordinator did not ask for secure aggregation")
        if masked:
            if self.secure is None:
                raise IncompatibleSite("asked for a masked update before any key exchange of secure aggregation")
            try:
                self.secure.check(instructions)  # before training: a round it cannot finish costs no training
            except SecureAggregationError as error:
                raise IncompatibleSite(f"secure aggregation: {error}") from None
        return masked

    def _mask(self, instructions: dict, values: list[np.ndarray]) -> list[np.ndarray]:
        from edgekit.federated.secure_aggregation import SecureAggregationError

        try:
            return self.secure.masked(instructions, values)
        except SecureAggregationError as error:
            raise IncompatibleSite(f"secure aggregation: {error}") from None

    def sends_head_statistics(self) -> bool:
        """Whether this site's own config lets its per-class feature sums leave it (``edgekit.federated.calibration``),
        masked when the federation runs secure aggregation."""
        federated = self.config.federated
        return federated.head_calibration and not federated.privacy.enabled

    def client(self):
        return _flower_client(self)


def _flower_client(site: Site):
    """``site`` as a Flower ``Client`` (the legacy gRPC transport and the in-process simulation both call it)."""
    from flwr.client import Client
    from flwr.common import (Code, EvaluateRes, FitRes, GetParametersRes, GetPropertiesRes, Status, ndarrays_to_parameters,
                             parameters_to_ndarrays)

    ok = Status(code=Code.OK, message="")

    class EdgekitSite(Client):
        def get_properties(self, ins):
            return GetPropertiesRes(status=ok, properties=site.properties(dict(ins.config)))

        def get_parameters(self, ins):  # a site that sends masked updates only never gives its tensors away
            arrays = site.adapter.arrays() if site.adapter is not None and not site.config.federated.secure_aggregation else []
            return GetParametersRes(status=ok, parameters=ndarrays_to_parameters(arrays))

        def fit(self, ins):
            if site.refusal:  # never train for a federation that refused this site
                return FitRes(status=Status(code=Code.FIT_NOT_IMPLEMENTED, message=site.refusal),
                              parameters=ndarrays_to_parameters([]), num_examples=0, metrics={})
            try:
                arrays, rows, metrics = site.fit(parameters_to_ndarrays(ins.parameters), dict(ins.config))
            except IncompatibleSite as refused:  # e.g. asked for statistics its config does not allow: the coordinator is told
                return FitRes(status=Status(code=Code.FIT_NOT_IMPLEMENTED, message=f"{site.identity.name}: {refused}"),
                              parameters=ndarrays_to_parameters([]), num_examples=0, metrics={})
            return FitRes(status=ok, parameters=ndarrays_to_parameters(arrays), num_examples=rows, metrics=metrics)

        def evaluate(self, ins):  # the coordinator judges on its own validation rows; sites are never asked
            return EvaluateRes(status=Status(code=Code.EVALUATE_NOT_IMPLEMENTED, message="not evaluated at sites"),
                               loss=0.0, num_examples=0, metrics={})

    return EdgekitSite()


def read_site_rows(path: Path, config: BuildConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A site's own data file (the build config's columns), every row a training row: its texts and label names."""
    from edgekit.tasks.text_data import clean_rows, read_rows

    columns = config.data
    examples, cleaning = clean_rows(read_rows(path, columns.text_column, columns.label_column, columns.split_column), str(path))
    if not examples:
        raise EdgekitError(f"{path}: no usable rows ({cleaning.summary()}); check data.text_column and data.label_column")
    return tuple(e.text for e in examples), tuple(e.label for e in examples)
