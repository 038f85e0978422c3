#!/usr/bin/env bash
# Quickstart, second command: install what the tests need and run the whole suite (CI runs this).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python-env.sh"

pip_install "setuptools>=69" wheel
pip_install "$TORCH_PIN"
pip_install -e "$EDGEKIT_ROOT[all]"

cd "$EDGEKIT_ROOT"
set +e
"$PYTHON" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "edgekit: pytest collected no tests; that is a failure, not a pass" >&2
    exit 1
fi
exit "$status"
