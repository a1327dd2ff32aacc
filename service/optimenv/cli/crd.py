"""``optimenv crd``: the OptimEnv CustomResourceDefinition the controller needs."""

from __future__ import annotations

import click

from optimenv.resource import crd_yaml


@click.command(name="crd")
def crd_command() -> None:
    """Print the OptimEnv CustomResourceDefinition as YAML (kubectl apply --server-side -f -)."""
    click.echo(crd_yaml(), nl=False)
