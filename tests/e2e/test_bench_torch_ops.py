"""bench/torch_ops.py end to end at toy size, next to one busy loop: every op asked for gets a
row with both backends' times and their ratio."""
import json
import os
import sys

import pytest
from bench_run import run_bench

pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(200)
def test_the_benchmark_prints_a_row_per_op_and_size(tmp_path):
    out_json = tmp_path / "rows.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "torch_ops.py"), "--ranks", "2", "--sizes", "4K,64K",
           "--ops", "coalesced,reduce,reduce_scatter,all_gather_into", "--reps", "3", "--burn", "1", "--timeout", "150", "--json", str(out_json)]
    out, _ = run_bench(cmd, 180)
    assert "busy loops beside the ranks: 1" in out.splitlines()[0], out
    rows = json.loads(out_json.read_text())
    ops = ("all_gather_into", "coalesced", "reduce", "reduce_scatter")  # the last two: FSDP's collectives
    assert sorted((r["op"], r["bytes"]) for r in rows) == [(op, b) for op in ops for b in (4096, 65536)]
    for r in rows:
        assert r["pycoll_s"] > 0 and r["gloo_s"] > 0 and abs(r["ratio"] - r["gloo_s"] / r["pycoll_s"]) < 1e-9, r
    lines = [line.split() for line in out.splitlines() if line.startswith(ops)]
    assert len(lines) == 8, out
