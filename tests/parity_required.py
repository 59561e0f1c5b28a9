"""With ``JAXREC_REQUIRE_PARITY=1`` (set by CI), a test skipped because torch, TorchRec or
FBGEMM does not import fails instead: CI must compare against them, never skip silently.

The hooks are re-exported by ``tests/conftest.py``; elsewhere, load with
``pytest -p parity_required``.
"""

import os

import pytest

ENV = "JAXREC_REQUIRE_PARITY"
PARITY_MODULES = ("torch", "torchrec", "fbgemm_gpu")


def missing_parity_import(reason: str) -> bool:
    """Whether a skip reason is ``pytest.importorskip`` failing on a parity module.

    >>> missing_parity_import("could not import 'torchrec': No module named 'torchrec'")
    True
    >>> missing_parity_import("could not import 'fbgemm_gpu.split_embedding_configs': boom")
    True
    >>> missing_parity_import("could not import 'matplotlib': No module named 'matplotlib'")
    False
    """
    prefix = "could not import '"
    if not reason.startswith(prefix):
        return False
    module = reason[len(prefix) :].split("'", 1)[0]
    return module.split(".")[0] in PARITY_MODULES


def _fail_if_parity_skipped(report) -> None:
    if os.environ.get(ENV) != "1" or not report.skipped or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    if missing_parity_import(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"{ENV}=1, but {reason}: install the parity packages as the README's parity "
            "recipe does (torch, torchrec, fbgemm-gpu-cpu)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A test module whose parity import is skipped at collection fails (when required)."""
    outcome = yield
    _fail_if_parity_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test whose parity import is skipped while it runs fails (when required)."""
    outcome = yield
    _fail_if_parity_skipped(outcome.get_result())
