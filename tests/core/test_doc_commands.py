"""Every command in README.md and docs/*.md runs as shown (docs/cli.md says how blocks are marked).

``sh`` blocks run with ``set -e``; ``text`` blocks that start with ``$ COMMAND`` are transcripts whose
output must be what they show (durations aside). Commands that start with kubectl, helm or docker
are not run, nor the kubectl end of a pipeline; a block tagged after its language (``sh setup``,
``sh gpu``, ``sh cluster``, ``text cluster``) is not run and says why. The first-job page's cluster
transcripts are checked against what the tools produce for them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from optimenv.config import load_config
from optimenv.plan import Hardware, plan
from optimenv.resource import GROUP, crd_manifest, parse_spec
from tests.conftest import REPO

pytestmark = pytest.mark.slow

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TAGS = {"setup": "installs or edits a start-up file", "gpu": "needs GPUs", "cluster": "needs a cluster"}
NEEDS_A_CLUSTER = {"kubectl", "helm", "docker"}
_FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", re.M | re.S)
_DURATION = re.compile(r"\b\d+(\.\d+)?s\b")
# The log file of `optimenv run` / `ray-launch`: a new name each run (time stamp and process id).
_RUN_LOG = re.compile(r"\S*/optimenv-(run|ray-launch)-\d{8}-\d{6}-\d+\.log\b")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    tags: frozenset[str]
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def transcript(self) -> bool:
        return self.lang == "text" and self.text.startswith("$ ")


def _blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            tags = frozenset(match.group(2).split())
            found.append(Block(path, line, match.group(1), tags, match.group(3)))
    return found


BLOCKS = _blocks()
SH = [b for b in BLOCKS if b.lang == "sh" and not b.tags]
TRANSCRIPTS = [b for b in BLOCKS if b.transcript and not b.tags]


def _commands(text: str) -> list[str]:
    """Logical lines (continuations joined), without comments and blank lines."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def runnable(command: str) -> str | None:
    """The part of ``command`` that runs here: ``None`` when it needs a cluster, a pipeline's
    ``| kubectl ...`` end cut off."""
    stages = command.split(" | ")
    if shlex.split(stages[0])[0] in NEEDS_A_CLUSTER:
        return None
    for i, stage in enumerate(stages[1:], start=1):
        if shlex.split(stage)[0] in NEEDS_A_CLUSTER:
            return " | ".join(stages[:i])
    return command


def _transcript(text: str) -> list[tuple[str, str]]:
    """``[(command, output shown)]`` of a ``$ COMMAND`` block."""
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return [(command, "".join(f"{line}\n" for line in out)) for command, out in steps]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder with what the documented commands name: examples/ and manifests/."""
    for name in ("examples", "manifests"):
        shutil.copytree(REPO / name, tmp_path / name)
    return tmp_path


def _env(request: pytest.FixtureRequest, text: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OPTIMENV_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if "optimenv run " in text:  # the session's Ray cluster instead of starting another
        env["RAY_ADDRESS"] = request.getfixturevalue("ray_address")
    return env


def _bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def test_blocks_are_found_and_every_tag_says_why_it_is_not_run() -> None:
    assert len(SH) >= 8 and len(TRANSCRIPTS) >= 4, [b.id for b in BLOCKS]
    for block in BLOCKS:
        unknown = block.tags - set(TAGS)
        assert not unknown, f"{block.id}: unknown tag {sorted(unknown)}; one of {TAGS}"


def test_docs_point_at_no_file_outside_the_repository() -> None:
    """Readers of the repository do not have the reference material: docs say what matters."""
    for path in DOCS:
        found = re.findall(r"\.\./shared/\S+", path.read_text(encoding="utf-8"))
        assert not found, f"{path.relative_to(REPO)} points outside the repository: {found}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", SH, ids=[b.id for b in SH])
def test_sh_block_runs(block: Block, workdir: Path, request: pytest.FixtureRequest) -> None:
    commands = [c for c in map(runnable, _commands(block.text)) if c is not None]
    if not commands:
        return  # only kubectl / helm / docker
    done = _bash("\n".join(["set -euo pipefail", *commands]), workdir, _env(request, block.text))
    assert done.returncode == 0, (
        f"{block.id}: exit {done.returncode}; tag the block if it cannot run here ({TAGS})\n"
        f"{done.stderr[-3000:]}"
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", TRANSCRIPTS, ids=[b.id for b in TRANSCRIPTS])
def test_transcript_shows_the_real_output(
    block: Block, workdir: Path, request: pytest.FixtureRequest
) -> None:
    for command, shown in _transcript(block.text):
        assert runnable(command) == command, (
            f"{block.id}: `{command}` needs a cluster: tag the block `text cluster`"
        )
        done = _bash(command, workdir, _env(request, command))
        assert _comparable(done.stdout) == _comparable(shown), (
            f"{block.id}: $ {command}\n{done.stderr[-2000:]}"
        )


def _comparable(output: str) -> str:
    return _RUN_LOG.sub("TMPDIR/optimenv-LOG.log", _DURATION.sub("Ns", output))


# ---- docs/first-job.md: its cluster transcripts against what the tools produce -------------------

FIRST_JOB = REPO / "docs" / "first-job.md"


def _first_job_steps() -> dict[str, str]:
    """Each shown command of the page's cluster transcripts -> the output shown for it."""
    steps: dict[str, str] = {}
    for block in BLOCKS:
        if block.path == FIRST_JOB and block.transcript:
            steps.update(_transcript(block.text))
    return steps


def _step(prefix: str) -> tuple[str, list[str]]:
    [(command, shown)] = [(c, s) for c, s in _first_job_steps().items() if c.startswith(prefix)]
    return command, shown.splitlines()


def _rendered() -> list[dict[str, Any]]:
    command, _ = _step("optimenv render ")
    out = subprocess.run(
        [Path(sys.executable).with_name("optimenv"), *shlex.split(runnable(command) or "")[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return list(yaml.safe_load_all(out))


def _applied(obj: dict[str, Any]) -> str:
    group = obj["apiVersion"].rpartition("/")[0]
    return f"{obj['kind'].lower()}{'.' + group if group else ''}/{obj['metadata']['name']} serverside-applied"


def test_first_job_apply_and_logs_are_what_the_rendered_objects_give() -> None:
    objects = _rendered()
    assert _step("optimenv render ")[1] == [_applied(o) for o in objects]
    spec = next(o for o in objects if o["metadata"]["name"].endswith("-spec"))
    doc = yaml.safe_load(spec["data"]["spec.json"])
    decisions = "; ".join(f"{d['kind']}: nothing set" for d in doc["deferred"])
    summary = (
        f"optimenv-bootstrap: spec {doc['hash'][:15]} (plan-wins); {len(doc['env'])} set; {decisions}; "
        "exec torchrun"
    )
    assert _step("kubectl logs ")[1] == [summary]


def test_first_job_optimenv_is_valid_and_plans_like_the_rendered_job() -> None:
    text = FIRST_JOB.read_text()
    [resource] = [yaml.safe_load(b.text) for b in BLOCKS if b.path == FIRST_JOB and b.lang == "yaml"]
    spec = parse_spec(resource["spec"])
    assert resource["spec"]["config"] == yaml.safe_load((REPO / "examples" / "fsdp2-gpu.yaml").read_text())
    step_one = plan(load_config(REPO / "examples" / "fsdp2-gpu.yaml"), Hardware(nodes=1, gpus_per_node=2))
    assert plan(load_config(REPO / "examples" / "fsdp2-gpu.yaml"), spec.topology.hardware()) == step_one
    name = resource["metadata"]["name"]
    assert _step("kubectl apply --server-side -f llama-fsdp2.yaml")[1] == [
        f"optimenv.{GROUP}/{name} serverside-applied"
    ]
    columns = crd_manifest()["spec"]["versions"][0]["additionalPrinterColumns"]
    header = ["NAME", *(c["name"].upper() for c in columns if not c.get("priority"))]
    shown = _step("kubectl get optimenv")[1]
    assert shown[0].split() == header and shown[1].split()[:3] == [
        name,
        spec.job.target if spec.job else "",
        "True",
    ]
    assert f"name: {name}" in text


def test_first_job_helm_notes_are_the_charts() -> None:
    import helm_python as helm

    command, shown = _step("helm install ")
    words = shlex.split(command)
    sets = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--set")
    values = {
        "image": {"repository": sets["image.repository"]},
        "watch": {"namespaces": sets["watch.namespaces"].strip("{}").split(",")},
    }
    notes = helm.Chart.load(REPO / "helm" / "optimenv").render(
        values, name=words[2], namespace=words[words.index("--namespace") + 1]
    )["optimenv/templates/NOTES.txt"]
    assert shown[shown.index("NOTES:") + 1 :] == notes.strip("\n").splitlines()


def test_first_job_pytorchjob_columns_are_the_operators(shared: Path) -> None:
    crd = yaml.safe_load(
        (
            shared / "crds" / "kubeflow-training-operator-v1.9.4_pytorchjob_kubeflow.org-v1.crd.yaml"
        ).read_text()
    )
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    header = [
        "NAME",
        *(c["name"].upper() for c in version["additionalPrinterColumns"] if not c.get("priority")),
    ]
    assert _step("kubectl get pytorchjob ")[1][0].split() == header
