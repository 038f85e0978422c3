#!/usr/bin/env bash
# Quickstart, first command: install edgekit and run its main job on the embedded default,
# `edgekit build` of the demo (all-MiniLM-L6-v2 with a head fitted on WordNet glosses, for
# x86-64-cpu), then verify the signed bundle it wrote exactly as a device would.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python-env.sh"

pip_install "$TORCH_PIN"
pip_install "$EDGEKIT_ROOT[build,agent]"
bin="$(dirname "$PYTHON")"
out="${EDGEKIT_DEMO_OUT:-$EDGEKIT_ROOT/out}"
cache="${EDGEKIT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/edgekit}"

"$bin/edgekit" build --out "$out" --cache-dir "$cache"
# The build signed with a development key in the cache; its edgekit.pub is the keyring here.
"$bin/edgekit" bundle verify "$out/x86-64-cpu/wordnet-supersense-1.0.0.ekb" --keyring "$cache/dev-key"
