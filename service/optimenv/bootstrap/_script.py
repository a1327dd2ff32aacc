"""Run a user's training script inside a Ray worker process as if it were its own ``python SCRIPT``.

Four things differ from a process of its own, and each is made to look the same to the script:

* ``sys.exit(n)`` and ``os._exit(n)`` end the script, not the worker: ``os._exit`` would kill the
  Ray worker (Ray reports a dead actor), so while the script runs it ends the script with code
  ``n`` instead, on the script's own thread of this process only (forked children, such as data
  loader workers, still really exit).
* What the script writes to stdout and stderr (file descriptors 1 and 2, so C extensions too)
  is handed line by line to ``on_lines`` (the driver shows it) and still written to the worker's
  own stderr (Ray's worker log keeps it).
* ``print`` is the interpreter's own (Ray Train replaces it in workers).
* A failure is the script's own traceback, without the frames of this runner.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import runpy
import select
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

#: How long the output reader may keep going after the script ended (a child the script started
#: may hold the pipe open; its later output stays in the worker's log only).
READER_GRACE_S = 2.0
#: Lines handed over at most this often (seconds) or this many at once, whichever comes first.
FLUSH_EVERY_S = 0.2
FLUSH_LINES = 200
#: Longest line handed over; the rest of a longer one is cut (progress bars without newlines).
MAX_LINE = 4096

LineSink = Callable[[list[str]], None]


@dataclass(frozen=True)
class ScriptResult:
    """How the script ended: ``exit_code`` 0 is success; ``error`` what Python itself would print."""

    exit_code: int
    error: str | None


class _OsExit(BaseException):
    """Raised in place of ``os._exit(code)`` on the script's thread."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def run_script(
    target: str, args: Sequence[str], *, module: bool, on_lines: LineSink | None = None
) -> ScriptResult:
    """Run ``target`` (a path, or a module name with ``module=True``) as ``__main__`` with ``args``."""
    sys.argv = [target, *args]
    output = _capture(on_lines) if on_lines is not None else contextlib.nullcontext()
    with output, _os_exit_ends_script(), _print_is_print():
        try:
            if module:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
        except _OsExit as exc:
            called = f"the script called os._exit({exc.code})"
            return ScriptResult(exc.code, None if exc.code == 0 else called)
        except SystemExit as exc:
            return _system_exit(exc.code)
        except BaseException as exc:  # the script's own failure, KeyboardInterrupt included
            return ScriptResult(1, script_traceback(exc))
    return ScriptResult(0, None)


def _system_exit(code: object) -> ScriptResult:
    """As the interpreter treats ``sys.exit(code)``: None is 0, an int is itself, else printed and 1."""
    if code is None:
        return ScriptResult(0, None)
    if isinstance(code, int):
        return ScriptResult(code, None if code == 0 else f"the script exited with {code}")
    return ScriptResult(1, str(code))


def script_traceback(exc: BaseException) -> str:
    """The traceback as ``python SCRIPT`` prints it: the frames of this runner and runpy left out."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and _is_runner(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()


@contextlib.contextmanager
def _print_is_print() -> Iterator[None]:
    """The interpreter's own ``print`` while the script runs.

    Ray Train V2 replaces ``print`` in its workers with one that also sends every line through its
    logger, so each line reaches the output twice; its replacement keeps the original as
    ``_original_print`` in its module. Whatever replaced ``print`` otherwise stays.
    """
    current = builtins.print
    home = sys.modules.get(getattr(current, "__module__", "") or "")
    original = getattr(home, "_original_print", None)
    if isinstance(current, types.BuiltinFunctionType) or not isinstance(original, types.BuiltinFunctionType):
        yield
        return
    builtins.print = original
    try:
        yield
    finally:
        builtins.print = current


def _is_runner(filename: str) -> bool:
    return filename in (__file__, runpy.__file__) or filename.startswith("<frozen runpy")


@contextlib.contextmanager
def _os_exit_ends_script() -> Iterator[None]:
    real = os._exit
    pid, thread = os.getpid(), threading.get_ident()

    def exit_script(code: int) -> None:
        if os.getpid() != pid or threading.get_ident() != thread:
            real(code)  # a forked child or another thread: a real exit, as before
        raise _OsExit(int(code))

    os._exit = exit_script  # type: ignore[assignment]
    try:
        yield
    finally:
        os._exit = real


@contextlib.contextmanager
def _capture(on_lines: LineSink) -> Iterator[None]:
    """Send fds 1 and 2 through a pipe whose lines go to ``on_lines`` and to the original stderr."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    reader = threading.Thread(
        target=_pump, args=(read_end, saved_err, on_lines), name="optimenv-script-output", daemon=True
    )
    reader.start()
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        reader.join(READER_GRACE_S)
        if not reader.is_alive():
            os.close(saved_err)
        # Else a child the script started still holds the pipe: the reader keeps copying to
        # saved_err until it closes, and the process's exit closes both.


def _pump(read_end: int, copy_to: int, on_lines: LineSink) -> None:
    pending: list[str] = []
    partial = b""
    last = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], FLUSH_EVERY_S)
            if ready:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                _write_all(copy_to, chunk)
                *complete, partial = (partial + chunk).split(b"\n")
                if len(partial) > MAX_LINE:  # no newline in sight: hand over what there is
                    complete.append(partial)
                    partial = b""
                pending.extend(_text(line) for line in complete)
            due = not ready or time.monotonic() - last >= FLUSH_EVERY_S
            if pending and (due or len(pending) >= FLUSH_LINES):
                _hand_over(on_lines, pending)
                pending, last = [], time.monotonic()
        if partial:
            pending.append(_text(partial))
        _hand_over(on_lines, pending)
    finally:
        os.close(read_end)


def _text(line: bytes) -> str:
    # A progress bar redraws with "\r": what a terminal would show is the last redraw.
    shown = line.rstrip(b"\r").rsplit(b"\r", 1)[-1]
    return shown[:MAX_LINE].decode("utf-8", "replace")


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the worker's log being gone must not break the script
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def _hand_over(on_lines: LineSink, lines: list[str]) -> None:
    if not lines:
        return
    with contextlib.suppress(Exception):  # the driver being gone must not break the script
        on_lines(lines)
