"""The rendered objects as text: multi-document YAML (``kubectl apply -f -``) or a ``v1`` ``List``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import yaml
from yaml.representer import SafeRepresenter

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


def to_yaml(objects: Sequence[Mapping[str, object]]) -> str:
    """Multi-document YAML, keys in the order the renderer built them."""
    return yaml.dump_all(
        objects, Dumper=_Dumper, sort_keys=False, explicit_start=True, allow_unicode=True, width=100
    )


def to_json(objects: Sequence[Mapping[str, object]]) -> str:
    """One ``v1`` ``List``, as ``kubectl get -o json`` prints several objects."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": objects}, indent=2) + "\n"
