# Sourced by demo.sh and test.sh: choose the Python environment edgekit installs into.
#
# - inside an active virtual environment ($VIRTUAL_ENV), use it;
# - otherwise create (once) and use .venv in the repository, or $EDGEKIT_VENV.
# torch is pinned to the CPU build before the project is installed: a bare
# `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail

EDGEKIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_PIN="torch==2.13.0"

if [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
else
    venv="${EDGEKIT_VENV:-$EDGEKIT_ROOT/.venv}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "edgekit: creating virtual environment $venv"
        "${EDGEKIT_BASE_PYTHON:-python3}" -m venv "$venv"
    fi
    PYTHON="$venv/bin/python"
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"edgekit needs Python 3.10 or newer; {sys.executable} is {sys.version.split()[0]}")
PY

pip_install() {
    "$PYTHON" -m pip install --disable-pip-version-check --quiet "$@"
}
