"""Doctests of the library run with several host devices too (sharded examples use two).

The flag must be set before JAX initialises its CPU backend; ``tests/conftest.py`` sets the
same one for the test suite.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
