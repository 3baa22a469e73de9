"""Watch an elastic job survive churn: a coordinator, a few training peers,
and a chaos loop that SIGKILLs peers and starts new ones while they train.

    python examples/elastic_demo.py            # NumPy peers (examples/elastic_numpy.py)
    python examples/elastic_demo.py --torch    # torch peers (examples/elastic_torch.py)

Every line a peer prints is prefixed with its name. The loss keeps going
down while peers come and go; newcomers report the state they received.
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time

from pycoll.control.coordinator import Coordinator
from pycoll.testing import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


ADMITTED = set()


def _pump(proc, name):
    for line in iter(proc.stdout.readline, b""):
        text = line.decode(errors="replace")
        if ": admitted as rank" in text:
            ADMITTED.add(name)
        sys.stdout.write(f"[{name}] {text}")
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    port = free_port()
    coordinator = Coordinator("127.0.0.1", port, min_world_size=args.peers, heartbeat_timeout=3.0).start()
    script = os.path.join(HERE, "elastic_torch.py" if args.torch else "elastic_numpy.py")
    procs = {}

    def start(name):
        cmd = [sys.executable, script, "--master-port", str(port), "--steps", str(args.steps), "--name", name]
        if not args.torch:
            cmd += ["--pause", "0.05"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=_pump, args=(p, name), daemon=True).start()
        procs[name] = p

    try:
        for i in range(args.peers):
            start(f"peer{i}")
        joined = 0
        deadline = time.monotonic() + 120
        while len(ADMITTED) < args.peers and time.monotonic() < deadline:  # imports take a while
            time.sleep(0.1)
        time.sleep(2.0)
        for _ in range(args.kills):
            alive = [n for n, p in procs.items() if p.poll() is None]
            if len(alive) < 3:
                break
            victim = rng.choice(alive)
            print(f"--- demo: SIGKILL {victim} ---", flush=True)
            procs[victim].send_signal(signal.SIGKILL)
            time.sleep(rng.uniform(0.5, 1.5))
            name = f"new{joined}"
            joined += 1
            print(f"--- demo: starting {name} ---", flush=True)
            start(name)
            time.sleep(rng.uniform(1.0, 2.5))
        deadline = time.monotonic() + 300
        while any(procs[n].poll() is None for n in ADMITTED) and time.monotonic() < deadline:
            time.sleep(0.2)
        for n, p in procs.items():
            if p.poll() is None:  # started too late: the job ended before it could be admitted
                print(f"--- demo: {n} was never admitted (the job had ended); stopping it ---", flush=True)
                p.kill()
                p.wait()
        codes = {n: p.returncode for n, p in procs.items()}
        print(f"--- demo: exit codes {codes} ---", flush=True)
        return 0 if all(c in (0, -signal.SIGKILL) for c in codes.values()) else 1
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        coordinator.stop()


if __name__ == "__main__":
    sys.exit(main())
