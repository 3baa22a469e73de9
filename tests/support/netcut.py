"""Cut one peer's links with network namespaces (root only; iproute2, no tc or iptables needed).

    with NetCut() as net:          # a namespace with two veth pairs to this one
        net.data_root, net.data_ns # addresses of the data pair (this side, the namespace's)
        net.ctl_root, net.ctl_ns   # addresses of the control pair
        net.popen_in_ns(argv, env) # a process inside the namespace
        net.cut("data")            # "data", "control" or "both": the namespace's end goes down

A peer in the namespace advertises ``data_ns`` for its data connections (PYCOLL_ADDR) and
reaches the coordinator at ``ctl_root``; peers here advertise ``data_root``. Taking an
interface down drops packets without a FIN or a reset, as a cut cable does. Names start
with ``pc16`` and everything is deleted on exit (also the processes started in it).
"""
import os
import subprocess

PREFIX = "pc16"


def available():
    """(True, "") when this process may build namespaces, else (False, why)."""
    if os.geteuid() != 0:
        return False, "needs root"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"iproute2 unusable: {exc}"
    return True, ""


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class NetCut:
    def __init__(self):
        tag = os.getpid() % 10000
        self.ns = f"{PREFIX}n{tag}"
        self.links = {"data": (f"{PREFIX}d{tag}", f"{PREFIX}D{tag}"), "control": (f"{PREFIX}c{tag}", f"{PREFIX}C{tag}")}
        sub = os.getpid() % 250 + 1
        self.data_root, self.data_ns = f"10.216.{sub}.1", f"10.216.{sub}.2"
        self.ctl_root, self.ctl_ns = f"10.217.{sub}.1", f"10.217.{sub}.2"
        self.procs = []

    def __enter__(self):
        try:
            _ip("netns", "add", self.ns)
            _ip("-n", self.ns, "link", "set", "lo", "up")
            for kind, (here, there) in self.links.items():
                root_ip, ns_ip = (self.data_root, self.data_ns) if kind == "data" else (self.ctl_root, self.ctl_ns)
                _ip("link", "add", here, "type", "veth", "peer", "name", there)
                _ip("link", "set", there, "netns", self.ns)
                _ip("addr", "add", f"{root_ip}/30", "dev", here)
                _ip("-n", self.ns, "addr", "add", f"{ns_ip}/30", "dev", there)
                _ip("link", "set", here, "up")
                _ip("-n", self.ns, "link", "set", there, "up")
        except BaseException:
            self.close()
            raise
        return self

    def popen_in_ns(self, argv, env=None, **kwargs):
        p = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], env=env, **kwargs)
        self.procs.append(p)
        return p

    def cut(self, which):
        for kind in ("data", "control") if which == "both" else (which,):
            _ip("-n", self.ns, "link", "set", self.links[kind][1], "down")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        for here, _ in self.links.values():
            subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)

    def __exit__(self, *exc):
        self.close()
