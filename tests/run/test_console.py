"""What ``optimenv run`` / ``ray-launch`` show on stderr, and what only goes to their log file."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

from optimenv._console import Console, _LineProgress

CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from optimenv._console import owned_stderr
    with owned_stderr(Path(sys.argv[1])) as console:
        os.write(2, b"\\x1b[36m(raylet)\\x1b[0m core_worker.cc:2465: internal noise\\n")
        print("a Python warning of Ray's", file=sys.stderr)
        console.say("starting Ray ...")
        console.show(0, ["\\x1b[1mbold\\x1b[0m line", "same on every rank"])
        console.show(1, ["same on every rank", "only rank 1"])
    print("after: stderr is the terminal again", file=sys.stderr)
    """
)


def test_fd2_noise_goes_to_the_log_and_the_terminal_gets_only_our_lines(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stderr.splitlines() == [
        "starting Ray ...",
        "[rank 0] bold line",  # no ANSI codes: stderr is a pipe here
        "[rank 0] same on every rank",
        "[rank 1] only rank 1",
        f"(1 repeated lines not shown; all are in {log})",
        "after: stderr is the terminal again",
    ]
    logged = log.read_text().splitlines()
    assert "(raylet) core_worker.cc:2465: internal noise" in logged
    assert "a Python warning of Ray's" in logged
    assert "[rank 1] same on every rank" in logged
    assert not any("\x1b" in line for line in logged)


def _console(tty: bool) -> tuple[Console, io.StringIO, io.StringIO]:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    stream, log = Stream(), io.StringIO()
    return Console(stream, log, Path("run.log")), stream, log


def test_a_line_repeated_by_the_same_rank_is_shown_once() -> None:
    console, stream, log = _console(tty=False)
    for _ in range(3):
        console.show(0, ["FutureWarning: deprecated", "  return func(*args)"])
    console.show(0, ["step 3 loss 1.0"])
    assert stream.getvalue().splitlines() == [
        "[rank 0] FutureWarning: deprecated",
        "[rank 0]   return func(*args)",
        "[rank 0] step 3 loss 1.0",
    ]
    assert console.repeats == 4
    assert len(log.getvalue().splitlines()) == 7


def test_colours_reach_a_terminal() -> None:
    console, stream, _ = _console(tty=True)
    console.show(0, ["\x1b[31mred\x1b[0m"])
    assert "\x1b[31mred\x1b[0m" in stream.getvalue()


def test_progress_off_a_terminal_is_a_line_now_and_then() -> None:
    console, stream, _ = _console(tty=False)
    bar = _LineProgress(console, 30, "training")
    bar.set_postfix(loss="5.5000")
    bar.update(1)  # the first step shows at once
    bar.update(1)  # within the interval: not shown
    bar._shown -= _LineProgress.EVERY_S
    bar.set_postfix(loss="4.0000")
    bar.update(1)
    bar.update(27)
    bar.close()
    bar.close()
    assert stream.getvalue().splitlines() == [
        "training: 1/30 steps, loss 5.5000",
        "training: 3/30 steps, loss 4.0000",
        "training: 30/30 steps, loss 4.0000",
    ]
