"""``optimenv-bootstrap`` (exec mode) and ``python -m optimenv.bootstrap run`` (in-process mode).

The arguments are parsed by hand: the command line is tiny, everything after the command belongs
to the command, and this runs on every pod start, where each import counts.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

PROG = "optimenv-bootstrap"
USAGE = f"""\
usage: {PROG} [--spec PATH] [--quiet] -- COMMAND [ARGS...]
       python -m optimenv.bootstrap run [--spec PATH] [--quiet] SCRIPT [ARGS...]
       python -m optimenv.bootstrap run [--spec PATH] [--quiet] -m MODULE [ARGS...]

Apply the optimenv worker spec (--spec, else $OPTIMENV_SPEC, else /etc/optimenv/spec.json) to the
environment, then exec COMMAND (exec mode) or run SCRIPT in this process (run mode, which also
keeps transformers' ZeRO-3 config alive). A one-line summary goes to stderr. Exit status: the
command's; 1 when the bootstrap refuses; 2 for a usage error or a missing script; 126 when COMMAND
cannot be executed; 127 when it is not found.
"""


def _fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _options(argv: list[str], *, run: bool) -> tuple[str | None, bool, str | None, list[str]]:
    """``(spec, quiet, module, rest)``: options end at ``--`` or at the first other word."""
    spec: str | None = None
    quiet = False
    module: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if arg in ("-q", "--quiet"):
            quiet = True
        elif arg == "--spec" or (run and arg == "-m"):
            if i + 1 >= len(argv):
                _fail(f"{arg} needs a value\n{USAGE}", 2)
            if arg == "--spec":
                spec = argv[i + 1]
            else:
                module = argv[i + 1]
                i += 2
                break  # like python -m: everything after the module is its arguments
            i += 1
        elif arg.startswith("--spec="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            _fail(f"unknown option {arg}\n{USAGE}", 2)
        else:
            break
        i += 1
    return spec, quiet, module, argv[i:]


def _apply(spec: str | None, quiet: bool, *, in_process: bool, doing: str) -> None:
    """Apply the spec to this process's environment, or exit with the one-line refusal."""
    from optimenv.bootstrap._apply import apply_spec, cpu_variables
    from optimenv.errors import OptimEnvError

    try:
        # Exec mode on a CPU-only worker: without it Accelerate runs each process that torchrun
        # starts alone (DistributedType.NO); with it they form one gloo group (MULTI_CPU). Run
        # mode runs inside a process its launcher (or exec mode) already set up.
        extra = () if in_process else cpu_variables(os.environ, "bootstrap: no GPU on this worker")
        applied = apply_spec(spec, os.environ, in_process=in_process, extra=extra)
    except OptimEnvError as exc:
        _fail(str(exc))
    _point_at(applied.spec_path)
    if not quiet:
        sys.stderr.write(f"{PROG}: {applied.summary()}; {doing}\n")
    sys.stderr.flush()


def _point_at(spec_path: str | None) -> None:
    # So that apply() in the training script (to hold the ZeRO-3 config) finds the same spec.
    from optimenv.spec import SPEC_ENV

    if spec_path is not None:
        os.environ[SPEC_ENV] = spec_path


def _exec(argv: list[str]) -> NoReturn:
    spec, quiet, _, command = _options(argv, run=False)
    if not command:
        _fail(f"no command to run\n{USAGE}", 2)
    _apply(spec, quiet, in_process=False, doing=f"exec {command[0]}")
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, os.environ)
    except FileNotFoundError:
        _fail(f"{command[0]}: command not found", 127)
    except PermissionError:
        _fail(f"{command[0]}: permission denied (not an executable file)", 126)
    except OSError as exc:
        _fail(f"{command[0]}: cannot execute: {exc.strerror or exc}", 126)


def _run(argv: list[str]) -> None:
    import runpy

    spec, quiet, module, rest = _options(argv, run=True)
    if module is None:
        if not rest:
            _fail(f"run: no script to run\n{USAGE}", 2)
        script = rest[0]
        if not os.path.isfile(script):
            _fail(f"run: {script}: no such file", 2)
    _apply(spec, quiet, in_process=True, doing=f"run {module or rest[0]}")
    if module is not None:
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(rest)
        sys.path[0] = os.path.dirname(os.path.abspath(rest[0]))  # as python SCRIPT does
        runpy.run_path(rest[0], run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "run":
        _run(args[1:])
        return 0
    _exec(args)


if __name__ == "__main__":
    sys.exit(main())
