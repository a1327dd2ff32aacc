"""``optimenv render``: a config into manifests on stdout (multi-document YAML or a v1 List)."""

from __future__ import annotations

from typing import Any

import click

from optimenv.cli._common import (
    config_topology,
    hardware_options,
    read_config,
    spec_policy_option,
    topology_from,
)
from optimenv.compiler import Job, compile
from optimenv.config import TrainingConfig
from optimenv.errors import ConfigError
from optimenv.limits import json_problem, load_json
from optimenv.plan import ProcessCountError
from optimenv.validation import parse_model
from optimenv.workload import TARGETS, JobSpec, Target, Topology, check_target


def _pairs(option: str, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(option, f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _tolerations(values: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for item in values:
        try:
            parsed = load_json(item, "--toleration")  # bounded: depth, 64-bit integers
        except ValueError as exc:
            raise ConfigError("--toleration", f"not valid JSON: {json_problem(exc)}") from None
        if not isinstance(parsed, dict):
            raise ConfigError("--toleration", 'must be a JSON object, e.g. {"key":"k","operator":"Exists"}')
        out.append(parsed)
    return out


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
    kind = check_target(target, "--target")
    if kind == "configmaps" and command:
        click.echo(
            "warning: --target configmaps renders no job, so the command after -- is not used; "
            "put it in your pod template after optimenv-bootstrap (docs/targets.md)",
            err=True,
        )
    cfg = read_config(config)
    kwargs.update(config_topology(cfg, kwargs))  # an accelerate config file's num_processes
    topology = topology_from(kwargs)
    pod = {
        "service_account": service_account,
        "node_selector": _pairs("--node-selector", node_selector),
        "tolerations": _tolerations(toleration),
        "runtime": runtime,
    }
    job: Target | JobSpec = kind
    if kind != "configmaps" and image is not None:
        job = parse_model(JobSpec, {"target": kind, "image": image, "command": list(command), **pod})
    result = _compile(cfg, topology, job, name, namespace, _pairs("--label", label), spec_policy, kwargs)
    if kind == "rayjob" and cfg.resources_per_worker.get("GPU", 1.0) != 1.0:
        click.echo("warning: resources_per_worker: each Ray Train worker gets one GPU here", err=True)
    click.echo(result.to_yaml() if output == "yaml" else result.to_json(), nl=False)
    for warning in result.plan.warnings:
        click.echo(f"warning: {warning}", err=True)


def _compile(
    cfg: TrainingConfig,
    topology: Topology,
    job: Target | JobSpec,
    name: str,
    namespace: str,
    labels: dict[str, str],
    policy: Any,
    kwargs: dict[str, Any],
) -> Job:
    """``compile()``; a size mismatch on the default 1 x 1 job names the options that set its size."""
    try:
        return compile(
            cfg,
            topology,
            job,
            name=name,
            namespace=namespace,
            labels=labels,
            policy=policy,
            deepspeed_path=kwargs["deepspeed_path"],
        )
    except ProcessCountError as exc:
        if topology.nodes is not None or topology.gpus_per_node is not None:
            raise
        raise ProcessCountError(
            exc.field,
            exc.reason,
            f"the job defaults to 1 node x 1 GPU: give its size with --nodes and --gpus-per-node, "
            f"whose product must be {exc.product}; or {exc.hint}",
            product=exc.product,
            world=exc.world,
        ) from None
