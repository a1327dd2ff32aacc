"""Hostile-input fuzzing shared by tests/fuzz and bench/fuzz_bench.py.

:func:`generate` turns real configs (``examples/``, optionally Axolotl's) into seeded cases: a
value replaced by a hostile fragment (huge or long integers, deep nesting, aliases, NUL and escape
characters, megabyte strings, wrong types), a key dropped, added or retyped, the text cut or
spliced, or a whole hostile document; each case also carries hardware, render options and a
mutation of the worker spec. :func:`check` runs one case through validate, plan, render, the
bootstrap's ``apply`` and the controller's ``desired()`` in this process and returns every breach
of the contract: a step either succeeds or raises ``OptimEnvError`` with one line, a refused
``apply`` changes nothing, and ``desired()`` never raises.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from optimenv.bootstrap._apply import apply_spec
from optimenv.compiler import compile
from optimenv.config import TrainingConfig, parse_config, parse_yaml
from optimenv.errors import MESSAGE_MAX, OptimEnvError
from optimenv.plan import Hardware, Plan, plan
from optimenv.spec import build_spec, content_hash, deepspeed_text
from optimenv.validation import parse_model
from optimenv.workload import TARGETS, JobSpec, Topology
from optimenv_controller import reconcile as rc

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

# Seeds beyond examples/: the sections the planner reads, each shape at least once.
BUILT_IN_SEEDS: list[dict[str, Any]] = [
    {"fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "Block"}},
    {
        "fsdp_version": 1,
        "fsdp_config": {"sharding_strategy": "SHARD_GRAD_OP", "backward_prefetch": "BACKWARD_PRE"},
    },
    {
        "deepspeed": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}},
        "tensor_parallel_size": 2,
    },
    {"deepspeed": "ds.json", "gradient_accumulation_steps": 4, "deepcompile": True},
    {"deepspeed": "zero3_offload_all", "batch_size": 16, "micro_batch_size": 2, "adapter": "qlora"},
    {"context_parallel_size": 2, "sample_packing": True, "micro_batch_size": 1, "ddp_timeout": 1800},
    {"torch_compile": "auto", "torch_compile_backend": "inductor", "fp8": True, "optimizer": "muon"},
    {"use_ray": True, "ray_num_workers": 4, "resources_per_worker": {"GPU": 1}, "expert_parallel_size": 2},
]
KNOWN_KEYS = (
    "fsdp", "fsdp_version", "fsdp_config", "deepspeed", "deepcompile", "bf16", "fp16", "fp8", "tf32",
    "torch_compile", "torch_compile_backend", "tensor_parallel_size", "dp_shard_size", "dp_replicate_size",
    "context_parallel_size", "sequence_parallel_degree", "expert_parallel_size",
    "gradient_accumulation_steps",
    "micro_batch_size", "batch_size", "ddp_timeout", "use_ray", "ray_num_workers", "resources_per_worker",
    "optimizer", "rl", "adapter", "load_in_4bit", "load_in_8bit", "relora", "fp32_norms", "sample_packing",
    "gradient_checkpointing_kwargs", "lora_mlp_kernel", "fp8_enable_fsdp_float8_all_gather",
)  # fmt: skip
FSDP_KEYS = (
    "fsdp_version", "version", "offload_params", "fsdp_offload_params", "min_num_params", "auto_wrap_policy",
    "transformer_layer_cls_to_wrap", "sharding_strategy", "reshard_after_forward", "state_dict_type",
    "cpu_offload_pin_memory", "cpu_ram_efficient_loading", "backward_prefetch", "activation_checkpointing",
)  # fmt: skip


def fragment(rng: random.Random, scale: float) -> str:
    """One hostile YAML value, written in flow style so it fits any value position."""
    n = max(2, int(rng.choice((10, 100, 1000, 10_000)) * scale))
    choices: list[Callable[[], str]] = [
        lambda: "1" * rng.choice((19, 20, 100, 101, 4301, 5000)),
        lambda: "0x" + "f" * rng.choice((15, 16, 17, 3600)),
        lambda: "-" + "9" * rng.choice((19, 30)),
        lambda: str(rng.choice((0, -1, 1, 2, 3, 7, 2**31, 2**63 - 1, 2**63, -(2**63)))),
        lambda: "1" + ":59" * rng.choice((2, 30, 300)),
        lambda: '"' + "9" * rng.choice((19, 40, 5000)) + '"',
        lambda: rng.choice((".nan", ".inf", "-.inf", "1e400", "1.5", "2.0", "0.0")),
        lambda: rng.choice(("true", "false", "null", "~", "yes", "auto", "''", '""', "[]", "{}")),
        lambda: rng.choice(("2024-01-01", "2024-01-01T10:00:00Z", "!!binary aGVsbG8=", "!!set {a, b}")),
        lambda: rng.choice(("!!python/object/apply:os.system [ls]", "!!omap [a: 1]", "!!str 3", "!!int x")),
        lambda: rng.choice(
            ("!!bool x", "!!float x", "!!timestamp x", "!!int ''", "!!binary '!'", "!!map [1]")
        ),
        lambda: '"' + rng.choice(("\\0", "\\e[31m", "\\n", "\\t", "A=B", "\\u2028", "\\x85")) + 'x"',
        lambda: '"' + "x" * n * 10 + '"',
        lambda: "[" * min(n, 3000) + "1" + "]" * min(n, 3000),
        lambda: "{a: " * min(n, 200) + "1" + "}" * min(n, 200),
        lambda: "[" + ", ".join(["1"] * n) + "]",
        lambda: "[" + ", ".join(f"{{k{i}: [1, 2]}}" for i in range(min(n, 2000))) + "]",
        lambda: rng.choice(("[adamw_8bit]", "{name: adamw}", "[full_shard, offload]", "FULL_SHARD")),
        lambda: rng.choice(("zero3", "zero1", "ds.json", "not-deepspeed.json", "nowhere.json", "fifo.json")),
        lambda: rng.choice(("/dev/zero", "big.json", "nested.json", "deep.json", ".", '"a\\0b.json"')),
        lambda: (
            "{zero_optimization: {stage: " + rng.choice(("3", '"3"', "5", "x", "[3]", "0x" + "f" * 99)) + "}}"
        ),
        lambda: rng.choice(("*undefined", "&a [*a]", "'unterminated", "[1, 2", "{a: 1", "- x", "a: b: c")),
    ]
    return rng.choice(choices)()


def hostile_document(rng: random.Random, scale: float) -> str:
    """A whole document built to exhaust time or memory (sizes scaled by ``scale``)."""
    size = max(2, int(1_000_000 * scale))
    refs = max(2, int(3000 * min(scale, 1.0)))
    kind = rng.randrange(6)
    if kind == 0:
        return f'a: &a "{"x" * size}"\nb: [{", ".join(["*a"] * refs)}]\n'
    if kind == 1:
        lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
        lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
        return "\n".join(lines) + "\ndeepspeed: {zero_optimization: {stage: 3}, x: *l8}\n"
    if kind == 2:
        return "x: [" + ",".join(["1"] * max(2, int(1_500_000 * scale))) + "]\n"
    if kind == 3:
        depth = max(2, int(100_000 * scale))
        return "a: " + "[" * depth + "]" * depth + "\n"
    if kind == 4:
        return "".join(f"{' ' * i}k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n"
    return "bf16: true\n---\nbf16: false\n"


@dataclass(frozen=True)
class Case:
    """One fuzz input and everything around it; ``spec_seed`` drives the worker-spec mutation."""

    index: int
    text: str
    hardware: dict[str, Any]
    target: str
    options: dict[str, Any]
    spec_seed: int
    deepspeed_path: str = "ds-on-worker.json"


def _paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*at, index))


def _mutate_data(rng: random.Random, data: dict[str, Any], frags: dict[str, str], scale: float) -> None:
    """Change ``data`` in place; a placeholder stands for each raw YAML fragment."""
    token = f"FUZZFRAG{len(frags):04d}"
    frags[token] = fragment(rng, scale)
    paths = [p for p in _paths(data) if p]
    op = rng.randrange(6)
    if op == 0 and paths:  # replace a value anywhere
        *parent, last = rng.choice(paths)
        _at(data, parent)[last] = token
    elif op == 1 and paths:  # drop a key
        *parent, last = rng.choice([p for p in paths if isinstance(p[-1], str)] or paths)
        del _at(data, parent)[last]
    elif op == 2:  # add a key the planner reads
        data[rng.choice(KNOWN_KEYS)] = token
    elif op == 3:  # a key inside fsdp_config
        fsdp = data.get("fsdp_config")
        if not isinstance(fsdp, dict):
            fsdp = data["fsdp_config"] = {}
        fsdp[rng.choice(FSDP_KEYS)] = token
    elif op == 4:  # a key YAML reads as another type, or a long one
        key_token = f"FUZZKEY{len(frags):04d}"
        frags[key_token] = rng.choice(("true", "1", "null", "[a]", "k" * 2000, "? " + "k" * 5000 + "\n"))
        data[key_token] = 1
    else:
        data["deepspeed"] = {"zero_optimization": {"stage": 2}, rng.choice(("train_batch_size", "x")): token}


def _at(data: Any, path: list[Any]) -> Any:
    for key in path:
        data = data[key]
    return data


def _mutate_text(rng: random.Random, text: str) -> str:
    if not text:
        return text
    cut = rng.randrange(len(text))
    op = rng.randrange(4)
    if op == 0:
        return text[:cut]
    if op == 1:
        return (
            text[:cut]
            + rng.choice(("\t", "\x00", "\x1b", ":", "- ", "&x ", "*x", "\ufeff", "'"))
            + text[cut:]
        )
    if op == 2:
        lines = text.splitlines(keepends=True)
        line = rng.randrange(len(lines))
        return "".join(lines[: line + 1] + lines[line:])
    return text + text


# Per option: the value a sound job has, then values that must be refused (or pass) cleanly.
OPTION_VALUES: dict[str, tuple[Any, ...]] = {
    "name": ("ft", "ft\n", "", "A", "-x", "a" * 64, "x.y", "ft-1"),
    "namespace": ("ml", "ML", "ml\n", "a" * 64),
    "image": ("img:1", "", " img", "img\n", "img:\x1b"),
    "command": (("python", "train.py"), (), ("torchrun", "x.py"), ("python", "-c", "1"), ("python", "\0")),
    "nodes": (1, 2, 0, 2**70),
    "gpus_per_node": (2, 1, 8, 0),
    "service_account": (None, "sa", "sa\n", "SA"),
    "labels": ({}, {"team": "nlp"}, {"team": "nlp\n"}, {"x" * 70: "y"}, {"t": "v" * 100_000}),
    "node_selector": ({}, {"pool": "h100"}, {"pool\n": "h100"}),
    "runtime": (None, "torch-distributed", "rt\n"),
    "tolerations": ((), ({"key": "gpu", "operator": "Exists"},), ({"efect": "x"},)),
}
HARDWARE_VALUES: dict[str, tuple[Any, ...]] = {
    "nodes": (1, None, 2, 0, 2**70),
    "gpus_per_node": (2, None, 4, 8),
    "bf16_supported": (None, True, False),
    "fp8_supported": (None, True, False),
    "torch_version": (None, "2.13.0", "2.5.0", "2.6.0\n", "abc"),
}


def _pick(rng: random.Random, values: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """The first (sound) value of each, with one or two changed half of the time."""
    chosen = {key: options[0] for key, options in values.items()}
    if rng.random() < 0.5:
        for key in rng.sample(sorted(values), rng.choice((1, 2))):
            chosen[key] = rng.choice(values[key])
    return chosen


def generate(
    seed: int, count: int, *, scale: float = 0.1, extra_seeds: tuple[Path, ...] = ()
) -> Iterator[Case]:
    """``count`` cases, the same for the same arguments."""
    rng = random.Random(seed)
    files = sorted(EXAMPLES.glob("*.yaml")) + list(extra_seeds)
    seeds = [yaml.safe_load(p.read_text()) for p in files] + BUILT_IN_SEEDS
    seeds = [s for s in seeds if isinstance(s, dict)]
    for index in range(count):
        if rng.random() < 0.03:
            text = hostile_document(rng, scale)
        else:
            data = copy.deepcopy(rng.choice(seeds))
            frags: dict[str, str] = {}
            for _ in range(rng.choice((1, 1, 2, 3))):
                _mutate_data(rng, data, frags, scale)
            text = yaml.safe_dump(data, sort_keys=False)
            for token, raw in frags.items():
                text = text.replace(token, raw)
            if rng.random() < 0.1:
                text = _mutate_text(rng, text)
        yield Case(
            index,
            text,
            _pick(rng, HARDWARE_VALUES),
            rng.choice(TARGETS),
            _pick(rng, OPTION_VALUES),
            rng.randrange(2**32),
        )


@dataclass
class Report:
    """What :func:`check` found: breaches of the contract, and which steps refused or passed."""

    breaches: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    over_memory: bool = False


def _step(report: Report, name: str, func: Callable[[], Any]) -> Any:
    """Run one step; a refusal must be an OptimEnvError of one line."""
    try:
        result = func()
    except OptimEnvError as exc:
        message = str(exc)
        if not message or "\n" in message or len(message) > MESSAGE_MAX:
            report.breaches.append(f"{name}: refusal is not one line: {message[:300]!r}")
        report.refused.append(name)
        return None
    except MemoryError:
        report.over_memory = True
        report.breaches.append(f"{name}: MemoryError")
        return None
    except Exception as exc:  # the contract forbids anything else: record where it came from
        where = traceback.extract_tb(exc.__traceback__)[-1]
        report.breaches.append(
            f"{name}: {type(exc).__name__}: {str(exc)[:200]} ({Path(where.filename).name}:{where.lineno})"
        )
        return None
    report.passed.append(name)
    return result


def write_worker_files(folder: Path) -> None:
    """The files the seeds and fragments name, in the folder relative DeepSpeed paths resolve in."""
    (folder / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (folder / "not-deepspeed.json").write_text(json.dumps({"auths": {"r": {"auth": "c2VjcmV0"}}}))
    (folder / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "deep.json").write_text('{"zero_optimization": {"stage": 2}, "x": ' + "9" * 5000 + "}")
    with open(folder / "big.json", "wb") as handle:
        handle.truncate(6 * 1024**3)  # sparse
    if not (folder / "fifo.json").exists():
        os.mkfifo(folder / "fifo.json")


def check(case: Case, folder: Path) -> Report:
    """Run ``case`` through every entry point (files it names live in ``folder``)."""
    report = Report()
    data = _step(report, "parse_yaml", lambda: parse_yaml(case.text))
    config = data is not None and _step(report, "validate", lambda: parse_config(data, base_dirs=(folder,)))
    if config:
        _step(report, "plan", lambda: plan(config).to_json())
        hardware = _step(report, "hardware", lambda: Hardware(**case.hardware))
        ds_path = str(folder / case.deepspeed_path)
        planned = hardware and _step(
            report, "plan-hw", lambda: plan(config, hardware, deepspeed_path=ds_path)
        )
        if planned:
            _check_render(report, case, config, ds_path)
            _check_bootstrap(report, case, planned, folder)
    _check_desired(report, case, data)
    return report


_JOB_FIELDS = ("image", "command", "service_account", "node_selector", "runtime", "tolerations")


def _check_render(report: Report, case: Case, config: TrainingConfig, ds_path: str) -> None:
    """compile() with the case's options as a job, topology and object metadata, then the output."""
    fields = {"target": case.target, **{key: case.options[key] for key in _JOB_FIELDS}}
    job = None if case.target == "configmaps" else _step(report, "job", lambda: parse_model(JobSpec, fields))
    sizes = {"nodes": case.options["nodes"], "gpus_per_node": case.options["gpus_per_node"]}
    topology = _step(report, "topology", lambda: parse_model(Topology, {**case.hardware, **sizes}))
    if topology is None or (job is None and case.target != "configmaps"):
        return
    compiled = _step(
        report,
        "render",
        lambda: compile(
            config,
            topology,
            job or case.target,
            name=case.options["name"],
            namespace=case.options["namespace"],
            labels=case.options["labels"],
            deepspeed_path=ds_path,
        ),
    )
    if compiled:
        _step(report, "render-out", lambda: (compiled.to_yaml(), compiled.to_json()))


def _check_bootstrap(report: Report, case: Case, planned: Plan, folder: Path) -> None:
    if planned.deepspeed is not None and planned.deepspeed_path:
        Path(planned.deepspeed_path).write_text(deepspeed_text(planned.deepspeed))
    spec = _step(report, "spec", lambda: build_spec(planned))
    if not spec:
        return
    doc = mutate_spec(random.Random(case.spec_seed), spec)
    environ = {"PATH": "/bin", "HOME": "/root"}
    before = dict(environ)
    applied = _step(report, "apply", lambda: apply_spec(doc, environ, in_process=False))
    if applied is None and environ != before:
        report.breaches.append("apply: refused after changing the environment")


def mutate_spec(rng: random.Random, spec: dict[str, Any]) -> Any:
    """A worker spec as a hostile or broken renderer (or a hand edit) could leave it."""
    doc = copy.deepcopy(spec)
    op = rng.randrange(10)
    env = doc["env"]
    if op == 0 and env:
        rng.choice(env)["name"] = rng.choice(("A=B", "", "1X", "X" * 5000, "PET_X", "RANK", "Ä"))
    elif op == 1 and env:
        rng.choice(env)["value"] = rng.choice(("a\0b", 10**5000, None, "x" * 100_000, ["x"]))
    elif op == 2 and env:
        env.append(copy.deepcopy(rng.choice(env)))
    elif op == 3:
        doc["deferred"].append(
            rng.choice(
                (
                    {"kind": "bf16_auto", "detail": {}},
                    {"kind": "x", "detail": {}},
                    {"kind": "nccl_p2p_check", "variable": "A=B", "detail": {}},
                    {"kind": "single_gpu_rendezvous_defaults", "detail": {"defaults": 1}},
                )
            )
        )
    elif op == 4:
        doc["deepspeed"] = rng.choice(({"x": [[[[1]]]] * 3}, {"x": 10**5000}, [1], "x", {"a": "b\0"}))
    elif op == 5:
        doc[rng.choice(("policy", "env", "deferred", "deepspeedPath"))] = rng.choice((None, 1, "x", [], {}))
    elif op == 6:
        deep: Any = 1
        for _ in range(rng.choice((10, 100, 2000))):
            deep = [deep]
        doc["warnings"] = deep
    else:
        return doc  # unchanged: the spec as rendered must apply
    if rng.random() < 0.8:  # re-signed, as a renderer with a bug would: only the checks after the hash see it
        body = {k: v for k, v in doc.items() if k != "hash"}
        with contextlib.suppress(ValueError, RecursionError):  # a huge int or deep list cannot be hashed
            doc["hash"] = content_hash(body)
    return doc


def _check_desired(report: Report, case: Case, data: Any) -> None:
    meta = {"name": "demo", "namespace": "ml", "uid": "u", "generation": 1}
    by_ref = {
        "apiVersion": "optimenv.dev/v1alpha1",
        "kind": "OptimEnv",
        "metadata": meta,
        "spec": {"configMapRef": {"name": "cm"}, "topology": {"nodes": 1, "gpusPerNode": 2}},
    }
    wants = [("desired-ref", lambda: rc.desired(by_ref, {"data": {"config.yaml": case.text}}))]
    if isinstance(data, dict):
        inline = {**by_ref, "spec": {"config": data, "topology": {"nodes": 1, "gpusPerNode": 2}}}
        wants.append(("desired-inline", lambda: rc.desired(inline)))
    for name, func in wants:
        want = _step(report, name, func)
        if name in report.refused:
            report.breaches.append(f"{name}: raised instead of answering Invalid")
        elif isinstance(want, rc.Invalid) and ("\n" in want.message or not want.message):
            report.breaches.append(f"{name}: Invalid message is not one line: {want.message[:300]!r}")
