"""The ``optimenv`` command line. stdout carries data only; messages go to stderr."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import yaml

from optimenv.config import FORMATS, MAX_CONFIG_BYTES, ConfigFormat, TrainingConfig, load_config, reading_as
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.plan import DEFAULT_DEEPSPEED_PATH, Hardware, Plan, plan
from optimenv.spec import POLICIES

F = TypeVar("F", bound=Callable[..., Any])

# Subcommands that live in other modules, imported only when used: (module, attribute, the extra
# of pyproject.toml they need, None for the base install).
_LAZY: dict[str, tuple[str, str, str | None]] = {
    "render": ("optimenv.render.cli", "render_command", None),
    "spec": ("optimenv.spec_cli", "spec_command", None),
    "crd": ("optimenv.resource", "crd_command", None),
    "ray-launch": ("optimenv.bootstrap.ray_launch", "ray_launch_command", "run"),
    "run": ("optimenv.local_run", "run_command", "run"),
    "controller": ("optimenv_controller.main", "controller_command", "controller"),
}


class MissingExtraError(OptimEnvError):
    """A command whose optional dependencies (an extra of the package) are not installed."""


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _LAZY:
            return super().get_command(ctx, cmd_name)
        module_name, attr, extra = _LAZY[cmd_name]
        missing = missing_requirements(extra) if extra else []
        if missing:
            assert extra is not None
            return _needs_extra(cmd_name, extra, missing)
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command


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


def _yes_no(value: str | None) -> bool | None:
    return None if value is None else value == "yes"


def _remember_format(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta[_FORMAT_KEY] = value


_FORMAT_KEY = "optimenv.config_format"
#: ``--format``: read CONFIG as an Axolotl config or an ``accelerate config`` file. Kept in the click
#: context (not passed on), so every command that reads CONFIG through :func:`read_config` has it.
format_option = click.option(
    "--format",
    type=click.Choice(FORMATS),
    expose_value=False,
    callback=_remember_format,
    help="What CONFIG is: an Axolotl config or an `accelerate config` file [default: told by its keys].",
)


def topology_options(func: F) -> F:
    """``--nodes``, ``--gpus-per-node``, ``--bf16-supported`` … shared by plan, render and spec."""
    options = [
        format_option,
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
    ]
    for option in reversed(options):
        func = option(func)
    return func


def hardware_options(func: F) -> F:
    """:func:`topology_options` and ``--deepspeed-path`` (the path mounted in pods)."""
    func = click.option(
        "--deepspeed-path",
        default=DEFAULT_DEEPSPEED_PATH,
        show_default=True,
        help="Where the DeepSpeed JSON is mounted on the workers.",
    )(func)
    return topology_options(func)


#: ``--spec-policy``, shared by render and spec.
spec_policy_option = click.option(
    "--spec-policy",
    type=click.Choice(POLICIES),
    default="plan-wins",
    show_default=True,
    help="Who wins on the worker when a planned variable is already set.",
)


def hardware_from(kwargs: dict[str, Any]) -> Hardware:
    return Hardware(
        nodes=kwargs.get("nodes"),
        gpus_per_node=kwargs.get("gpus_per_node"),
        bf16_supported=_yes_no(kwargs.get("bf16_supported")),
        fp8_supported=_yes_no(kwargs.get("fp8_supported")),
        torch_version=kwargs.get("torch_version"),
    )


def read_config(source: str) -> TrainingConfig:
    """CONFIG argument: a path, or ``-`` for standard input, in the ``--format`` given (if any)."""
    ctx = click.get_current_context(silent=True)
    fmt: ConfigFormat | None = ctx.meta.get(_FORMAT_KEY) if ctx is not None else None
    with reading_as(fmt):
        return _read_config(source)


def _read_config(source: str) -> TrainingConfig:
    if source == "-":
        # Bytes, bounded: a text read would pass undecodable bytes on as surrogates.
        raw = sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                "config", f"standard input is larger than the limit of {MAX_CONFIG_BYTES} bytes"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("config", "standard input is not UTF-8 text") from None
        return load_config("<stdin>", text=text)
    return load_config(Path(source))


def plan_from_args(config: str, kwargs: dict[str, Any]) -> Plan:
    cfg = read_config(config)
    kwargs.update(config_topology(cfg, kwargs))
    return plan(cfg, hardware_from(kwargs), deepspeed_path=kwargs["deepspeed_path"])


def config_topology(cfg: TrainingConfig, kwargs: dict[str, Any]) -> dict[str, int]:
    """``nodes`` / ``gpus_per_node`` from an ``accelerate config`` file's ``num_machines`` and
    ``num_processes`` (``{}`` when it names none); an option given that disagrees is refused."""
    launch = cfg.launch
    if launch is None or launch.processes is None:
        return {}
    want = {"nodes": launch.machines, "gpus_per_node": launch.processes // launch.machines}
    for key, value in want.items():
        given = kwargs.get(key)
        if given is not None and given != value:
            option = "--" + key.replace("_", "-")
            raise ConfigError(
                option,
                f"{given} disagrees with the config file, which asks for {launch.processes} processes on "
                f"{launch.machines} machine(s) ({value} {'node(s)' if key == 'nodes' else 'per node'})",
                f"leave {option} out, or change num_processes / num_machines in the file",
            )
    return want


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
        click.echo(result.to_json(), nl=False)
    elif output == "yaml":
        click.echo(yaml.safe_dump(result.to_dict(), sort_keys=False, allow_unicode=True), nl=False)
    elif output == "env":
        click.echo(_env_lines(result), nl=False)
    else:
        click.echo(_table(result), nl=False)
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
    sys.exit(code if type(code) is int else 0)


def _help_hint(exc: click.ClickException) -> str:
    ctx = exc.ctx if isinstance(exc, click.UsageError) else None
    return f" (see {ctx.command_path} --help)" if ctx is not None else ""


if __name__ == "__main__":  # pragma: no cover
    main()
