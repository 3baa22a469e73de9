"""Lightning on the "pycoll" backend: `L.Trainer(strategy=DDPStrategy(process_group_backend="pycoll"),
accelerator="cpu", devices=2)` trains, through Lightning's own launcher, to the same parameters on
both ranks, bit for bit the parameters the same run reaches on Gloo (2 ranks: each gradient sum has
one order). lightning is in the `test` extra, so this never skips."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import lightning  # noqa: F401  a plain import: a missing install fails here, it does not skip
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "support" / "lightning_run.py"
STEPS = 4  # lightning_run.STEPS
RUN_TIMEOUT_S = 90


def _start(backend, out):
    env = dict(os.environ)
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)  # Lightning launches both ranks itself, on a free port of its choosing
    env.update(TORCH_DEVICE_BACKEND_AUTOLOAD="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    # its own session: rank 1 is Lightning's child, and a timeout must kill both ranks
    return subprocess.Popen([sys.executable, str(RUNNER), backend, str(out)], env=env, cwd=str(out),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc, backend):
    try:
        log, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the Lightning run on {backend} did not finish in {RUN_TIMEOUT_S} s:\n{log[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind after rank 0 exited
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"the Lightning run on {backend} failed:\n{log[-4000:]}"


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 30)
def test_lightning_ddp_trains_bit_identical_to_gloo(tmp_path):
    # both runs at once: each spends most of its time importing Lightning
    procs = {backend: _start(backend, tmp_path) for backend in ("pycoll", "gloo")}
    for backend, proc in procs.items():
        _finish(proc, backend)
    runs = {b: [json.loads((tmp_path / f"{b}-{r}.json").read_text()) for r in range(2)] for b in procs}
    mine, gloo = runs["pycoll"], runs["gloo"]
    for r in range(2):
        assert (mine[r]["backend"], mine[r]["world"], mine[r]["rank"]) == ("pycoll", 2, r)
        assert (gloo[r]["backend"], gloo[r]["world"], gloo[r]["rank"]) == ("gloo", 2, r)
        assert mine[r]["steps"] == STEPS and len(mine[r]["losses"]) == STEPS
        assert mine[r]["final"] != mine[r]["initial"], f"rank {r}: training changed nothing"
        assert mine[r]["final"] == gloo[r]["final"], f"rank {r}: parameters differ from Gloo's"
        assert mine[r]["losses"] == gloo[r]["losses"], f"rank {r}: losses differ from Gloo's"
    assert mine[0]["final"] == mine[1]["final"], "the ranks' parameters differ"
    assert mine[0]["losses"] != mine[1]["losses"]  # each rank trained on its own half of the data
