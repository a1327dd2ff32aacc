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
from typing import Any, Literal

from optimenv.config import parse_config, parse_yaml
from optimenv.deepspeed import PRESETS
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.plan import Plan, plan
from optimenv.render import CONTENT_HASH_ANNOTATION, JobOptions, render
from optimenv.resource import API_VERSION, GROUP, KIND, Condition, OptimEnvSpec, parse_spec
from optimenv.spec import build_spec, content_hash

FIELD_MANAGER = "optimenv"
MANAGED_BY = "app.kubernetes.io/managed-by"
NAME_LABEL = "optimenv.dev/name"
CHILD_SUFFIXES = ("-env", "-spec", "-deepspeed")
#: The CRD's maxLength of a condition message (a longer one would make the whole status write fail).
MESSAGE_MAX = next(
    m.max_length for m in Condition.model_fields["message"].metadata if hasattr(m, "max_length")
)

ChildKey = tuple[str, str, str]  # (apiVersion, kind, name)

#: The job kinds whose owned objects the controller can watch (``--job-kind``): (group, version, plural).
JOB_RESOURCES: dict[str, tuple[str, str, str]] = {
    "rayjob": ("ray.io", "v1", "rayjobs"),
    "pytorchjob": ("kubeflow.org", "v1", "pytorchjobs"),
    "trainjob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
}


def child_key(body: Mapping[str, Any]) -> ChildKey:
    return (body["apiVersion"], body["kind"], body["metadata"]["name"])


def child_configmap_names(name: str) -> tuple[str, ...]:
    """Names of the ConfigMaps an OptimEnv may own (the renderers' naming convention)."""
    return tuple(name + suffix for suffix in CHILD_SUFFIXES)


def config_map_ref(obj: Mapping[str, Any]) -> str | None:
    """The referenced ConfigMap's name, read leniently (also used to index invalid objects)."""
    ref = (obj.get("spec") or {}).get("configMapRef")
    name = ref.get("name") if isinstance(ref, dict) else None
    return name if isinstance(name, str) and name else None


@dataclass(frozen=True)
class Desired:
    """What a valid OptimEnv should own."""

    children: tuple[dict[str, Any], ...]
    summary: dict[str, Any]


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
    status: dict[str, Any] | None = None  # None: the observed status is already right
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
            result = plan(config, spec.topology.hardware(), deepspeed_path=spec.deepspeedPath)
        except ConfigError as exc:
            # Name the field as the user wrote it: under spec.config, or in the referenced ConfigMap.
            raise ConfigError(where + exc.field, exc.reason, exc.hint) from None
        return _render(obj, spec, result)
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
            return Invalid("ConfigMapNotFound", f"spec.configMapRef: ConfigMap {ref.name!r} not found")
        text = (body.get("data") or {}).get(ref.key)
        if text is None:
            return Invalid(
                "ConfigMapKeyNotFound",
                f"spec.configMapRef.key: ConfigMap {ref.name!r} has no key {ref.key!r}",
            )
        data = parse_yaml(text)
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
            f"{ds!r} is a file path, which the controller cannot read",
            f"inline the DeepSpeed JSON as a mapping or use a preset ({', '.join(sorted(PRESETS))})",
        )
    return data


def _render(obj: Mapping[str, Any], spec: OptimEnvSpec, result: Plan) -> Desired:
    meta = obj["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    job = spec.job
    labels = labels_for(obj)
    options = JobOptions(
        name=name,
        namespace=namespace,
        image=job.image if job else None,
        command=tuple(job.command) if job else (),
        nodes=spec.topology.nodes,
        gpus_per_node=spec.topology.gpusPerNode,
        service_account=job.serviceAccount if job else None,
        node_selector=dict(job.nodeSelector) if job else {},
        tolerations=tuple(job.tolerations) if job else (),
        labels={**(job.labels if job else {}), **labels},
        runtime=job.runtime if job else None,
        spec_policy=spec.policy,
    )
    objects = render(result, job.target if job else "configmaps", options)
    owner = owner_reference(obj)
    children: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for rendered in objects:
        body = copy.deepcopy(rendered)
        child_meta = body.setdefault("metadata", {})
        child_meta["namespace"] = namespace
        child_meta["labels"] = {**child_meta.get("labels", {}), **labels}
        annotations = child_meta.setdefault("annotations", {})
        if CONTENT_HASH_ANNOTATION not in annotations:
            # Jobs get defaulted by the API server and webhooks: compare our hash, not their spec.
            annotations[CONTENT_HASH_ANNOTATION] = content_hash(
                {k: v for k, v in body.items() if k != "status"}
            )
        child_meta["ownerReferences"] = [owner]
        children.append(body)
        if body["kind"] == "ConfigMap":
            for suffix in CHILD_SUFFIXES:
                if child_meta["name"] == name + suffix:
                    names[suffix] = child_meta["name"]
    summary = {
        "target": job.target if job else None,
        "envConfigMap": names.get("-env"),
        "specConfigMap": names.get("-spec"),
        "deepspeedConfigMap": names.get("-deepspeed"),
        "hash": build_spec(result, policy=spec.policy)["hash"],
    }
    # A merge patch drops null keys: leave them out, or the stored status never compares equal.
    summary = {k: v for k, v in summary.items() if v is not None}
    return Desired(children=tuple(children), summary=summary)


def owned_by(child: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    uid = obj["metadata"].get("uid")
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == uid and r.get("kind") == KIND for r in refs)


def controller_owner(child: Mapping[str, Any]) -> str | None:
    """The name of the OptimEnv that is ``child``'s controller owner, or None (not one of ours)."""
    for ref in (child.get("metadata") or {}).get("ownerReferences") or []:
        group = str(ref.get("apiVersion") or "").rpartition("/")[0]
        if ref.get("controller") and ref.get("kind") == KIND and group == GROUP and ref.get("name"):
            name: str = ref["name"]
            return name
    return None


def managed_metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`in_sync` compares of a job child: enough to recognise the echo of its apply."""
    meta = body["metadata"]
    keep = ("name", "labels", "annotations", "ownerReferences")
    return {"kind": body["kind"], "metadata": {k: meta[k] for k in keep if k in meta}}


def child_intact(child: Mapping[str, Any]) -> bool:
    """An owned ConfigMap whose data still matches its content-hash annotation (not edited by hand)."""
    meta = child.get("metadata") or {}
    owned = any(r.get("controller") and r.get("kind") == KIND for r in meta.get("ownerReferences") or [])
    stamp = (meta.get("annotations") or {}).get(CONTENT_HASH_ANNOTATION)
    return owned and stamp is not None and stamp == content_hash(dict(child.get("data") or {}))


def in_sync(observed: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Whether applying ``want`` would change nothing we manage in ``observed``."""
    o_meta, w_meta = observed.get("metadata") or {}, want["metadata"]
    for key in ("labels", "annotations"):
        have = o_meta.get(key) or {}
        if any(have.get(k) != v for k, v in (w_meta.get(key) or {}).items()):
            return False
    if not all(ref in (o_meta.get("ownerReferences") or []) for ref in w_meta["ownerReferences"]):
        return False
    # ConfigMaps are not defaulted by the server: compare the payload too, to undo hand edits.
    return want["kind"] != "ConfigMap" or (
        (observed.get("data") or {}) == (want.get("data") or {})
        and (observed.get("binaryData") or {}) == (want.get("binaryData") or {})
    )


def decide(
    obj: Mapping[str, Any],
    want: Desired | Invalid,
    observed: Mapping[ChildKey, Mapping[str, Any] | None],
    now: str,
    failure: Failure | None = None,
) -> Outcome:
    """The writes, status and Events that bring the cluster to ``want``.

    ``failure``: a child the API refused (it is left out of ``want``); Ready says so unless a name
    conflict, which blocks every write, is the bigger problem. ConfigMaps are written before jobs.
    """
    old_status = obj.get("status") or {}
    generation = obj["metadata"].get("generation")
    summary = old_status.get("plan")
    applies: list[Apply] = []
    events: list[Event] = []
    conflict: str | None = None

    if isinstance(want, Invalid):
        valid = ("False", want.reason, want.message)
        kept = "keeping the last good children: " if summary else "nothing applied: "
        ready = ("False", want.reason, kept + want.message)
    else:
        valid = ("True", "Planned", "the config plans cleanly")
        summary = want.summary
        for body in want.children:
            have = observed.get(child_key(body))
            if have is not None and not owned_by(have, obj):
                conflict = (
                    f"{body['kind']} {body['metadata']['name']!r} exists and is not owned by this OptimEnv"
                )
                break
            if have is None:
                applies.append(Apply(body, force=False, verb="Created"))
            elif not in_sync(have, body):
                applies.append(Apply(body, force=True, verb="Updated"))
        if conflict is not None:
            applies = []
            ready = ("False", "NameConflict", conflict + "; rename or delete it (the controller never will)")
        elif failure is not None:
            ready = ("False", failure.reason, failure.message)
        else:
            ready = ("True", "Applied", f"{len(want.children)} children in sync")

    # Clipped to the CRD's maxLength before comparing with the stored (clipped) messages.
    ready, valid = (ready[0], ready[1], _clip(ready[2])), (valid[0], valid[1], _clip(valid[2]))
    conditions = [
        _condition(old_status, "Ready", ready, generation, now),
        _condition(old_status, "Valid", valid, generation, now),
    ]
    status: dict[str, Any] = {"observedGeneration": generation, "conditions": conditions, "plan": summary}

    # The job goes last: it mounts the ConfigMaps, and a refused job must not hold them back.
    applies.sort(key=lambda a: a.body["kind"] != "ConfigMap")
    events.extend(apply_events(applies))
    old_valid = _find(old_status, "Valid")
    if valid[0] == "False" and (
        old_valid is None
        or (old_valid.get("status"), old_valid.get("message"))
        != (
            valid[0],
            valid[2],
        )
    ):
        events.append(Event("Warning", "Invalid", valid[2]))
    old_ready = _find(old_status, "Ready")
    if conflict is not None and (old_ready is None or old_ready.get("reason") != "NameConflict"):
        events.append(Event("Warning", "NameConflict", conflict))
    elif (
        failure is not None
        and ready[1] == failure.reason
        and (old_ready is None or (old_ready.get("reason"), old_ready.get("message")) != ready[1:])
    ):
        events.append(Event("Warning", failure.reason, ready[2]))

    changed = _comparable(status) != _comparable(old_status)
    return Outcome(tuple(applies), status if changed else None, tuple(events), conflict)


def apply_events(applies: list[Apply] | tuple[Apply, ...]) -> list[Event]:
    """One Event per verb, naming every child it concerns."""
    events = []
    for verb in ("Created", "Updated"):
        done = [f"{a.body['kind']} {a.body['metadata']['name']}" for a in applies if a.verb == verb]
        if done:
            events.append(Event("Normal", verb, f"{verb.lower()} " + ", ".join(done)))
    return events


def _clip(message: str) -> str:
    if len(message) <= MESSAGE_MAX:
        return message
    marker = " … (truncated)"
    return message[: MESSAGE_MAX - len(marker)] + marker


def _find(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            found: Mapping[str, Any] = cond
            return found
    return None


def _condition(
    old_status: Mapping[str, Any], kind: str, value: tuple[str, str, str], generation: Any, now: str
) -> dict[str, Any]:
    state, reason, message = value
    old = _find(old_status, kind)
    # lastTransitionTime moves only when the status itself flips (metav1.Condition semantics).
    since = old.get("lastTransitionTime") if old and old.get("status") == state else None
    return {
        "type": kind,
        "status": state,
        "observedGeneration": generation,
        "lastTransitionTime": since or now,
        "reason": reason,
        "message": _clip(message),
    }


def _comparable(status: Mapping[str, Any]) -> Any:
    return {
        "observedGeneration": status.get("observedGeneration"),
        "plan": status.get("plan"),
        "conditions": sorted(
            (
                {k: v for k, v in cond.items() if k != "lastTransitionTime"}
                for cond in status.get("conditions") or []
            ),
            key=lambda c: str(c.get("type")),
        ),
    }
