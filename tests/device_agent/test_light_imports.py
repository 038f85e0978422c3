"""The device side stays light: importing device_agent never pulls in build-side packages."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "peft", "optimum", "edgekit", "onnx")

PROBE = """
import json, sys
import device_agent, device_agent.bundle, device_agent.keys, device_agent.host, device_agent.errors, device_agent.cli
import device_agent.server, device_agent.repository, device_agent.runtime, device_agent.batching, device_agent.preprocess, device_agent.validation, device_agent.tensorrt_engine
from device_agent.host import probe_host
probe_host()
print(json.dumps(sorted(sys.modules)))
"""


def test_device_agent_imports_no_build_side_package():
    output = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    modules = set(json.loads(output))
    loaded = sorted(name for name in modules if name.split(".")[0] in FORBIDDEN)
    assert loaded == [], f"device_agent pulled in {loaded}"
