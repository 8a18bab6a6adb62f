"""`python -m tests.omero_standin serve`: the stand-in as its own process.

Listens on 127.0.0.1: Glacier2 over ssl (`--port`, what omero-py connects to) and tcp
(`--tcp-port`, the router BlitzGateway moves to after login), plus the control API of
control.py (`--control-port`). Once all three listen it writes a JSON file (`--ready-file`)
naming the ports and the login; it runs until SIGTERM or SIGINT. Port 0 picks a free port.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .sessions import User


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.omero_standin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the stand-in until SIGTERM")
    serve.add_argument("--port", type=int, default=0, help="Glacier2 ssl port")
    serve.add_argument("--tcp-port", type=int, default=0, help="Glacier2 tcp port")
    serve.add_argument("--control-port", type=int, default=0, help="HTTP control API port")
    serve.add_argument("--ready-file", type=Path, help="write the ports here once listening")
    serve.add_argument("--user", default="tilebridge", help="the one user's name")
    serve.add_argument("--password", default="tilebridge-secret")
    serve.add_argument("--group", default="tilebridge")
    serve.add_argument("--idle-timeout-s", type=float, default=600.0)
    serve.add_argument("--pyramid-threshold-px", type=int, help="pixels per plane above which")
    serve.add_argument("--pyramid-tile", help="pyramid tile WIDTHxHEIGHT, e.g. 256x256")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s"
    )
    return serve_forever(args)


def serve_forever(args: argparse.Namespace) -> int:
    from .fixtures import import_omero_quietly

    # As in the tests: omero-py's generated servant bases (omero.api.IAdmin, ...) exist only
    # once omero.clients and omero.gateway are imported.
    import_omero_quietly()
    from .control import serve_control
    from .server import OmeroStandin

    options: dict[str, object] = {"idle_timeout_s": args.idle_timeout_s}
    if args.pyramid_threshold_px is not None:
        options["pyramid_threshold_px"] = args.pyramid_threshold_px
    if args.pyramid_tile is not None:
        width, height = (int(v) for v in args.pyramid_tile.lower().split("x"))
        options["pyramid_tile"] = (width, height)
    server = OmeroStandin([User(args.user, args.password, args.group)], **options)  # type: ignore[arg-type]
    server.port, server.tcp_port = args.port, args.tcp_port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    control = serve_control(server, args.control_port)
    ready = {
        "pid": os.getpid(),
        "port": server.port,
        "tcp_port": server.tcp_port,
        "control_port": control.server_address[1],
        "user": args.user,
        "password": args.password,
        "group": args.group,
    }
    public = {k: v for k, v in ready.items() if k != "password"}
    logging.info("OMERO stand-in listening: %s", public)
    if args.ready_file is not None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(args.ready_file)
    stop.wait()
    control.shutdown()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
