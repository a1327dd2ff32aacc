"""Validate custom objects against a CRD's openAPIV3Schema the way ``fieldValidation=Strict`` would.

A plain JSON-Schema check of a CRD schema ignores unknown fields (the API server prunes them); this
one treats every object that lists ``properties`` and does not preserve unknown fields as closed,
and maps OpenAPI's ``nullable`` onto JSON Schema. CEL rules are not evaluated (no Kubernetes CEL
library offline); tests cover them through :func:`optimenv.resource.parse_spec`.
"""

from __future__ import annotations

from typing import Any

import jsonschema


def to_strict_jsonschema(node: Any) -> Any:
    if isinstance(node, list):
        return [to_strict_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_strict_jsonschema(value) for key, value in node.items() if key != "properties"}
    if "properties" in node:
        out["properties"] = {name: to_strict_jsonschema(sub) for name, sub in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            out["additionalProperties"] = False
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


def strict_validator(crd: dict[str, Any], version: str) -> jsonschema.Draft7Validator:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = to_strict_jsonschema(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)
