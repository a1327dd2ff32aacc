"""What goes where: ConfigMaps, hashes, mounts, resources, passthrough, sizing, and every refusal."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from optimenv.compiler import compile
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.plan import EnvVar
from optimenv.render import CONTENT_HASH_ANNOTATION, Request, object_name, render
from optimenv.spec import build_spec, content_hash, verify_spec
from optimenv.validation import parse_model
from optimenv.workload import TARGETS, JobSpec, Topology
from tests.render.conftest import EXAMPLES, compiled, config_of, plan_example, target_of
from tests.render.validators import Validator

JOBS = ("rayjob", "pytorchjob", "trainjob")


def _objects(source: Any, target: str, **overrides: Any) -> list[dict[str, Any]]:
    """The objects of ``source`` compiled for ``target`` (2 x 4 GPUs unless overridden), validated."""
    return compiled(source, target, **overrides).manifests()


def _pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    spec = job["spec"]
    if job["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    if job["kind"] == "PyTorchJob":
        return [r["template"] for r in spec["pytorchReplicaSpecs"].values()]
    patches = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return [p["template"]["spec"]["template"] for p in patches]


def test_configmaps_first_with_their_content_hash() -> None:
    for target in TARGETS:
        objects = _objects("zero3-gpu", target)
        kinds = [o["kind"] for o in objects]
        assert kinds[:3] == ["ConfigMap"] * 3
        assert [o["metadata"]["name"] for o in objects[:3]] == ["ft-env", "ft-deepspeed", "ft-spec"]
        assert len(objects) == (3 if target == "configmaps" else 4)
        for cm in objects[:3]:
            assert cm["metadata"]["annotations"][CONTENT_HASH_ANNOTATION] == content_hash(cm["data"])


def test_env_spec_and_deepspeed_contents() -> None:
    p = plan_example("fsdp2-cpu", 2, 4)  # bf16: auto stays deferred
    env, spec_cm = _objects("fsdp2-cpu", "configmaps")
    assert env["data"] == p.env_dict
    assert "ACCELERATE_MIXED_PRECISION" not in env["data"]  # deferred: the bootstrap decides
    spec = verify_spec(json.loads(spec_cm["data"]["spec.json"]))
    assert spec == build_spec(p)
    assert {d["kind"] for d in spec["deferred"]} >= {"bf16_auto", "nccl_p2p_check"}
    zero3 = plan_example("zero3-gpu", 2, 4)
    ds = _objects("zero3-gpu", "configmaps")[1]
    assert json.loads(ds["data"]["deepspeed.json"]) == zero3.deepspeed
    user_wins = _objects("zero3-gpu", "configmaps", policy="user-wins")[-1]
    assert json.loads(user_wins["data"]["spec.json"])["policy"] == "user-wins"


def test_pod_templates_mount_roll_and_request_gpus() -> None:
    p = plan_example("zero3-gpu", 2, 4)
    for target in JOBS:
        objects = _objects("zero3-gpu", target)
        cms = {
            o["metadata"]["name"]: o["metadata"]["annotations"][CONTENT_HASH_ANNOTATION] for o in objects[:3]
        }
        for template in _pod_templates(objects[-1]):
            assert template["metadata"]["annotations"][CONTENT_HASH_ANNOTATION] == content_hash(cms)
            container = template["spec"]["containers"][0]
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            assert volumes[mounts["/etc/optimenv/spec.json"]["name"]]["configMap"]["name"] == "ft-spec"
            assert volumes[mounts[p.deepspeed_path]["name"]]["configMap"]["name"] == "ft-deepspeed"  # type: ignore[index]
            has_shm = "/dev/shm" in mounts
            assert has_shm == (target != "rayjob")  # KubeRay adds its own /dev/shm
            if has_shm:
                assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory"}
    pytorch = _objects("zero3-gpu", "pytorchjob")[-1]
    for replica in pytorch["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 4}}
    ray = _objects("zero3-gpu", "rayjob")[-1]["spec"]["rayClusterSpec"]
    assert ray["headGroupSpec"]["rayStartParams"] == {"num-gpus": "0"}
    assert "resources" not in ray["headGroupSpec"]["template"]["spec"]["containers"][0]
    train = _objects("zero3-gpu", "trainjob")[-1]["spec"]["trainer"]
    assert train["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 4}}


def test_a_changed_config_changes_every_hash() -> None:
    changed = {"deepspeed": "zero3", "bf16": True, "gradient_accumulation_steps": 4}
    for target in JOBS:
        old, new = _objects("zero3-gpu", target), _objects(changed, target)
        assert [o["metadata"]["name"] for o in old] == [o["metadata"]["name"] for o in new]
        assert _pod_templates(old[-1])[0]["metadata"] != _pod_templates(new[-1])[0]["metadata"]


def test_passthrough_and_labels(validator: Validator) -> None:
    tolerations = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
    opts: dict[str, Any] = dict(
        namespace="ml",
        service_account="trainer",
        node_selector={"pool": "h100"},
        tolerations=list(tolerations),
        labels={"team": "nlp", "app.kubernetes.io/managed-by": "platform"},
    )
    for target in JOBS:
        objects = _objects("fsdp2-gpu", target, **opts)
        validator.validate_all(objects)
        for obj in objects:
            meta = obj["metadata"]
            assert meta["namespace"] == "ml"
            assert meta["labels"]["team"] == "nlp"
            assert meta["labels"]["app.kubernetes.io/instance"] == "ft"
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "platform"  # the caller's label wins
        for template in _pod_templates(objects[-1]):
            spec = template["spec"]
            assert spec["serviceAccountName"] == "trainer"
            assert spec["nodeSelector"] == {"pool": "h100"}
            assert spec["tolerations"] == [dict(t) for t in tolerations]


def test_pytorchjob_replicas_and_launch() -> None:
    job = _objects("fsdp2-gpu", "pytorchjob", nodes=3, gpus=2)[-1]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 2)
    assert job["spec"]["nprocPerNode"] == "2"
    command = specs["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert command == [
        "optimenv-bootstrap",
        "--spec",
        "/etc/optimenv/spec.json",
        "--",
        "torchrun",
        "--no-python",
        "python",
        "train.py",
    ]
    single = _objects("fsdp2-gpu", "pytorchjob", nodes=1, gpus=8)[-1]
    assert list(single["spec"]["pytorchReplicaSpecs"]) == ["Master"]  # Worker replicas must be >= 1


def test_trainjob_runtime_by_plan_and_patches() -> None:
    fsdp = _objects("fsdp2-gpu", "trainjob")[-1]["spec"]
    zero3 = _objects("zero3-gpu", "trainjob")[-1]["spec"]
    assert fsdp["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert zero3["runtimeRef"]["name"] == "deepspeed-distributed"
    assert [
        j["name"]
        for j in fsdp["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    ] == ["node"]
    assert [
        j["name"]
        for j in zero3["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    ] == ["launcher", "node"]
    assert zero3["trainer"]["command"][:2] == ["sh", "-c"]
    assert "mpirun -np 8 " in zero3["trainer"]["command"][2]
    assert not any(e["name"].startswith("PET_") for e in fsdp["trainer"]["env"])
    custom = _objects("zero3-gpu", "trainjob", runtime="my-runtime")[-1]["spec"]
    assert custom["runtimeRef"]["name"] == "my-runtime"
    assert custom["trainer"]["command"][4] == "torchrun"


def test_rayjob_sizing() -> None:
    job = _objects("fsdp2-gpu", "rayjob")[-1]["spec"]
    group = job["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "--workers 8 " in job["entrypoint"]
    three = {**yaml.safe_load((EXAMPLES / "fsdp2-gpu.yaml").read_text()), "ray_num_workers": 3}
    assert "--workers 3 " in _objects(three, "rayjob")[-1]["spec"]["entrypoint"]
    quoted = _objects("fsdp2-gpu", "rayjob", command=["python3", "train.py", "--name", "a b"])[-1]["spec"]
    assert quoted["entrypoint"].endswith("--workers 8 -- train.py --name 'a b'")
    module = _objects("fsdp2-gpu", "rayjob", command=["python", "-m", "axolotl.cli.train", "cfg.yaml"])[-1][
        "spec"
    ]
    assert module["entrypoint"].endswith("--workers 8 --module -- axolotl.cli.train cfg.yaml")


def test_object_name() -> None:
    assert object_name("job", "env") == "job-env"


def test_deterministic() -> None:
    for target in TARGETS:
        assert json.dumps(_objects("zero3-gpu", target)) == json.dumps(_objects("zero3-gpu", target))


# ---- refusals: one line, naming the field --------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "overrides", "match"),
    [
        (
            "helmchart",
            {"image": None},
            r"^target: unknown target 'helmchart' \(choose one of rayjob, pytorchjob",
        ),
        ("rayjob", {"name": "a" * 48}, r"^name: 'a{48}' is 48 characters; a rayjob name may have at most 47"),
        ("pytorchjob", {"name": "a" * 55}, r"^name: .* at most 54"),
        ("trainjob", {"name": "a" * 49}, r"^name: .* a trainjob name may have at most 44"),
        ("trainjob", {"name": "Ft"}, r"^name: 'Ft' is not a DNS-1035 label"),
        ("rayjob", {"name": "9lives"}, r"^name: '9lives' is not a DNS-1035 label"),
        ("pytorchjob", {"name": "ft_job"}, r"^name: 'ft_job' is not a DNS-1035 label"),
        ("configmaps", {"name": "a" * 64}, r"^name: .* at most 63"),
        ("rayjob", {"image": None}, r"^image: is required for the rayjob target"),
        ("pytorchjob", {"image": None}, r"^image: is required for the pytorchjob target"),
        ("trainjob", {"command": []}, r"^command: the training command is required"),
        (
            "pytorchjob",
            {"command": ["torchrun", "train.py"]},
            r"^command: starts with the launcher 'torchrun'",
        ),
        (
            "trainjob",
            {"command": ["python", "-m", "accelerate.commands.launch"]},
            r"^command: starts with the launcher",
        ),
        (
            "rayjob",
            {"command": ["python", "-c", "print(1)"]},
            r"^command: Ray mode runs a Python script or module",
        ),
        ("configmaps", {"namespace": "ML"}, r"^namespace: 'ML' is not a DNS-1123 label"),
        ("pytorchjob", {"labels": {"team": "a b"}}, r"^labels.team: 'a b' is not a valid label value"),
        ("configmaps", {"labels": ["team=a"]}, r"^labels: must be a mapping of strings, got list"),
        ("configmaps", {"policy": "maybe"}, r"^policy: must be one of plan-wins, user-wins"),
    ],
)
def test_refusals(target: str, overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        compiled("zero3-gpu", target, **overrides)
    assert "\n" not in str(info.value)


def test_more_ray_workers_than_gpus_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^ray_num_workers: 9 Ray Train workers need 9 GPUs") as info:
        compiled({"deepspeed": "zero3", "bf16": True, "ray_num_workers": 9}, "rayjob")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"labels": {"team": "a b"}}, r"^labels.team: 'a b' is not a valid label value"),
        ({"node_selector": {"bad key!": "x"}}, r"^node_selector.bad key!: is not a valid label key"),
        ({"service_account": "Trainer"}, r"^service_account: 'Trainer' is not a DNS-1123 subdomain"),
        (
            {"tolerations": [{"key": "a", "efect": "NoSchedule"}]},
            r"^tolerations\[0\]: unknown field\(s\) efect",
        ),
        ({"tolerations": ["gpu"]}, r"^tolerations\[0\]: Input should be a valid dictionary"),
        ({"command": "python train.py"}, r"^command: must be a list of arguments, not one string"),
        ({"labels": ["team=a"]}, r"^labels: Input should be a valid dictionary"),
        ({"image": ""}, r"^image: String should have at least 1 character"),
        ({"target": "configmaps"}, r"^target: Input should be 'rayjob', 'pytorchjob' or 'trainjob'"),
        ({"serviceAccount": "Trainer"}, r"^serviceAccount: 'Trainer' is not a DNS-1123 subdomain"),
    ],
)
def test_bad_job_specs(fields: dict[str, Any], match: str) -> None:
    """The job model refuses in one line, naming the field as the caller spelled it."""
    with pytest.raises(ConfigError, match=match):
        parse_model(JobSpec, {"target": "pytorchjob", "image": "i", **fields})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"nodes": 0}, r"^nodes: Input should be greater than or equal to 1"),
        ({"gpus_per_node": True}, r"^gpus_per_node: Input should be a valid integer"),
        ({"torch_version": "2.6.0\n"}, r"^torch_version: must look like 2.6.0"),
        ({"gpus": 8}, r"^gpus: unknown field"),
    ],
)
def test_bad_topologies(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_model(Topology, fields)


def test_gpus_that_do_not_equal_the_parallel_sizes() -> None:
    hsdp = {
        "dp_shard_size": 2,
        "dp_replicate_size": 2,
        "bf16": True,
        "fsdp_version": 2,
        "fsdp_config": {"reshard_after_forward": True},
    }
    for target in JOBS:
        # 6 is not a multiple of 4; 8 is, but Accelerate needs exactly 4 processes (C28), and with both
        # sizes written Axolotl's loader has nothing to infer (C29).
        for gpus, says in (
            (3, "which does not divide the 6 processes"),
            (4, "but Accelerate needs them to equal the 8"),
        ):
            with pytest.raises(
                ConfigError,
                match=rf"^dp_shard_size: the parallelism sizes multiply to 4, {says} .*\(change the sizes",
            ):
                compiled(hsdp, target, nodes=2, gpus=gpus)
        compiled(hsdp, target, nodes=2, gpus=2)
    # A RayJob's processes are its Ray Train workers, not its GPUs.
    ray = compiled({**hsdp, "ray_num_workers": 4}, "rayjob", nodes=2, gpus=4)
    assert ray.workers == 4 and "--workers 4 " in ray.manifests()[-1]["spec"]["entrypoint"]


def test_configmap_over_one_mebibyte() -> None:
    big = {"zero_optimization": {"stage": 2}, "comment": "x" * (1024 * 1024)}
    with pytest.raises(
        ConfigError, match=r"^configmap ft-deepspeed: data is \d+ bytes, over the ConfigMap limit of 1 MiB"
    ):
        compiled({"deepspeed": big, "bf16": True}, "configmaps", nodes=1, gpus=1)


def test_a_plan_carrying_a_rendezvous_variable_is_refused() -> None:
    """The renderer's own guard, below compile(): no plan reaches a ConfigMap with a launcher's variable."""
    job = compiled("fsdp2-gpu", "pytorchjob")
    for name in ("MASTER_ADDR", "PET_NNODES", "OMPI_COMM_WORLD_RANK", "ACCELERATE_TORCH_DEVICE"):
        forged = type(job.plan)(**{**job.plan.__dict__, "env": (*job.plan.env, EnvVar(name, "x", "forged"))})
        request = Request("pytorchjob", "ft", "default", {}, target_of("pytorchjob"), job.launch, job.spec)
        with pytest.raises(OptimEnvError, match=f"{name} is a rendezvous variable"):
            render(forged, request)  # type: ignore[arg-type]


def test_compile_needs_a_name_to_render() -> None:
    """Without a name the job carries its plan, spec and size (a local run) and no objects."""
    job = compile(config_of("zero3-gpu"), Topology(nodes=1, gpus_per_node=2), "rayjob")
    assert job.objects == () and job.workers == 2 and job.hash == job.spec["hash"]
    assert job.deepspeed_json is not None and json.loads(job.deepspeed_json) == job.plan.deepspeed
