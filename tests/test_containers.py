"""Where users run it: containers give /dev/shm 64 MB (Docker's default).

Shared arrays live in memfd segments, which are not files of /dev/shm: a
512 MB shared array, a compute on it and a MapReduce over it work where
``multiprocessing.shared_memory`` of the same size dies with SIGBUS.  The
test makes that setting itself, in a mount namespace of its own (``unshare
--mount`` with a 64 MB tmpfs on /dev/shm), and is skipped where it cannot.
"""

from __future__ import annotations

import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)

SHAREDMEM = """
import os
import dask.array as da, numpy as np
import dask_sharedmem as sharedmem
st = os.statvfs("/dev/shm")
assert st.f_blocks * st.f_frsize == 64 << 20, st
x = sharedmem.empty(64 << 20)                  # 512 MB, eight times /dev/shm
x[...] = 1.0
total = (da.from_array(x, chunks=8 << 20) + 1).sum().compute(scheduler="sharedmem")
with sharedmem.MapReduce(np=2) as pool:
    def work(i):
        part = x[i::4]
        part *= 3
        return float(part.sum())
    parts = pool.map(work, range(4))
print(total, sum(parts))
"""

MULTIPROCESSING = """
import numpy as np
from multiprocessing import shared_memory
s = shared_memory.SharedMemory(create=True, size=512 << 20)
try:
    np.ndarray((64 << 20,), buffer=s.buf)[...] = 1.0
finally:
    s.unlink()
"""


def in_small_dev_shm(script: str) -> subprocess.CompletedProcess:
    mount = "mount -t tmpfs -o size=64m tmpfs /dev/shm"
    return subprocess.run(["unshare", "--mount", "sh", "-c", f'{mount} && exec "$0" -c "$1"',
                           sys.executable, script],
                          cwd=ROOT, capture_output=True, text=True, timeout=100)


@pytest.fixture(scope="module")
def can_unshare():
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64m tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here (needs root): {probe.stderr.strip()}")


def test_512_mb_of_shared_arrays_work_with_a_64_mb_dev_shm(can_unshare):
    p = in_small_dev_shm(SHAREDMEM)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(2.0 * (64 << 20)), str(3.0 * (64 << 20))]


def test_multiprocessing_shared_memory_dies_there(can_unshare):
    """The control: the setting bites (what the test above is immune to)."""
    p = in_small_dev_shm(MULTIPROCESSING)
    assert p.returncode == -signal.SIGBUS, (p.returncode, p.stderr)
