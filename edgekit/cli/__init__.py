"""The ``edgekit`` command line: one typer app per command group, one file each.

Heavy libraries (torch, onnxruntime, transformers) are imported inside the
commands that need them, so ``edgekit --help`` answers at once.
"""

from __future__ import annotations

import typer

from device_agent.errors import UserErrorGroup
from edgekit.cli import build, bundle, compare, doctor, explain, federated, fleet, fleet_rollouts, flash, keys, retrain, targets

app = typer.Typer(
    name="edgekit",
    cls=UserErrorGroup,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help=(
        "Build, sign and flash customised models to edge devices, then watch them for drift.\n\n"
        "Start with `edgekit doctor` to see what this machine can run, and "
        "`edgekit targets list` for the device classes edgekit builds for."
    ),
)
app.add_typer(targets.app, name="targets")
app.add_typer(keys.app, name="keys")
app.add_typer(bundle.app, name="bundle")
app.add_typer(fleet.app, name="fleet")
app.add_typer(federated.app, name="federated")
fleet.app.command("deploy")(fleet_rollouts.deploy)
fleet.app.command("rollouts")(fleet_rollouts.list_rollouts)
fleet.app.add_typer(fleet_rollouts.rollout_app, name="rollout")
app.command("build")(build.build)
app.command("doctor")(doctor.doctor)
app.command("flash")(flash.flash)
app.command("explain")(explain.explain)
app.command("retrain")(retrain.retrain)
app.command("compare")(compare.compare)


@app.command()
def version() -> None:
    """Print edgekit's version."""
    from edgekit import __version__

    typer.echo(f"edgekit {__version__}")


def main() -> None:
    app()
