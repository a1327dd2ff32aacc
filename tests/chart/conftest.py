"""Render the optimenv chart with the real Helm engine (helm-python-sdk), no cluster, no helm binary."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python as helm
import pytest
import yaml

RELEASE_NAMESPACE = "optimenv-system"
Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def chart_dir(repo: Path) -> Path:
    return repo / "helm" / "optimenv"


@pytest.fixture(scope="session")
def generator(repo: Path) -> ModuleType:
    """helm/generate.py: the HelmValues model and the generated-file writer."""
    spec = importlib.util.spec_from_file_location("optimenv_helm_generate", repo / "helm" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def chart(chart_dir: Path) -> Any:
    return helm.Chart.load(chart_dir)


@pytest.fixture(scope="session")
def render_raw(chart: Any) -> Callable[..., dict[str, str]]:
    def _render(values: dict[str, Any] | None = None, name: str = "optimenv") -> dict[str, str]:
        rendered: dict[str, str] = chart.render(values or {}, name=name, namespace=RELEASE_NAMESPACE)
        return rendered

    return _render


@pytest.fixture(scope="session")
def render(render_raw: Callable[..., dict[str, str]]) -> Render:
    """Every object the chart renders for ``values``, in template order."""

    def _render(values: dict[str, Any] | None = None, name: str = "optimenv") -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = []
        for path, text in sorted(render_raw(values, name).items()):
            if path.endswith(".txt"):
                continue
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
        return objects

    return _render
