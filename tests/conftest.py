"""Test-wide set-up: several host devices, so sharding tests run on a CPU; and, with
``JAXREC_REQUIRE_PARITY=1`` (CI), parity tests that cannot import torch, TorchRec or FBGEMM
fail rather than skip (:mod:`parity_required`).

The device flag must be set before JAX initialises its CPU backend (the first computation).
"""

import os

from parity_required import pytest_make_collect_report, pytest_runtest_makereport

__all__ = ["pytest_make_collect_report", "pytest_runtest_makereport"]

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
