"""The Ray driver's life in ``optimenv run`` and ``optimenv ray-launch``: start, wait, stop, clean up.

* Ray is joined at ``$RAY_ADDRESS`` or started locally (a cluster of our own, never one that
  ``ray start`` left running here), and never twice: auto-connect is off, so a Ray call after
  shutdown fails instead of starting a second local cluster.
* Workers' output does not go through Ray's log forwarding (``log_to_driver=False``): launch()
  hands it to the console, without Ray's own messages.
* Ctrl-C and SIGTERM stop the run with status 130 or 143, as a shell reports a process killed by
  them, and every process Ray started here is gone within a few seconds. Training is still
  running on a helper thread then, and Ray ends the whole process with status 1 when any thread
  touches it after ``ray.shutdown()`` or when its raylet goes first: so the command ends at once,
  without the interpreter's own clean-up (:func:`exits_when_interrupted`), and a reaper process
  stops Ray's processes after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

from optimenv._console import Console

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
#: How long processes of the run may outlive the stop before they are killed.
REAP_GRACE_S = 3.0

T = TypeVar("T")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run; ``code`` is the exit status to end with."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@contextmanager
def exits_when_interrupted() -> Iterator[None]:
    """Around a whole command: after an interruption, end the process at once with its status."""
    try:
        yield
    except Interrupted as stop:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(stop.code)


@contextmanager
def ray_cluster(console: Console, address: str | None = None) -> Iterator[Any]:
    """Ray, joined or started for the duration; yields the ``ray`` module."""
    # Loopback and no usage reports for a local cluster (a user's own settings win).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"  # read when ray is imported
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    console.say(f"joining Ray at {address} ..." if address else "starting Ray ...")
    with _signals_interrupt():
        interrupted = False
        try:
            context = ray.init(
                address=address or "local",
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
            console.log(f"Ray's own logs: {context.address_info.get('session_dir')}/logs")
            with _signals_interrupt():  # again: ray.init installs a SIGTERM handler of its own
                yield ray
        except Interrupted:
            interrupted = True
            raise
        finally:
            _stop(ray, shutdown=not interrupted)


def wait_for(work: Callable[[], T], console: Console, on_stop: Callable[[], None] = lambda: None) -> T:
    """Run ``work`` on a helper thread and return its result (or raise its error).

    Ray Train installs its own SIGINT handler when ``fit()`` runs on the main thread (a graceful
    abort that exits 0 or 1); on a helper thread the signals stay ours. After Ctrl-C or SIGTERM,
    ``on_stop`` runs and :class:`Interrupted` is raised.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc

    runner = threading.Thread(target=run, name="optimenv-fit", daemon=True)
    runner.start()
    try:
        while runner.is_alive():
            runner.join(0.2)
    except (KeyboardInterrupt, Interrupted) as stop:
        on_stop()
        console.say("interrupted: stopping the workers and Ray")
        raise Interrupted(stop.code if isinstance(stop, Interrupted) else EXIT_INTERRUPTED) from None
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt:  # while Ray starts: nothing runs on other threads yet
        raise Interrupted(EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(ray: Any, *, shutdown: bool) -> None:
    """Stop Ray, then every process it started here that is still alive after a short grace.

    Without ``shutdown`` (interrupted while training runs on another thread) nothing is stopped
    from this process: Ray ends it with status 1 when a thread touches Ray after shutdown, or when
    its raylet goes away first. A reaper process waits for this one to end, then stops them.
    """
    import psutil

    # Workers are the raylet's children: list the tree before shutdown reparents them.
    started = psutil.Process().children(recursive=True)
    if not shutdown:
        _reap_after_exit(started)
        return
    with _signals_ignored():  # a second Ctrl-C must not leave the cluster half-stopped
        ray.shutdown()
        _terminate(started)


def _terminate(procs: list[Any]) -> None:
    """SIGTERM, a grace of REAP_GRACE_S, then SIGKILL for what is left."""
    import psutil

    for proc in procs:
        _quietly(psutil, proc.terminate)
    _, alive = psutil.wait_procs(procs, timeout=REAP_GRACE_S)
    for proc in alive:
        _quietly(psutil, proc.kill)


def _reap_after_exit(procs: list[Any]) -> None:
    # Process ids with their start times, so a reused id is never killed.
    ids = [f"{proc.pid}:{proc.create_time()!r}" for proc in procs if proc.is_running()]
    subprocess.Popen(
        [sys.executable, "-m", "optimenv._ray_driver", "reap", str(os.getpid()), *ids],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives this process, untouched by the terminal's Ctrl-C
    )


def _reap(parent: int, ids: list[str]) -> None:
    """The reaper: once ``parent`` has ended, stop the processes it listed."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(parent).wait(timeout=30)
    procs = []
    for item in ids:
        pid, _, started = item.partition(":")
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(int(pid))
            if proc.create_time() == float(started):
                procs.append(proc)
    _terminate(procs)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _quietly(psutil: Any, action: Callable[[], None]) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):  # it ended by itself meanwhile
        action()


if __name__ == "__main__":  # the reaper, started by _reap_after_exit
    if len(sys.argv) >= 3 and sys.argv[1] == "reap":
        _reap(int(sys.argv[2]), sys.argv[3:])
