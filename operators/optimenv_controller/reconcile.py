"""The reconciler's decisions, as pure functions of what was observed.

``desired(obj, config_text)`` turns an ``OptimEnv`` (a dict, as read from the API server) into the
children it should own; ``decide(...)`` compares them with the observed children and returns the
writes, the status and the Events. Nothing here does I/O, so every branch is testable without a
server, and a reconcile where nothing changed returns no writes at all.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ValidationError

from optimenv.compiler import compile
from optimenv.config import TrainingConfig, parse_config, parse_yaml
from optimenv.deepspeed import PRESETS
from optimenv.errors import ConfigError, OptimEnvError, shown
from optimenv.limits import check_data
from optimenv.render import CONTENT_HASH_ANNOTATION
from optimenv.resource import (
    API_VERSION,
    KIND,
    Condition,
    ConditionStatus,
    JobStatus,
    OptimEnvSpec,
    OptimEnvStatus,
    PlanSummary,
    clip,
    max_length,
    parse_spec,
)
from optimenv.spec import content_hash
from optimenv.workload import JOB_KINDS as JOB_TARGET_KINDS
from optimenv_controller import lifecycle

FIELD_MANAGER = "optimenv"
MANAGED_BY = "app.kubernetes.io/managed-by"
NAME_LABEL = "optimenv.dev/name"
#: The CRD's maxLength of a condition message (a longer one would make the whole status write fail).
MESSAGE_MAX = max_length(Condition, "message")

#: An Event's message limit (the API server's); longer ones are cut.
EVENT_MAX = 1024
ChildKey = tuple[str, str, str]  # (apiVersion, kind, name)

#: The job kinds whose owned objects the controller can watch (``--job-kind``): (group, version, plural).
JOB_RESOURCES: dict[str, tuple[str, str, str]] = {
    target: (kind.group, kind.version, kind.plural) for target, kind in JOB_TARGET_KINDS.items()
}
#: The same kinds as (apiVersion, kind).
JOB_KINDS: dict[str, tuple[str, str]] = {
    target: (kind.api_version, kind.kind) for target, kind in JOB_TARGET_KINDS.items()
}


def child_key(body: Mapping[str, Any]) -> ChildKey:
    return (body["apiVersion"], body["kind"], body["metadata"]["name"])


def config_map_ref(obj: Mapping[str, Any]) -> str | None:
    """The referenced ConfigMap's name, read leniently (also used to index invalid objects)."""
    ref = (obj.get("spec") or {}).get("configMapRef")
    name = ref.get("name") if isinstance(ref, dict) else None
    return name if isinstance(name, str) and name else None


@dataclass(frozen=True)
class Desired:
    """What a valid OptimEnv should own."""

    children: tuple[dict[str, Any], ...]
    summary: PlanSummary


@dataclass(frozen=True)
class Invalid:
    """Why an OptimEnv cannot be planned; permanent until the object or its ConfigMap changes."""

    reason: str
    message: str


@dataclass(frozen=True)
class Failure:
    """A child the API server refused to read or write for good (403, 404, 422 …): status, not a retry."""

    reason: str
    message: str
    # Children that could not be read: left untouched (their status entry too) until readable.
    children: frozenset[ChildKey] = frozenset()


def failure_reason(status: int) -> str:
    """The Ready reason for an API refusal with HTTP ``status``."""
    return {403: "Forbidden", 404: "NotFound"}.get(status, "ApplyFailed")


@dataclass(frozen=True)
class Apply:
    body: dict[str, Any]
    force: bool  # only for objects this OptimEnv already owns
    # Created: absent when read, so created by POST (never merged into an object that appeared since).
    verb: Literal["Created", "Updated"]


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Outcome:
    applies: tuple[Apply, ...] = ()
    status: OptimEnvStatus | None = None  # None: the observed status is already right
    events: tuple[Event, ...] = ()
    conflict: str | None = None


def owner_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels_for(obj: Mapping[str, Any]) -> dict[str, str]:
    return {MANAGED_BY: "optimenv", NAME_LABEL: obj["metadata"]["name"]}


def desired(obj: Mapping[str, Any], referenced: Mapping[str, Any] | None = None) -> Desired | Invalid:
    """The children of ``obj``, or why there are none. Never raises for bad user input.

    ``referenced`` is the ConfigMap named by ``spec.configMapRef`` as read (None: it does not exist).
    """
    try:
        # Bounds first (values, text, depth, 64-bit integers): nothing below may grow with the input.
        check_data(obj.get("spec"), "spec")
        spec = parse_spec(obj.get("spec"))
        if spec.config is not None:
            where = "spec.config."
        else:
            assert spec.configMapRef is not None
            where = f"ConfigMap {spec.configMapRef.name} key {spec.configMapRef.key}: "
        try:
            data = _config_data(spec, referenced)
            if isinstance(data, Invalid):
                return data
            config = parse_config(data)
        except ConfigError as exc:
            # Name the field as the user wrote it: under spec.config, or in the referenced ConfigMap.
            raise ConfigError(where + exc.field, exc.reason, exc.hint) from None
        return _render(obj, spec, config, where)
    except OptimEnvError as exc:
        return Invalid("InvalidConfig", str(exc))


def _config_data(spec: OptimEnvSpec, referenced: Mapping[str, Any] | None) -> dict[str, Any] | Invalid:
    if spec.config is not None:
        data: Any = copy.deepcopy(spec.config)
    else:
        assert spec.configMapRef is not None
        ref = spec.configMapRef
        body = referenced
        if body is None:
            return Invalid("ConfigMapNotFound", f"spec.configMapRef: ConfigMap {shown(ref.name)} not found")
        data_map = body.get("data")
        text = data_map.get(ref.key) if isinstance(data_map, Mapping) else None
        if text is None:
            return Invalid(
                "ConfigMapKeyNotFound",
                f"spec.configMapRef.key: ConfigMap {shown(ref.name)} has no key {shown(ref.key)}",
            )
        data = parse_yaml(text)  # bounded while it is composed: an alias bomb is never expanded
    if not isinstance(data, dict):
        raise ConfigError("config", f"top level must be a mapping, got {type(data).__name__}")
    ds = data.get("deepspeed")
    accelerate_ds = data.get("deepspeed_config")  # an accelerate config file's section
    if isinstance(accelerate_ds, dict) and accelerate_ds.get("deepspeed_config_file") is not None:
        ds = accelerate_ds["deepspeed_config_file"]
    if isinstance(ds, str) and ds not in PRESETS:
        # A path would be read from the controller's own filesystem, never the workers'.
        raise ConfigError(
            "deepspeed",
            f"{shown(ds)} is a file path, which the controller cannot read",
            f"inline the DeepSpeed JSON as a mapping or use a preset ({', '.join(sorted(PRESETS))})",
        )
    return data


def _render(obj: Mapping[str, Any], spec: OptimEnvSpec, config: TrainingConfig, where: str) -> Desired:
    """The compiled job's objects, owned by ``obj``: what ``optimenv render`` prints, plus ownership."""
    meta = obj["metadata"]
    labels = labels_for(obj)
    job = compile(
        config,
        spec.topology,
        spec.job or "configmaps",
        name=meta["name"],
        namespace=meta["namespace"],
        labels=labels,
        policy=spec.policy,
        deepspeed_path=spec.deepspeedPath,
        config_path=where,
    )
    owner = owner_reference(obj)
    children = job.manifests()
    for body in children:
        annotations = body["metadata"].setdefault("annotations", {})
        if CONTENT_HASH_ANNOTATION not in annotations:
            # Jobs get defaulted by the API server and webhooks: compare our hash, not their spec.
            annotations[CONTENT_HASH_ANNOTATION] = content_hash(body)
        body["metadata"]["ownerReferences"] = [owner]
    summary = PlanSummary(
        target=job.target if spec.job else None,
        envConfigMap=job.env_configmap,
        specConfigMap=job.spec_configmap,
        deepspeedConfigMap=job.deepspeed_configmap,
        hash=job.hash,
    )
    return Desired(children=tuple(children), summary=summary)


def owned_by(child: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    uid = obj["metadata"].get("uid")
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == uid and r.get("kind") == KIND for r in refs)


def managed_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`as_applied` compares of a child: the metadata we manage, and a job's spec."""
    meta = body["metadata"]
    keep = ("name", "labels", "annotations", "ownerReferences")
    fields = {"kind": body["kind"], "metadata": {k: meta[k] for k in keep if k in meta}}
    if body["kind"] != "ConfigMap" and "spec" in body:
        fields["spec"] = body["spec"]
    return fields


def as_applied(observed: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether ``observed`` is still what applying ``wanted`` (:func:`managed_fields`) left.

    A ConfigMap's data is checked against its own content-hash annotation (itself compared with
    the wanted one), so the payload need not be kept in memory twice.
    """
    if wanted["kind"] == "ConfigMap":
        return _meta_in_sync(observed, wanted) and child_intact(observed)
    return in_sync(observed, wanted)


def job_status_changed(obj: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    """Whether ``job`` as observed would change ``obj``'s ``status.job`` (a transition to report)."""
    old = job_status_of(observed_status(obj), job)
    new = lifecycle.job_record(job, old, obj["metadata"].get("generation") or 0)

    def same(record: JobStatus | None) -> JobStatus | None:
        return record.model_copy(update={"observedGeneration": None}) if record is not None else None

    return same(old) != same(new)


def child_intact(child: Mapping[str, Any]) -> bool:
    """An owned ConfigMap whose data still matches its content-hash annotation (not edited by hand)."""
    meta = child.get("metadata") or {}
    owned = any(r.get("controller") and r.get("kind") == KIND for r in meta.get("ownerReferences") or [])
    stamp = (meta.get("annotations") or {}).get(CONTENT_HASH_ANNOTATION)
    return owned and stamp is not None and stamp == content_hash(dict(child.get("data") or {}))


def _meta_in_sync(observed: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    o_meta, w_meta = observed.get("metadata") or {}, want["metadata"]
    for key in ("labels", "annotations"):
        have = o_meta.get(key) or {}
        if any(have.get(k) != v for k, v in (w_meta.get(key) or {}).items()):
            return False
    return all(ref in (o_meta.get("ownerReferences") or []) for ref in w_meta["ownerReferences"])


def in_sync(observed: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Whether applying ``want`` would change nothing we manage in ``observed``."""
    if not _meta_in_sync(observed, want):
        return False
    if want["kind"] != "ConfigMap":
        # Jobs are defaulted by the API server and webhooks: every field we set must still hold.
        return "spec" not in want or covers(observed.get("spec"), want["spec"])
    # ConfigMaps are not defaulted by the server: compare the payload too, to undo hand edits.
    return (observed.get("data") or {}) == (want.get("data") or {}) and (
        observed.get("binaryData") or {}
    ) == (want.get("binaryData") or {})


def covers(have: Any, want: Any) -> bool:
    """Whether ``have`` holds every field of ``want`` with its value (fields added by others are fine).

    Lists of named items (containers, env, volumes: list maps keyed by ``name``) are matched by name,
    other lists item by item; scalars must be equal.
    """
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(k in have and covers(have[k], v) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list):
            return False
        if all(isinstance(w, Mapping) and "name" in w for w in want):
            named = {h.get("name"): h for h in have if isinstance(h, Mapping)}
            return all(w["name"] in named and covers(named[w["name"]], w) for w in want)
        return len(have) == len(want) and all(covers(h, w) for h, w in zip(have, want, strict=True))
    return bool(have == want)


def job_child(want: Desired) -> dict[str, Any] | None:
    """The job among the children of ``want`` (None: ConfigMaps only)."""
    return next((c for c in want.children if c["kind"] != "ConfigMap"), None)


def job_status_of(status: OptimEnvStatus, job: Mapping[str, Any] | None) -> JobStatus | None:
    """``status.job`` if it describes ``job`` (same kind and name), else None."""
    record = status.job
    if job is None or record is None:
        return None
    return record if (record.kind, record.name) == (job["kind"], job["metadata"]["name"]) else None


Model = TypeVar("Model", bound=BaseModel)


def _read(model: type[Model], value: Any) -> Model | None:
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def observed_status(obj: Mapping[str, Any]) -> OptimEnvStatus:
    """``obj``'s stored status as its model; a part that does not read as one (edited by hand, an
    older shape) is taken as absent, so the next status write replaces it."""
    raw = obj.get("status")
    raw = raw if isinstance(raw, Mapping) else {}
    generation = raw.get("observedGeneration")
    listed = raw.get("conditions")
    conditions = [_read(Condition, c) for c in listed] if isinstance(listed, list) else []
    return OptimEnvStatus(
        observedGeneration=generation if type(generation) is int and generation >= 0 else None,
        conditions=[c for c in conditions if c is not None],
        plan=_read(PlanSummary, raw.get("plan")),
        job=_read(JobStatus, raw.get("job")),
    )


class _Said(NamedTuple):
    """What a condition says: its status, reason and message (clipped to the CRD's maxLength, as
    stored, so that it compares with what is stored)."""

    status: ConditionStatus
    reason: str
    message: str


def _said(status: ConditionStatus, reason: str, message: str) -> _Said:
    return _Said(status, reason, clip(message, MESSAGE_MAX))


def decide(
    obj: Mapping[str, Any],
    want: Desired | Invalid,
    observed: Mapping[ChildKey, Mapping[str, Any] | None],
    now: str,
    failure: Failure | None = None,
) -> Outcome:
    """The writes, status and Events that bring the cluster to ``want``.

    ``failure``: the API refused something for good; the children it names are left as they are.
    Ready says so unless a name conflict, which blocks every write, is the bigger problem.
    ConfigMaps are written before the job. The job follows :mod:`lifecycle`'s rules: a finished job
    is never written or re-created, one deleted before it finished waits for a new generation.
    """
    old = observed_status(obj)
    generation = obj["metadata"].get("generation")
    applies: list[Apply] = []
    conflict: str | None = None
    summary, record = old.plan, old.job
    if isinstance(want, Invalid):
        valid = _said("False", want.reason, want.message)
        kept = "keeping the last good children: " if summary else "nothing applied: "
        ready = _said("False", want.reason, kept + want.message)
    else:
        summary = want.summary
        applies, conflict, record, note = _writes(obj, old, want, observed, failure)
        valid = _said("True", "Planned", "the config plans cleanly")
        ready = _ready(conflict, failure, note)
    conditions = [
        _condition(old, "Ready", ready, generation, now),
        _condition(old, "Valid", valid, generation, now),
    ]
    status = OptimEnvStatus(observedGeneration=generation, conditions=conditions, plan=summary, job=record)
    events = [*apply_events(obj, applies), *_warnings(old, valid, ready, conflict, failure)]
    moved = lifecycle.transition(old.job, status.job)
    if moved is not None:
        events.append(Event(moved[0], moved[1], clip(moved[2], EVENT_MAX)))
    changed = _comparable(status) != _comparable(old)
    return Outcome(tuple(applies), status if changed else None, tuple(events), conflict)


def _ready(conflict: str | None, failure: Failure | None, note: str) -> _Said:
    """Ready for a valid config: a name conflict blocks every write, so it is said first."""
    if conflict is not None:
        return _said("False", "NameConflict", conflict + "; rename or delete it (the controller never will)")
    if failure is not None:
        return _said("False", failure.reason, failure.message)
    return _said("True", "Applied", note)


def _writes(
    obj: Mapping[str, Any],
    old: OptimEnvStatus,
    want: Desired,
    observed: Mapping[ChildKey, Mapping[str, Any] | None],
    failure: Failure | None,
) -> tuple[list[Apply], str | None, JobStatus | None, str]:
    """The children to write, a name conflict, the job's status entry and Ready's message."""
    generation = obj["metadata"].get("generation") or 0
    job = job_child(want)
    old_record = job_status_of(old, job)
    refused = failure.children if failure is not None else frozenset()
    applies: list[Apply] = []
    left: str | None = None
    for body in want.children:
        key = child_key(body)
        have = observed.get(key)
        if key in refused:
            continue
        if have is not None and not owned_by(have, obj):
            what = f"{body['kind']} {body['metadata']['name']!r} exists and is not owned by this OptimEnv"
            return [], what, _record(job, None, obj, old, refused), ""
        action = lifecycle.job_action(old_record, have, generation) if body is job else None
        if action == "leave":
            left = "left as it is" if have is not None else "not re-created"
        elif have is None:
            applies.append(Apply(body, force=False, verb="Created"))
        elif not in_sync(have, body):
            applies.append(Apply(body, force=True, verb="Updated"))
    # The job goes last: it mounts the ConfigMaps, and a refused job must not hold them back.
    applies.sort(key=lambda a: a.body["kind"] != "ConfigMap")
    record = _record(job, observed.get(child_key(job)) if job else None, obj, old, refused)
    note = f"{len(want.children) - (left == 'not re-created')} children in sync"
    if left is not None and record is not None:
        note += f"; {record.kind} {record.name} is {record.phase} ({record.reason}): {left}"
    return applies, None, record, note


def _record(
    job: Mapping[str, Any] | None,
    have: Mapping[str, Any] | None,
    obj: Mapping[str, Any],
    old_status: OptimEnvStatus,
    refused: frozenset[ChildKey],
) -> JobStatus | None:
    """``status.job`` for the wanted ``job`` as observed (``have``); kept as it was if unreadable."""
    if job is None:
        return None
    old = job_status_of(old_status, job)
    if child_key(job) in refused:
        return old
    if have is not None and not owned_by(have, obj):
        have = None  # someone else's object holds the name: ours is gone
    return lifecycle.job_record(have, old, obj["metadata"].get("generation") or 0)


def _warnings(
    old: OptimEnvStatus, valid: _Said, ready: _Said, conflict: str | None, failure: Failure | None
) -> list[Event]:
    """Warning Events for what newly went wrong (each distinct message once)."""
    events: list[Event] = []
    old_valid = _find(old, "Valid")
    if valid.status == "False" and (
        old_valid is None or (old_valid.status, old_valid.message) != (valid.status, valid.message)
    ):
        events.append(Event("Warning", "Invalid", valid.message))
    old_ready = _find(old, "Ready")
    if conflict is not None and (old_ready is None or old_ready.reason != "NameConflict"):
        events.append(Event("Warning", "NameConflict", conflict))
    elif (
        failure is not None
        and ready.reason == failure.reason
        and (old_ready is None or (old_ready.reason, old_ready.message) != (ready.reason, ready.message))
    ):
        events.append(Event("Warning", failure.reason, ready.message))
    return events


def apply_events(obj: Mapping[str, Any], applies: list[Apply] | tuple[Apply, ...]) -> list[Event]:
    """One Event per verb, naming every child it concerns.

    Not for the first creation of a new OptimEnv's children: its status says the same, and one more
    API call per object would weigh on every bulk creation. A child created later (deleted by hand,
    or new with a spec change) is an Event.
    """
    first = (obj.get("status") or {}).get("observedGeneration") is None
    events = []
    for verb in ("Updated",) if first else ("Created", "Updated"):
        done = [f"{a.body['kind']} {a.body['metadata']['name']}" for a in applies if a.verb == verb]
        if done:
            events.append(Event("Normal", verb, f"{verb.lower()} " + ", ".join(done)))
    return events


def _find(status: OptimEnvStatus, kind: str) -> Condition | None:
    return next((cond for cond in status.conditions if cond.type == kind), None)


def _condition(old_status: OptimEnvStatus, kind: str, said: _Said, generation: Any, now: str) -> Condition:
    old = _find(old_status, kind)
    # lastTransitionTime moves only when the status itself flips (metav1.Condition semantics).
    since = old.lastTransitionTime if old is not None and old.status == said.status else now
    return Condition(
        type=kind,
        status=said.status,
        observedGeneration=generation,
        lastTransitionTime=since,
        reason=said.reason,
        message=said.message,
    )


def _comparable(status: OptimEnvStatus) -> OptimEnvStatus:
    """``status`` without what moves on its own: the conditions' transition times and order."""
    conditions = sorted(
        (cond.model_copy(update={"lastTransitionTime": ""}) for cond in status.conditions),
        key=lambda cond: cond.type,
    )
    return status.model_copy(update={"conditions": conditions})
