"""Golden files: every example config x every target, byte for byte, and each object valid.

Regenerate after an intended change with ``OPTIMENV_UPDATE_GOLDEN=1 pytest tests/render``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from optimenv.cli import main
from optimenv.compiler import compile
from optimenv.workload import TARGETS, JobSpec, Target, Topology
from tests.render.conftest import EXAMPLES, GOLDEN, REPO, config_of
from tests.render.validators import Validator

UPDATE = os.environ.get("OPTIMENV_UPDATE_GOLDEN") == "1"
EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.yaml"))
MANIFESTS = REPO / "manifests" / "examples"
# The user-facing examples: FSDP2, HSDP and ZeRO-3 on 2 nodes x 4 GPUs, for each target.
MANIFEST_EXAMPLES = ("fsdp2-gpu", "parallel-gpu", "zero3-gpu")
# HSDP 2x2 needs exactly 4 processes (C28): 2 nodes x 2 GPUs.
TOPOLOGY = {"parallel-gpu": (2, 2)}


def _topology(example: str) -> tuple[int, int]:
    return TOPOLOGY.get(example, (2, 4))


def _job(example: str, target: Target) -> Target | JobSpec:
    if target == "configmaps":
        return target
    return JobSpec(
        target=target,
        image="registry.example.com/train:1.0",
        command=["python", "train.py", "--config", "/workspace/config.yaml"],
        service_account="trainer",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )


def _compare(path: Path, text: str) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"{path} missing; run with OPTIMENV_UPDATE_GOLDEN=1"
    assert path.read_text(encoding="utf-8") == text, f"{path} drifted; rerun with OPTIMENV_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_golden(example: str, validator: Validator) -> None:
    nodes, gpus = _topology(example)
    for target in TARGETS:
        job = compile(
            config_of(example),
            Topology(nodes=nodes, gpus_per_node=gpus),
            _job(example, target),
            name=f"ft-{example}",
            namespace="ml",
            labels={"team": "research"},
        )
        validator.validate_all(job.manifests())
        _compare(GOLDEN / example / f"{target}.yaml", job.to_yaml())


def test_golden_has_no_strays() -> None:
    expected = {GOLDEN / e / f"{t}.yaml" for e in EXAMPLE_NAMES for t in TARGETS}
    assert set(GOLDEN.glob("*/*.yaml")) == expected


@pytest.mark.parametrize("example", MANIFEST_EXAMPLES)
def test_manifests_examples_match_the_cli(
    example: str, validator: Validator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``manifests/examples`` is exactly what the documented CLI line prints."""
    monkeypatch.chdir(REPO)
    nodes, gpus = _topology(example)
    for target in TARGETS:
        argv = [
            "render",
            f"examples/{example}.yaml",
            "--target",
            target,
            "--name",
            example,
            "--nodes",
            str(nodes),
            "--gpus-per-node",
            str(gpus),
        ]
        if target != "configmaps":
            argv += ["--image", "ghcr.io/example/train:latest", "--", "python", "train.py"]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        out = capsys.readouterr().out
        assert exit_info.value.code == 0, out
        validator.validate_all(list(yaml.safe_load_all(out)))
        _compare(MANIFESTS / f"{example}.{target}.yaml", out)
