"""The ``optimenv`` command line, the one layer that imports click commands together.

stdout carries data only; messages go to stderr. Every command module lives in this package; the
planner, renderers and bootstrap below it never import it (pyproject.toml [tool.importlinter]).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
import yaml

from optimenv.cli._common import (
    config_topology,
    format_option,
    hardware_from,
    hardware_options,
    read_config,
    spec_policy_option,
    topology_from,
    topology_options,
)
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.plan import Plan, plan

__all__ = [
    "cli",
    "config_topology",
    "format_option",
    "hardware_from",
    "hardware_options",
    "main",
    "read_config",
    "spec_policy_option",
    "topology_from",
    "topology_options",
]


class MissingExtraError(OptimEnvError):
    """A command whose optional dependencies (an extra of the package) are not installed."""


def _render() -> click.Command:
    from optimenv.cli.render import render_command

    return render_command


def _spec() -> click.Command:
    from optimenv.cli.spec import spec_command

    return spec_command


def _crd() -> click.Command:
    from optimenv.cli.crd import crd_command

    return crd_command


def _ray_launch() -> click.Command:
    from optimenv.cli.ray_launch import ray_launch_command

    return ray_launch_command


def _run() -> click.Command:
    from optimenv.cli.run import run_command

    return run_command


#: The group that packages beside optimenv register their commands in (pyproject.toml
#: [project.entry-points]): the controller, whose package optimenv itself never imports.
COMMAND_GROUP = "optimenv.commands"


def _registered(name: str) -> Callable[[], click.Command]:
    def load() -> click.Command:
        found = importlib.metadata.entry_points(group=COMMAND_GROUP, name=name)
        if not found:
            raise MissingExtraError(
                f"optimenv {name} is not registered in this installation; reinstall optimenv from its "
                "checkout: pip install -c constraints.txt -e '.[controller]'"
            )
        command = next(iter(found)).load()
        assert isinstance(command, click.Command)
        return command

    return load


# Subcommands imported only when used: how to load each, and the extra of pyproject.toml it needs
# (None for the base install).
_LAZY: dict[str, tuple[Callable[[], click.Command], str | None]] = {
    "render": (_render, None),
    "spec": (_spec, None),
    "crd": (_crd, None),
    "ray-launch": (_ray_launch, "run"),
    "run": (_run, "run"),
    "controller": (_registered("controller"), "controller"),
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _LAZY:
            return super().get_command(ctx, cmd_name)
        load, extra = _LAZY[cmd_name]
        missing = missing_requirements(extra) if extra else []
        if missing:
            assert extra is not None
            return _needs_extra(cmd_name, extra, missing)
        return load()


def missing_requirements(extra: str) -> list[str]:
    """The distributions that ``optimenv[extra]`` asks for and that are not installed, by name."""
    from packaging.requirements import Requirement

    try:
        declared = importlib.metadata.requires("optimenv") or []
    except importlib.metadata.PackageNotFoundError:
        return []  # run from a source tree without metadata: nothing to check against
    missing: list[str] = []
    for text in declared:
        req = Requirement(text)
        if req.marker is None or not req.marker.evaluate({"extra": extra}):
            continue
        if req.name == "optimenv":  # an extra made of other extras (run includes worker)
            missing += [m for inner in sorted(req.extras) for m in missing_requirements(inner)]
            continue
        try:
            importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(req.name)
    return list(dict.fromkeys(missing))


def _needs_extra(name: str, extra: str, missing: list[str]) -> click.Command:
    """Stands in for a command whose extra is missing: any invocation gets the one-line fix."""

    def refuse(args: tuple[str, ...]) -> NoReturn:
        raise MissingExtraError(
            f"optimenv {name} needs the {extra!r} extra, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install it from the optimenv "
            f"checkout: pip install -c constraints.txt -e '.[{extra}]'"
        )

    return click.Command(
        name,
        callback=refuse,
        params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        context_settings={"ignore_unknown_options": True},
        add_help_option=False,
        short_help=f"(not installed: needs the {extra!r} extra)",
    )


def plan_from_args(config: str, kwargs: dict[str, Any]) -> Plan:
    cfg = read_config(config)
    kwargs.update(config_topology(cfg, kwargs))  # an accelerate config file's num_processes
    return plan(cfg, hardware_from(kwargs), deepspeed_path=kwargs["deepspeed_path"])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(None, "-V", "--version", package_name="optimenv")
def cli() -> None:
    """Plan the FSDP / DeepSpeed environment of an Axolotl-style training config.

    Exit status: 0 done, 1 the input was refused (the message names the field and the fix), 2 a
    usage error (unknown command or option, missing argument, bad option value).
    """


@cli.command()
@click.argument("config")
@format_option
@click.option(
    "--strict", is_flag=True, help="Refuse keys that look like misspellings of keys optimenv reads."
)
def validate(config: str, strict: bool) -> None:
    """Check CONFIG (a path or - for stdin); exit 0 if valid, 1 with the field path if not."""
    cfg = read_config(config)
    misses = cfg.near_misses
    if strict and misses:
        (key, close), more = misses[0], len(misses) - 1
        also = f"; and {', '.join(k for k, _ in misses[1:])}" if more else ""
        raise ConfigError(key, f"not a key optimenv reads{also}", f"did you mean {close!r}? (--strict)")
    # Planning for unknown hardware finds the contradictions that no hardware can resolve.
    result = plan(cfg, hardware_from(config_topology(cfg, {})))
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{config}: valid", err=True)


@cli.command(name="plan")
@click.argument("config")
@click.option(
    "-o", "--output", type=click.Choice(["table", "json", "yaml", "env"]), default="table", show_default=True
)
@hardware_options
def plan_command(config: str, output: str, **kwargs: Any) -> None:
    """Show the environment Accelerate will see for CONFIG, with the key behind each variable."""
    result = plan_from_args(config, kwargs)
    if output == "json":
        text = result.to_json()
    elif output == "yaml":
        text = yaml.safe_dump(result.to_dict(), sort_keys=False, allow_unicode=True)
    elif output == "env":
        text = _env_lines(result)
    else:
        text = _table(result)
    # Data, written as it is: click.echo would strip escape sequences when stdout is not a terminal.
    click.echo(text, nl=False, color=True)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


def _env_lines(result: Plan) -> str:
    """``NAME=value`` lines a shell can source; what the worker decides follows as comments."""
    lines = [f"{var.name}={_shell_quote(var.value)}" for var in result.env]
    lines += [
        f"# decided on the worker: {d.variable} ({d.kind}, from {d.source})"
        if d.variable
        else f"# decided on the worker: {d.kind} (from {d.source})"
        for d in result.deferred
    ]
    return "".join(f"{line}\n" for line in lines)


def _shell_quote(value: str) -> str:
    safe = all(ch.isalnum() or ch in "_-.,/:=+@" for ch in value)
    return value if safe and value else "'" + value.replace("'", "'\\''") + "'"


def _table(result: Plan) -> str:
    rows = [(v.name, v.value, v.source) for v in result.env]
    rows += [(d.variable or "-", f"<decided on the worker: {d.kind}>", d.source) for d in result.deferred]
    header = ("VARIABLE", "VALUE", "SOURCE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point: every refusal is one line on stderr; exit status 1, or 2 for a usage error."""
    try:
        # Without standalone mode click returns (not raises) the code of a click.exceptions.Exit.
        code = cli.main(args=argv, prog_name="optimenv", standalone_mode=False)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, not at interpreter exit
    except OptimEnvError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.format_message(), err=True)  # the help text itself: no "error:" line
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # Usage errors exit 2, as click's own standalone mode does; other click errors 1.
        click.echo(f"error: {exc.format_message().rstrip('.')}{_help_hint(exc)}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT):
            raise
        _stdout_failed(exc)
    sys.exit(code if type(code) is int else 0)


def _help_hint(exc: click.ClickException) -> str:
    ctx = exc.ctx if isinstance(exc, click.UsageError) else None
    return f" (see {ctx.command_path} --help)" if ctx is not None else ""


def _stdout_failed(exc: OSError) -> NoReturn:
    """Writing the output failed (``> /dev/full``, a closed pipe): say so once, exit 1."""
    # Point stdout at /dev/null so the interpreter's own flush at exit cannot fail again.
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if exc.errno != errno.EPIPE:  # the reader of a closed pipe wants nothing more, not even a message
        click.echo(f"error: cannot write the output: {exc.strerror or exc}", err=True)
    sys.exit(1)
