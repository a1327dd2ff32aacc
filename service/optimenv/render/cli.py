"""``optimenv render``: a config into manifests on stdout (multi-document YAML or a v1 List)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click
import yaml
from yaml.representer import SafeRepresenter

from optimenv.cli import config_topology, hardware_from, hardware_options, read_config, spec_policy_option
from optimenv.config import TrainingConfig
from optimenv.errors import ConfigError
from optimenv.plan import Hardware, Plan, ProcessCountError, plan
from optimenv.render import TARGETS, JobOptions, render

try:  # libyaml's emitter writes the same bytes about 4x faster
    from yaml import CSafeDumper as _BaseDumper
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeDumper as _BaseDumper  # type: ignore[assignment]


class _Dumper(_BaseDumper):
    """Block style everywhere; multi-line strings (the JSON files) as literal blocks."""


def _str(dumper: SafeRepresenter, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in the order the renderer built them."""
    return yaml.dump_all(
        objects, Dumper=_Dumper, sort_keys=False, explicit_start=True, allow_unicode=True, width=100
    )


def to_json(objects: list[dict[str, Any]]) -> str:
    """One ``v1`` ``List``, as ``kubectl get -o json`` prints several objects."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": objects}, indent=2) + "\n"


def _pairs(option: str, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(option, f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _tolerations(values: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    out = []
    for item in values:
        try:
            parsed = json.loads(item)
        except json.JSONDecodeError as exc:
            raise ConfigError("--toleration", f"not valid JSON: {exc.msg}") from None
        if not isinstance(parsed, dict):
            raise ConfigError("--toleration", 'must be a JSON object, e.g. {"key":"k","operator":"Exists"}')
        out.append(parsed)
    return tuple(out)


@click.command(name="render", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config")
@click.option("--target", required=True, help=f"One of {', '.join(TARGETS)}.")
@click.option("--name", required=True, help="Job name; objects are <name>, <name>-env, <name>-spec ...")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--image", help="Container image (required for job targets).")
@click.option("--service-account", help="Pod service account.")
@click.option("--node-selector", multiple=True, metavar="KEY=VALUE", help="Pod node selector (repeat).")
@click.option("--toleration", multiple=True, metavar="JSON", help="A pod toleration as JSON (repeat).")
@click.option("-l", "--label", multiple=True, metavar="KEY=VALUE", help="Extra label on every object.")
@click.option(
    "--runtime",
    help="TrainJob ClusterTrainingRuntime (default: torch-distributed, or "
    "deepspeed-distributed when DeepSpeed is on).",
)
@spec_policy_option
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@hardware_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def render_command(
    config: str,
    target: str,
    name: str,
    namespace: str,
    image: str | None,
    service_account: str | None,
    node_selector: tuple[str, ...],
    toleration: tuple[str, ...],
    label: tuple[str, ...],
    runtime: str | None,
    spec_policy: Any,
    output: str,
    command: tuple[str, ...],
    **kwargs: Any,
) -> None:
    """Render CONFIG into manifests for TARGET; the training command goes after --.

    \b
    optimenv render cfg.yaml --target pytorchjob --name ft --image IMG --nodes 2 --gpus-per-node 8 \\
        -- python train.py | kubectl apply --server-side -f -
    """
    if target not in TARGETS:
        raise ConfigError("--target", f"unknown target {target!r}", f"choose one of {', '.join(TARGETS)}")
    cfg = read_config(config)
    kwargs.update(config_topology(cfg, kwargs))  # an accelerate config file's num_processes
    # Job targets default to 1 node x 1 GPU; whether that was asked for decides the hint below.
    topology_given = kwargs.get("nodes") is not None or kwargs.get("gpus_per_node") is not None
    if target == "configmaps" and command:
        click.echo(
            "warning: --target configmaps renders no job, so the command after -- is not used; "
            "put it in your pod template after optimenv-bootstrap (docs/targets.md)",
            err=True,
        )
    if target != "configmaps":
        # A job has a definite topology: plan for exactly the pods it starts.
        kwargs["nodes"] = kwargs.get("nodes") or 1
        kwargs["gpus_per_node"] = kwargs.get("gpus_per_node") or 1
    options = JobOptions(
        name=name,
        namespace=namespace,
        image=image,
        command=command,
        nodes=kwargs.get("nodes") or 1,
        gpus_per_node=kwargs.get("gpus_per_node") or 1,
        service_account=service_account,
        node_selector=_pairs("--node-selector", node_selector),
        tolerations=_tolerations(toleration),
        labels=_pairs("--label", label),
        runtime=runtime,
        spec_policy=spec_policy,
    )
    hardware = hardware_from(kwargs)
    if target == "rayjob" and "ray_num_workers" in cfg.model_fields_set:
        options = dataclasses.replace(options, ray_workers=cfg.ray_num_workers)
        if cfg.ray_num_workers <= options.nodes * options.gpus_per_node:
            # The Ray Train workers are the processes (C28); more than the GPUs is refused by render.
            hardware = dataclasses.replace(hardware, nodes=1, gpus_per_node=cfg.ray_num_workers)
    result = _plan(cfg, hardware, kwargs["deepspeed_path"], default_topology=not topology_given)
    if target == "rayjob" and cfg.resources_per_worker.get("GPU", 1.0) != 1.0:
        click.echo("warning: resources_per_worker: each Ray Train worker gets one GPU here", err=True)
    objects = render(result, target, options)
    click.echo(to_yaml(objects) if output == "yaml" else to_json(objects), nl=False)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


def _plan(cfg: TrainingConfig, hardware: Hardware, deepspeed_path: str, *, default_topology: bool) -> Plan:
    """``plan()``; a size mismatch on the default 1 x 1 job names the options that set its size."""
    try:
        return plan(cfg, hardware, deepspeed_path=deepspeed_path)
    except ProcessCountError as exc:
        if not default_topology:
            raise
        raise ProcessCountError(
            exc.field,
            exc.reason,
            f"the job defaults to 1 node x 1 GPU: give its size with --nodes and --gpus-per-node, "
            f"whose product must be {exc.product}; or {exc.hint}",
            product=exc.product,
            world=exc.world,
        ) from None
