"""The coordinator of a federation: admits sites, runs Flower's rounds, judges each global model, keeps the record.

It runs Flower's own server loop (``flwr.server.Server``) with Flower's FedAvg or FedProx, extended at three points:

- ``SiteRegistry`` (a Flower client manager) admits a site only after asking for its properties with the
  coordinator's expectations: the same base model (digest of its files), labels the federation knows and, when the
  coordinator has a keyring of site keys, a valid signature of a fresh challenge. A refused site is told why and
  disconnected; enough admitted sites are waited for up to ``federated.join_timeout_s``, then the run fails naming
  who is missing.
- The strategy records what each site returned per round (rows, loss, bytes) and refuses a round in which fewer
  than ``min_fit_clients`` sites returned (``RoundShort``); the server then waits for sites to rejoin (the same
  timeout) and runs the round again.
- Each round's global model is judged on the coordinator's own validation rows (Flower's ``evaluate_fn``); the
  sites are never asked to evaluate.

After the rounds, one more exchange calibrates the head (``edgekit.federated.calibration``): the sites send per-class
feature statistics under the final model (with secure aggregation, masked like an update: the coordinator learns
only their sum) and the coordinator refits the classifier from them, kept when its validation rows prefer it.

Two transports carry the same messages: in-process proxies (``edgekit federated simulate``: sites take turns on
one shared model, so two cores are not oversubscribed) and Flower's gRPC transport (``edgekit federated server``
and ``client``, TLS when certificates are given).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.federated.site import HEAD_STATISTICS, LABEL_COUNTS, MASKED_STATISTICS, AdapterModel, SharedBase

try:  # the federated extra: this module is imported only by `edgekit federated`
    from flwr.common import DisconnectRes, GetPropertiesIns, ReconnectIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import Server
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg, FedProx
    from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server
    from flwr.supercore.address import parse_address
except ImportError as missing:
    raise EdgekitError(f"edgekit federated needs Flower ({missing.name} is missing): pip install 'edgekit[federated]'") from None

if TYPE_CHECKING:
    from device_agent.keys import Keyring
    from edgekit.config import BuildConfig
    from edgekit.data import Split

PROPERTIES_TIMEOUT_S = 60.0
MAX_ROUND_ATTEMPTS = 3  # a round that keeps coming back short fails the run instead of training the others forever


class FederationError(EdgekitError):
    """The federation could not finish (too few sites, a round that kept failing)."""


class RoundShort(Exception):
    """Fewer sites than ``min_fit_clients`` returned an update this round."""


def quiet_flower() -> None:
    """Flower logs every message at INFO and warns that its gRPC server API is deprecated (edgekit uses it on
    purpose: it runs in one process, without a SuperLink); edgekit prints its own progress instead."""
    logging.getLogger("flwr").setLevel(logging.ERROR)


@dataclass
class RoundRecord:
    round: int
    val_accuracy: float
    val_loss: float
    train_loss: float | None = None
    sites: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    bytes_to_each_site: int = 0
    bytes_from_each_site: int = 0
    seconds: float = 0.0
    attempts: int = 1


@dataclass
class JoinedSite:
    site: str
    rows: int
    label_counts: dict[str, int]
    key_id: str = ""
    sends_head_statistics: bool = False  # its own config lets it answer the head calibration
    masks_statistics: bool = False  # it masks them when secure aggregation asks (a site from before that sends them plain)


class Coordinator:
    """The global model, the admission rules and the record of a federation (see the module docstring)."""

    def __init__(self, config: BuildConfig, base: SharedBase, labels: tuple[str, ...], validation: Split, *,
                 sites_expected: int, keyring: Keyring | None = None, say=lambda _: None,
                 adapter: AdapterModel | None = None) -> None:
        federated = config.federated
        self.config, self.base, self.labels, self.validation = config, base, labels, validation
        self.adapter = adapter or AdapterModel(base, labels, config)
        self.min_fit = federated.min_fit_clients or sites_expected
        if self.min_fit > sites_expected:
            raise EdgekitError(f"federated.min_fit_clients {self.min_fit} is more than the {sites_expected} sites of this run")
        # Secure aggregation: any threshold sites rebuild a secret. min_fit_clients (at least 2, so no one site's shares
        # unmask another): a round that finishes has enough sites to unmask it, if they all answer the unmask stage.
        if federated.secure_aggregation and self.min_fit < 2:
            raise EdgekitError(f"federated.secure_aggregation hides each site's update in a sum of at least 2 sites, but a "
                               f"round may finish with {self.min_fit}; run with 2 sites or more and federated.min_fit_clients "
                               "of at least 2, or set federated.secure_aggregation: false")
        self.secure_threshold = self.min_fit if federated.secure_aggregation else 0
        self._exchange = None  # the current round's key and share exchange (secure aggregation)
        self._global: list[np.ndarray] = []  # the current round's global tensors (what the sites' updates are relative to)
        self.sites_expected, self.keyring, self.say = sites_expected, keyring, say
        self.rounds: list[RoundRecord] = []
        self.total_rounds = federated.rounds
        self.joined: dict[str, JoinedSite] = {}
        self.refused: list[dict] = []
        self.started = time.perf_counter()
        self._round_started = time.perf_counter()
        self._attempts: dict[int, int] = {}
        self.releases: dict[str, int] = {}  # per site: updates it sent (with privacy on, each one spends privacy budget)
        self.calibration: dict = {"applied": False, "reason": "not run"}

    # ------------------------------------------------------------------ admission

    def expectations(self) -> dict:
        return {"labels": json.dumps(list(self.labels)), "base_digest": self.base.digest, "challenge": secrets.token_hex(16),
                "secure_aggregation": int(self.config.federated.secure_aggregation)}

    def judge(self, properties: dict, challenge: str, connected: set[str] = frozenset()) -> str | None:
        """Why a site with these ``properties`` cannot join while the sites named ``connected`` are, or None (a site
        whose connection broke may join again under its name)."""
        if properties.get("problem"):
            return str(properties["problem"])
        site = str(properties.get("site", ""))
        if not site:
            return "the site sent no name"
        if site in connected:
            return f"a site named {site!r} is already connected; give each site its own --name"
        if properties.get("base_digest") != self.base.digest:
            return "its base model differs from the coordinator's (the digests of the model files differ)"
        try:
            int(properties.get("rows", 0)), json.loads(str(properties.get(LABEL_COUNTS, "{}")))
        except ValueError:
            return "its properties are malformed (rows, label_counts); is it an edgekit site of this version?"
        if self.config.federated.secure_aggregation and not properties.get("secure_aggregation"):
            return ("this federation runs secure aggregation (federated.secure_aggregation) and the site does not offer it; "
                    "update edgekit at the site")
        if properties.get("adapter_shapes") != self.adapter.shape_digest():
            return ("its adapter tensors differ in names or shapes from the coordinator's (finetune.lora_r, "
                    "lora_target_modules or task settings differ); use the coordinator's build config")
        if self.keyring is not None:
            return self._signature_problem(str(properties.get("key_id", "")), str(properties.get("signature", "")), challenge)
        return None

    def _signature_problem(self, key: str, signature: str, challenge: str) -> str | None:
        from cryptography.exceptions import InvalidSignature

        if not key:
            return "the coordinator admits only sites with a key in its --sites keyring; start the client with --site-key"
        public = self.keyring.keys.get(key)
        if public is None:
            return f"its key {key} is not in the coordinator's sites keyring {self.keyring.directory}"
        try:
            public.verify(bytes.fromhex(signature), challenge.encode())
        except (InvalidSignature, ValueError):
            return f"its signature of the coordinator's challenge does not verify with key {key}"
        return None

    def admitted(self, properties: dict) -> None:
        site = str(properties["site"])
        self.joined[site] = JoinedSite(site, int(properties.get("rows", 0)), json.loads(str(properties.get(LABEL_COUNTS, "{}"))),
                                       str(properties.get("key_id", "")), bool(properties.get(HEAD_STATISTICS, False)),
                                       bool(properties.get(MASKED_STATISTICS, False)))
        self.say(f"site {site} joined: {self.joined[site].rows} rows ({len(self.joined)} of {self.sites_expected})")

    def refuse(self, properties: dict, reason: str) -> None:
        self.refused.append({"site": str(properties.get("site", "?")), "reason": reason})
        self.say(f"site {properties.get('site', '?')} refused: {reason}")

    # ------------------------------------------------------------------ rounds

    def fit_config(self, server_round: int) -> dict:
        """What every site does this round, from the coordinator's config (a site's own config does not decide its
        privacy: the report states what the coordinator asked for)."""
        federated = self.config.federated
        privacy = federated.privacy
        return {"round": server_round, "rounds": self.total_rounds, "local_epochs": federated.local_epochs,
                "clipping_norm": privacy.clipping_norm if privacy.enabled else 0.0,
                "noise_multiplier": privacy.noise_multiplier if privacy.enabled else 0.0}

    def round_starts(self) -> None:
        """The sites of a round are chosen: its time counts from here (not from the wait for sites to join)."""
        self._round_started = time.perf_counter()

    def evaluate(self, server_round: int, arrays: list[np.ndarray], _config: dict):
        with self.adapter.lock:
            self.adapter.load(arrays)
            accuracy, loss = self.adapter.accuracy_and_loss(self.validation)
        if server_round == 0:
            self.rounds.append(RoundRecord(0, accuracy, loss))
            self.say(f"round 0 (the starting adapter): validation accuracy {accuracy:.4f}")
        else:
            record = self.rounds[-1]
            if record.round != server_round:  # a round that trained nothing: the global model is the previous one
                record = RoundRecord(server_round, accuracy, loss)
                self.rounds.append(record)
            record.val_accuracy, record.val_loss = accuracy, loss
            train = f"train loss {record.train_loss:.4f}, " if record.train_loss is not None else ""
            self.say(f"round {server_round}: validation accuracy {accuracy:.4f} (loss {loss:.4f}, {train}"
                     f"{len(record.sites)} sites, {record.seconds:.0f} s)")
        return loss, {"accuracy": accuracy}

    def record_fit(self, server_round: int, results: list, failures: list, sampled: list[str]) -> None:
        returned = list(results)
        sites = [str(res.metrics.get("site", proxy.cid)) for proxy, res in returned]
        for site in sites:
            self.releases[site] = self.releases.get(site, 0) + 1
        dropped = [site for site in sampled if site not in sites]
        for failure in failures:
            why = f"{type(failure).__name__}: {failure}" if isinstance(failure, BaseException) else failure[1].status.message
            self.say(f"round {server_round}: a site failed ({why[:300]})")
        self._attempts[server_round] = attempts = self._attempts.get(server_round, 0) + 1
        if len(returned) < self.min_fit:
            if attempts >= MAX_ROUND_ATTEMPTS:
                raise FederationError(f"round {server_round} came back short {attempts} times ({len(returned)} of the "
                                      f"{self.min_fit} sites needed returned an update; dropped: {', '.join(dropped) or 'none'}); "
                                      "see the failures above")
            self.say(f"round {server_round}: {len(returned)} of the {self.min_fit} sites needed returned an update "
                     f"(dropped: {', '.join(dropped) or 'none'}); waiting up to {self.config.federated.join_timeout_s:g} s "
                     "for sites to rejoin, then running the round again")
            raise RoundShort()
        rows = np.array([res.num_examples for _, res in returned], dtype=float)
        losses = np.array([float(res.metrics.get("loss", np.nan)) for _, res in returned])
        train_loss = float(np.sum(rows * losses) / rows.sum()) if np.isfinite(losses).all() else None
        size = sum(a.nbytes for a in parameters_to_ndarrays(returned[0][1].parameters))
        sent = sum(a.nbytes for a in self._global) if self.config.federated.secure_aggregation else size
        self.rounds.append(RoundRecord(server_round, float("nan"), float("nan"), train_loss, sites, dropped, sent, size,
                                       time.perf_counter() - self._round_started, attempts))

    # ------------------------------------------------------------------ secure aggregation

    def exchange_keys(self, server_round: int, parameters, instructions: list, registry: SiteRegistry) -> list:
        """The key and share exchanges of secure aggregation with the round's sites; their fit instructions, each with
        its own orders (neighbours, the shares relayed to it). A site that fails an exchange sits the round out."""
        from flwr.common import FitIns

        from edgekit.federated.secure_aggregation import STAGE

        self._global = parameters_to_ndarrays(parameters)
        named = [(registry.names.get(proxy.cid, proxy.cid), proxy, ins) for proxy, ins in instructions]
        # Too few sites left: the round counts as short, and runs again or fails (record_fit raises).
        exchange, named = self._key_exchange(server_round, named, lambda: self.record_fit(server_round, [], [], registry.sampled))
        self._exchange = exchange
        return [(proxy, FitIns(ins.parameters, {**ins.config, STAGE: exchange.fit_orders(name)})) for name, proxy, ins in named]

    def _key_exchange(self, round_number: int, named: list, too_few) -> tuple:
        """Secure aggregation's key and share exchanges with ``named`` ([(site, proxy, fit instructions)]): the exchange
        and the sites that finished both. A site that fails a stage sits out; when fewer than ``min_fit_clients`` are
        left, ``too_few()`` is called (it raises: the sum could not be unmasked)."""
        from edgekit.federated.secure_aggregation import RoundExchange

        exchange = RoundExchange(round_number, self.secure_threshold)
        for request, took in ((exchange.keys_request, exchange.took_keys), (exchange.shares_request, exchange.took_shares)):
            config = request()
            answered = []
            for name, proxy, ins in named:
                reply = self._ask(proxy, name, config)
                try:
                    if reply is not None:
                        took(name, reply)
                        answered.append((name, proxy, ins))
                except (KeyError, TypeError, ValueError) as error:  # a malformed reply: that site sits the round out
                    self.say(f"round {round_number}: site {name}'s {config['stage']} reply is malformed ({error}); it sits the round out")
            left_out = [name for name, _, _ in named if name not in {a for a, _, _ in answered}]
            named = answered
            if len(named) < self.min_fit:
                self.say(f"round {round_number}: {len(named)} of the {self.min_fit} sites needed finished secure "
                         f"aggregation's {config['stage']} stage (left out: {', '.join(left_out)})")
                too_few()
        return exchange, named

    def unmasked_mean(self, results: list, registry: SiteRegistry) -> list[np.ndarray]:
        """FedAvg's weighted mean of the round's updates, from their masked forms and the survivors' shares."""
        from edgekit.federated.secure_aggregation import SecureAggregationError

        exchange = self._exchange
        masked = {self._site_of(proxy, res, registry): parameters_to_ndarrays(res.parameters) for proxy, res in results}
        rows = sum(res.num_examples for _, res in results)
        try:
            total = exchange.unmasked_sum(masked, self._revealed(exchange, results, registry))
        except SecureAggregationError as error:
            # Fewer shares than the threshold were revealed, so nothing is unmasked: the round runs again with new keys.
            attempts = self._attempts.get(exchange.round, 1)
            if attempts >= MAX_ROUND_ATTEMPTS:
                raise FederationError(f"round {exchange.round}: secure aggregation could not unmask the sum {attempts} "
                                      f"times ({error})") from None
            self.rounds.pop()
            self.say(f"round {exchange.round}: secure aggregation could not unmask the sum ({error}); running the round again")
            raise RoundShort() from None
        return [(g.astype(np.float64) + t / rows).astype(g.dtype) for g, t in zip(self._global, total)]

    @staticmethod
    def _site_of(proxy, res, registry: SiteRegistry) -> str:
        """The name the site was admitted under (what the key exchange used), not the one its reply claims."""
        return registry.names.get(proxy.cid) or str(res.metrics.get("site", proxy.cid))

    def _revealed(self, exchange, results: list, registry: SiteRegistry) -> dict[str, dict]:
        """The unmask stage: each survivor's shares of the survivors' seeds and of the dropped sites' mask keys."""
        from edgekit.federated.secure_aggregation import STAGE

        request = exchange.unmask_request(sorted(self._site_of(proxy, res, registry) for proxy, res in results))
        revealed = {}
        for proxy, res in results:
            name = self._site_of(proxy, res, registry)
            reply = self._ask(proxy, name, request)
            try:
                if reply is not None:
                    answer = json.loads(str(reply[STAGE]))
                    revealed[name] = {kind: {str(k): str(v) for k, v in dict(answer.get(kind, {})).items()} for kind in ("seeds", "keys")}
            except (AttributeError, KeyError, TypeError, ValueError) as error:  # counted as no answer
                self.say(f"round {exchange.round}: site {name}'s unmask reply is malformed ({error})")
        return revealed

    def _ask(self, proxy, site: str, config: dict) -> dict | None:
        """A site's properties reply to one stage of secure aggregation, or None (said) when it fails or refuses."""
        try:
            properties = dict(proxy.get_properties(GetPropertiesIns(config=config), PROPERTIES_TIMEOUT_S, None).properties)
        except Exception as error:  # noqa: BLE001 - a site that cannot answer sits the round out
            self.say(f"round {config['round']}: site {site} did not answer secure aggregation's {config['stage']} stage "
                     f"({type(error).__name__})")
            return None
        if properties.get("problem"):
            self.say(f"round {config['round']}: site {site} refused secure aggregation's {config['stage']} stage: "
                     f"{properties['problem']}")
            return None
        return properties

    # ------------------------------------------------------------------ running

    def run(self, registry: SiteRegistry, rounds: int, *, max_workers: int | None = None) -> None:
        """Flower's server loop over ``registry``'s sites for ``rounds`` rounds; the final global model stays loaded."""
        self.total_rounds = rounds
        server = CoordinatorServer(client_manager=registry, strategy=self.strategy(registry))
        server.set_max_workers(max_workers)
        server.fit(rounds, timeout=self.config.federated.round_timeout_s)
        self._finish(server)
        self.calibrate_head(registry, max_workers)

    def serve(self, address: str, rounds: int, certificates: tuple[bytes, bytes, bytes] | None) -> None:
        """The same over Flower's gRPC transport: sites connect with ``edgekit federated client``.

        Flower's ``start_server`` is not used: it installs its own SIGINT/SIGTERM handlers (which exit 0) for the rest
        of the process and stops its gRPC server only when the rounds end normally, so a failed federation would
        leave the process and the sites' streams hanging. Here the server stops and every site is told to disconnect
        whatever happens."""
        self.total_rounds = rounds
        registry = SiteRegistry(self)
        server = CoordinatorServer(client_manager=registry, strategy=self.strategy(registry))
        grpc_server = _listen(registry, address, certificates)
        try:
            server.fit(rounds, timeout=self.config.federated.round_timeout_s)
            self._finish(server)
            self.calibrate_head(registry, None)  # the sites are still connected
        finally:
            server.disconnect_all_clients(timeout=10.0)
            grpc_server.stop(grace=1).wait(5)

    def _finish(self, server) -> None:
        if len(self.rounds) <= 1:
            raise FederationError("no round finished; see the messages above")
        self.adapter.load(parameters_to_ndarrays(server.parameters))

    def calibrate_head(self, registry: SiteRegistry, max_workers: int | None) -> None:
        """Refit the head from the sites' per-class feature statistics under the final model; keep it when the
        validation rows score it higher than FedAvg's head. Whatever goes wrong here (too few sites answer, a
        degenerate covariance), the federation keeps FedAvg's head: its rounds are not lost."""
        federated = self.config.federated
        if not federated.head_calibration:
            self.calibration = {"applied": False, "reason": "federated.head_calibration is off"}
            return
        if federated.privacy.enabled:
            self.calibration = {"applied": False, "reason": "privacy is on: the statistics would leave the sites un-noised"}
            return
        final = self.adapter.arrays()
        try:
            self.calibration = self._calibrate(registry, max_workers, final)
        except Exception as error:  # noqa: BLE001 - the rounds' model stands; say why the head was not refitted
            self.calibration = {"applied": False, "reason": f"head calibration failed: {type(error).__name__}: {error}"[:500]}
            with self.adapter.lock:
                self.adapter.load(final)
        if "val_accuracy_after" in self.calibration:
            after, before = self.calibration["val_accuracy_after"], self.calibration["val_accuracy_before"]
            self.say(f"head calibration: validation accuracy {before:.4f} with FedAvg's head, {after:.4f} refitted from "
                     f"{len(self.calibration['sites'])} sites' statistics (shrinkage {self.calibration['shrinkage']:g}): "
                     f"{'refitted head kept' if self.calibration['applied'] else 'FedAvg head kept'}")
        else:
            self.say(f"head calibration: skipped ({self.calibration['reason']})")

    def _calibrate(self, registry: SiteRegistry, max_workers: int | None, final: list[np.ndarray]) -> dict:
        from edgekit.federated import calibration

        started = time.perf_counter()
        secure = self.config.federated.secure_aggregation
        able = [(name, proxy) for name, proxy in registry.admitted_sites()
                if name in self.joined and self.joined[name].sends_head_statistics and (self.joined[name].masks_statistics or not secure)]
        if len(able) < self.min_fit:
            return {"applied": False, "sites": [], "problems": [],
                    "reason": f"{len(able)} of the {self.min_fit} sites needed are connected and allowed by their own "
                              "config to send statistics (federated.head_calibration on, privacy off"
                              f"{'; masked: a site of this version' if secure else ''})"}
        gather = self._masked_statistics if secure else self._plain_statistics
        summed, record = gather(registry, able, max_workers, final)
        record |= {"min_class_rows": calibration.MIN_CLASS_ROWS, "secure_aggregation": secure}
        if summed is None:
            return record | {"applied": False}
        counts, sums, scatter = summed
        if counts.sum() <= np.count_nonzero(counts):
            return record | {"applied": False, "reason": "the sites' statistics hold too few rows per class to estimate a covariance"}
        with self.adapter.lock:
            x = calibration.features(self.adapter, self.validation)
            fedavg = calibration.current_head(self.adapter)
            before = float(np.mean(fedavg.logits(x).argmax(-1) == self.validation.labels))
            scored = [(float(np.mean(head.logits(x).argmax(-1) == self.validation.labels)), shrinkage, head) for shrinkage in
                      calibration.SHRINKAGES for head in [calibration.discriminant_head(counts, sums, scatter, shrinkage)]]
            after, shrinkage, head = max(scored, key=lambda scored_head: scored_head[0])
            head, temperature = calibration.tempered(head, x, self.validation.labels)
            applied = after > before
            if applied:
                calibration.set_head(self.adapter, head)
        return record | {
            "applied": applied, "val_accuracy_before": round(before, 4), "val_accuracy_after": round(after, 4),
            "shrinkage": shrinkage, "temperature": round(temperature, 3), "rows": int(counts.sum()),
            "seconds": round(time.perf_counter() - started, 2),
            "reason": ("validation prefers the refitted head (its shrinkage chosen on the same rows)" if applied
                       else "validation does not prefer the refitted head; FedAvg's is kept")}

    def _statistics_replies(self, instructions: list, max_workers: int | None, final: list[np.ndarray]) -> tuple[list, list[str]]:
        """The sites' replies to the statistics request (results, and the failures in words)."""
        from flwr.server.server import fit_clients

        results, failures = fit_clients(instructions, max_workers, self.config.federated.round_timeout_s,
                                        group_id=self.total_rounds + 1)
        with self.adapter.lock:  # simulated sites share this model: whatever they did with it, the final one is this
            self.adapter.load(final)
        return results, [f"{type(f).__name__}: {f}" if isinstance(f, BaseException) else f[1].status.message for f in failures]

    def _statistics_request(self, final: list[np.ndarray]):
        from flwr.common import FitIns

        from edgekit.federated import calibration

        return FitIns(ndarrays_to_parameters(final), {"phase": calibration.PHASE, "round": self.total_rounds + 1,
                                                      "rounds": self.total_rounds})

    def _plain_statistics(self, registry: SiteRegistry, able: list, max_workers: int | None, final: list[np.ndarray]) -> tuple:
        """Each site's statistics as it sent them (the coordinator sees every site's), checked and summed."""
        from edgekit.federated import calibration

        classes, width = len(self.labels), calibration.classifier_layer(self.adapter).in_features
        request = self._statistics_request(final)
        results, problems = self._statistics_replies([(proxy, request) for _, proxy in able], max_workers, final)
        replies = {}
        for proxy, res in results:
            site, arrays = self._site_of(proxy, res, registry), parameters_to_ndarrays(res.parameters)
            problem = calibration.check_statistics(arrays, classes, width, res.num_examples)
            if problem:
                problems.append(f"{site}: {problem}")
            else:
                replies[site] = arrays
        record = {"sites": sorted(replies), "problems": problems,
                  "bytes_from_each_site": sum(a.nbytes for a in next(iter(replies.values()), []))}
        if len(replies) < self.min_fit:
            return None, record | {"reason": f"{len(replies)} of the {self.min_fit} sites needed sent statistics"}
        return [sum(arrays[i] for arrays in replies.values()) for i in range(3)], record

    def _masked_statistics(self, registry: SiteRegistry, able: list, max_workers: int | None, final: list[np.ndarray]) -> tuple:
        """The sum of the sites' statistics through secure aggregation (one more key exchange): the coordinator never
        sees one site's. Nothing is retried: when the sum cannot be unmasked, FedAvg's head stays."""
        from flwr.common import FitIns

        from edgekit.federated import calibration
        from edgekit.federated.secure_aggregation import STAGE, SecureAggregationError

        classes, width = len(self.labels), calibration.classifier_layer(self.adapter).in_features
        round_number, request = self.total_rounds + 1, self._statistics_request(final)

        def too_few():
            raise SecureAggregationError(f"fewer than the {self.min_fit} sites needed finished the key exchange")

        try:
            exchange, named = self._key_exchange(round_number, [(name, proxy, request) for name, proxy in able], too_few)
        except SecureAggregationError as error:
            return None, {"sites": [], "problems": [], "reason": f"secure aggregation: {error}"}
        instructions = [(proxy, FitIns(ins.parameters, {**ins.config, STAGE: exchange.fit_orders(name)})) for name, proxy, ins in named]
        results, problems = self._statistics_replies(instructions, max_workers, final)
        shapes, masked, answered = calibration.statistics_shapes(classes, width), {}, []
        for proxy, res in results:
            site, arrays = self._site_of(proxy, res, registry), parameters_to_ndarrays(res.parameters)
            if [tuple(a.shape) for a in arrays] != shapes or any(a.dtype != np.uint64 for a in arrays):
                problems.append(f"{site}: it sent {[tuple(a.shape) for a in arrays][:3]}, not masked statistics of shapes {shapes}")
            else:
                masked[site] = arrays
                answered.append((proxy, res))
        record = {"sites": sorted(masked), "problems": problems,
                  "bytes_from_each_site": sum(a.nbytes for a in next(iter(masked.values()), []))}
        if len(masked) < self.min_fit:
            return None, record | {"reason": f"{len(masked)} of the {self.min_fit} sites needed sent masked statistics"}
        try:
            summed = exchange.unmasked_sum(masked, self._revealed(exchange, answered, registry))
        except SecureAggregationError as error:
            return None, record | {"reason": f"secure aggregation could not unmask the statistics' sum ({error})"}
        # The sum is checked as one site's reply would be: whole class counts within all the rows it covers.
        problem = calibration.check_statistics(summed, classes, width, sum(res.num_examples for _, res in answered))
        if problem:
            return None, record | {"reason": f"the unmasked sum of the statistics is not valid: {problem}"}
        # A class that fewer than the threshold of these sites hold enough rows of is summed over those alone: its sum
        # is theirs (as a FedAvg head row is mostly theirs). Said, from the label counts they declared at admission.
        declared = [self.joined[site].label_counts if site in self.joined else {} for site in masked]
        record["classes_summed_over_fewer_sites"] = [
            label for label in self.labels
            if 0 < sum(counts.get(label, 0) >= calibration.MIN_CLASS_ROWS for counts in declared) < self.secure_threshold]
        return summed, record

    def strategy(self, registry: SiteRegistry):
        federated = self.config.federated
        coordinator = self
        base = FedProx if federated.strategy == "fedprox" else FedAvg
        extra = {"proximal_mu": federated.proximal_mu} if federated.strategy == "fedprox" else {}

        class Coordinated(base):
            def configure_fit(self, server_round, parameters, client_manager):
                instructions = super().configure_fit(server_round, parameters, client_manager)
                if not federated.secure_aggregation:
                    return instructions
                return coordinator.exchange_keys(server_round, parameters, instructions, registry)

            def aggregate_fit(self, server_round, results, failures):
                coordinator.record_fit(server_round, results, failures, registry.sampled)
                if not federated.secure_aggregation:
                    return super().aggregate_fit(server_round, results, failures)
                return ndarrays_to_parameters(coordinator.unmasked_mean(results, registry)), {}

        return Coordinated(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=self.min_fit, min_evaluate_clients=0,
                           min_available_clients=self.min_fit, evaluate_fn=self.evaluate, on_fit_config_fn=self.fit_config,
                           accept_failures=True, initial_parameters=ndarrays_to_parameters(self.adapter.arrays()), **extra)

    def privacy_releases(self) -> int:
        """The most updates any one site sent (attempts of rounds run again count: their updates left the site too)."""
        return max(self.releases.values(), default=0)

    def report(self, partition: str | None) -> dict:
        from edgekit.federated import secure_aggregation
        from edgekit.federated.privacy import privacy_report

        federated = self.config.federated
        completed = [r for r in self.rounds if r.round > 0]
        statistics_seen = ("masked: the coordinator unmasks only their sum over sites, which for a class fewer sites hold "
                           "is theirs" if federated.secure_aggregation else "exact and seen per site")
        return {
            "clients": len(self.joined), "rounds": len(completed), "strategy": federated.strategy,
            "proximal_mu": federated.proximal_mu if federated.strategy == "fedprox" else None,
            "local_epochs": federated.local_epochs, "partition": partition, "min_fit_clients": self.min_fit,
            "per_round": [{"round": r.round, "loss": r.train_loss, "val_loss": r.val_loss, "accuracy": r.val_accuracy,
                           "sites": r.sites, "dropped": r.dropped, "attempts": r.attempts, "seconds": round(r.seconds, 2),
                           "bytes_to_each_site": r.bytes_to_each_site, "bytes_from_each_site": r.bytes_from_each_site}
                          for r in self.rounds],
            "per_client": [{"client": s.site, "rows": s.rows, "label_counts": s.label_counts, "key_id": s.key_id or None}
                           for s in self.joined.values()],
            "refused": self.refused,
            "secure_aggregation": secure_aggregation.report(federated.secure_aggregation, self.secure_threshold),
            "dp": privacy_report(federated.privacy, self.privacy_releases()),
            "head_calibration": self.calibration,
            "left_each_site": [*(["its update each round (rows x (trained - global adapter and head tensors), clipped and "
                                  "noised when dp is on), masked: alone it is uniformly random; the coordinator unmasks "
                                  "only the round's sum", "per round (and once more for the head statistics): two public "
                                  "keys, its Shamir shares of its mask seed and mask key encrypted for the other sites "
                                  "(relayed), then its shares of the survivors' seeds and the dropped sites' mask keys"]
                                 if federated.secure_aggregation else
                                 ["the LoRA adapter and head tensors after local training (clipped and noised when dp is on)"]),
                               "its row count and label counts",
                               *([f"after the last round (head calibration, {statistics_seen}): per-class row counts, "
                                  f"per-class sums of its rows' features at the classifier's input and their scatter matrix, "
                                  f"over the classes it holds at least {self.calibration['min_class_rows']} rows of"]
                                 if self.calibration.get("sites") else []),
                               "its seconds per round, and (with dp off) its mean training loss and whether clipping applied",
                               "its name, base model digest and (with a site key) a signature of the coordinator's challenge"],
            "never_left_a_site": ["its rows (texts and labels)", "gradients or per-row values (statistics are sums over "
                                  "at least the stated number of rows of a class)", "the base model's weights"],
            "adapter_tensors": len(self.adapter.names),
            "adapter_parameters": int(sum(p.numel() for p in self.adapter.parameters())),
            "seconds": round(time.perf_counter() - self.started, 1),
        }


class CoordinatorServer(Server):
    """Flower's server, running a round again (after waiting for sites) when too few sites returned."""

    def fit_round(self, server_round, timeout):
        while True:
            try:
                return super().fit_round(server_round, timeout)
            except RoundShort:
                continue  # the registry waits (bounded) for enough sites before the round runs again


class SiteRegistry(SimpleClientManager):
    """Flower's client manager, admitting each site once (see ``Coordinator.judge``) and sampling admitted sites only."""

    def __init__(self, coordinator: Coordinator) -> None:
        super().__init__()
        self.coordinator = coordinator
        self.names: dict[str, str] = {}  # admitted sites: Flower's id → the site's name
        self.sampled: list[str] = []  # the names of the sites the current round went to
        self._admission = threading.Lock()
        self._first_round_started = False

    def unregister(self, client) -> None:
        self.names.pop(client.cid, None)
        super().unregister(client)

    def num_available(self) -> int:
        return len(self._admitted())

    def admitted_sites(self) -> list[tuple[str, ClientProxy]]:
        """The admitted sites connected now, by name, without waiting for more or admitting new ones."""
        names = dict(self.names)
        return [(names[client.cid], client) for client in self._admitted() if client.cid in names]

    def _admitted(self) -> list:
        names = dict(self.names)
        return [client for cid, client in list(self.clients.items()) if cid in names]

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion=None) -> list:
        """Every admitted site, once at least ``min_num_clients`` are (waiting at most ``join_timeout_s``)."""
        needed = min_num_clients or num_clients
        if not self._first_round_started:  # every site the run was started for joins before the first round
            needed = max(needed, self.coordinator.sites_expected)
        timeout = self.coordinator.config.federated.join_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            self._admit_new()
            admitted = self._admitted()
            if len(admitted) >= needed:
                self._first_round_started = True
                self.sampled = [self.names.get(client.cid, client.cid) for client in admitted]
                self.coordinator.round_starts()
                return admitted
            left = deadline - time.monotonic()
            if left <= 0:
                joined = ", ".join(sorted(self.coordinator.joined)) or "none"
                refused = "; ".join(f"{r['site']}: {r['reason']}" for r in self.coordinator.refused)
                raise FederationError(
                    f"{len(admitted)} of the {needed} sites a round needs are connected after waiting {timeout:g} s "
                    f"(joined so far: {joined}{'; refused: ' + refused if refused else ''}); start more clients, or lower "
                    "federated.min_fit_clients / raise federated.join_timeout_s")
            with self._cv:
                self._cv.wait(timeout=min(left, 0.5))

    def _admit_new(self) -> None:
        with self._admission:
            for cid, client in list(self.clients.items()):
                if cid in self.names:
                    continue
                expected = self.coordinator.expectations()
                try:
                    properties = dict(client.get_properties(GetPropertiesIns(config=expected), PROPERTIES_TIMEOUT_S, None).properties)
                except Exception as error:  # a site that cannot answer is dropped; it may connect again
                    self.coordinator.say(f"a site ({cid}) did not answer its admission check ({type(error).__name__}); dropped")
                    super().unregister(client)
                    continue
                problem = self.coordinator.judge(properties, expected["challenge"], set(self.names.values()))
                if problem is None:
                    self.coordinator.admitted(properties)
                    self.names[cid] = str(properties["site"])
                    continue
                self.coordinator.refuse(properties, problem)
                super().unregister(client)
                try:  # tell the site why (it remembers), then to disconnect
                    client.get_properties(GetPropertiesIns(config={"refused": problem}), 10.0, None)
                    client.reconnect(ReconnectIns(seconds=None), 10.0, None)
                except Exception:
                    pass  # it is gone already


def _listen(registry: SiteRegistry, address: str, certificates: tuple[bytes, bytes, bytes] | None):
    """Flower's gRPC (bidirectional stream) server for ``registry``'s sites on ``address``, started."""
    if not parse_address(address):
        raise EdgekitError(f"--address {address!r} is not HOST:PORT (e.g. 0.0.0.0:8089 or [::]:8089)")
    try:
        return start_grpc_server(client_manager=registry, server_address=address, certificates=certificates)
    except RuntimeError as error:  # grpc: the port is taken or not allowed, or the TLS files do not make a key pair
        raise EdgekitError(f"cannot listen on {address} ({error}); is the port free and allowed, and are --certificate, "
                           "--private-key and --ca-certificate PEM files of one key pair?") from None


class InProcessSite(ClientProxy):
    """A Flower client proxy calling a site's ``Client`` directly (``edgekit federated simulate``)."""

    def __init__(self, cid: str, client) -> None:
        super().__init__(cid)
        self.client = client

    def get_properties(self, ins, timeout, group_id):
        return self.client.get_properties(ins)

    def get_parameters(self, ins, timeout, group_id):
        return self.client.get_parameters(ins)

    def fit(self, ins, timeout, group_id):
        return self.client.fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

    def reconnect(self, ins, timeout, group_id):
        return DisconnectRes(reason="done")
