"""Two processes on one machine's CPU (``jax.distributed`` with gloo collectives) train a
DLRM through DistributedModelParallel; the result equals one device's."""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("multiprocess_worker.py")
# Three fresh interpreters (two workers, the reference) each import jax and jaxrec and
# compile a DLRM step: about 40 s of CPU apiece, shared by CI's 2 cores with the other test
# workers. One run took 117 s on a loaded machine (load average ~20), so the old 120 s
# limit was a load flake, not a hang; the limit only bounds a real deadlock.
TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_device(tmp_path):
    port, got, want = free_port(), tmp_path / "got.npz", tmp_path / "want.npz"
    commands = [
        [sys.executable, str(WORKER), str(p), "2", str(port), str(got)] for p in range(2)
    ] + [[sys.executable, str(WORKER), "--reference", "4", str(want)]]
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    got, want = np.load(got), np.load(want)
    assert sorted(got.files) == sorted(want.files)
    assert any(name.startswith("state:") for name in want.files)
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-6)
    for name in want.files:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=1e-7, err_msg=name)
