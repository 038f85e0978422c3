"""``edgekit federated``: fine-tune one model across sites that keep their data, then build it into signed bundles."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.output import console, print_json

app = typer.Typer(no_args_is_help=True, help=(
    "Federated fine-tuning with Flower: each site trains LoRA adapters and the head on its own rows, only those "
    "tensors travel, and the coordinator averages them each round (FedAvg or FedProx). After the last round the "
    "merged model goes through the build passes (export, optimize, quantize, evaluate, gates, package) to signed "
    "bundles, with the federation's record in report.json. Text classification only so far."))

CONFIG_ARGUMENT = typer.Argument(None, help=(
    "Build config YAML (model, task, data columns, finetune's LoRA settings, the federated section, targets); omit it "
    "for the embedded demo's."), metavar="[CONFIG.yaml]")
OUT_OPTION = typer.Option(Path("out"), "--out", help="Where the merged model, bundles and reports go.")
KEY_OPTION = typer.Option(None, "--key", help="Signing key (edgekit.key); default: a development key in the cache dir.")
CACHE_OPTION = typer.Option(None, "--cache-dir", help="Pass cache (default: $XDG_CACHE_HOME/edgekit).")
ROUNDS_OPTION = typer.Option(None, "--rounds", min=1, help="Rounds of local training and averaging (default: federated.rounds, 3).")
JSON_OPTION = typer.Option(False, "--json", help="Print the build reports (each with its federated record) as JSON.")


def _context(out: Path, cache_dir: Path | None, key: Path | None, *, quiet: bool):
    from edgekit.cli.build import _progress_bars, _say, _signing_key, default_cache_dir
    from edgekit.federated.runs import Context

    key, _ = _signing_key(key, cache_dir or default_cache_dir(), quiet=quiet)
    return Context(out, cache_dir, key, _progress_bars(quiet=quiet), _say(quiet=quiet), quiet)


def _finish(reports: list[dict], passed: bool, as_json: bool) -> None:
    if as_json:
        print_json(reports)
    else:
        from edgekit.report import render

        render(reports, console)
    if not passed:
        raise typer.Exit(1)


@app.command("simulate")
def simulate(
    config_file: Path | None = CONFIG_ARGUMENT,
    clients: int = typer.Option(3, "--clients", min=1, help="How many sites to simulate."),
    partition: str = typer.Option("iid", "--partition", help=(
        "How the training rows are dealt: iid; dirichlet:ALPHA (per class, shares drawn from Dirichlet(ALPHA): 0.1 gives "
        "each site a few classes, 100 is near iid); by-column:NAME (one site per value of that data column; --clients "
        "must equal their number).")),
    rounds: int | None = ROUNDS_OPTION,
    out: Path = OUT_OPTION,
    key: Path | None = KEY_OPTION,
    cache_dir: Path | None = CACHE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Simulate a federation on one machine: the config's training rows dealt to --clients sites, then bundles.

    The sites run in this process and take turns on one shared model (two cores are not split N ways); each round
    each site trains federated.local_epochs on its rows from the global adapter, and the coordinator averages what
    they return (weighted by rows) and judges the result on the validation split, which no site holds. The test split
    judges only the bundles. The per-site label counts are printed first, so the skew a Dirichlet partition makes is
    visible. Exits 1 when a target fails its gates, 2 on bad input.
    """
    from edgekit.config import load_build_config
    from edgekit.federated.partition import parse_partition
    from edgekit.federated.runs import simulate as run

    parse_partition(partition)  # a bad --partition is an error before anything else is said
    config = load_build_config(config_file)
    context = _context(out, cache_dir, key, quiet=as_json)
    reports, passed = run(config, clients=clients, partition=partition, rounds=rounds, context=context)
    _finish(reports, passed, as_json)


@app.command("server")
def server(
    config_file: Path | None = CONFIG_ARGUMENT,
    address: str = typer.Option("0.0.0.0:8089", "--address", help="HOST:PORT to listen on for sites."),
    min_clients: int = typer.Option(..., "--min-clients", min=1, help=(
        "Sites that must join before the first round; every round needs them (or federated.min_fit_clients).")),
    rounds: int | None = ROUNDS_OPTION,
    sites: Path | None = typer.Option(None, "--sites", metavar="KEYRING_DIR", help=(
        "Admit only sites whose key (edgekit keys generate; the site's edgekit.pub copied here, any name ending .pub) "
        "signs a fresh challenge. Without it any site that reaches the port and has the same base model and labels joins.")),
    certificate: Path | None = typer.Option(None, "--certificate", help="TLS: this server's certificate (PEM)."),
    private_key: Path | None = typer.Option(None, "--private-key", help="TLS: this server's private key (PEM)."),
    ca_certificate: Path | None = typer.Option(None, "--ca-certificate", help="TLS: the CA certificate that signed --certificate (PEM)."),
    out: Path = OUT_OPTION,
    key: Path | None = KEY_OPTION,
    cache_dir: Path | None = CACHE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Coordinate a federation of real sites over gRPC, then build the merged model into bundles.

    The config's data is the coordinator's own held-out set: its validation split judges each round's global model,
    its calibration rows and test split serve the build after the last round. Sites join with `edgekit federated
    client --server HOST:PORT --data FILE` and the same config; a site with another base model (its files' digest),
    labels the coordinator's data does not have, or (with --sites) no valid key is refused with the reason, on both
    sides. A site that drops mid-round is left out of that round when federated.min_fit_clients allows; otherwise
    the round runs again once enough sites are back, waiting at most federated.join_timeout_s before failing.
    TLS needs all three of --certificate, --private-key and --ca-certificate.
    """
    from edgekit.config import load_build_config
    from edgekit.errors import EdgekitError
    from edgekit.federated.runs import serve

    given = [p for p in (ca_certificate, certificate, private_key) if p is not None]
    if given and len(given) != 3:
        raise EdgekitError("TLS needs --ca-certificate, --certificate and --private-key together")
    certificates = tuple(_read(p) for p in (ca_certificate, certificate, private_key)) if given else None
    config = load_build_config(config_file)
    context = _context(out, cache_dir, key, quiet=as_json)
    reports, passed = serve(config, address=address, min_clients=min_clients, rounds=rounds, certificates=certificates,
                            sites_keyring=sites, context=context)
    _finish(reports, passed, as_json)


@app.command("client")
def client(
    config_file: Path | None = CONFIG_ARGUMENT,
    server_address: str = typer.Option(..., "--server", metavar="HOST:PORT", help="The coordinator (`edgekit federated server`)."),
    data: Path = typer.Option(..., "--data", help=(
        "This site's labelled rows (CSV/TSV, JSONL or Parquet with the config's text and label columns); every row trains, "
        "none is uploaded.")),
    name: str | None = typer.Option(None, "--name", help="This site's name in the coordinator's report (default: the host name)."),
    site_key: Path | None = typer.Option(None, "--site-key", help="This site's signing key (edgekit keys generate), for a coordinator started with --sites."),
    ca_certificate: Path | None = typer.Option(None, "--ca-certificate", help="TLS: the CA certificate the coordinator's certificate is signed by."),
    max_wait: float = typer.Option(60.0, "--max-wait", min=1, help="Seconds to keep retrying an unreachable coordinator before giving up."),
    as_json: bool = typer.Option(False, "--json", help="Print what this site did as JSON."),
) -> None:
    """Join a federation as one site: train the coordinator's adapter on --data each round; rows never leave.

    The config must name the same base model as the coordinator's (its files are compared by digest) and the same
    data columns and finetune settings (the LoRA shapes must match). The site's labels must be among the
    coordinator's. Exits 0 when the coordinator ends the federation, 2 with the reason when it refuses this site or
    cannot be reached within --max-wait seconds.
    """
    import socket

    from edgekit.cli.build import _progress_bars, _say
    from edgekit.config import load_build_config
    from edgekit.federated.runs import join

    config = load_build_config(config_file)
    site = join(config, server=server_address, data_file=data, name=name or socket.gethostname(), site_key=site_key,
                root_certificate=ca_certificate, max_wait_s=max_wait, progress=_progress_bars(quiet=as_json), say=_say(quiet=as_json))
    summary = {"site": site.identity.name, "rows": len(site.texts), "rounds": site.rounds_done, "label_counts": site.label_counts}
    if as_json:
        print_json(summary)
    else:
        console.print(f"site {summary['site']}: trained {summary['rounds']} round(s) on {summary['rows']} rows; the federation ended",
                      highlight=False)


def _read(path: Path) -> bytes:
    from edgekit.errors import EdgekitError

    try:
        return path.read_bytes()
    except OSError as error:
        raise EdgekitError(f"cannot read {path}: {error.strerror}") from None
