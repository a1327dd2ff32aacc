"""The job's lifecycle in ``status.job``: each operator's recorded status bodies (job_statuses.yaml),
their phases, and what the controller sends when the job operator writes them.

The wire tests run the real operator against kmock, write each recorded status into the job's
``/status`` as its operator would (the whole status replaced), and read back what the controller
sent: one status patch with the new ``status.job``, one Event per phase change, nothing else.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import kmock as km
import pytest
import yaml

from optimenv.resource import JobStatus
from optimenv_controller import lifecycle
from optimenv_controller import reconcile as rc
from tests.controller.apiserver import ApiServer, eventually, settle
from tests.controller.conftest import NS, optimenv
from tests.controller.harness import running_operator
from tests.controller.test_wire import OE, OE_PATH, events, ready, status_writes, user_patch
from tests.render.validators import Validator

STEPS: dict[str, list[dict[str, Any]]] = yaml.safe_load(
    (pathlib.Path(__file__).parent / "job_statuses.yaml").read_text()
)
JOB = {"image": "registry.example/train:1", "command": ["python", "train.py"]}
TARGETS = {"RayJob": "rayjob", "PyTorchJob": "pytorchjob", "TrainJob": "trainjob"}
CASES = [(kind, step) for kind, steps in STEPS.items() for step in steps]


def rendered_job(kind: str) -> dict[str, Any]:
    """The job the controller renders for ``demo`` with this target, as the API server stores it."""
    obj = optimenv(job={"target": TARGETS[kind], **JOB})
    obj["metadata"].update(uid="uid-1", generation=1)
    want = rc.desired(obj)
    assert isinstance(want, rc.Desired)
    job = rc.job_child(want)
    assert job is not None
    job["metadata"]["creationTimestamp"] = "2026-11-25T09:59:58Z"
    return job


def expected(step: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """The step's phase, reason and times (and message, where the step names one)."""
    want = {"startTime": None, "completionTime": None, **step["expect"]}
    if want["startTime"] == "creationTimestamp":
        want["startTime"] = job["metadata"]["creationTimestamp"]
    return want


def replacing(old: Any, new: Any) -> Any:
    """A merge patch that turns ``old`` into ``new`` (what an operator's status update does)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        patch[key] = replacing(old.get(key), value)
    return patch


@pytest.mark.parametrize(("kind", "step"), CASES, ids=[f"{k}-{s['as']}" for k, s in CASES])
def test_recorded_status_is_valid_for_its_crd_and_maps_to_its_phase(
    shared: pathlib.Path, kind: str, step: dict[str, Any]
) -> None:
    job = rendered_job(kind)
    if step["status"]:
        job["status"] = copy.deepcopy(step["status"])
    checked = {k: v for k, v in job.items() if k != "metadata"}
    checked["metadata"] = {k: job["metadata"][k] for k in ("name", "namespace", "labels", "annotations")}
    Validator(shared).validate(checked)  # the upstream CRD, strict: a status field it lacks fails
    state = lifecycle.job_state(job)
    found = {
        "phase": state.phase,
        "reason": state.reason,
        "message": state.message,
        "startTime": state.start_time,
        "completionTime": state.completion_time,
    }
    want = expected(step, job)
    assert {k: found[k] for k in want} == want


def test_every_phase_is_recorded_for_some_operator() -> None:
    phases = {step["expect"]["phase"] for _, step in CASES}
    assert phases == {"Pending", "Running", "Succeeded", "Failed", "Stopped"}


def test_job_rules() -> None:
    job = rendered_job("PyTorchJob")
    running = {**job, "status": STEPS["PyTorchJob"][2]["status"]}
    done = {**job, "status": STEPS["PyTorchJob"][5]["status"]}
    record = JobStatus(
        kind="PyTorchJob", name="demo", uid="j-1", phase="Pending", reason="", observedGeneration=3
    )

    def as_(phase: str, **update: Any) -> JobStatus:
        return record.model_copy(update={"phase": phase, **update})

    # An existing job: brought in line while it runs, left alone once it no longer does.
    assert lifecycle.job_action(None, running, 3) == "apply"
    assert lifecycle.job_action(as_("Running"), done, 3) == "leave"
    # An absent job: created the first time, or when a create never landed (no uid recorded).
    assert lifecycle.job_action(None, None, 1) == "create"
    assert lifecycle.job_action(as_("Pending", uid=None), None, 3) == "create"
    # Finished: never again, whatever the generation.
    for phase in ("Succeeded", "Failed"):
        assert lifecycle.job_action(as_(phase), None, 99) == "leave"
    # Deleted before it finished: only a newer generation brings it back.
    for phase in ("Pending", "Running", "Stopped"):
        assert lifecycle.job_action(as_(phase), None, 3) == "leave"
        assert lifecycle.job_action(as_(phase), None, 4) == "create"
    stopped = lifecycle.job_record(None, as_("Running", reason="PyTorchJobRunning"), 3)
    assert stopped is not None
    assert (stopped.phase, stopped.reason, stopped.uid) == ("Stopped", "JobDeleted", "j-1")
    assert lifecycle.job_record(None, stopped, 3) == stopped  # recorded once, then kept as it is
    finished = as_("Succeeded", reason="PyTorchJobSucceeded")
    assert lifecycle.job_record(None, finished, 7) == finished
    assert lifecycle.job_record(None, None, 1) is None


def job_path(kind: str) -> tuple[str, str]:
    group, version, plural = rc.JOB_RESOURCES[TARGETS[kind]]
    return f"{group}/{version}/{plural}", f"/apis/{group}/{version}/namespaces/{NS}/{plural}/demo"


def job_record(api: ApiServer) -> dict[str, Any]:
    obj = api.obj(OE, NS, "demo") or {}
    record: dict[str, Any] = (obj.get("status") or {}).get("job") or {}
    return record


@pytest.mark.parametrize("kind", sorted(STEPS))
@pytest.mark.timeout(90)
async def test_job_phase_follows_its_operator(kmock: ApiServer, kind: str) -> None:
    resource, path = job_path(kind)
    kmock.put_object(OE, optimenv(job={"target": TARGETS[kind], **JOB}))
    async with running_operator(str(kmock.url), job_kinds=(TARGETS[kind],)):
        await eventually(lambda: ready(kmock) and job_record(kmock).get("phase") == "Pending")
        await settle(kmock)
        job = kmock.obj(resource, NS, "demo")
        assert job is not None
        first = job_record(kmock)
        assert (first["kind"], first["name"], first["uid"]) == (kind, "demo", job["metadata"]["uid"])
        previous = first
        for step in STEPS[kind][1:]:
            mark = kmock.count
            old = (kmock.obj(resource, NS, "demo") or {}).get("status") or {}
            await user_patch(kmock, f"{path}/status", {"status": replacing(old, step["status"])})
            want = expected(step, {**job, "metadata": (kmock.obj(resource, NS, "demo") or {})["metadata"]})
            await eventually(lambda w=want: all(job_record(kmock).get(k) == v for k, v in w.items()))
            await settle(kmock)
            stored = kmock.obj(resource, NS, "demo")
            assert stored is not None
            previous = _check_wire(kmock, mark, stored, step, want, previous)


def _check_wire(
    api: ApiServer,
    mark: int,
    job: dict[str, Any],
    step: dict[str, Any],
    want: dict[str, Any],
    old: dict[str, Any],
) -> dict[str, Any]:
    """One status patch carrying the new entry, one Event if the phase moved, nothing else."""
    kind = job["kind"]
    writes = api.writes(since=mark)
    (patch,) = status_writes(writes)
    assert patch.url.path == f"{OE_PATH}/demo/status"
    assert patch.headers["Content-Type"] == "application/merge-patch+json"
    assert patch.params["fieldManager"] == "optimenv"
    sent = patch.data["status"]["job"]
    message = lifecycle.job_state(job).message
    assert sent == {**old, "message": message, **want, "observedGeneration": 1}, step["as"]
    said = events(writes)
    if sent["phase"] == old["phase"]:
        assert said == [], step["as"]
    else:
        (event,) = said
        assert event.data["reason"] == f"Job{sent['phase']}"
        assert event.data["type"] == ("Warning" if sent["phase"] in ("Failed", "Stopped") else "Normal")
        assert event.data["message"].startswith(f"{kind} demo is {sent['phase']} ({sent['reason']})")
    assert [r for r in writes if r is not patch and r not in said] == []  # no apply: status is not drift
    assert [r for r in list(api)[mark:] if r.action == km.action.FETCH] == []
    return dict(sent)
