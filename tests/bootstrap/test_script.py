"""Running a user's script inside a Ray worker process as if it were its own ``python SCRIPT``.

Each case runs in a fresh interpreter: the runner swaps file descriptors 1 and 2, ``os._exit`` and
``print`` for the script's duration, which must not leak into pytest's own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

# Runs SCRIPT through run_script with an on_lines sink and prints the outcome as JSON on the real stdout.
RUNNER = textwrap.dedent(
    """
    import json, os, sys
    from optimenv.bootstrap._script import run_script
    lines = []
    real_stdout = os.fdopen(os.dup(1), "w")
    result = run_script(sys.argv[1], sys.argv[2:], module=False, on_lines=lines.extend)
    import builtins
    json.dump({"exit_code": result.exit_code, "error": result.error, "lines": lines,
               "os_exit_restored": os._exit.__module__ in ("posix", "nt"),
               "print_module": builtins.print.__module__}, real_stdout)
    real_stdout.flush()
    """
)


def _run(tmp_path: Path, script: str, *args: str, prelude: str = "") -> dict[str, Any]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    proc = subprocess.run(
        [sys.executable, "-c", prelude + RUNNER, str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    out["stderr"] = proc.stderr
    return out


def test_sys_exit_codes_are_the_scripts_exit_status_without_a_traceback(tmp_path: Path) -> None:
    result = _run(tmp_path, "import sys\nprint('before')\nsys.exit(3)\n")
    assert (result["exit_code"], result["error"]) == (3, "the script exited with 3")
    assert result["lines"] == ["before"]
    assert _run(tmp_path, "import sys\nsys.exit()\n")["exit_code"] == 0
    # As the interpreter does: a non-integer exit code is printed and the status is 1.
    message = _run(tmp_path, "import sys\nsys.exit('bad input file')\n")
    assert (message["exit_code"], message["error"]) == (1, "bad input file")


@pytest.mark.parametrize("code", [0, 7])
def test_os_exit_ends_the_script_not_the_worker(tmp_path: Path, code: int) -> None:
    # bench/gpu/train.py ends with os._exit(0): in a Ray worker that killed the worker process.
    result = _run(tmp_path, f"import os\nprint('done', flush=True)\nos._exit({code})\nprint('never')\n")
    assert result["exit_code"] == code
    assert result["lines"] == ["done"]
    assert result["os_exit_restored"]
    assert (result["error"] is None) == (code == 0)


def test_a_forked_child_still_really_exits(tmp_path: Path) -> None:
    # multiprocessing's fork start method ends every child with os._exit: it must not raise there.
    script = """
        import multiprocessing as mp
        def work(q):
            q.put(41 + 1)
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=work, args=(q,))
        p.start()
        print("child said", q.get(timeout=30))
        p.join(30)
        print("child exit", p.exitcode)
    """
    result = _run(tmp_path, script)
    assert result["exit_code"] == 0, result
    assert result["lines"] == ["child said 42", "child exit 0"]


def test_an_exception_is_the_scripts_own_traceback(tmp_path: Path) -> None:
    script = """
        def inner():
            raise ValueError("boom")
        inner()
    """
    result = _run(tmp_path, script)
    assert result["exit_code"] == 1
    error = result["error"]
    assert error.startswith("Traceback (most recent call last):")
    assert error.endswith("ValueError: boom")
    assert "script.py\", line 4, in <module>" in error
    assert "runpy" not in error and "_script.py" not in error


def test_output_of_both_streams_and_of_c_level_writes_is_captured_line_by_line(tmp_path: Path) -> None:
    script = r"""
        import os, sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        sys.stdout.flush()
        os.write(1, b"fd one\n")
        os.write(2, b"fd two, then a bar\rredrawn\n")
        sys.stdout.write("no newline at the end")
    """
    result = _run(tmp_path, script)
    assert result["lines"] == ["to stdout", "to stderr", "fd one", "redrawn", "no newline at the end"]
    # The worker's own stderr (Ray's worker log) keeps a copy.
    assert "to stdout" in result["stderr"] and "fd one" in result["stderr"]


def test_ray_trains_print_patch_is_undone_while_the_script_runs(tmp_path: Path) -> None:
    # Ray Train V2 replaces print in workers with one that also logs each line (printed twice);
    # its patch keeps the original as _original_print in its module, as this stand-in does.
    prelude = textwrap.dedent(
        """
        import builtins, sys, types
        patch = types.ModuleType("fake_patch")
        patch._original_print = builtins.print
        def doubled(*args, **kwargs):
            patch._original_print(*args, **kwargs)
            patch._original_print(*args, **kwargs)
        doubled.__module__ = "fake_patch"
        sys.modules["fake_patch"] = patch
        builtins.print = doubled
        """
    )
    result = _run(tmp_path, "print('once')\n", prelude=prelude)
    assert result["lines"] == ["once"]
    assert result["print_module"] == "fake_patch"  # the worker's print is Ray's again afterwards
