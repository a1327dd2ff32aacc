"""Names and labels are matched whole: a trailing newline (``$`` accepts one) is refused (issue 20)."""

from __future__ import annotations

from typing import Any

import pytest

from optimenv.cli import main
from optimenv.errors import ConfigError
from optimenv.validation import parse_model
from optimenv.workload import JobSpec
from tests.render.conftest import EXAMPLES, compiled

BASE: dict[str, Any] = {"target": "pytorchjob", "image": "img:1", "command": ["python", "train.py"]}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"service_account": "trainer\n"}, "service_account"),
        ({"runtime": "torch-distributed\n"}, "runtime"),
        ({"labels": {"team": "nlp\n"}}, "labels.team"),
        ({"labels": {"team\n": "nlp"}}, "labels.'team\\n'"),
        ({"node_selector": {"pool": "h100\n"}}, "node_selector.pool"),
        ({"node_selector": {"example.com\n/pool": "h100"}}, "node_selector.'example.com\\n/pool'"),
        ({"image": "img:1\nEVIL=1"}, "image"),
        ({"image": "img:\x1b[31m1"}, "image"),
    ],
)
def test_job_specs_refuse_a_trailing_newline(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_model(JobSpec, {**BASE, **overrides})
    assert raised.value.field == field
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"namespace": "ml\n"}, "namespace"), ({"labels": {"team": "nlp\n"}}, "labels.team")],
)
def test_object_metadata_refuses_a_trailing_newline(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        compiled("zero3-gpu", "configmaps", nodes=1, gpus=1, **overrides)
    assert raised.value.field == field
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("target", ["configmaps", "rayjob", "pytorchjob", "trainjob"])
def test_object_name_with_a_trailing_newline_is_refused(target: str) -> None:
    with pytest.raises(ConfigError) as raised:
        compiled("zero3-gpu", target, nodes=1, gpus=1, name="ft\n")
    assert raised.value.field == "name"
    assert str(raised.value).startswith("name: 'ft\\n' is not a DNS-")


def test_a_long_label_value_is_clipped_in_the_message() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_model(JobSpec, {**BASE, "labels": {"team": "x" * 100_000}})
    assert len(str(raised.value)) < 200


def test_cli_name_with_a_newline_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["render", str(EXAMPLES / "zero3-gpu.yaml"), "--target", "configmaps", "--name", "ft\n"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert (info.value.code, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("error: name: 'ft\\n' is not a DNS-1123 label")


def test_toleration_with_a_5000_digit_number_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    toleration = '{"key": "gpu", "operator": "Exists", "tolerationSeconds": ' + "9" * 5000 + "}"
    argv = [
        "render",
        str(EXAMPLES / "zero3-gpu.yaml"),
        "--target",
        "configmaps",
        "--name",
        "ft",
        "--toleration",
        toleration,
    ]
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert (info.value.code, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("error: --toleration.tolerationSeconds: "), err[:300]
