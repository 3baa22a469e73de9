"""bench/overlap.py end to end at toy size: one lane, two lanes and Gloo each run their rounds and
the table reports sane numbers; bench/train_step.py --overlap adds its lanes' columns."""
import json
import os
import re
import sys

import pytest
from bench_run import run_bench

pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.timeout(240)


def _run(cmd, tmp_path, limit=200):
    return run_bench(cmd, limit, dict(os.environ, TMPDIR=str(tmp_path)))[0]


def test_overlap_table(tmp_path):
    out_json = tmp_path / "out.json"
    out = _run([sys.executable, os.path.join(ROOT, "bench", "overlap.py"), "--ranks", "2", "--buckets", "2",
                "--sizes", "0.0625", "--lanes", "2", "--reps", "2", "--warmup", "1", "--gap", "1",
                "--json", str(out_json)], tmp_path)
    header = next(line for line in out.splitlines() if line.startswith("| ranks"))
    assert "pycoll ms" in header and "pycoll-l2 ms" in header and "gloo ms" in header
    rows = [line for line in out.splitlines() if re.match(r"\| 2 \| 2 \| 0.0625 \|", line)]
    assert [r.split("|")[4].strip() for r in rows] == ["burst", "staggered"], out
    data = json.loads(out_json.read_text())
    assert len(data["rows"]) == 2 and set(data["rows"][0]["wall_ms"]) == {"pycoll", "pycoll-l2", "gloo"}
    for row, medians in zip(rows, data["rows"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        walls = [float(c) for c in cells[4:7]]
        assert all(0 < w < 10_000 for w in walls), row
        wall = medians["wall_ms"]
        assert walls == [round(wall[i], 1) for i in ("pycoll", "pycoll-l2", "gloo")], (row, medians)
        # the ratio is of the unrounded medians (a 0.3 ms cell rounds by up to 17 %): check it against the JSON's
        assert float(cells[7].rstrip("x")) == pytest.approx(wall["pycoll"] / wall["pycoll-l2"], abs=0.006)
        assert cells[-1].startswith("1/"), row  # one lane never runs two plans at once


def test_train_step_overlap_columns(tmp_path):
    out = _run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--ranks", "2", "--shapes", "comm",
                "--steps", "2", "--warmup", "1", "--width", "64", "--layers", "2", "--overlap", "2",
                "--bucket-mb", "0.01"], tmp_path)
    header = next(line for line in out.splitlines() if line.startswith("| ranks"))
    assert "pycoll-l2 step" in header and "gloo/pycoll-l2" in header
    row = next(line for line in out.splitlines() if re.match(r"\| 2 \| comm", line))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 23 and 0 < float(cells[17]) < 10_000, row  # after the DDP floor's three columns
    assert float(cells[18].rstrip("x")) > 0 and float(cells[19].rstrip("x")) > 0, row
    assert "DDP bucket (16.2 KiB, 16.2 KiB)" in out  # --bucket-mb reached DDP: two buckets, not one
