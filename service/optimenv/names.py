"""Kubernetes names, labels and namespaces: what the API server accepts, checked before rendering.

Every pattern is matched whole (``fullmatch``): ``$`` would also accept a trailing newline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from optimenv.errors import ConfigError, shown
from optimenv.limits import key_text

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LABEL_KEY_HINT = "[prefix/]name, name at most 63 of [-A-Za-z0-9_.]"
LABEL_VALUE_HINT = "at most 63 of [-A-Za-z0-9_.]"


def is_label(value: str, pattern: re.Pattern[str] = DNS1123_LABEL) -> bool:
    return isinstance(value, str) and len(value) <= 63 and bool(pattern.fullmatch(value))


def is_subdomain(value: str) -> bool:
    return isinstance(value, str) and len(value) <= 253 and bool(_DNS1123_SUBDOMAIN.fullmatch(value))


def is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return (not prefix or is_subdomain(prefix)) and len(name) <= 63 and bool(_LABEL_NAME.fullmatch(name))


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_VALUE.fullmatch(value))


def check_namespace(namespace: Any) -> str:
    if not isinstance(namespace, str) or not is_label(namespace):
        raise ConfigError(
            "namespace",
            f"{shown(namespace)} is not a DNS-1123 label",
            "lowercase letters, digits and '-', at most 63 characters",
        )
    return namespace


def check_labels(where: str, labels: Any) -> dict[str, str]:
    """``labels`` as a plain dict, every key and value one the API server accepts."""
    if not isinstance(labels, Mapping):
        raise ConfigError(where, f"must be a mapping of strings, got {type(labels).__name__}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(where, f"keys and values must be strings, got {shown(key)}: {shown(value)}")
        if not is_label_key(key):
            raise ConfigError(f"{where}.{key_text(key)}", "is not a valid label key", LABEL_KEY_HINT)
        if not is_label_value(value):
            raise ConfigError(
                f"{where}.{key_text(key)}", f"{shown(value)} is not a valid label value", LABEL_VALUE_HINT
            )
    return dict(labels)
