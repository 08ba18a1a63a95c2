"""`nrr teacher serve`: run the embedded OpenAI-compatible teacher until interrupted.

Prints one line `nrr-teacher listening on http://HOST:PORT/v1` (flushed) once it accepts requests,
so a parent process that asked for port 0 learns the port.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from recipes.config import add_config_arguments
from recipes.config import load_config
from recipes.stages import STAGES

HELP = STAGES["teacher"].help
DEFAULT_CONFIG = STAGES["teacher"].default_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="serve until interrupted")
    add_config_arguments(serve, DEFAULT_CONFIG)
    serve.add_argument("--parent-pid", type=int, default=None,
                       help="exit when this process is gone (a pipeline that started the teacher was killed)")


def _watch_parent(pid: int, server) -> None:
    while True:
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            server.httpd.shutdown()
            return


def cli(args: argparse.Namespace) -> int:
    from recipes.teacher.server import TeacherServerConfig, TeacherServer

    cfg = load_config(TeacherServerConfig, args.config, args.overrides)
    server = TeacherServer(cfg)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.httpd.shutdown).start())
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, server), daemon=True).start()
    print(f"nrr-teacher listening on {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    print(f"nrr-teacher stopped; responses by label: {server.counts}", file=sys.stderr, flush=True)
    return 0
