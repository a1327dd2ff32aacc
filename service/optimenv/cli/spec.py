"""``optimenv spec``: a config's worker spec and DeepSpeed JSON as files, for use on this machine.

The files carry what the rendered ``<name>-spec`` and ``<name>-deepspeed`` ConfigMaps carry, except
that the spec names the DeepSpeed JSON where it was written (not where pods mount it), so
``optimenv-bootstrap --spec DIR/spec.json -- COMMAND`` and ``optimenv ray-launch --spec
DIR/spec.json -- SCRIPT`` work here as they do in a pod.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from optimenv._files import write_atomically
from optimenv.cli._common import (
    config_topology,
    read_config,
    spec_policy_option,
    topology_from,
    topology_options,
)
from optimenv.compiler import compile
from optimenv.errors import ConfigError

SPEC_FILE = "spec.json"
DEEPSPEED_FILE = "deepspeed.json"


@click.command(name="spec", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config")
@click.option(
    "-o",
    "--out-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Folder to write {SPEC_FILE} (and {DEEPSPEED_FILE} when DeepSpeed is on) into; created if absent.",
)
@spec_policy_option
@click.option(
    "--deepspeed-path",
    help=f"Where the spec expects the DeepSpeed JSON [default: DIR/{DEEPSPEED_FILE}, the file written].",
)
@topology_options
def spec_command(
    config: str, out_dir: Path, spec_policy: Any, deepspeed_path: str | None, **kwargs: Any
) -> None:
    """Write the worker spec of CONFIG (and its DeepSpeed JSON) into a folder, for local use.

    \b
    optimenv spec examples/zero3-gpu.yaml -o out
    optimenv-bootstrap --spec out/spec.json -- python train.py
    """
    folder = out_dir.absolute()
    ds_file = folder / DEEPSPEED_FILE
    cfg = read_config(config)
    kwargs.update(config_topology(cfg, kwargs))  # an accelerate config file's num_processes
    job = compile(
        cfg,
        topology_from(kwargs),
        "configmaps",
        policy=spec_policy,
        deepspeed_path=deepspeed_path or str(ds_file),
    )
    _make_folder(folder)
    written = []
    # The JSON first: a spec on disk never names a DeepSpeed file that is not there yet.
    if job.deepspeed_json is not None:
        _write(ds_file, job.deepspeed_json)
        written.append(ds_file)
    _write(folder / SPEC_FILE, job.spec_json)
    written.append(folder / SPEC_FILE)
    for warning in job.plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {', '.join(map(str, written))}", err=True)
    if job.deepspeed_json is not None and deepspeed_path and Path(deepspeed_path) != ds_file:
        note = f"note: the spec expects the DeepSpeed JSON at {deepspeed_path}: copy {ds_file} there"
        click.echo(note, err=True)
    click.echo(
        f"use: optimenv-bootstrap --spec {folder / SPEC_FILE} -- COMMAND, "
        f"or optimenv ray-launch --spec {folder / SPEC_FILE} -- SCRIPT",
        err=True,
    )


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError("--out-dir", f"{folder} exists and is not a folder", "name a folder") from None
    except OSError as exc:
        raise ConfigError("--out-dir", f"cannot create {folder}: {exc.strerror or exc}") from None


def _write(path: Path, text: str) -> None:
    try:
        write_atomically(path, text)
    except OSError as exc:
        raise ConfigError("--out-dir", f"cannot write {path}: {exc.strerror or exc}") from None
