"""bench/fault_latency.py runs (it once imported its helpers from a folder that had moved, and
nothing noticed): one trial of a SIGKILL on 3 peers, and the table line it prints."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(180)
def test_fault_latency_bench_measures_a_sigkill():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "fault_latency.py"), "--trials", "1",
                          "--peers", "3", "--mib", "1", "--heartbeat", "1", "--only", "sigkill"],
                         capture_output=True, text=True, timeout=160,
                         env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = re.search(r"^sigkill plain +detection median +([\d.]+) ms.*recovery median +([\d.]+) ms", out.stdout, re.M)
    assert line, out.stdout[-2000:]
    detection, recovery = map(float, line.groups())
    assert 0 < detection <= recovery < 10_000  # ms: a dead peer is seen before the group goes on
