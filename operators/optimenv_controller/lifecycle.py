"""The owned job's lifecycle: each operator's own status mapped onto one phase, and the job rules.

Pure functions of the job as read from the API server (no I/O). The phases:

* ``Pending``: created, not running yet (queued, suspended, cluster starting, retrying);
* ``Running``: the operator reports the training running;
* ``Succeeded`` / ``Failed``: finished; a finished job is never written to or re-created;
* ``Stopped``: stopped before it finished (a RayJob stopped through Ray, or the job deleted while it
  ran: reason ``JobDeleted``; the controller re-creates it only for a new generation of the
  ``OptimEnv``).

Where each rule comes from (the operators' sources at the versions the renderers target):

* RayJob, KubeRay v1.7.0: ``ray-operator/apis/ray/v1/rayjob_types.go`` (``JobStatus`` PENDING,
  RUNNING, STOPPED, SUCCEEDED, FAILED; ``JobDeploymentStatus`` Initializing, Running, Complete,
  Failed, ValidationFailed, Suspending, Suspended, Retrying, Waiting; terminal deployment states
  Complete and Failed) and ``controllers/ray/rayjob_controller.go`` (a Ray job in a terminal state
  turns the deployment ``Complete``, or ``Failed`` with reason ``AppFailed`` when the Ray job
  FAILED; ``Retrying`` while ``backoffLimit`` allows another attempt on a new cluster;
  ``status.startTime`` is set on Initializing, ``status.endTime`` on Complete/Failed).
* PyTorchJob, Kubeflow Training Operator v1.9: ``pkg/apis/kubeflow.org/v1/common_types.go``
  (``JobCondition`` types Created, Running, Restarting, Succeeded, Suspended, Failed;
  ``status.startTime``, ``status.completionTime``) and ``pkg/util/status.go`` (a condition holds
  when its status is "True"; a Failed job takes no further condition; Running and Restarting
  replace each other, and Running turns False when the job succeeds or fails).
* TrainJob, Kubeflow Trainer v2.3: ``pkg/apis/trainer/v1alpha1/trainjob_types.go`` (condition
  types Suspended, Complete, Failed, reasons Suspended, Resumed, DeadlineExceeded …; ``jobsStatus``
  per child Job with ``ready`` and ``active`` counts), ``pkg/runtime/framework/plugins/jobset``
  (Complete and Failed are the JobSet's Completed and Failed conditions, copied) and
  ``pkg/controller/trainjob_controller.go`` (the job's start, for its deadline, is its creation or
  the moment it was resumed). A TrainJob has no start or completion time fields: the start is
  taken as the operator takes it, the completion from the terminal condition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from optimenv.resource import JobStatus, clip, max_length

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Stopped"]
#: Finished: never written to, never re-created.
FINISHED: frozenset[str] = frozenset({"Succeeded", "Failed"})
#: Not running any more: an existing job in one of these phases is left as it is.
TERMINAL: frozenset[str] = FINISHED | {"Stopped"}
JOB_DELETED = "JobDeleted"
#: The CRD's limits on the entry's text (an operator's message can be long, and would fail the write).
JOB_MESSAGE_MAX = max_length(JobStatus, "message")
JOB_REASON_MAX = max_length(JobStatus, "reason")


@dataclass(frozen=True)
class JobState:
    """One job's phase as its operator reports it."""

    phase: Phase
    reason: str
    message: str = ""
    start_time: str | None = None
    completion_time: str | None = None


def job_state(job: Mapping[str, Any]) -> JobState:
    """The phase of a RayJob, PyTorchJob or TrainJob from its own ``status``."""
    status = job.get("status")
    status = status if isinstance(status, Mapping) else {}
    mapper = _MAPPERS.get(str(job.get("kind")))
    if mapper is None:
        raise ValueError(f"not a job kind the controller owns: {job.get('kind')!r}")
    return mapper(status, job)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _time(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# -- RayJob ----------------------------------------------------------------------------------------
_RAY_PENDING = {"Initializing", "Waiting", "Scheduling", "Scheduled", "Retrying"}


def _rayjob(status: Mapping[str, Any], job: Mapping[str, Any]) -> JobState:
    deployment, ray = _text(status.get("jobDeploymentStatus")), _text(status.get("jobStatus"))
    message, reason = _text(status.get("message")), _text(status.get("reason"))
    start, end = _time(status.get("startTime")), _time(status.get("endTime"))
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and ray == "FAILED"):
        return JobState("Failed", reason or deployment, message, start, end)
    if deployment == "Complete":
        if ray == "STOPPED":
            return JobState("Stopped", "RayJobStopped", message, start, end)
        return JobState("Succeeded", "Complete", message, start, end)
    if deployment in ("Suspending", "Suspended"):
        return JobState("Pending", "Suspended", message, start)
    if deployment == "Running" and ray == "RUNNING":
        return JobState("Running", "Running", message, start)
    if deployment == "Running" or deployment in _RAY_PENDING:
        # Running with the Ray job PENDING (or not submitted yet): the driver has not started.
        return JobState("Pending", deployment if deployment != "Running" else "Submitted", message, start)
    return JobState("Pending", "Created", message, start)


# -- PyTorchJob ------------------------------------------------------------------------------------
# Condition type → phase, in precedence order (a Failed job takes no further condition).
_PT_FINISHED: tuple[tuple[str, Phase], ...] = (("Failed", "Failed"), ("Succeeded", "Succeeded"))
_PT_ACTIVE: tuple[tuple[str, Phase], ...] = (
    ("Suspended", "Pending"),
    ("Restarting", "Running"),
    ("Running", "Running"),
)


def _pytorchjob(status: Mapping[str, Any], job: Mapping[str, Any]) -> JobState:
    true: dict[str, Mapping[str, Any]] = {}
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("status") == "True":
            true[str(cond.get("type"))] = cond
    start = _time(status.get("startTime"))
    for kind, phase in _PT_FINISHED:
        if kind in true:
            cond = true[kind]
            done = _time(status.get("completionTime")) or _time(cond.get("lastTransitionTime"))
            return JobState(phase, _text(cond.get("reason")) or kind, _text(cond.get("message")), start, done)
    for kind, phase in _PT_ACTIVE:
        if kind in true:
            cond = true[kind]
            return JobState(phase, _text(cond.get("reason")) or kind, _text(cond.get("message")), start)
    created = true.get("Created") or {}
    return JobState(
        "Pending", _text(created.get("reason")) or "Created", _text(created.get("message")), start
    )


# -- TrainJob --------------------------------------------------------------------------------------
_TJ_FINISHED: tuple[tuple[str, Phase], ...] = (("Failed", "Failed"), ("Complete", "Succeeded"))


def _trainjob(status: Mapping[str, Any], job: Mapping[str, Any]) -> JobState:
    conds = {str(c.get("type")): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}
    suspended = conds.get("Suspended") or {}
    resumed = suspended.get("status") == "False" and _time(suspended.get("lastTransitionTime"))
    start = resumed or _time((job.get("metadata") or {}).get("creationTimestamp"))
    for kind, phase in _TJ_FINISHED:
        cond = conds.get(kind) or {}
        if cond.get("status") == "True":
            done = _time(cond.get("lastTransitionTime"))
            return JobState(phase, _text(cond.get("reason")) or kind, _text(cond.get("message")), start, done)
    if suspended.get("status") == "True":
        reason = _text(suspended.get("reason")) or "Suspended"
        return JobState("Pending", reason, _text(suspended.get("message")))
    jobs = [j for j in status.get("jobsStatus") or [] if isinstance(j, Mapping)]
    ready = [str(j.get("name")) for j in jobs if _count(j.get("ready")) > 0]
    if ready:
        return JobState("Running", "JobsReady", f"ready: {', '.join(ready)}", start)
    if any(_count(j.get("active")) > 0 for j in jobs):
        return JobState("Pending", "JobsStarting", "", start)
    return JobState("Pending", "Created", "", start)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


_MAPPERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], JobState]] = {
    "RayJob": _rayjob,
    "PyTorchJob": _pytorchjob,
    "TrainJob": _trainjob,
}


# -- the rules ---------------------------------------------------------------------------------
Action = Literal["create", "apply", "leave"]


def job_action(record: JobStatus | None, have: Mapping[str, Any] | None, generation: int) -> Action:
    """What the controller may do with its job: ``record`` is ``status.job`` for this very job.

    A finished job is never re-created; one deleted before it finished is re-created only for a
    newer generation than the one it was deleted at. An existing job that no longer runs is left.
    """
    if have is not None:
        return "leave" if job_state(have).phase in TERMINAL else "apply"
    if record is None or not record.uid:
        return "create"  # never seen: first run, or a create that never landed
    if record.phase in FINISHED:
        return "leave"
    seen = record.observedGeneration
    return "create" if seen is not None and generation > seen else "leave"


def job_record(job: Mapping[str, Any] | None, old: JobStatus | None, generation: int) -> JobStatus | None:
    """The ``status.job`` entry after a reconcile: ``job`` as observed (None: absent), ``old`` before.

    ``old`` must describe the same job kind and name (else pass None).
    """
    if job is not None:
        state = job_state(job)
        return JobStatus(
            kind=job["kind"],
            name=job["metadata"]["name"],
            uid=job["metadata"].get("uid"),
            phase=state.phase,
            reason=clip(state.reason, JOB_REASON_MAX),
            message=clip(state.message, JOB_MESSAGE_MAX),
            startTime=state.start_time,
            completionTime=state.completion_time,
            observedGeneration=generation,
        )
    if old is None or not old.uid:
        return None  # nothing was ever there
    if old.phase in FINISHED or old.reason == JOB_DELETED:
        return old  # the record stays as it was (gone after it finished, or already stopped)
    message = (
        f"{old.kind} {old.name} was deleted while {old.phase}; change the OptimEnv's spec (a new "
        "generation) to start it again"
    )
    stopped = {"phase": "Stopped", "reason": JOB_DELETED, "message": message}
    return old.model_copy(update={**stopped, "observedGeneration": generation})


EventType = Literal["Normal", "Warning"]


def transition(old: JobStatus | None, new: JobStatus | None) -> tuple[EventType, str, str] | None:
    """The Event (type, reason, message) for a phase change of the job, or None."""
    if new is None:
        return None
    if old is not None and (old.uid, old.phase) == (new.uid, new.phase):
        return None
    event_reason = JOB_DELETED if new.reason == JOB_DELETED else f"Job{new.phase}"
    kind: EventType = "Warning" if new.phase in ("Failed", "Stopped") else "Normal"
    detail = f": {new.message}" if new.message else ""
    return kind, event_reason, f"{new.kind} {new.name} is {new.phase} ({new.reason}){detail}"
