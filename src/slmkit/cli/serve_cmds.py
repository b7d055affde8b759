"""`slm serve`: the OpenAI-compatible server and its web playground (slmkit.serve)."""

from __future__ import annotations

import argparse
import socket
import sys
import threading

from slmkit.cli.flags import Parser, add_dataclass_flags, add_runtime_flags, given, runtime
from slmkit.errors import UserError

SERVE = "serve"  # the dest prefix of the ServeOptions flags


def cmd_serve(args: argparse.Namespace) -> None:
    from slmkit.cli.common import refuse_finetuned
    from slmkit.serve import ServeOptions, require_extra

    options = ServeOptions(**given(args, SERVE))
    options.validate()
    require_extra()
    for run in args.run:
        refuse_finetuned(run, args.checkpoint)
    from slmkit.serve.app import load_served

    served = load_served(args.run, args.checkpoint, runtime(args, "device"), runtime(args, "dtype"),
                         runtime(args, "weights"))
    sock = _listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    names = ", ".join(repr(m.name) for m in served)
    print(f"serving {names} at http://{shown}:{port}/ (playground) and http://{shown}:{port}/v1 (OpenAI API); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    _run(served, options, sock)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port or a bad address is one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _run(served, options, sock: socket.socket) -> None:
    """HTTP in a thread of its own; every model's decoding in this (the main) thread, where the
    models were loaded (slmkit.serve.engine says why). Ctrl-C or SIGTERM stops both."""
    import uvicorn

    from slmkit.serve.app import Server, create_app
    from slmkit.serve.engine import EngineLoop

    engines = EngineLoop()
    app = create_app(Server(served, options, engines))
    config = uvicorn.Config(app, log_level="info" if options.access_log else "warning",
                            access_log=options.access_log, timeout_graceful_shutdown=3)
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="slmkit-http", daemon=True)
    thread.start()
    try:
        engines.run(alive=thread.is_alive)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        http.should_exit = True
        thread.join(timeout=10)


def _build_serve(p: Parser) -> None:
    from slmkit.serve import ServeOptions

    p.add_argument("--run", action="append", required=True, metavar="RUN_DIR",
                   help="a run directory (or checkpoint) to serve, named after its folder; repeat to serve several "
                        "(the request's model field picks one)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of each run directory (default: best)")
    add_runtime_flags(p, "device", "dtype", "weights")
    add_dataclass_flags(p, ServeOptions, SERVE, "server")
    p.set_defaults(func=cmd_serve)


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("serve", build=_build_serve,
                   help="an OpenAI-compatible HTTP API with streaming and a web playground",
                   description="Serve trained models over an OpenAI-compatible HTTP API (/v1/completions, "
                               "/v1/chat/completions, /v1/models, /health) with server-sent-event streaming and "
                               "continuous batching, and a web playground at /. Needs the serve extra: "
                               'pip install -e ".[serve]".')
