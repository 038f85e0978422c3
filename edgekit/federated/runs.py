"""The three ways a federation runs, and the hand-off of its model to the build pipeline.

- ``simulate``: the build config's training rows dealt to N sites (``edgekit.federated.partition``), the sites and
  the coordinator in this process; validation and test stay with the coordinator.
- ``serve``: the coordinator alone, listening on Flower's gRPC transport; its config's data is its own held-out
  set (validation judges each round; calibration and test serve the build after the last round).
- ``join``: one site, with its own data file, connecting to a coordinator; its rows never leave it.

After the last round the coordinator merges the global adapter into the base weights and builds that model
through the same passes as ``edgekit build`` (export, optimize, quantize, evaluate, gates, package), with the
federation's record in each target's ``report.json`` (``federated``) and ``report.html``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import EdgekitError
from edgekit.federated.site import AdapterModel, SharedBase, Site, SiteIdentity, base_model, read_site_rows

if TYPE_CHECKING:
    from edgekit.config import BuildConfig
    from edgekit.data import TaskData

MODEL_FOLDER = "federated/model"  # in the output folder: the merged model the bundles were built from
RECORD_FILE = "federated/federation.json"


@dataclass
class Context:
    out: Path
    cache_dir: Path | None
    key: Path | None
    progress: object
    say: object
    quiet: bool


def simulate(config: BuildConfig, *, clients: int, partition: str, rounds: int | None, context: Context) -> tuple[list[dict], bool]:
    from edgekit.federated.coordinator import Coordinator, InProcessSite, SiteRegistry, quiet_flower
    from edgekit.federated.partition import column_values, parse_partition, partition_rows
    from edgekit.tasks import load_task_data

    scheme = parse_partition(partition)
    _check_targets(config)
    base = base_model(config)
    data = load_task_data(config)
    train = data.train
    values = None
    if scheme.kind == "by-column":
        values = column_values(config.data.path, config.data.text_column, config.data.label_column, scheme.column,
                               train.texts, tuple(data.labels[i] for i in train.labels))
    parts = partition_rows(scheme, train.labels, clients, config.federated.seed, values)
    quiet_flower()
    context.say(f"federated simulate: {len(parts)} sites ({scheme}), {rounds or config.federated.rounds} rounds of "
                f"{config.federated.local_epochs} local epoch(s), {config.federated.strategy}; the coordinator keeps "
                f"{len(data.val)} validation and {len(data.test)} test rows")
    for part in parts:
        counts = part.label_counts(train.labels, data.labels)
        context.say(f"  {part.name}: {len(part.rows)} rows, " + ", ".join(f"{label} {n}" for label, n in counts.items()))
    shared = AdapterModel(base, data.labels, config)  # sites take turns on one model: no copy per site
    coordinator = Coordinator(config, base, data.labels, data.val, sites_expected=len(parts), say=context.say, adapter=shared)
    registry = SiteRegistry(coordinator)
    for part in parts:
        site = Site(SiteIdentity(part.name), base, tuple(train.texts[i] for i in part.rows),
                    tuple(data.labels[train.labels[i]] for i in part.rows), config, context.progress, context.say, adapter=shared)
        registry.register(InProcessSite(part.name, site.client()))
    with context.progress:
        coordinator.run(registry, rounds or config.federated.rounds, max_workers=1)
    return build_from(coordinator, config, data, str(scheme), context)


def serve(config: BuildConfig, *, address: str, min_clients: int, rounds: int | None, certificates, sites_keyring: Path | None,
          context: Context) -> tuple[list[dict], bool]:
    from edgekit.federated.coordinator import Coordinator, quiet_flower
    from edgekit.tasks import load_task_data

    _check_targets(config)
    base = base_model(config)
    data = load_task_data(config)
    keyring = _sites_keyring(sites_keyring) if sites_keyring is not None else None
    quiet_flower()
    coordinator = Coordinator(config, base, data.labels, data.val, sites_expected=min_clients, keyring=keyring, say=context.say)
    context.say(f"federated server on {address}: waiting for {min_clients} site(s) (up to {config.federated.join_timeout_s:g} s), "
                f"then {rounds or config.federated.rounds} rounds; TLS {'on' if certificates else 'off'}, "
                f"site keys {'required (' + str(sites_keyring) + ')' if keyring else 'not required'}")
    coordinator.serve(address, rounds or config.federated.rounds, certificates)
    return build_from(coordinator, config, data, None, context)


def join(config: BuildConfig, *, server: str, data_file: Path, name: str, site_key: Path | None, root_certificate: Path | None,
         max_wait_s: float, progress, say) -> Site:
    """Run one site until the coordinator ends the federation (or refuses the site); returns the site."""
    from edgekit.federated.coordinator import quiet_flower

    from flwr.supercore.address import parse_address

    if not parse_address(server):
        raise EdgekitError(f"--server {server!r} is not HOST:PORT (e.g. coordinator.example:8089)")
    texts, labels = read_site_rows(data_file, config)
    site = Site(SiteIdentity(name, site_key), base_model(config), texts, labels, config, progress, say)
    if site_key is not None:
        site.identity.sign("check")  # an unreadable key is an error now, not at the coordinator's challenge
    quiet_flower()
    say(f"site {name}: {len(texts)} rows from {data_file}; connecting to {server} (giving up after {max_wait_s:g} s)")
    try:
        certificate = root_certificate.read_bytes() if root_certificate is not None else None
    except OSError as error:
        raise EdgekitError(f"cannot read --ca-certificate {root_certificate}: {error.strerror}") from None
    _quiet_closed_channel_pollers()
    with progress:
        _connect(site, server, certificate, max_wait_s, say)
    if site.refusal is not None:
        raise EdgekitError(f"the coordinator at {server} refused this site: {site.refusal}")
    if site.rounds_done == 0:
        raise EdgekitError(f"the coordinator at {server} ended without asking this site to train (refused it: check the "
                           "coordinator's messages; e.g. its site keys)")
    return site


def _sites_keyring(folder: Path):
    from device_agent.keys import Keyring, KeyMaterialError

    try:
        return Keyring.load(folder)
    except KeyMaterialError as error:
        raise EdgekitError(f"--sites {folder}: {error}. For a federation the keyring holds each site's edgekit.pub "
                           "(`edgekit keys generate --out DIR` on the site)") from None


def _quiet_closed_channel_pollers() -> None:
    """gRPC watches a channel's connectivity in a thread of its own; when Flower closes a channel that never connected,
    that thread can raise "Cannot monitor channel state: Channel closed!", which Python prints as a traceback. It says
    nothing the retry loop does not (the connection failed), so it is kept off the terminal; other errors still print."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "edgekit_quiet_channels", False):
        return

    def hook(args) -> None:
        if isinstance(args.exc_value, ValueError) and "Channel closed" in str(args.exc_value):
            return
        previous(args)

    hook.edgekit_quiet_channels = True
    threading.excepthook = hook


def _connect(site: Site, server: str, certificate: bytes | None, max_wait_s: float, say) -> None:
    """Flower's client loop until the coordinator ends the federation or refuses the site. Flower's gRPC stream fails at
    once when nobody listens (it retries only some transports), so an unreachable coordinator is retried here, with
    backoff, for up to ``max_wait_s``; so is a stream that breaks after the coordinator had been reached (the wait
    starts again, and the site rejoins under its name)."""
    import grpc
    from flwr.client import start_client

    started, tries, contacts = time.monotonic(), 0, site.contacts
    while True:
        tries += 1
        try:
            start_client(server_address=server, client=site.client(), root_certificates=certificate,
                         insecure=certificate is None, max_wait_time=max_wait_s)
            return
        except grpc.RpcError as error:
            if site.refusal is not None:
                return
            if site.contacts != contacts:  # the coordinator was reached since the last failure: a fresh wait
                started, tries, contacts = time.monotonic(), 1, site.contacts
            code = error.code() if callable(getattr(error, "code", None)) else None
            details = error.details() if callable(getattr(error, "details", None)) else str(error)
            waited = time.monotonic() - started
            if code != grpc.StatusCode.UNAVAILABLE:
                raise EdgekitError(f"the coordinator at {server} ended this site's connection ({getattr(code, 'name', 'error')}: "
                                   f"{details}) after {site.rounds_done} round(s) of training") from None
            if waited >= max_wait_s:
                what = (f"could not reach the coordinator at {server}" if site.contacts == 0
                        else f"lost the coordinator at {server} after {site.rounds_done} round(s) of training")
                raise EdgekitError(f"{what}: UNAVAILABLE: {details} ({tries} tries over {waited:.0f} s); check the address "
                                   "(and --ca-certificate for a TLS coordinator) and that `edgekit federated server` runs "
                                   "there") from None
            if tries == 1:
                say(f"the coordinator at {server} does not answer ({details}); retrying for up to {max_wait_s:g} s")
            time.sleep(min(0.5 * 2 ** min(tries, 4), max(0.1, max_wait_s - waited)))


def _check_targets(config: BuildConfig) -> None:
    """A target profile the build after the last round could not read is an error before any site trains."""
    from edgekit.targets import load_target

    for name in config.targets:
        load_target(name)


def build_from(coordinator, config: BuildConfig, data: TaskData, partition: str | None, context: Context) -> tuple[list[dict], bool]:
    """The global model through the build pipeline; the federation's record in every target's report."""
    import json

    from device_agent.files import write_atomically
    from edgekit.cli.build import build_bundles

    folder = coordinator.adapter.save_merged(context.out / MODEL_FOLDER)
    record = coordinator.report(partition)
    record["model"] = str(folder)
    write_atomically(context.out / RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode())
    context.say(f"federation done in {record['seconds']:.0f} s: final validation accuracy "
                f"{record['per_round'][-1]['accuracy']:.4f}; building the merged model ({folder})")
    return build_bundles(merged_model_config(config, folder, coordinator.base), context.out, context.cache_dir, context.key,
                         searching=False, quiet=context.quiet, federated=record)


def merged_model_config(config: BuildConfig, folder: Path, base: SharedBase) -> BuildConfig:
    """The build config for the federation's merged model: it is the source, its trained head is kept as it is, and
    nothing trains it further (no head fit, fine-tuning, pruning with recovery training, QAT or search: those would
    train on the build's training split, which in a simulation is the sites' rows)."""
    document = config.model_dump()
    document["model"]["source"] = str(folder)
    document["head"] |= {"enabled": False, "pooling": base.pooling}
    for section in ("finetune", "prune", "qat", "search"):
        document[section]["enabled"] = False
    return type(config).model_validate(document)
