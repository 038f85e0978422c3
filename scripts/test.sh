#!/usr/bin/env bash
# Quickstart, second command: install what the tests need and run the whole suite (CI runs this).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python-env.sh"

# Debian packages some tests need: the Fashion-MNIST IDX files (image task),
# WordNet 3.0 (the demo set regenerates byte for byte) and Chromium (the fleet
# report rendered headless). Installed when missing and apt is usable; without
# them those tests skip and say why.
debian_packages=()
[ -d /usr/share/datasets/fashion-mnist ] || debian_packages+=(dataset-fashion-mnist)
[ -f /usr/share/wordnet/data.noun ] || debian_packages+=(wordnet-base)
command -v chromium >/dev/null 2>&1 || debian_packages+=(chromium)
if [ "${#debian_packages[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
        echo "edgekit: installing Debian packages ${debian_packages[*]}"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debian_packages[@]}"; } >/dev/null \
            || echo "edgekit: could not install ${debian_packages[*]}; the tests that need them will skip" >&2
    else
        echo "edgekit: ${debian_packages[*]} missing and apt-get is not usable as root here; the tests that need them will skip" >&2
    fi
fi

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
