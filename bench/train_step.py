"""The training-step benchmark (DDP or FSDP2 on pycoll against Gloo) from this checkout:
``python bench/train_step.py --help``. It is ``pycoll bench --train`` (pycoll/train_bench.py),
run with the pycoll next to this file; other bench/ scripts use its helpers from here."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from pycoll.train_bench import run  # noqa: E402
# the helpers other bench/ scripts take from here (import train_step as _ts)
from pycoll.train_bench import _killpg, _sigterm, busy_loops, ints  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(run(prog="bench/train_step.py"))
