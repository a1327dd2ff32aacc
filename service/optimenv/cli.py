"""The ``optimenv`` command line. stdout carries data only; messages go to stderr."""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from optimenv.config import MAX_CONFIG_BYTES, TrainingConfig, load_config
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.limits import read_stream
from optimenv.plan import DEFAULT_DEEPSPEED_PATH, Hardware, Plan, plan

F = TypeVar("F", bound=Callable[..., Any])

# Subcommands that live in other modules (some need optional extras); imported only when used.
_LAZY: dict[str, tuple[str, str]] = {
    "render": ("optimenv.render.cli", "render_command"),
    "crd": ("optimenv.resource", "crd_command"),
    "ray-launch": ("optimenv.bootstrap.ray_launch", "ray_launch_command"),
    "run": ("optimenv.local_run", "run_command"),
    "controller": ("optimenv_controller.main", "controller_command"),
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [n for n, (mod, _) in _LAZY.items() if _module_exists(mod)]
        return sorted([*super().list_commands(ctx), *lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY:
            module_name, attr = _LAZY[cmd_name]
            if not _module_exists(module_name):
                return None
            command = getattr(importlib.import_module(module_name), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _yes_no(value: str | None) -> bool | None:
    return None if value is None else value == "yes"


def hardware_options(func: F) -> F:
    """``--nodes``, ``--gpus-per-node``, ``--bf16-supported`` … shared by plan and render."""
    options = [
        click.option("--nodes", type=click.IntRange(min=1), help="Number of nodes (unknown: leave out)."),
        click.option("--gpus-per-node", type=click.IntRange(min=1), help="GPUs (processes) per node."),
        click.option(
            "--bf16-supported",
            type=click.Choice(["yes", "no"]),
            help="Whether the GPUs support bf16; unknown leaves bf16: auto to the worker.",
        ),
        click.option(
            "--fp8-supported", type=click.Choice(["yes", "no"]), help="Whether the GPUs support fp8."
        ),
        click.option("--torch-version", help="torch version of the worker image (for torch_compile: auto)."),
        click.option(
            "--deepspeed-path",
            default=DEFAULT_DEEPSPEED_PATH,
            show_default=True,
            help="Where the DeepSpeed JSON is mounted on the workers.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def hardware_from(kwargs: dict[str, Any]) -> Hardware:
    return Hardware(
        nodes=kwargs.get("nodes"),
        gpus_per_node=kwargs.get("gpus_per_node"),
        bf16_supported=_yes_no(kwargs.get("bf16_supported")),
        fp8_supported=_yes_no(kwargs.get("fp8_supported")),
        torch_version=kwargs.get("torch_version"),
    )


def read_config(source: str) -> TrainingConfig:
    """CONFIG argument: a path (a regular file), or ``-`` for standard input; both bounded."""
    if source == "-":
        # Bytes, bounded: a text read would pass undecodable bytes on as surrogates.
        if sys.stdin is None:  # started with standard input closed
            raise ConfigError("config", "standard input is closed", "give a file path instead of -")
        try:
            raw = read_stream(sys.stdin.buffer, MAX_CONFIG_BYTES)
        except OSError as exc:
            raise ConfigError("config", f"standard input: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("config", "standard input is not UTF-8 text") from None
        return load_config("<stdin>", text=text)
    return load_config(Path(source))


def plan_from_args(config: str, kwargs: dict[str, Any]) -> Plan:
    return plan(read_config(config), hardware_from(kwargs), deepspeed_path=kwargs["deepspeed_path"])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="optimenv")
def cli() -> None:
    """Plan the FSDP / DeepSpeed environment of an Axolotl-style training config."""


@cli.command()
@click.argument("config")
def validate(config: str) -> None:
    """Check CONFIG (a path or - for stdin); exit 0 if valid, 1 with the field path if not."""
    # Planning for unknown hardware finds the contradictions that no hardware can resolve.
    plan(read_config(config))
    click.echo(f"{config}: valid", err=True)


@cli.command(name="plan")
@click.argument("config")
@click.option(
    "-o", "--output", type=click.Choice(["table", "json", "env"]), default="table", show_default=True
)
@hardware_options
def plan_command(config: str, output: str, **kwargs: Any) -> None:
    """Show the environment Accelerate will see for CONFIG, with the key behind each variable."""
    result = plan_from_args(config, kwargs)
    if output == "json":
        text = result.to_json()
    elif output == "env":
        text = "".join(f"{var.name}={_shell_quote(var.value)}\n" for var in result.env)
    else:
        text = _table(result)
    # Data, written as it is: click.echo would strip escape sequences when stdout is not a terminal.
    click.echo(text, nl=False, color=True)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


cli.add_command(plan_command, name="explain")


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
    """Entry point: every refusal is one line on stderr and exit status 1."""
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
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(1)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT):
            raise
        _stdout_failed(exc)
    sys.exit(code if type(code) is int else 0)


def _stdout_failed(exc: OSError) -> NoReturn:
    """Writing the output failed (``> /dev/full``, a closed pipe): say so once, exit 1."""
    # Point stdout at /dev/null so the interpreter's own flush at exit cannot fail again.
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if exc.errno != errno.EPIPE:  # the reader of a closed pipe wants nothing more, not even a message
        click.echo(f"error: cannot write the output: {exc.strerror or exc}", err=True)
    sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
