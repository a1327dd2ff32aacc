"""``optimenv render``: data on stdout only, one-line errors with exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optimenv.cli import main
from tests.render.conftest import EXAMPLES
from tests.render.validators import Validator


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_yaml_and_json_carry_the_same_objects(
    capsys: pytest.CaptureFixture[str], validator: Validator
) -> None:
    args = [
        "render",
        str(EXAMPLES / "zero3-gpu.yaml"),
        "--target",
        "pytorchjob",
        "--name",
        "ft",
        "-n",
        "ml",
        "--image",
        "img:1",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--service-account",
        "sa",
        "--node-selector",
        "pool=h100",
        "--toleration",
        '{"key": "gpu", "operator": "Exists"}',
        "-l",
        "team=nlp",
    ]
    command = ["--", "python", "train.py", "--lr", "1e-5"]
    code, out_yaml, err = _run(capsys, *args, *command)
    assert code == 0 and err == ""
    assert out_yaml.startswith("---\napiVersion: v1\nkind: ConfigMap\n")
    docs = list(yaml.safe_load_all(out_yaml))
    code, out_json, _ = _run(capsys, *args, "-o", "json", *command)
    assert code == 0
    listed = json.loads(out_json)
    assert (listed["apiVersion"], listed["kind"]) == ("v1", "List")
    assert listed["items"] == docs
    validator.validate_all(docs)
    master = docs[-1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert master["containers"][0]["command"][-4:] == ["python", "train.py", "--lr", "1e-5"]
    assert master["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert docs[-1]["metadata"]["labels"]["team"] == "nlp"


def test_bf16_supported_feeds_the_plan(capsys: pytest.CaptureFixture[str], validator: Validator) -> None:
    cfg = str(EXAMPLES / "fsdp2-cpu.yaml")  # bf16: auto
    _, unknown, _ = _run(capsys, "render", cfg, "--target", "configmaps", "--name", "a", "-o", "json")
    _, known, _ = _run(
        capsys, "render", cfg, "--target", "configmaps", "--name", "a", "--bf16-supported", "no", "-o", "json"
    )
    for listed in (unknown, known):
        validator.validate_all(json.loads(listed)["items"])
    assert "ACCELERATE_MIXED_PRECISION" not in json.loads(unknown)["items"][0]["data"]
    # GPUs without bf16: Axolotl trains bf16: auto in fp16 there (docs/compatibility.md C14).
    assert json.loads(known)["items"][0]["data"]["ACCELERATE_MIXED_PRECISION"] == "fp16"


def test_rayjob_takes_ray_num_workers_from_the_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, validator: Validator
) -> None:
    cfg = tmp_path / "ray.yaml"
    cfg.write_text("bf16: true\nuse_ray: true\nray_num_workers: 3\n")
    code, out, _ = _run(
        capsys,
        "render",
        str(cfg),
        "--target",
        "rayjob",
        "--name",
        "r",
        "--image",
        "i",
        "--gpus-per-node",
        "4",
        "-o",
        "json",
        "--",
        "python",
        "t.py",
    )
    assert code == 0
    validator.validate_all(json.loads(out)["items"])
    assert "--workers 3 -- t.py" in json.loads(out)["items"][-1]["spec"]["entrypoint"]


def test_rayjob_plans_for_its_ray_workers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """C28/C29: 4 Ray Train workers on 8 GPUs are 4 processes, so dp_shard_size 4 is the whole RayJob;
    the PyTorchJob's 8 processes make it HSDP, with the 2 replicas Axolotl's loader infers."""
    cfg = tmp_path / "ray.yaml"
    cfg.write_text(
        "bf16: true\nuse_ray: true\nray_num_workers: 4\ndp_shard_size: 4\nfsdp_version: 2\n"
        "fsdp_config:\n  reshard_after_forward: true\n"
    )
    common = ("--name", "r", "--image", "i", "--nodes", "2", "--gpus-per-node", "4", "--", "python", "t.py")
    code, out, _ = _run(capsys, "render", str(cfg), "--target", "rayjob", *common)
    assert code == 0 and "--workers 4 -- t.py" in out
    assert "PARALLELISM_CONFIG_DP_REPLICATE_SIZE" not in out
    code, out, err = _run(capsys, "render", str(cfg), "--target", "pytorchjob", *common)
    assert code == 0 and "PARALLELISM_CONFIG_DP_REPLICATE_SIZE: '2'" in out
    assert "dp_replicate_size: not set; 2 inferred from the 8 processes" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "helm", "--name", "a"], "error: --target: unknown target 'helm'"),
        (
            ["--target", "rayjob", "--name", "x" * 48, "--image", "i", "--", "python", "t.py"],
            "error: name: '" + "x" * 48 + "' is 48 characters; a rayjob name may have at most 47",
        ),
        (
            ["--target", "trainjob", "--name", "Bad_Name", "--image", "i", "--", "python", "t.py"],
            "error: name: 'Bad_Name' is not a DNS-1035 label",
        ),
        (["--target", "pytorchjob", "--name", "a", "--", "python", "t.py"], "error: image: is required"),
        (
            [
                "--target",
                "pytorchjob",
                "--name",
                "a",
                "--image",
                "i",
                "--gpus-per-node",
                "3",
                "--",
                "python",
                "t.py",
            ],
            "error: dp_shard_size: the parallelism sizes multiply to 4, but Accelerate needs them to equal "
            "the 3 processes",
        ),
        (
            ["--target", "pytorchjob", "--name", "a", "--image", "i", "--node-selector", "novalue"],
            "error: --node-selector: expected KEY=VALUE",
        ),
    ],
)
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    example = "parallel-gpu" if "--gpus-per-node" in extra else "fsdp2-gpu"
    code, out, err = _run(capsys, "render", str(EXAMPLES / f"{example}.yaml"), *extra)
    assert code == 1
    assert out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_configmap_over_one_mebibyte_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "big.yaml"
    cfg.write_text(
        json.dumps({"bf16": True, "deepspeed": {"zero_optimization": {"stage": 1}, "pad": "x" * 1_100_000}})
    )
    code, out, err = _run(capsys, "render", str(cfg), "--target", "configmaps", "--name", "big")
    assert (code, out) == (1, "")
    assert err.startswith("error: configmap big-deepspeed: data is ") and err.count("\n") == 1


def test_the_installed_command(validator: Validator) -> None:
    """The console script end to end, as `optimenv render ... | kubectl apply -f -` runs it."""
    exe = Path(sys.executable).with_name("optimenv")
    done = subprocess.run(
        [
            str(exe),
            "render",
            str(EXAMPLES / "fsdp2-gpu.yaml"),
            "--target",
            "trainjob",
            "--name",
            "ft",
            "--image",
            "i",
            "--",
            "python",
            "train.py",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    validator.validate_all(docs)
    assert [d["kind"] for d in docs] == ["ConfigMap", "ConfigMap", "TrainJob"]
