"""bench/diloco.py end to end at toy size: Gloo and every pycoll variant run their rounds and the
table and the JSON report sane numbers. (Tier e2e: tests/conftest.py marks a test by its folder.)"""
import json
import os
import sys

import pytest
from bench_run import run_bench

pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench", "diloco.py")

pytestmark = pytest.mark.timeout(180)


def test_diloco_bench_table(tmp_path):
    out_json = tmp_path / "out.json"
    variants = ["gloo", "pycoll-sync", "pycoll-async"]  # (int8: tests/e2e/test_diloco.py)
    cmd = [sys.executable, BENCH, "--ranks", "2", "--width", "64", "--layers", "2", "--sync-every", "2",
           "--rounds", "3", "--timeout", "60", "--variants", ",".join(variants), "--json", str(out_json)]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    out, err = run_bench(cmd, 150, env)
    rows = {parts[0]: parts[1:] for parts in map(str.split, out.splitlines()) if parts and parts[0] in variants}
    assert sorted(rows) == sorted(variants), out
    assert rows["gloo"][-2:] == ["1.00", "1.00"], out  # the ratios' base
    results = json.loads(out_json.read_text())["results"]
    for variant in variants:
        r = results[variant]
        assert r is not None, f"{variant} failed\n{out}\n{err}"
        assert 0 < r["inner"] < r["round"] and 0 < r["blocking"] < r["round"], (variant, r)
