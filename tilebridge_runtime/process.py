"""Process supervision: a service whose thread died must not stay up half alive.

A service is a few long-lived threads (network, owner, workers). If one of them dies from an
exception nobody caught, the process would keep running without it (e.g. without its broker
thread: connected to nothing, acking nothing) and systemd, seeing it alive, would never
restart it. `exit_when_a_thread_dies()` makes any such death end the process with
`EXIT_THREAD_DIED`, so the supervisor restarts it; the durable state makes that safe.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

EXIT_THREAD_DIED = 70
"""EX_SOFTWARE: an internal error; systemd's `Restart=on-failure` restarts the service."""

log = logging.getLogger(__name__)


def exit_when_a_thread_dies() -> None:
    """Install the hook: an uncaught exception in any thread logs it and exits the process."""

    def die(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.critical(
            "thread %s died: %s: %s; exiting so the service is restarted",
            name,
            args.exc_type.__name__,
            args.exc_value,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_THREAD_DIED)

    threading.excepthook = die
