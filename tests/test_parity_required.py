"""``JAXREC_REQUIRE_PARITY=1`` turns a parity test skipped for a missing torch, TorchRec or
FBGEMM into a failure (at collection and inside a test); other skips stay skips."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
AT_COLLECTION = """
import pytest
torchrec = pytest.importorskip("torchrec")
def test_a():
    pass
"""
IN_TESTS = """
import pytest
def test_fbgemm():
    pytest.importorskip("fbgemm_gpu.split_embedding_configs")
def test_other_module():
    pytest.importorskip("a_module_that_is_not_installed")
"""


def run_pytest(tmp_path, source, require):
    """A sub-run of ``source`` where torchrec and fbgemm_gpu fail to import."""
    (tmp_path / "torchrec.py").write_text("raise ModuleNotFoundError('no torchrec here')\n")
    (tmp_path / "fbgemm_gpu").mkdir()
    (tmp_path / "fbgemm_gpu" / "__init__.py").write_text("raise ModuleNotFoundError('none')\n")
    (tmp_path / "test_parity.py").write_text(source)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{TESTS}")
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.pop("JAXREC_REQUIRE_PARITY", None)
    if require:
        env["JAXREC_REQUIRE_PARITY"] = "1"
    args = ["-p", "parity_required", "-p", "no:cacheprovider", "-c", os.devnull, "-rA"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "test_parity.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout


@pytest.mark.parametrize("require", [False, True])
def test_a_module_skipped_at_collection_fails_only_when_required(tmp_path, require):
    code, out = run_pytest(tmp_path, AT_COLLECTION, require)
    if require:
        assert code != 0, out
        assert "JAXREC_REQUIRE_PARITY=1, but could not import 'torchrec'" in out
    else:  # the only module skipped: nothing collected, no failure
        assert code == pytest.ExitCode.NO_TESTS_COLLECTED and "1 skipped" in out, out


@pytest.mark.parametrize("require", [False, True])
def test_a_parity_import_skipped_in_a_test_fails_and_other_skips_stay(tmp_path, require):
    code, out = run_pytest(tmp_path, IN_TESTS, require)
    if require:
        assert code != 0 and "1 failed, 1 skipped" in out, out
        assert "FAILED test_parity.py::test_fbgemm" in out
        assert "could not import 'fbgemm_gpu.split_embedding_configs'" in out
    else:
        assert code == 0 and "2 skipped" in out, out
