"""The pieces of ``optimenv run`` / ``ray-launch`` that need no Ray: refusals, failure text, the report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from optimenv.bootstrap.ray import LaunchError, MetricsRecord, WorkerReport, check_capacity
from optimenv.config import parse_config
from optimenv.errors import OptimEnvError
from optimenv.local_run import Timings, build_report, format_report, loss_summary, report_text
from optimenv.plan import Hardware, plan


@pytest.mark.parametrize(
    ("workers", "use_gpu", "resources", "message"),
    [
        (
            3,
            False,
            {"CPU": 2.0},
            "workers: 3 CPU workers need 3 CPUs (one each), but the Ray cluster has 2; "
            "use --workers 2 or fewer, or join a larger cluster ($RAY_ADDRESS)",
        ),
        (
            4,
            True,
            {"CPU": 16.0, "GPU": 2.0},
            "workers: 4 GPU workers need 4 GPUs (one each), but the Ray cluster has 2; "
            "use --workers 2 or fewer, or train on CPU workers (--cpu)",
        ),
        (
            1,
            True,
            {"CPU": 2.0},
            "workers: 1 GPU workers need 1 GPUs (one each), but the Ray cluster has 0; "
            "or train on CPU workers (--cpu)",
        ),
    ],
)
def test_more_workers_than_the_cluster_can_place_are_refused(
    workers: int, use_gpu: bool, resources: dict[str, float], message: str
) -> None:
    with pytest.raises(OptimEnvError) as caught:
        check_capacity(workers, use_gpu, resources)
    assert str(caught.value) == message


def test_workers_that_fit_pass() -> None:
    check_capacity(2, False, {"CPU": 2.0})
    check_capacity(8, True, {"CPU": 1.0, "GPU": 8.0})


def _report(
    rank: int, code: int, error: str | None, node: int = 0, losses: tuple[float, ...] = ()
) -> WorkerReport:
    metrics = tuple(MetricsRecord(rank, step, {"loss": loss}, 0.0) for step, loss in enumerate(losses))
    return WorkerReport(rank, rank, 2, node, code, None, None, metrics, error, finished_at=1.0 + rank)


def test_the_first_failure_is_shown_whole_and_later_ones_in_a_line() -> None:
    error = LaunchError(
        "worker 0 failed first (exit 1)",
        [
            _report(0, 1, "Traceback ...\nValueError: boom"),
            _report(1, 1, "Traceback ...\nValueError: boom"),
            _report(2, 1, "Traceback ...\n  File x\nRuntimeError: Connection closed by peer\n"),
            _report(3, 0, None),
        ],
        1,
    )
    # Workers 0 and 1 failed alike, first: one section; worker 2 broke after them (a torn collective).
    assert error.failure_lines() == [
        "--- workers 0, 1 (exit 1) ---",
        "Traceback ...",
        "ValueError: boom",
        "--- worker 2 (exit 1), after workers 0, 1: RuntimeError: Connection closed by peer",
    ]
    # Ranks that failed alike are listed in rank order, whichever finished first.
    alike = [dataclasses.replace(_report(0, 1, "boom"), finished_at=5.0), _report(1, 1, "boom")]
    assert LaunchError("", alike, 1).failure_lines()[0] == "--- workers 0, 1 (exit 1) ---"
    # Ordered by when each failed, not by rank: the cause comes first.
    later = [
        dataclasses.replace(_report(0, 1, "Traceback ...\nRuntimeError: peer gone"), finished_at=9.0),
        _report(1, 3, "the script exited with 3"),
    ]
    assert LaunchError("", later, 3).failure_lines()[0] == "--- worker 1 (exit 3) ---"


def test_loss_summary_first_last_and_change() -> None:
    assert loss_summary([5.0, "nan?", 4.0, 2.5]) == {"first": 5.0, "last": 2.5, "change": -0.5, "steps": 3}
    assert loss_summary([None, "x"]) is None


def test_the_report_shows_nodes_and_the_loss_trend() -> None:
    config = parse_config({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}})
    result = plan(config, Hardware(nodes=2, gpus_per_node=1))
    reports = [_report(rank, 0, None, node=rank, losses=(5.5, 2.75)) for rank in (0, 1)]
    report = build_report(result, reports, Timings(), use_gpu=False)
    assert [(w["node_rank"], w["nodes"]) for w in report["workers"]] == [(0, 2), (1, 2)]
    text = report_text(report)
    # Alike but for their ranks: one section.
    assert text.splitlines()[0] == "ranks 0, 1 (nodes 0, 1 of 2):"
    assert text.count("  loss       5.5000 -> 2.7500 (-50.0%) over 2 steps") == 1
    reports[1] = _report(1, 0, None, node=1, losses=(5.5, 3.0))
    text = report_text(build_report(result, reports, Timings(), use_gpu=False))
    assert "rank 0 (node 0 of 2):" in text and "rank 1 (node 1 of 2):" in text


def test_the_report_reads_the_same_as_json_and_yaml() -> None:
    config = parse_config({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}})
    result = plan(config, Hardware(nodes=1, gpus_per_node=2))
    reports = [_report(rank, 0, None, losses=(5.5, 2.75)) for rank in (0, 1)]
    report = build_report(result, reports, Timings(), use_gpu=False)
    as_json = json.loads(format_report(report, "json"))
    assert as_json["workers"][1]["rank"] == 1
    assert yaml.safe_load(format_report(report, "yaml")) == as_json
    assert format_report(report, "text") == report_text(report)
