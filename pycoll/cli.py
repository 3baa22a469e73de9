"""The ``pycoll`` command line (also ``python -m pycoll``).

    pycoll demo                        # the tour: 4 peers, every algorithm, a fault, a join
    pycoll run -n 4 train.py ...       # a coordinator and 4 workers (torchrun's variables)
    pycoll run --elastic -n 4 train.py # the same, elastic: the dead are replaced, the others carry on
    pycoll master --port 29500         # a standalone coordinator
    pycoll bench --plot busbw.png      # all-reduce benchmark against Gloo
    pycoll bench --train --burn 0,2    # the DDP training step against Gloo, idle and next to 2 busy loops
    pycoll topology topo.toml          # check a topology file, show the ring and the multi-ring's cycles
    pycoll probe --master H:P --world-size N --rank R   # measure the network, write a topology file
    pycoll aggregator --group rack0    # a standalone in-network aggregator for one topology group

Every subcommand imports what it needs when it runs, so ``pycoll --help`` is instant.
"""
import argparse
import logging
import os
import sys


class UsageError(Exception):
    """A bad option or setting: ``main`` prints it on one line and exits with code 2."""


class RuntimeFailure(Exception):
    """Something the command could not do (a busy port): one line, exit code 1."""


def _port(text):
    """argparse type of a TCP port: an integer in 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range (1-65535)")
    return value


def _env_port(names, default):
    """The first of the environment variables ``names`` that is set, checked as a port
    (read when used, so that a bad value never breaks ``--help``)."""
    for name in names:
        raw = os.environ.get(name)
        if raw:
            try:
                return _port(raw)
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"environment variable {name}={raw!r}: {exc}") from None
    return default


def _listen_error(exc, host, port, option):
    """A coordinator that cannot bind: one line naming the option (exit code 1)."""
    why = getattr(exc, "strerror", None) or str(exc)
    if "in use" in why.lower():
        why = "address already in use"
    return RuntimeFailure(f"cannot listen on {host}:{port} ({option}): {why}")


def _cmd_master(args):
    from pycoll.control.coordinator import Coordinator
    try:
        c = Coordinator(args.host, args.port, world_size=args.world_size, heartbeat_timeout=args.heartbeat_timeout)
    except Exception as exc:  # noqa: BLE001 - zmq.ZMQError, OSError: the port is taken or not ours
        raise _listen_error(exc, args.host, args.port, "--port") from None
    print(f"pycoll coordinator on tcp://{args.host}:{c.port} (pid {os.getpid()})", flush=True)
    try:
        c.serve()
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_run(args):
    from pycoll.launcher import run
    argv = list(args.script)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if args.module:
        argv = ["-m", args.module] + argv
    if not argv:
        print("pycoll run: give a script (or -m module) to run, e.g. pycoll run -n 4 train.py", file=sys.stderr)
        return 2
    if args.nprocs < 1:
        print("pycoll run: -n must be at least 1", file=sys.stderr)
        return 2
    elastic_only = {"--max-restarts": args.max_restarts, "--restart-delay": args.restart_delay,
                    "--join-timeout": args.join_timeout, "--log-dir": args.log_dir}
    extra = {}
    if args.elastic:
        if args.keep_going:
            raise UsageError("--keep-going and --elastic: choose one (--elastic keeps the others running "
                             "and also replaces a worker that failed)")
        for option, value in elastic_only.items():
            if isinstance(value, (int, float)) and value < 0:
                raise UsageError(f"{option} must not be negative")
        extra = dict(elastic=True, max_restarts=3 if args.max_restarts is None else args.max_restarts,
                     restart_delay=1.0 if args.restart_delay is None else args.restart_delay,
                     join_timeout=args.join_timeout or None, log_dir=args.log_dir)
    else:
        given = [option for option, value in elastic_only.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} is an option of elastic runs: add --elastic")
    import zmq
    try:
        return run(argv, args.nprocs, master_addr=args.master_addr, master_port=args.master_port,
                   keep_going=args.keep_going, heartbeat_timeout=args.heartbeat_timeout, **extra)
    except zmq.ZMQError as exc:  # the coordinator could not listen
        raise _listen_error(exc, args.master_addr, args.master_port or "a free port", "--master-port") from None


def _stripes(args):
    """--stripes, else $PYCOLL_STRIPES, resolved as the workers resolve theirs ("auto" from
    $PYCOLL_LINK or the topology): returns (stripes, options for the aggregator)."""
    from pycoll.net.links import resolve_stripes
    source = "--stripes" if args.stripes is not None else "environment variable PYCOLL_STRIPES"
    try:
        return resolve_stripes(args.stripes, {"topology": args.topology} if args.topology else {})
    except ValueError as exc:
        text = str(exc)  # (a bad environment variable's error names it already)
        raise UsageError(text if text.startswith("environment variable") else f"{source}: {text}") from None


def _cmd_aggregator(args):
    from pycoll.aggregator import start
    if args.master_port is None:
        args.master_port = _env_port(("PYCOLL_MASTER_PORT", "MASTER_PORT"), 29500)
    stripes, _ = _stripes(args)  # (the socket buffer sizes "auto" also gives are the workers' business)
    agg = start(args.group, args.master_addr, args.master_port, topology=args.topology, stripes=stripes)
    print(f"pycoll aggregator for group {args.group!r} joined {args.master_addr}:{args.master_port} "
          f"(pid {os.getpid()})", flush=True)
    try:
        agg.serve()
    except KeyboardInterrupt:
        pass
    finally:
        agg.close()
    return 0


def _cmd_bench(args):
    if args.train is not None:  # the training-step benchmark takes the rest of the line
        from pycoll.train_bench import run
        return run(args.train, "pycoll bench --train")
    from pycoll.benchmark import run_from_args
    return run_from_args(args)


def _cmd_demo(args):
    from pycoll.benchmark import parse_size
    from pycoll.demo import main
    try:
        nbytes = parse_size(args.size)
    except ValueError as exc:
        print(f"pycoll demo: {exc}", file=sys.stderr)
        return 2
    algorithms = [a.strip() for a in args.algorithms.split(",")] if args.algorithms else None
    if algorithms:
        from pycoll.plan import planners
        unknown = [a for a in algorithms if a not in planners.ALGORITHMS]
        if unknown:
            print(f"pycoll demo: unknown algorithm {unknown[0]!r}; choose from "
                  f"{', '.join(planners.ALGORITHMS)}", file=sys.stderr)
            return 2
    if args.peers < 3:
        print("pycoll demo: --peers must be at least 3 (one is killed, two must survive)", file=sys.stderr)
        return 2
    return main(peers=args.peers, nbytes=nbytes, algorithms=algorithms, iters=args.iters,
                time_limit=args.time_limit, progress=not args.quiet)


def _master(text):
    """--master HOST:PORT -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host:
        raise UsageError(f"--master: expected HOST:PORT, got {text!r}")
    try:
        return host, _port(port)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--master: {exc}") from None


def _group_args(args):
    """(rank, world size, master host, master port) from --rank/--world-size/--master, else
    torchrun's or `pycoll run`'s environment (RANK, WORLD_SIZE, MASTER_ADDR, PYCOLL_MASTER_PORT)."""
    from pycoll.options import environ
    rank = args.rank if args.rank is not None else environ("RANK")
    world = args.world_size if args.world_size is not None else environ("WORLD_SIZE")
    if args.master:
        host, port = _master(args.master)
    else:
        host = environ("MASTER_ADDR") or "127.0.0.1"
        port = _env_port(("PYCOLL_MASTER_PORT", "MASTER_PORT"), None)
    if rank is None or world is None or port is None:
        raise UsageError("needs --master HOST:PORT, --world-size N and --rank R (rank 0 runs where the "
                         "coordinator listens), or torchrun's / `pycoll run`'s environment")
    try:
        return int(rank), int(world), host, port
    except ValueError:
        raise UsageError(f"rank {rank!r} and world size {world!r} must be integers") from None


def _cmd_probe(args):
    import pycoll
    rank, world, host, port = _group_args(args)
    comm = pycoll.init(rank=rank, world_size=world, master_addr=host, master_port=port, topology="measure",
                       probe_seconds=args.seconds, join_timeout=args.join_timeout)
    try:
        res = comm.epoch_state.probe_result
        if rank == 0 and res is not None:
            text = res.toml(name=args.name)
            with open(args.out, "w") as f:
                f.write(text + "\n")
            print(res.table())
            layout = comm.epoch_state.selector().layout
            print(f"ring order: {layout.ring}; probe took {res.seconds:.2f} s; topology written to {args.out}")
    finally:
        comm.close()
    return 0


def _cmd_topology(args):
    from pycoll.plan.view import show
    return show(args.file, peers=args.peers, cycles=not args.no_cycles, out=sys.stdout)


def build_parser():
    """The argument parser of the ``pycoll`` command."""
    p = argparse.ArgumentParser(
        prog="pycoll", description="Fault-tolerant collective communication for ML training.",
        epilog="Start with `pycoll demo`. `pycoll COMMAND --help` describes each command. "
               "Log level: --log-level or the PYCOLL_LOG environment variable (debug shows every collective).")
    p.add_argument("--log-level", default=None,
                   help="logging level: debug, info, warning (default; also PYCOLL_LOG)")
    p.add_argument("--version", action="version", version=f"pycoll {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="tour: 4 local peers, every algorithm, a peer killed and one joining",
                       description="Start a coordinator and local peers; run and time every algorithm on every "
                                   "collective; train a toy model while one peer is killed and a new one joins; "
                                   "check that every peer ends with identical parameters; print a summary.")
    d.add_argument("--peers", type=int, default=4, help="peers at the start (default 4)")
    d.add_argument("--size", default="4M", help="bytes per collective and model size (default 4M)")
    d.add_argument("--algorithms", default=None, help="comma-separated subset (default: all)")
    d.add_argument("--iters", type=int, default=5, help="timed iterations per collective (default 5)")
    d.add_argument("--time-limit", type=float, default=90.0, help="give up after this many seconds (default 90)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("run", help="launch N local workers with a coordinator",
                       description="Start a coordinator and N copies of a script with RANK, WORLD_SIZE, LOCAL_RANK, "
                                   "MASTER_ADDR, MASTER_PORT set, as torchrun does (the coordinator listens on "
                                   "PYCOLL_MASTER_PORT; MASTER_PORT is left to torch.distributed). Output lines "
                                   "are prefixed with [rank]; the first failure stops the others. With --elastic "
                                   "(workers call pycoll.connect()) the others carry on instead and a "
                                   "replacement with the same RANK joins the running group and is healed.")
    r.add_argument("-n", "--nprocs", type=int, required=True, help="number of workers")
    r.add_argument("--master-addr", default="127.0.0.1", help="coordinator address (default 127.0.0.1)")
    r.add_argument("--master-port", type=_port, default=None, help="coordinator port (default: a free port)")
    r.add_argument("--keep-going", action="store_true",
                   help="do not stop the group when one worker fails (elastic jobs)")
    r.add_argument("--heartbeat-timeout", type=float, default=5.0,
                   help="seconds without heartbeat = a worker is dead (default 5)")
    r.add_argument("--elastic", action="store_true",
                   help="elastic group (workers call pycoll.connect()): when a worker dies the others carry "
                        "on and a replacement starts, joins and is healed (docs/elastic-launch.md)")
    r.add_argument("--max-restarts", type=int, default=None,
                   help="--elastic: replacements in all before a failure stops the job (default 3)")
    r.add_argument("--restart-delay", type=float, default=None,
                   help="--elastic: seconds before a replacement starts, doubled for each earlier "
                        "replacement of that rank, at most 30 (default 1)")
    r.add_argument("--join-timeout", type=float, default=None,
                   help="--elastic: seconds for all N workers to connect (default PYCOLL_JOIN_TIMEOUT, else 300)")
    r.add_argument("--log-dir", default=None,
                   help="--elastic: folder for the workers' output files (default: a temporary one, removed "
                        "when the job succeeds)")
    r.add_argument("-m", dest="module", default=None, help="run a module instead of a script")
    r.add_argument("script", nargs=argparse.REMAINDER, help="script and its arguments")
    r.set_defaults(func=_cmd_run)

    m = sub.add_parser("master", help="run the coordinator in the foreground",
                       description="Run a coordinator that peers join with pycoll.init()/pycoll.connect().")
    m.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    m.add_argument("--port", type=_port, default=29500, help="port to listen on (default 29500)")
    m.add_argument("--world-size", type=int, default=None,
                   help="wait for this many peers before the first epoch (omit for an elastic group)")
    m.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds without heartbeat = dead")
    m.set_defaults(func=_cmd_master)

    from pycoll.benchmark import add_arguments
    b = sub.add_parser("bench", help="all-reduce benchmark: pycoll's algorithms against Gloo",
                       description="Time all-reduce on local ranks over loopback for each pycoll algorithm and "
                                   "for Gloo (needs torch): median of barrier-separated iterations, slowest rank; "
                                   "prints algbw and busbw per size; --plot draws busbw against size.")
    add_arguments(b)
    b.add_argument("--train", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="instead: the training step (DDP or FSDP2) on pycoll against Gloo, idle and loaded; "
                        "every argument after --train is its own (pycoll bench --train --help)")
    b.set_defaults(func=_cmd_bench)

    t = sub.add_parser("topology", help="check a topology file; show groups, links, ring and Hamiltonian cycles",
                       description="Load and validate a topology file (TOML; see topologies/README.md), then "
                                   "print its peers, groups, links, the ring order pycoll would use and the "
                                   "directed Hamiltonian cycles the hamiltonian algorithm runs for its number of "
                                   "peers. Exit code 2 if the file is invalid.")
    t.add_argument("file", nargs="?", default=None, help="topology file (.toml)")
    t.add_argument("--peers", type=int, default=None, help="no file: show the cycles for this many peers")
    t.add_argument("--no-cycles", action="store_true", help="do not print the Hamiltonian cycles")
    t.set_defaults(func=_cmd_topology)

    pr = sub.add_parser("probe", help="measure bandwidth and latency between the group's hosts; write a topology file",
                        description="Join a group (one command per host) and measure every pair: round trips "
                                    "(all at once), then bandwidth in rounds of pairs that share no host and no "
                                    "shared uplink, a few hundred ms each. Sites are found by clustering the "
                                    "round trips; a test with two flows between two sites tells a shared "
                                    "uplink from private links. Rank 0 prints the matrices and writes the "
                                    "topology file (use it with topology=FILE, edit it, keep it); "
                                    "topology=\"measure\" does the same whenever a group forms.")
    pr.add_argument("--master", default=None, help="HOST:PORT of the coordinator (rank 0 starts it there)")
    pr.add_argument("--world-size", type=int, default=None, help="number of hosts (default WORLD_SIZE)")
    pr.add_argument("--rank", type=int, default=None, help="this host's rank (default RANK)")
    pr.add_argument("--seconds", type=float, default=0.3, help="each bandwidth flow's duration (default 0.3)")
    pr.add_argument("--out", default="measured.toml", help="topology file rank 0 writes (default measured.toml)")
    pr.add_argument("--name", default="measured", help="the topology's name")
    pr.add_argument("--join-timeout", type=float, default=120.0, help="seconds to wait for the group")
    pr.set_defaults(func=_cmd_probe)

    a = sub.add_parser("aggregator", help="run a standalone in-network aggregator (a software switch)",
                       description="Join a group as the standalone aggregator of one 'switch' group of the "
                                   "topology file: aggregates that group's innetwork all-reduces, holds no "
                                   "model state. Secret from PYCOLL_SECRET.")
    a.add_argument("--group", required=True, help="name of the topology group this aggregator serves")
    a.add_argument("--topology", default=os.environ.get("PYCOLL_TOPOLOGY"),
                   help="the workers' topology file (also PYCOLL_TOPOLOGY)")
    a.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    a.add_argument("--master-port", type=_port, default=None,
                   help="coordinator port (default PYCOLL_MASTER_PORT, else MASTER_PORT, else 29500)")
    a.add_argument("--stripes", default=None,
                   help="connections per peer pair, or 'auto'; must match the workers' "
                        "(default PYCOLL_STRIPES, else as the workers choose)")
    a.set_defaults(func=_cmd_aggregator)
    return p


def _version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("pycoll")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv=None):
    """Entry point of the ``pycoll`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    source, raw = ("--log-level", args.log_level) if args.log_level is not None else \
        ("environment variable PYCOLL_LOG", os.environ.get("PYCOLL_LOG") or "WARNING")
    level = getattr(logging, str(raw).upper(), None)
    if not isinstance(level, int):
        parser.error(f"{source}: unknown level {raw!r} (debug, info, warning, error)")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pycoll").setLevel(level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prog = f"pycoll {args.command}"
    from pycoll.errors import InvalidArgument
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except RuntimeFailure as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except InvalidArgument as exc:  # e.g. a bad PYCOLL_* setting, read when used
        print(f"{prog}: {str(exc).splitlines()[0] if str(exc) else exc!r}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
