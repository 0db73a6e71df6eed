"""How the process learns it must stop, wherever hypercorn runs it.

``hypercorn --worker-class trio`` runs the app in spawned worker processes. A
SIGTERM can reach them three ways, and each must drain the same way:

* the hypercorn parent only (``docker stop``, Kubernetes: the parent is PID 1):
  the parent sets a shared shutdown event that each worker polls, then gives open
  connections ``--graceful-timeout`` seconds;
* the whole process group (systemd's ``KillMode=control-group``): the worker gets
  the signal too, and without a handler would die at once, dropping every
  connection;
* the worker only (``kill <worker pid>``).

:func:`watch_for_shutdown` handles SIGTERM in the worker (and keeps handling it,
so the parent's later ``terminate()`` cannot kill a worker that is still
draining), watches the parent's event, and tells the parent when only the worker
was signalled, so hypercorn stops as it does when signalled itself. The parent's
event and graceful timeout are read from the worker's own process object, where
hypercorn's spawn handed them over: not a public interface, so pyproject.toml admits
only the hypercorn releases the shutdown tests (tests/test_shutdown.py) passed with.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

import attrs
import trio

log = logging.getLogger(__name__)

HYPERCORN_GRACEFUL_TIMEOUT_S = 3.0  # hypercorn's own default for --graceful-timeout
POLL_S = 0.1  # as often as hypercorn's workers poll the same event


@attrs.frozen
class Host:
    """What the process knows about the server that runs it."""

    graceful_timeout_s: float
    parent_pid: int | None = None  # a hypercorn parent to tell when only we were signalled
    parent_stopping: Callable[[], bool] = lambda: False

    def drain_window_s(self) -> float:
        """The part of the graceful timeout that requests may use: every answer must be
        written before hypercorn closes the connections (it starts its clock up to one
        poll before ours)."""
        margin = min(2.0, max(0.5, 0.1 * self.graceful_timeout_s))
        return max(0.0, self.graceful_timeout_s - margin)


def hypercorn_worker() -> Host | None:
    """The hypercorn parent of this worker process, or None when not run that way."""
    process = multiprocessing.current_process()
    kwargs = getattr(process, "_kwargs", None) or {}
    config = kwargs.get("config")
    event = kwargs.get("shutdown_event")
    graceful = getattr(config, "graceful_timeout", None)
    if event is None or not isinstance(graceful, int | float):
        return None
    return Host(float(graceful), parent_pid=os.getppid(), parent_stopping=event.is_set)


async def watch_for_shutdown(host: Host, begin: Callable[[float], None]) -> None:
    """Call ``begin(window_s)`` once, when the process is told to stop; runs until cancelled."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("not on the main thread: SIGTERM cannot be handled; shutdown will not drain")
        await trio.sleep_forever()
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        signalled = False
        while not (signalled or host.parent_stopping()):
            with trio.move_on_after(POLL_S):
                async for _ in signals:
                    signalled = True
                    break
        if signalled and host.parent_pid is not None and not host.parent_stopping():
            _tell_parent(host.parent_pid)
        begin(host.drain_window_s())
        async for _ in signals:  # later signals (hypercorn's terminate()) change nothing
            pass


def _tell_parent(pid: int) -> None:
    if os.getppid() != pid:  # the parent is gone; never signal whoever adopted us
        return
    log.info("SIGTERM reached this worker only; asking the hypercorn parent to stop too")
    os.kill(pid, signal.SIGTERM)
