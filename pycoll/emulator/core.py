"""Build and tear down an emulated network of Linux network namespaces.

Layout (one ``Emulator``):

* one netns per peer, named ``<prefix><rank>`` with ``prefix =
  "pce<pid>-<k>-"`` (``k`` counts emulators in this process);
* in each peer netns a TUN device ``emu0`` with address 10.77.x.y/16 (the
  /16 route makes every other peer "on link"; TUN needs no ARP);
* one ``delayline`` process (C, in the caller's netns) holding all TUN fds:
  it forwards each packet to the destination peer's TUN after the link's
  one-way delay, dropping a configured fraction;
* rate caps with tc in each peer netns: an ``htb`` on ``emu0`` egress with
  one class per destination (per-link cap) under an optional parent class
  (host NIC egress cap), and, for a NIC cap, an ``ifb`` with an ``htb``
  (one fair share per sending peer) for the host's ingress.

Everything created is removed by ``close()`` (``__exit__``), at interpreter
exit (atexit) and on SIGTERM/SIGHUP.  Namespaces left by a process that died
hard (SIGKILL) are reclaimed by :func:`cleanup_stale` (run at every start):
their names carry the dead creator's pid.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import sites as _sites
from ._build import delayline_binary
from .spec import EmuSpec, LinkSpec, tc_rate, tc_size

RUN_PREFIX = f"pce{os.getpid()}-"
_STALE_RE = re.compile(r"^pce(\d+)-")
_counter = itertools.count()
_live: "List[Emulator]" = []
_live_lock = threading.RLock()  # re-entrant: the signal handler may run while held
_prev_handlers: Dict[int, object] = {}
_atexit_done = False

PROBE = str(Path(__file__).resolve().with_name("probe.py"))
IFNAME = "emu0"
IFB = "ifb0"
# Uncapped links are assumed to run at most this fast when sizing queues.
_ASSUMED_MAX_BPS = 10e9


def _run(argv: Sequence[str], *, input: Optional[str] = None, timeout: float = 20,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run a short admin command (ip/tc/sysctl) with a hard timeout."""
    r = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_netns() -> List[str]:
    """Names of all named network namespaces."""
    r = _run(["ip", "netns", "list"], check=False, timeout=10)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> List[int]:
    r = _run(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def _kill_pids(pids: List[int], grace: float = 2.0) -> None:
    """SIGTERM, wait (bounded), SIGKILL stragglers.  Only ever called with
    pids of processes inside namespaces this package created."""
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < end:
        left = [p for p in left if _pid_alive(p) and not _is_zombie(p)]
        if left:
            time.sleep(0.02)
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _delete_netns(ns: str) -> Optional[str]:
    """Kill what runs inside, then delete.  Returns an error string or None."""
    for attempt in range(5):
        pids = _netns_pids(ns)
        if pids:
            _kill_pids(pids)
        r = _run(["ip", "netns", "del", ns], check=False, timeout=10)
        if r.returncode == 0 or ns not in list_netns():
            return None
        time.sleep(0.1 * (attempt + 1))
    return f"could not delete netns {ns}: {r.stderr.strip()}"


def cleanup_stale() -> List[str]:
    """Delete namespaces (and temp dirs) left by emulator runs whose creator
    process is dead.

    Only touches names of the form ``pce<pid>-...`` whose pid is not alive
    (the creator was SIGKILLed before it could clean up).  Returns the
    namespaces removed."""
    removed = []
    for ns in list_netns():
        m = _STALE_RE.match(ns)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if _delete_netns(ns) is None:
            removed.append(ns)
    # Their temp dirs (config, delay-line log) too.
    for d in Path(tempfile.gettempdir()).glob("pce*-*"):
        m = _STALE_RE.match(d.name)
        if m and d.is_dir() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
    return removed


def available() -> Tuple[bool, str]:
    """Can this process build an emulated network?  Returns (ok, reason).

    Checks root, the ``ip``/``tc`` tools, creating a namespace, a TUN device
    and an htb qdisc inside it, and a C compiler.  Leaves nothing behind."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, TUN, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' (iproute2) not found"
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun missing"
    from ._build import compiler
    if os.environ.get("PYCOLL_DELAYLINE_BIN") is None and compiler() is None:
        return False, "no C compiler to build the delay line"
    ns = f"{RUN_PREFIX}probe{next(_counter)}"
    try:
        r = _run(["ip", "netns", "add", ns], check=False, timeout=10)
        if r.returncode != 0:
            return False, f"cannot create a network namespace: {r.stderr.strip()}"
        r = _run(["ip", "-n", ns, "tuntap", "add", "dev", "t0", "mode", "tun"], check=False,
                 timeout=10)
        if r.returncode != 0:
            return False, f"cannot create a TUN device: {r.stderr.strip()}"
        r = _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "t0", "root",
                  "handle", "1:", "htb"], check=False, timeout=10)
        if r.returncode != 0:
            return False, f"tc htb unavailable: {r.stderr.strip()}"
        return True, "ok"
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"probe failed: {e}"
    finally:
        if ns in list_netns():
            _run(["ip", "netns", "del", ns], check=False, timeout=10)


def peer_address(rank: int) -> str:
    """10.77.0.1 for rank 0, ...; 250 hosts per third octet (keeps .0/.255 free)."""
    if not 0 <= rank < 250 * 255:
        raise ValueError("rank out of range")
    return f"10.77.{rank // 250}.{rank % 250 + 1}"


# ------------------------------------------------------------------ signals

def _teardown_all() -> None:
    with _live_lock:
        emus = list(_live)
    for e in reversed(emus):
        try:
            e.close()
        except Exception as ex:  # never let one failure stop the others
            print(f"pycoll.emulator: teardown error: {ex}", file=sys.stderr)


def _on_signal(sig, frame):
    _teardown_all()
    prev = _prev_handlers.get(sig, signal.SIG_DFL)
    if callable(prev):
        prev(sig, frame)
    elif prev == signal.SIG_IGN:
        return
    else:  # default action (terminate), now that everything is cleaned up
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)


def _install_handlers() -> None:
    global _atexit_done
    if not _atexit_done:
        atexit.register(_teardown_all)
        _atexit_done = True
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal only works in the main thread; atexit still covers us
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if sig in _prev_handlers:
            continue
        try:
            _prev_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):
            _prev_handlers.pop(sig, None)


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_prev_handlers.items()):
        try:
            if signal.getsignal(sig) is _on_signal:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        except (ValueError, OSError, TypeError):
            pass
        del _prev_handlers[sig]


def _readline(pipe, timeout: float) -> Optional[str]:
    """One line from a binary pipe within ``timeout`` seconds (None on EOF/timeout)."""
    sel = selectors.DefaultSelector()
    sel.register(pipe, selectors.EVENT_READ)
    buf = b""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if not sel.select(max(0.0, end - time.monotonic())):
                continue
            ch = os.read(pipe.fileno(), 1)  # byte-wise: never read past the line
            if not ch:
                return None
            buf += ch
            if ch == b"\n":
                return buf.decode(errors="replace")
            if len(buf) > 65536:
                break
        return None
    finally:
        sel.close()


# ------------------------------------------------------------------ emulator

class Emulator:
    """Context manager: an emulated network of ``spec.n_peers`` hosts.

    >>> with Emulator(EmuSpec.uniform(2, rate_bps=100e6, delay_s=0.025)) as emu:
    ...     srv = emu.run_in(1, ["iperf3", "-s", "-1"])
    ...     emu.exec_in(0, ["iperf3", "-c", emu.peer_ip(1)], timeout=30)

    Parameters: ``spec`` is an EmuSpec, a topology-like object (``world_size``
    + ``link(u,v)``, see EmuSpec.from_topology) or a dict (EmuSpec.coerce).
    ``mtu``: TUN MTU (large MTUs cut the per-packet cost of the user-space
    delay line; 65000 sustains > 1 Gbit/s here).  ``seed``: loss/jitter PRNG.
    ``tcp_buffers``: raise the peers' TCP autotuning maxima (tcp_rmem/wmem)
    to 64 MiB (or to the given number of bytes) so one flow can fill a large
    bandwidth-delay product; False keeps the kernel defaults.
    ``congestion``: TCP congestion control inside peers (default: inherit).
    ``keep_logs``: keep the temp dir (config, delay line log) after close.
    ``sysctls``: more ``name=value`` settings for every namespace (e.g.
    ``["net.ipv4.tcp_slow_start_after_idle=0"]``).
    """

    def __init__(self, spec, *, mtu: int = 65000, seed: int = 1, tcp_buffers=True,
                 congestion: Optional[str] = None, keep_logs: bool = False,
                 startup_timeout: float = 20.0, sysctls: Sequence[str] = ()):
        self.spec = EmuSpec.coerce(spec)
        self.n = self.spec.n_peers
        if not 576 <= int(mtu) <= 65535:
            raise ValueError("mtu must be in [576, 65535]")
        self.mtu = int(mtu)
        self.seed = int(seed)
        self.tcp_buffers = tcp_buffers
        self.congestion = congestion
        self.keep_logs = keep_logs
        self.sysctls = [str(s) for s in sysctls]
        for s in self.sysctls:
            if not re.fullmatch(r"net\.[a-z0-9_.]+=[0-9 ]+", s):
                raise ValueError(f"sysctl {s!r}: expected net.NAME=NUMBER")
        self.startup_timeout = startup_timeout
        self.prefix = f"{RUN_PREFIX}{next(_counter)}-"
        self.netns = [f"{self.prefix}{r}" for r in range(self.n)]
        self.peer_ips = [peer_address(r) for r in range(self.n)]
        self._links = {(u, v): ls for u, v, ls in self.spec.links()}
        # Sites (shared uplinks, see sites.py): routers are then the delay line's peers.
        self.sites = self.spec.sites
        self.router_netns = [f"{self.prefix}s{i}" for i in range(len(self.sites or ()))]
        self._site_of = _sites.site_of_ranks(self.sites, self.n) if self.sites else None
        self._created: List[str] = []
        self._procs: List[subprocess.Popen] = []
        self._dl: Optional[subprocess.Popen] = None
        self._dl_log = None
        self._tmp: Optional[str] = None
        self._started = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> "Emulator":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Emulator":
        """Create namespaces, start the delay line, configure addresses and tc."""
        if self._started:
            raise RuntimeError("Emulator already started")
        self._started = True
        with _live_lock:
            _live.append(self)
        _install_handlers()
        try:
            cleanup_stale()
            binary = delayline_binary()
            self._tmp = tempfile.mkdtemp(prefix=f"{self.prefix}")
            existing = set(list_netns())
            for ns in self.netns + self.router_netns:
                if ns in existing:
                    raise RuntimeError(f"netns {ns} already exists")
                _run(["ip", "netns", "add", ns])
                self._created.append(ns)
                self._prepare_ns(ns)
            for ns in self.router_netns:
                _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *_sites.router_sysctls()])
            self._start_delayline(binary)
            if self.sites:
                self._configure_sites()
            else:
                for r in range(self.n):
                    self._configure_peer(r)
        except BaseException:
            self.close()
            raise
        return self

    def _prepare_ns(self, ns: str) -> None:
        # Before the TUN exists: disable IPv6 so no router solicitations etc.
        # reach the delay line; size TCP autotuning for large BDPs.
        sysctls = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        if self.tcp_buffers:
            mx = 64 << 20 if self.tcp_buffers is True else int(self.tcp_buffers)
            sysctls += [f"net.ipv4.tcp_rmem=4096 131072 {mx}",
                        f"net.ipv4.tcp_wmem=4096 16384 {mx}"]
        if self.congestion:
            sysctls.append(f"net.ipv4.tcp_congestion_control={self.congestion}")
        sysctls += self.sysctls
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-e", "-w", *sysctls])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _queue_cap(self, u: int, v: int) -> int:
        """Delay-line queue cap: 2x the link's bandwidth-delay product + slack."""
        ls = self._links[(u, v)]
        return self._queue_bytes(ls.rate_bps or self.spec.nic_bps(u) or _ASSUMED_MAX_BPS, ls)

    def _queue_bytes(self, rate_bps: float, ls: LinkSpec) -> int:
        """2x the bandwidth-delay product at ``rate_bps`` over ``ls``, plus slack, in [4, 256] MiB."""
        bdp = rate_bps / 8 * (ls.delay_s + ls.jitter_s)
        return int(min(max(2 * bdp + 16 * self.mtu, 4 << 20), 256 << 20))

    def _delayline_conf(self) -> List[str]:
        """Peers and links of the delay line: the ranks, or (with sites) the routers."""
        if not self.sites:
            conf = [f"peers {self.n}"]
            conf += [f"peer {r} {self.netns[r]} {IFNAME} {self.peer_ips[r]}" for r in range(self.n)]
            links = [(u, v, ls, self._queue_cap(u, v)) for (u, v), ls in self._links.items()]
        else:
            k = len(self.sites)
            conf = [f"peers {k}"]
            conf += [f"peer {i} {ns} {_sites.TUN} {_sites.router_ip(i)}"
                     for i, ns in enumerate(self.router_netns)]
            links = []
            for a in range(k):
                for b in range(k):
                    if a != b:
                        ls = self.spec.site_link(a, b)
                        links.append((a, b, ls, self._queue_bytes(self.sites[a].uplink_bps or _ASSUMED_MAX_BPS, ls)))
        for u, v, ls, cap in links:
            conf.append(f"link {u} {v} {int(round(ls.delay_s * 1e9))} "
                        f"{int(round(ls.jitter_s * 1e9))} {ls.loss!r} {cap}")
        if self.sites:
            conf += [f"route {ip}/32 {self._site_of[r]}" for r, ip in enumerate(self.peer_ips)]
        return conf

    def _start_delayline(self, binary: str) -> None:
        conf = [f"mtu {self.mtu}", f"seed {self.seed}",
                f"stats {self._tmp}/stats.json", "watch_stdin 1"] + self._delayline_conf()
        path = os.path.join(self._tmp, "delayline.conf")
        with open(path, "w") as f:
            f.write("\n".join(conf) + "\n")
        self._dl_log = open(os.path.join(self._tmp, "delayline.log"), "wb")
        # stdin is a pipe we never write: when this process dies, the delay
        # line sees EOF and exits (works even after SIGKILL of the parent).
        self._dl = subprocess.Popen([binary, path], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=self._dl_log,
                                    start_new_session=True, close_fds=True)
        line = _readline(self._dl.stdout, self.startup_timeout)
        if not line or not line.startswith("READY"):
            self._dl_log.flush()
            raise RuntimeError(f"delay line did not start: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self._tmp, "delayline.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace").strip()
        except OSError:
            return "(no log)"

    def _configure_peer(self, r: int) -> None:
        ns, ip = self.netns[r], self.peer_ips[r]
        batch = [f"link set {IFNAME} mtu {self.mtu} txqueuelen 1000",
                 f"addr add {ip}/16 dev {IFNAME}",
                 f"link set {IFNAME} up"]
        nic = self.spec.nic_bps(r)
        if nic:
            batch += [f"link add {IFB} type ifb", f"link set {IFB} mtu 65535 up"]
        _run(["ip", "-n", ns, "-batch", "-"], input="\n".join(batch) + "\n")
        tc = self._tc_commands(r)
        if tc:
            _run(["ip", "netns", "exec", ns, "tc", "-batch", "-"], input="\n".join(tc) + "\n")

    def _configure_sites(self) -> None:
        """Routers, bridges, veths, routes and shapers of the site layout (sites.py)."""
        quantum = self.mtu + 64
        for i, site in enumerate(self.sites):
            ns = self.router_netns[i]
            _run(["ip", "-n", ns, "-batch", "-"],
                 input="\n".join(_sites.router_links(i, site.members, self.netns, self.mtu)
                                 + _sites.router_routes(i, self._site_of, self.peer_ips)) + "\n")
            tc: List[str] = []
            if site.uplink_bps:
                up = site.uplink_bps
                rtt = max((self.spec.site_link(i, j).delay_s + self.spec.site_link(j, i).delay_s
                           for j in range(len(self.sites)) if j != i), default=0.0)
                limit = _sites.uplink_queue_bytes(up, self.mtu, rtt)
                _run(["ip", "-n", ns, "-batch", "-"],
                     input=f"link add {_sites.IFB} type ifb\nlink set {_sites.IFB} mtu 65535 up\n")
                tc += _sites.shaper(_sites.TUN, up, self._burst(up), quantum, limit, tc_rate, tc_size)
                tc += _sites.ingress_redirect(_sites.TUN)
                tc += _sites.shaper(_sites.IFB, up, self._burst(up), quantum, limit, tc_rate, tc_size)
            for r in site.members:
                nic = self.spec.nic_bps(r)
                if nic:  # the rank's receive side: the router's port toward it
                    tc += _sites.shaper(_sites.port_name(r), nic, self._burst(nic), quantum,
                                        _sites.uplink_queue_bytes(nic, self.mtu, 0.0), tc_rate, tc_size)
            if tc:
                _run(["ip", "netns", "exec", ns, "tc", "-batch", "-"], input="\n".join(tc) + "\n")
        for r in range(self.n):
            ns = self.netns[r]
            _run(["ip", "-n", ns, "-batch", "-"],
                 input="\n".join(_sites.rank_config(r, self._site_of, self.peer_ips, self.mtu)) + "\n")
            nic = self.spec.nic_bps(r)
            if nic:  # the rank's send side, at the sender: local backpressure as on a real NIC
                b = self._burst(nic)
                tc = [f"qdisc add dev {IFNAME} root handle 1: htb default 1",
                      f"class add dev {IFNAME} parent 1: classid 1:1 htb rate {tc_rate(nic)} "
                      f"ceil {tc_rate(nic)} burst {tc_size(b)} cburst {tc_size(b)} quantum {quantum}"]
                _run(["ip", "netns", "exec", ns, "tc", "-batch", "-"], input="\n".join(tc) + "\n")

    def _burst(self, rate_bps: float) -> int:
        # A bucket must hold at least one max-size packet (twice, for slack);
        # 2 ms worth at high rates keeps timer granularity from costing rate.
        return int(max(2 * (self.mtu + 64), rate_bps / 8 * 0.002))

    def _tc_commands(self, r: int) -> List[str]:
        """htb on the TUN egress (per-destination caps under the NIC cap) and
        ifb+htb (per-source shares of the NIC cap) for the host's ingress."""
        nic = self.spec.nic_bps(r)
        caps = {d: self._links[(r, d)].rate_bps for d in range(self.n) if d != r}
        cmds: List[str] = []
        quantum = self.mtu + 64
        if nic or any(c for c in caps.values()):
            share = nic / max(1, self.n - 1) if nic else None
            cmds.append(f"qdisc add dev {IFNAME} root handle 1: htb default {'2' if nic else '0'}")
            parent = "1:"
            if nic:
                b = self._burst(nic)
                cmds.append(f"class add dev {IFNAME} parent 1: classid 1:1 htb rate {tc_rate(nic)} "
                            f"ceil {tc_rate(nic)} burst {tc_size(b)} cburst {tc_size(b)} quantum {quantum}")
                parent = "1:1"
                # default class for anything not addressed to a peer
                cmds.append(f"class add dev {IFNAME} parent 1:1 classid 1:2 htb "
                            f"rate {tc_rate(max(8000, share / 100))} ceil {tc_rate(nic)} "
                            f"burst {tc_size(b)} cburst {tc_size(b)} quantum {quantum}")
            for d, cap in caps.items():
                if cap is None and not nic:
                    continue  # unclassified -> htb direct queue: not shaped
                ceil = min(cap, nic) if (cap and nic) else (cap or nic)
                rate = min(ceil, share) if share else ceil
                b = self._burst(ceil)
                cid = f"1:{100 + d:x}"
                cmds.append(f"class add dev {IFNAME} parent {parent} classid {cid} htb "
                            f"rate {tc_rate(rate)} ceil {tc_rate(ceil)} "
                            f"burst {tc_size(b)} cburst {tc_size(b)} quantum {quantum}")
                cmds.append(f"filter add dev {IFNAME} parent 1: protocol ip prio 1 u32 "
                            f"match ip dst {self.peer_ips[d]}/32 flowid {cid}")
        if nic:
            # Ingress cap: redirect everything arriving on the TUN through an
            # ifb whose egress is the host's receive capacity.  One htb class
            # per sending peer (each guaranteed an equal share, all may borrow
            # up to the NIC rate) instead of one FIFO: TCP flows sharing a
            # drop-tail FIFO split it very unevenly (one run gave 9 % / 91 %),
            # which would make collective benchmarks irreproducible.
            b = self._burst(nic)
            share = nic / max(1, self.n - 1)
            limit = int(max(8 * (self.mtu + 64), nic / 8 * 0.05))  # >= ~50 ms of buffer
            cmds += [f"qdisc add dev {IFNAME} handle ffff: ingress",
                     f"filter add dev {IFNAME} parent ffff: protocol all prio 1 u32 match u32 0 0 "
                     f"action mirred egress redirect dev {IFB}",
                     f"qdisc add dev {IFB} root handle 1: htb default 2",
                     f"class add dev {IFB} parent 1: classid 1:1 htb rate {tc_rate(nic)} "
                     f"ceil {tc_rate(nic)} burst {tc_size(b)} cburst {tc_size(b)} quantum {quantum}",
                     f"class add dev {IFB} parent 1:1 classid 1:2 htb "
                     f"rate {tc_rate(max(8000, share / 100))} ceil {tc_rate(nic)} "
                     f"burst {tc_size(b)} cburst {tc_size(b)} quantum {quantum}",
                     f"qdisc add dev {IFB} parent 1:2 bfifo limit {limit}"]
            for src in range(self.n):
                if src == r:
                    continue
                cid = f"1:{100 + src:x}"
                cmds += [f"class add dev {IFB} parent 1:1 classid {cid} htb rate {tc_rate(share)} "
                         f"ceil {tc_rate(nic)} burst {tc_size(b)} cburst {tc_size(b)} quantum {quantum}",
                         f"qdisc add dev {IFB} parent {cid} bfifo limit {limit}",
                         f"filter add dev {IFB} parent 1: protocol ip prio 1 u32 "
                         f"match ip src {self.peer_ips[src]}/32 flowid {cid}"]
        return cmds

    def close(self) -> None:
        """Tear everything down (idempotent; safe on partial start-up).

        Re-entrant on purpose: a SIGTERM arriving while the main thread is in
        close() runs close() again from the handler, which finishes every
        step (each one tolerates having been done already) before the
        process dies."""
        if self._closed:
            return
        problems = []
        try:
            # 1. processes we started in the peers, with their process groups
            for p in list(self._procs):
                if p.poll() is None:  # not reaped -> pid (and its pgid) still ours
                    try:
                        os.killpg(p.pid, signal.SIGTERM)
                    except (ProcessLookupError, PermissionError):
                        pass
            end = time.monotonic() + 2.0
            for p in list(self._procs):
                try:
                    p.wait(timeout=max(0.01, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    try:
                        p.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        problems.append(f"process {p.pid} did not exit")
            # 2. the delay line: EOF on stdin, then SIGTERM, then SIGKILL
            if self._dl is not None:
                try:
                    if self._dl.stdin:
                        self._dl.stdin.close()
                except OSError:
                    pass
                if self._dl.poll() is None:
                    self._dl.terminate()
                try:
                    self._dl.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self._dl.kill()
                    self._dl.wait(timeout=3)
                if self._dl.stdout:
                    self._dl.stdout.close()
            if self._dl_log is not None:
                self._dl_log.close()
            # 3. namespaces (kills anything still inside first)
            for ns in reversed(list(self._created)):
                err = _delete_netns(ns)
                if err:
                    problems.append(err)
                elif ns in self._created:
                    self._created.remove(ns)
        finally:
            self._closed = True
            with _live_lock:
                if self in _live:
                    _live.remove(self)
                last = not _live
            if last:
                _restore_handlers()
            if self._tmp and not self.keep_logs:
                shutil.rmtree(self._tmp, ignore_errors=True)
        if problems:
            warnings.warn("emulator teardown: " + "; ".join(problems), RuntimeWarning)

    # -- queries -------------------------------------------------------------
    def peer_ip(self, rank: int) -> str:
        """IPv4 address of peer ``rank`` (reachable from every other peer)."""
        return self.peer_ips[rank]

    def netns_name(self, rank: int) -> str:
        return self.netns[rank]

    @property
    def delayline_pid(self) -> Optional[int]:
        return self._dl.pid if self._dl else None

    @property
    def log_dir(self) -> Optional[str]:
        return self._tmp

    def expected_rtt(self, u: int, v: int) -> float:
        """Configured round trip u -> v -> u (propagation only; 0 inside a site)."""
        if self.sites:
            a, b = self._site_of[u], self._site_of[v]
            if a == b:
                return 0.0
            return self.spec.site_link(a, b).delay_s + self.spec.site_link(b, a).delay_s
        return self._links[(u, v)].delay_s + self._links[(v, u)].delay_s

    def stats(self, timeout: float = 3.0) -> dict:
        """Delay-line counters (per link: packets in/out, loss and overflow
        drops, queue high-water mark).  Asks the delay line for a fresh dump."""
        self._check_running()
        path = os.path.join(self._tmp, "stats.json")
        try:
            before = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            before = None
        old_seq = self._read_stats(path).get("seq", 0) if before else 0
        self._dl.send_signal(signal.SIGUSR1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self._read_stats(path)
            if st.get("seq", 0) > old_seq:
                return st
            time.sleep(0.01)
        raise TimeoutError("delay line did not write stats")

    @staticmethod
    def _read_stats(path: str) -> dict:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _check_running(self) -> None:
        if not self._started or self._closed:
            raise RuntimeError("emulator is not running")
        if self._dl is None or self._dl.poll() is not None:
            raise RuntimeError(f"delay line exited: {self._log_tail()}")

    # -- running things ------------------------------------------------------
    def peer_env(self, rank: int) -> Dict[str, str]:
        """Variables every command in a peer gets."""
        return {"PEER_RANK": str(rank), "PEER_WORLD_SIZE": str(self.n),
                "PEER_IPS": ",".join(self.peer_ips), "PEER_IP": self.peer_ips[rank],
                "PEER_NETNS": self.netns[rank]}

    def run_in(self, rank: int, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
               inherit_env: bool = True, **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside peer ``rank``'s namespace; returns the Popen.

        The environment is os.environ (unless ``inherit_env=False``) plus
        PEER_RANK, PEER_WORLD_SIZE, PEER_IPS (comma-separated), PEER_IP,
        PEER_NETNS, plus ``env`` (which wins).  The process gets its own
        session so teardown can kill its whole process group."""
        self._check_running()
        if not 0 <= rank < self.n:
            raise IndexError(f"rank {rank} out of range")
        full = dict(os.environ) if inherit_env else {}
        full.update(self.peer_env(rank))
        if env:
            full.update({k: str(v) for k, v in env.items()})
        popen_kwargs.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.netns[rank], *map(str, argv)],
                             env=full, **popen_kwargs)
        self._procs.append(p)
        return p

    def exec_in(self, rank: int, argv: Sequence[str], timeout: float = 60.0,
                check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        """Run to completion inside peer ``rank`` (captures output as text).
        Kills it after ``timeout`` seconds (raises subprocess.TimeoutExpired)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        p = self.run_in(rank, argv, **kwargs)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(p)
            p.communicate(timeout=5)
            raise
        cp = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check:
            cp.check_returncode()
        return cp

    def run_python(self, rank: int, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """``run_in`` for ``sys.executable args...``."""
        return self.run_in(rank, [sys.executable, *args], **kwargs)

    def start_server(self, rank: int, probe_args: Sequence[str], timeout: float = 10.0):
        """Start a probe.py server mode in ``rank`` and wait for LISTENING."""
        p = self.run_python(rank, ["-u", PROBE, *probe_args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        line = _readline(p.stdout, timeout)
        if not line or not line.startswith("LISTENING"):
            _killpg(p)
            err = p.stderr.read().decode(errors="replace") if p.poll() is not None else ""
            raise RuntimeError(f"probe server in peer {rank} did not start: {err[-500:]}")
        return p

    def loopback_check(self, count: int = 5, port: int = 7001, timeout: float = 30.0) -> dict:
        """Every peer pings every other peer over TCP.

        Returns ``{(u, v): {"rtt": median_s, "min": fastest_s, "expected": configured_s,
        "connect_s": s}}`` and raises RuntimeError if any pair is unreachable. On a busy host
        every late wake-up of the delay line adds to a ping, never takes from it: ``min`` is
        the one to hold against the configured delay there.
        """
        self._check_running()
        servers = [self.start_server(r, ["echo", str(port), str(timeout)]) for r in range(self.n)]
        try:
            clients = []
            for u in range(self.n):
                others = [self.peer_ips[v] for v in range(self.n) if v != u]
                clients.append(self.run_python(u, ["-u", PROBE, "pingall", str(port), str(count),
                                                   *others], stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True))
            result = {}
            end = time.monotonic() + timeout
            for u, c in enumerate(clients):
                try:
                    out, err = c.communicate(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _killpg(c)
                    raise RuntimeError(f"loopback check: peer {u} timed out")
                if c.returncode != 0:
                    raise RuntimeError(f"loopback check: peer {u} failed: {err[-500:]}")
                data = json.loads(out.strip().splitlines()[-1])
                for v in range(self.n):
                    if v == u:
                        continue
                    d = data[self.peer_ips[v]]
                    result[(u, v)] = {"rtt": d["median"], "min": min(d["rtts"]) if d["rtts"] else None,
                                      "expected": self.expected_rtt(u, v), "connect_s": d["connect_s"]}
            return result
        finally:
            for s in servers:
                _killpg(s)
                try:
                    s.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
                for f in (s.stdout, s.stderr):
                    if f:
                        f.close()

    def measure_transfer(self, src: int, dst: int, seconds: float = 3.0, nbytes: int = 0,
                         port: int = 7100, seed: int = 0, timeout: float = 60.0) -> dict:
        """One bulk TCP transfer src -> dst (see probe.py); returns the sink's
        JSON (bytes, seconds, rate_bps, sha256, eof) plus ``sent_sha256``."""
        return self.measure_transfers([(src, dst)], seconds, nbytes, port, seed, timeout)[0]

    def measure_transfers(self, pairs: Sequence[Tuple[int, int]], seconds: float = 3.0,
                          nbytes: int = 0, port: int = 7100, seed: int = 0,
                          timeout: float = 60.0) -> List[dict]:
        """Simultaneous bulk transfers, one per (src, dst) pair.

        Each result also has ``window_rate_bps``: the rate over the interval
        in which all transfers were active (fair comparison of shares)."""
        self._check_running()
        sinks, sources = [], []
        try:
            for i, (s, d) in enumerate(pairs):
                sinks.append(self.start_server(d, ["sink", str(port + i), str(timeout)]))
            for i, (s, d) in enumerate(pairs):
                sources.append(self.run_python(
                    s, ["-u", PROBE, "source", self.peer_ips[d], str(port + i), str(seconds),
                        str(nbytes), str(seed + i)], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True))
            end = time.monotonic() + timeout
            results = []
            for i, (snk, src) in enumerate(zip(sinks, sources)):
                try:
                    so, se = src.communicate(timeout=max(0.1, end - time.monotonic()))
                    ko, ke = snk.communicate(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"transfer {pairs[i]} timed out")
                if src.returncode != 0 or snk.returncode != 0:
                    raise RuntimeError(f"transfer {pairs[i]} failed: {se[-400:]} "
                                       f"{ke.decode(errors='replace')[-400:]}")
                r = json.loads(ko.decode().strip().splitlines()[-1])
                sr = json.loads(so.strip().splitlines()[-1])
                r["sent_bytes"] = sr["bytes"]
                r["sent_sha256"] = sr["sha256"]
                r["pair"] = tuple(pairs[i])
                results.append(r)
            _add_window_rates(results)
            return results
        finally:
            for p in sinks + sources:
                if p.poll() is None:
                    _killpg(p)
                    try:
                        p.wait(timeout=3)
                    except subprocess.TimeoutExpired:
                        pass
                for f in (p.stdout, p.stderr):
                    if f:
                        f.close()


def _bytes_at(timeline, t: float) -> float:
    """Linear interpolation of cumulative bytes at time t."""
    prev_t, prev_b = timeline[0]
    if t <= prev_t:
        return prev_b
    for ti, bi in timeline[1:]:
        if ti >= t:
            return prev_b + (bi - prev_b) * (t - prev_t) / max(ti - prev_t, 1e-9)
        prev_t, prev_b = ti, bi
    return prev_b


def _add_window_rates(results: List[dict], warmup: float = 0.3) -> None:
    """Rates over the window in which *all* transfers were running.

    The sinks stamp samples with CLOCK_MONOTONIC, which network namespaces
    share, so their timelines are directly comparable.  Skips ``warmup``
    seconds after the last flow started (slow start).  Sets
    ``window_rate_bps`` and ``window_s`` on each result (None if the common
    window is shorter than 0.5 s)."""
    ok = [r for r in results if r.get("timeline")]
    if len(ok) != len(results) or not ok:
        for r in results:
            r["window_rate_bps"], r["window_s"] = None, 0.0
        return
    t0 = max(r["t_first"] for r in ok) + warmup
    t1 = min(r["t_last"] for r in ok)
    for r in results:
        if t1 - t0 < 0.5:
            r["window_rate_bps"], r["window_s"] = None, max(0.0, t1 - t0)
        else:
            b = _bytes_at(r["timeline"], t1) - _bytes_at(r["timeline"], t0)
            r["window_rate_bps"], r["window_s"] = b * 8 / (t1 - t0), t1 - t0


def _killpg(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
