"""What several commands share: reading CONFIG, and the options that make a :class:`Topology`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from optimenv.config import FORMATS, MAX_CONFIG_BYTES, ConfigFormat, TrainingConfig, load_config, reading_as
from optimenv.errors import ConfigError
from optimenv.limits import read_stream
from optimenv.plan import DEFAULT_DEEPSPEED_PATH, Hardware
from optimenv.spec import POLICIES
from optimenv.validation import parse_model
from optimenv.workload import Topology

F = TypeVar("F", bound=Callable[..., Any])


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


#: ``--log``, shared by run and ray-launch.
log_option = click.option(
    "--log",
    "log_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where Ray's messages and the workers' output are logged (default: a new file in $TMPDIR).",
)


def _yes_no(value: str | None) -> bool | None:
    return None if value is None else value == "yes"


def topology_from(kwargs: dict[str, Any]) -> Topology:
    """The :func:`topology_options` as a :class:`Topology`; a size left out is unknown."""
    return parse_model(
        Topology,
        {
            "nodes": kwargs.get("nodes"),
            "gpus_per_node": kwargs.get("gpus_per_node"),
            "bf16_supported": _yes_no(kwargs.get("bf16_supported")),
            "fp8_supported": _yes_no(kwargs.get("fp8_supported")),
            "torch_version": kwargs.get("torch_version"),
        },
    )


def hardware_from(kwargs: dict[str, Any]) -> Hardware:
    """What the planner is told for the :func:`topology_options` (``plan``, ``validate``)."""
    return topology_from(kwargs).hardware()


def config_topology(cfg: TrainingConfig, kwargs: dict[str, Any]) -> dict[str, int]:
    """The sizes an ``accelerate config`` file's ``num_machines`` / ``num_processes`` give for the
    options left out (``{}`` when it names none). An option that disagrees with the file is kept:
    the planner refuses the pair, with the same words for every front end."""
    launch = cfg.launch
    if launch is None or launch.processes is None:
        return {}
    want = {"nodes": launch.machines, "gpus_per_node": launch.processes // launch.machines}
    return {key: value for key, value in want.items() if kwargs.get(key) is None}


def read_config(source: str) -> TrainingConfig:
    """CONFIG argument: a path (a regular file), or ``-`` for standard input, both bounded, in the
    ``--format`` given (if any)."""
    ctx = click.get_current_context(silent=True)
    fmt: ConfigFormat | None = ctx.meta.get(_FORMAT_KEY) if ctx is not None else None
    with reading_as(fmt):
        return _read_config(source)


def _read_config(source: str) -> TrainingConfig:
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
