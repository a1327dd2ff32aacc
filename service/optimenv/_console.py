"""The driver's terminal during a Ray launch: optimenv's lines, the progress bar and the script's output.

Everything else written to file descriptor 2 while the launch runs (Ray's Python and C++ logs from
the driver process, the processes it starts) goes to a log file, which the report names. A line the
script prints again (on another rank, or every step) is shown once; all of them are in the log.
ANSI escape codes reach the terminal only when stderr is one.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
#: Longest line logged at once (a longer one continues on the next line).
MAX_LINE = 65536
#: How many distinct recent lines are remembered to drop repeats from other ranks.
DEDUP_WINDOW = 2048


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def default_log_path(prefix: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"optimenv-{prefix}-{stamp}-{os.getpid()}.log"


class Console:
    """Where a launch writes for the user (``say``, ``progress``, ``show``) and what it logs."""

    def __init__(self, stream: TextIO, log: TextIO, log_path: Path) -> None:
        self.stream = stream
        self.log_path = log_path
        self._log = log
        self._lock = threading.Lock()
        self._tty = stream.isatty()
        self._recent: OrderedDict[str, int] = OrderedDict()
        self.repeats = 0

    def say(self, text: str) -> None:
        """One of optimenv's own lines."""
        self._write(text if self._tty else strip_ansi(text))
        self.log(text)

    def log(self, text: str) -> None:
        with self._lock:
            if not self._log.closed:  # a process of Ray's may write after the launch ended
                self._log.write(strip_ansi(text).rstrip("\n") + "\n")
                self._log.flush()

    def show(self, rank: int, lines: list[str]) -> None:
        """Lines a worker's script printed. A line already shown (by any rank) is only logged: the
        same warning from every rank and every step would bury the rest."""
        for line in lines:
            self.log(f"[rank {rank}] {line}")
            key = strip_ansi(line)
            if key in self._recent:
                self._recent.move_to_end(key)
                self.repeats += 1
                continue
            self._recent[key] = rank
            if len(self._recent) > DEDUP_WINDOW:
                self._recent.popitem(last=False)
            self._write(f"[rank {rank}] {line if self._tty else key}")

    def progress(self, total: int | None, desc: str) -> Any:
        """A tqdm bar on a terminal (tqdm comes with the ``run`` extra); plain lines elsewhere."""
        if not self._tty:
            return _LineProgress(self, total, desc)
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=self.stream)

    def _write(self, text: str) -> None:
        with self._lock:
            if self._tty:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)  # above any progress bar, which is redrawn
            else:
                self.stream.write(text + "\n")


class _LineProgress:
    """Progress as a line at the first step, then every few seconds, and at the end: what a log file
    or CI output can show of a bar."""

    EVERY_S = 5.0

    def __init__(self, console: Console, total: int | None, desc: str) -> None:
        self._console, self._total, self._desc = console, total, desc
        self._done = 0
        self._postfix = ""
        self._shown = float("-inf")  # the first step shows at once: training has started
        self._shown_done = 0
        self._closed = False

    def update(self, n: int = 1) -> None:
        self._done += n
        if time.monotonic() - self._shown >= self.EVERY_S:
            self._show()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def close(self) -> None:
        if not self._closed and self._done != self._shown_done:
            self._show()
        self._closed = True

    def _show(self) -> None:
        of = f"/{self._total}" if self._total else ""
        extra = f", {self._postfix}" if self._postfix else ""
        self._console.say(f"{self._desc}: {self._done}{of} steps{extra}")
        self._shown, self._shown_done = time.monotonic(), self._done


@contextlib.contextmanager
def owned_stderr(log_path: Path) -> Iterator[Console]:
    """Take file descriptor 2 for the duration: the terminal gets only what the Console writes."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    read_end, write_end = os.pipe()
    with (
        open(log_path, "a", encoding="utf-8", errors="replace") as log,
        open(terminal_fd, "w", buffering=1, encoding="utf-8", errors="replace") as terminal,
    ):
        console = Console(terminal, log, log_path)
        pump = threading.Thread(target=_to_log, args=(read_end, console), name="optimenv-stderr", daemon=True)
        pump.start()
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            yield console
        finally:
            if console.repeats:
                console.say(f"({console.repeats} repeated lines not shown; all are in {log_path})")
            sys.stderr.flush()
            os.dup2(terminal_fd, 2)
            # Processes started meanwhile (Ray's) may still hold the pipe; their later lines are lost.
            pump.join(1.0)


def _to_log(read_end: int, console: Console) -> None:
    with open(read_end, "rb") as pipe:
        while raw := pipe.readline(MAX_LINE):
            console.log(raw.decode("utf-8", "replace"))
