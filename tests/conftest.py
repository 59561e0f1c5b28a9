"""Test-wide set-up: several host devices, so sharding tests run on a CPU.

This must run before JAX initialises its CPU backend (the first computation).
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
