"""One install in its own process, so a test can kill -9 it at any moment.

Usage: python -m tests.support.install_driver STATE_DIR KEYRING_DIR BUNDLE
Prints "ready" once the repository is open, then "installed".
"""

from __future__ import annotations

import sys
from pathlib import Path

from device_agent.keys import Keyring
from device_agent.repository import Repository


def main() -> None:
    state, keyring, bundle = (Path(arg) for arg in sys.argv[1:4])
    repository = Repository(state, Keyring.load(keyring))
    repository.start()
    print("ready", flush=True)
    repository.install(bundle)
    print("installed", flush=True)


if __name__ == "__main__":
    main()
