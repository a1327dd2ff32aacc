"""The pure decisions (no server), the command line, and the metrics endpoint."""

from __future__ import annotations

import copy
import pathlib
import socket
import urllib.request
from typing import Any

import yaml
from click.testing import CliRunner

from optimenv.cli import cli
from optimenv.render import CONFIGMAP_SUFFIXES
from optimenv_controller import lifecycle
from optimenv_controller import reconcile as rc
from optimenv_controller.metrics import Metrics
from tests.controller.conftest import optimenv


def _obj(**spec: Any) -> dict[str, Any]:
    body = optimenv(**spec)
    body["metadata"].update(uid="uid-1", generation=1)
    return body


def _stored(status: Any) -> dict[str, Any]:
    """``status`` as the API server keeps it after the controller's merge patch (nulls deleted)."""
    stored: dict[str, Any] = status.stored()
    return stored


def _converged(obj: dict[str, Any]) -> tuple[dict[str, Any], rc.Desired, dict[rc.ChildKey, Any]]:
    want = rc.desired(obj)
    assert isinstance(want, rc.Desired)
    first = rc.decide(obj, want, {rc.child_key(c): None for c in want.children}, "2026-01-01T00:00:00Z")
    assert first.status is not None
    obj = {**obj, "status": _stored(first.status)}
    return obj, want, {rc.child_key(c): copy.deepcopy(c) for c in want.children}


def test_nothing_changed_means_no_writes_no_status_no_events() -> None:
    obj, want, observed = _converged(_obj())
    outcome = rc.decide(obj, want, observed, "2026-01-02T00:00:00Z")
    assert outcome == rc.Outcome()


def test_hand_edited_child_is_updated_with_force_and_transition_time_kept() -> None:
    obj, want, observed = _converged(_obj())
    env = next(k for k in observed if k[2] == "demo-env")
    observed[env]["data"]["ACCELERATE_MIXED_PRECISION"] = "fp16"
    assert not rc.child_intact(observed[env])
    outcome = rc.decide(obj, want, observed, "2026-01-02T00:00:00Z")
    assert [(a.body["metadata"]["name"], a.force, a.verb) for a in outcome.applies] == [
        ("demo-env", True, "Updated")
    ]
    assert outcome.status is None  # Ready stays True: no status write, no moved timestamp


def test_flip_moves_last_transition_time_only_for_the_flipped_condition() -> None:
    obj, _, _ = _converged(_obj())
    broken = copy.deepcopy(obj)
    broken["spec"]["config"]["bf16"] = "maybe"
    broken["metadata"]["generation"] = 2
    outcome = rc.decide(broken, rc.desired(broken), {}, "2026-01-03T00:00:00Z")
    assert outcome.status is not None and outcome.applies == ()
    conds = {c["type"]: c for c in _stored(outcome.status)["conditions"]}
    assert conds["Valid"]["status"] == "False" and conds["Valid"]["message"].startswith("spec.config.bf16")
    assert conds["Valid"]["lastTransitionTime"] == "2026-01-03T00:00:00Z"
    assert all(c["observedGeneration"] == 2 for c in conds.values())
    assert _stored(outcome.status)["plan"] == obj["status"]["plan"]  # the last good plan is kept
    assert [e.reason for e in outcome.events] == ["Invalid"]


def test_a_child_owned_by_another_uid_is_a_conflict() -> None:
    obj, want, observed = _converged(_obj())
    spec = next(k for k in observed if k[2] == "demo-spec")
    observed[spec]["metadata"]["ownerReferences"][0]["uid"] = "uid-of-a-deleted-namesake"
    outcome = rc.decide(obj, want, observed, "2026-01-02T00:00:00Z")
    assert outcome.applies == () and outcome.conflict and "demo-spec" in outcome.conflict


def test_config_map_ref_missing_or_without_key_is_invalid() -> None:
    obj = _obj(spec={"configMapRef": {"name": "cfg", "key": "train.yaml"}})
    missing = rc.desired(obj, None)
    assert missing == rc.Invalid("ConfigMapNotFound", "spec.configMapRef: ConfigMap 'cfg' not found")
    no_key = rc.desired(obj, {"metadata": {"name": "cfg"}, "data": {"config.yaml": "base_model: m"}})
    assert isinstance(no_key, rc.Invalid) and no_key.reason == "ConfigMapKeyNotFound"
    bad = rc.desired(obj, {"metadata": {"name": "cfg"}, "data": {"train.yaml": "fsdp_version: [\n"}})
    assert isinstance(bad, rc.Invalid) and bad.message.startswith(
        "ConfigMap cfg key train.yaml: config: not valid YAML"
    )


def test_deepspeed_file_paths_are_refused_the_controller_reads_no_local_files() -> None:
    obj = _obj()
    obj["spec"]["config"]["deepspeed"] = "/etc/passwd"
    want = rc.desired(obj)
    assert isinstance(want, rc.Invalid)
    assert want.message.startswith("spec.config.deepspeed: '/etc/passwd' is a file path")


def test_child_names_follow_the_renderers() -> None:
    want = rc.desired(_obj())
    assert isinstance(want, rc.Desired)
    assert {c["metadata"]["name"] for c in want.children} == {f"demo-{s}" for s in CONFIGMAP_SUFFIXES}


def test_controller_command_options() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["controller", "--help"])
    assert result.exit_code == 0
    assert "--all-namespaces" in result.output and "--metrics-port" in result.output
    clash = runner.invoke(cli, ["controller", "-n", "ml", "--all-namespaces"])
    assert clash.exit_code == 2 and "exclude each other" in clash.output
    assert "--job-kind" in result.output
    unknown = runner.invoke(cli, ["controller", "--job-kind", "mpijob"])
    assert unknown.exit_code == 2 and "'mpijob' is not one of" in unknown.output


def test_job_children_are_owned_and_their_echo_is_as_applied() -> None:
    obj = _obj(job={"target": "rayjob", "image": "img:1", "command": ["python", "t.py"]})
    want = rc.desired(obj)
    assert isinstance(want, rc.Desired)
    (job,) = [c for c in want.children if c["kind"] == "RayJob"]
    assert rc.owned_by(job, obj)
    # As the server stores it: defaulted spec, server metadata, a status; still the echo of our apply.
    stored = copy.deepcopy(job)
    stored["spec"]["submissionMode"] = "K8sJobMode"  # a CRD default the renderer leaves out
    stored["metadata"].update(uid="u-2", resourceVersion="7")
    stored["status"] = {"jobStatus": "RUNNING"}
    wanted = rc.managed_fields(job)
    assert set(wanted["metadata"]) == {"name", "labels", "annotations", "ownerReferences"}
    assert wanted["spec"] == job["spec"]  # a job's spec is managed too
    assert rc.as_applied(stored, wanted) and rc.in_sync(stored, job)
    edited = copy.deepcopy(stored)
    edited["metadata"]["annotations"][rc.CONTENT_HASH_ANNOTATION] = "sha256:edited"
    assert not rc.as_applied(edited, wanted)
    # A field we set, changed by hand (the image of the head), is drift; one the server added is not.
    head = stored["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["imagePullPolicy"] = "IfNotPresent"
    assert rc.as_applied(stored, wanted)
    head["image"] = "img:2"
    assert not rc.as_applied(stored, wanted) and not rc.in_sync(stored, job)
    # Not ours: no controller reference, one to another kind, or to another OptimEnv of that name.
    ref = job["metadata"]["ownerReferences"][0]
    for refs in (
        [],
        [{**ref, "controller": False}],
        [{**ref, "kind": "Deployment", "apiVersion": "apps/v1"}],
        [{**ref, "uid": "uid-of-a-deleted-namesake"}],
    ):
        assert not rc.owned_by({"metadata": {"ownerReferences": refs}}, obj)


def test_metrics_endpoint_serves_the_counters() -> None:
    metrics = Metrics()
    metrics.reconciles.labels(result="synced").inc()
    metrics.errors.labels(reason="429").inc()
    metrics.duration.observe(0.02)
    metrics.cached.labels(cache="owned").set_function(lambda: 3)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics.serve(port, addr="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'optimenv_reconciles_total{result="synced"} 1.0' in text
    assert 'optimenv_reconcile_errors_total{reason="429"} 1.0' in text
    assert "optimenv_reconcile_duration_seconds_count 1.0" in text
    assert 'optimenv_cached_objects{cache="owned"} 3.0' in text


def test_condition_messages_are_clipped_to_the_crds_max_length() -> None:
    crd = yaml.safe_load(pathlib.Path("manifests/crds/optimenv.dev_optimenvs.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    limit = status["properties"]["conditions"]["items"]["properties"]["message"]["maxLength"]
    assert limit == rc.MESSAGE_MAX

    obj = _obj()
    huge = rc.Invalid("InvalidConfig", "spec.config.x: " + "y" * (2 * limit))
    first = rc.decide(obj, huge, {}, "2026-01-01T00:00:00Z")
    assert first.status is not None
    conds = {c["type"]: c for c in _stored(first.status)["conditions"]}
    for cond in conds.values():
        assert len(cond["message"]) <= limit
    assert len(conds["Valid"]["message"]) == limit and conds["Valid"]["message"].endswith("(truncated)")
    # The clipped message compares equal next time: no status write, no repeated Warning.
    again = rc.decide({**obj, "status": _stored(first.status)}, huge, {}, "2026-01-02T00:00:00Z")
    assert again == rc.Outcome()


def test_refused_child_is_ready_false_with_one_warning_and_the_rest_applied() -> None:
    obj = _obj()
    want = rc.desired(obj)
    assert isinstance(want, rc.Desired)
    failure = rc.Failure(rc.failure_reason(403), "get PyTorchJob ml/demo: 403 forbidden")
    outcome = rc.decide(obj, want, {rc.child_key(c): None for c in want.children}, "t0", failure)
    assert [a.verb for a in outcome.applies] == ["Created"] * len(want.children)
    assert outcome.status is not None
    conds = {c["type"]: c for c in _stored(outcome.status)["conditions"]}
    assert (conds["Ready"]["status"], conds["Ready"]["reason"]) == ("False", "Forbidden")
    assert conds["Ready"]["message"] == failure.message
    # The first creation of a new object's children is its status, not an Event; the refusal is.
    assert [(e.type, e.reason) for e in outcome.events] == [("Warning", "Forbidden")]
    # Still refused on the next pass: nothing new to say.
    obj, _, observed = _converged(obj)
    obj = {**obj, "status": _stored(outcome.status)}
    assert rc.decide(obj, want, observed, "t1", failure) == rc.Outcome()
    assert [rc.failure_reason(code) for code in (403, 404, 422, 400)] == [
        "Forbidden",
        "NotFound",
        "ApplyFailed",
        "ApplyFailed",
    ]


def test_the_crd_carries_the_job_entry_and_its_printer_column() -> None:
    crd = yaml.safe_load(pathlib.Path("manifests/crds/optimenv.dev_optimenvs.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    job = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["job"]
    assert job["properties"]["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed", "Stopped"]
    assert job["properties"]["message"]["maxLength"] == lifecycle.JOB_MESSAGE_MAX
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Job"] == {"name": "Job", "type": "string", "jsonPath": ".status.job.phase"}
    assert columns["Job Reason"]["priority"] == 1
    # A long operator message is cut to the CRD's limit (a longer one would fail the status write).
    obj = _obj(job={"target": "pytorchjob", "image": "img:1", "command": ["python", "t.py"]})
    want = rc.desired(obj)
    assert isinstance(want, rc.Desired)
    stored = copy.deepcopy(rc.job_child(want))
    assert stored is not None
    stored["metadata"]["uid"] = "j-1"
    failed = {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": "x" * 100_000}
    stored["status"] = {"conditions": [failed]}
    observed = {rc.child_key(c): copy.deepcopy(c) for c in want.children}
    observed[rc.child_key(stored)] = stored
    outcome = rc.decide(obj, want, observed, "t0")
    assert outcome.status is not None
    record = _stored(outcome.status)["job"]
    assert record["phase"] == "Failed" and len(record["message"]) == lifecycle.JOB_MESSAGE_MAX
    (event,) = [e for e in outcome.events if e.reason == "JobFailed"]
    assert event.type == "Warning" and len(event.message) <= rc.EVENT_MAX
