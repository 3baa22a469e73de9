"""The ``pycoll`` command line (also ``python -m pycoll``)."""
import argparse
import logging
import os
import sys


def _cmd_master(args):
    from .coordinator import main
    main(args.host, args.port, world_size=args.world_size, heartbeat_timeout=args.heartbeat_timeout)
    return 0


def _cmd_run(args):
    from .launcher import run
    argv = list(args.script)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if args.module:
        argv = ["-m", args.module] + argv
    if not argv:
        print("pycoll run: give a script (or -m module) to run", file=sys.stderr)
        return 2
    return run(argv, args.nprocs, master_addr=args.master_addr, master_port=args.master_port,
               keep_going=args.keep_going)


def _cmd_aggregator(args):
    from .aggregator import start
    agg = start(args.group, args.master_addr, args.master_port, topology=args.topology, stripes=args.stripes)
    print(f"pycoll aggregator for group {args.group!r} joined {args.master_addr}:{args.master_port} "
          f"(pid {os.getpid()})", flush=True)
    try:
        agg.serve()
    except KeyboardInterrupt:
        pass
    finally:
        agg.close()
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="pycoll", description="Fault-tolerant collective communication for ML training.")
    p.add_argument("--log-level", default=os.environ.get("PYCOLL_LOG", "WARNING"),
                   help="logging level (also PYCOLL_LOG); default WARNING")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("master", help="run the coordinator in the foreground",
                       description="Run a coordinator that peers join with pycoll.init()/pycoll.connect().")
    m.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    m.add_argument("--port", type=int, default=29500, help="port to listen on (default 29500)")
    m.add_argument("--world-size", type=int, default=None,
                   help="wait for this many peers before the first epoch (omit for an elastic group)")
    m.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds without heartbeat = dead")
    m.set_defaults(func=_cmd_master)

    r = sub.add_parser("run", help="launch N local workers with a coordinator",
                       description="Start a coordinator and N copies of a script with RANK, WORLD_SIZE, "
                                   "MASTER_ADDR, MASTER_PORT set (as torchrun does).")
    r.add_argument("-n", "--nprocs", type=int, required=True, help="number of workers")
    r.add_argument("--master-addr", default="127.0.0.1")
    r.add_argument("--master-port", type=int, default=None, help="default: a free port")
    r.add_argument("--keep-going", action="store_true",
                   help="do not stop the group when one worker fails (elastic jobs)")
    r.add_argument("-m", dest="module", default=None, help="run a module instead of a script")
    r.add_argument("script", nargs=argparse.REMAINDER, help="script and its arguments")
    r.set_defaults(func=_cmd_run)

    a = sub.add_parser("aggregator", help="run a standalone in-network aggregator (a software switch)",
                       description="Join a group as the standalone aggregator of one 'switch' group of the "
                                   "topology file: aggregates that group's innetwork all-reduces, holds no "
                                   "model state. Secret from PYCOLL_SECRET.")
    a.add_argument("--group", required=True, help="name of the topology group this aggregator serves")
    a.add_argument("--topology", default=os.environ.get("PYCOLL_TOPOLOGY"),
                   help="the workers' topology file (also PYCOLL_TOPOLOGY)")
    a.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    a.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    a.add_argument("--stripes", type=int, default=int(os.environ.get("PYCOLL_STRIPES", "1")),
                   help="connections per peer pair; must match the workers'")
    a.set_defaults(func=_cmd_aggregator)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
