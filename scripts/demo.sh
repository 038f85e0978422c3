#!/usr/bin/env bash
# Quickstart, first command: install edgekit and run its main job on the embedded default.
# Until the build pipeline lands, the main job is a look at this machine and the shipped targets.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python-env.sh"

pip_install "$EDGEKIT_ROOT[agent]"
bin="$(dirname "$PYTHON")"
"$bin/edgekit" doctor
"$bin/edgekit" targets list
