"""``apply()``: make a worker spec true in this process's environment.

Order: read and verify the spec, refuse if Accelerate's state already exists, check the DeepSpeed
JSON on disk, decide every deferred step, check every planned variable against the environment,
and only then write. A refusal leaves the environment as it was.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, NamedTuple

from optimenv import limits
from optimenv.bootstrap import _probe
from optimenv.errors import OptimEnvError, shown
from optimenv.spec import (
    DEFERRED_KINDS,
    LAUNCHER_VARIABLES,
    SPEC_ENV,
    SPEC_PATH,
    SpecError,
    set_by_launcher,
    verify_spec,
)

# transformers keeps only a weakref to its DeepSpeed config; these strong references keep
# is_deepspeed_zero3_enabled() true for the life of the process (Axolotl's D10).
_KEEP_ALIVE: list[object] = []
# The last result per (spec hash, mode, deepspeed copy) with the mapping it was applied to, so a
# second apply() to the same environment returns the same record.
_APPLIED: dict[tuple[str, bool, str | None], tuple[Mapping[str, str], Applied]] = {}


#: What makes Accelerate run the processes of a CPU-only worker as one gloo group (MULTI_CPU); without
#: it each process runs alone (exec mode under torchrun) or ignores Ray's group (Ray mode).
CPU_VARIABLE = "ACCELERATE_USE_CPU"

Extra = tuple[tuple[str, str, str], ...]


def cpu_variables(environ: Mapping[str, str], source: str, *, cpu: bool | None = None) -> Extra:
    """``ACCELERATE_USE_CPU=true`` for CPU workers (``cpu``; ``None``: when no GPU is visible), unless
    the environment sets it already: setting it, to ``false`` say, is how a user opts out."""
    if cpu is False or CPU_VARIABLE in environ:
        return ()
    if cpu is None and _probe.no_gpu_reason(environ) is None:
        return ()
    return ((CPU_VARIABLE, "true", source),)


class BootstrapError(OptimEnvError):
    """The bootstrap refuses to start the worker (the message says why and what to do)."""


# The records are NamedTuples: importing dataclasses and building frozen dataclasses cost the exec
# path ~10 ms, a third of a bare interpreter start (bench/bootstrap_bench.py).


class Variable(NamedTuple):
    """One planned variable and what the bootstrap did with it.

    ``value`` is what the environment holds now, ``planned`` what the plan asked for, ``source`` the
    config key behind the plan's value (or ``environment`` when the environment's value was kept).
    """

    name: str
    value: str
    planned: str
    source: str
    reason: str


class Decision(NamedTuple):
    """A deferred step as decided on this worker; ``value`` is what it set (``None``: nothing)."""

    kind: str
    variable: str | None
    value: str | None
    reason: str


class Applied(NamedTuple):
    """What :func:`apply` did: ``assigned`` it wrote, ``kept`` it found already set and left alone.

    Immutable. ``zero3_config`` is the live ``HfTrainerDeepSpeedConfig`` for ZeRO-3 (in-process and
    Ray modes; the bootstrap also holds it for the life of the process), else ``None``.
    """

    spec_hash: str
    spec_path: str | None
    policy: str
    assigned: tuple[Variable, ...]
    kept: tuple[Variable, ...]
    decisions: tuple[Decision, ...]
    deepspeed_path: str | None
    in_process: bool
    zero3_config: object | None = None

    @property
    def env(self) -> dict[str, str]:
        """Every planned variable with the value it has now."""
        return {v.name: v.value for v in (*self.assigned, *self.kept)}

    def holds_in(self, environ: Mapping[str, str]) -> bool:
        return all(environ.get(name) == value for name, value in self.env.items())

    def summary(self) -> str:
        """One line for logs."""
        parts = [f"spec {self.spec_hash[:15]} ({self.policy})", f"{len(self.assigned)} set"]
        if self.kept:
            parts.append(f"{len(self.kept)} kept ({', '.join(v.name for v in self.kept)})")
        for d in self.decisions:
            parts.append(f"{d.kind}: {f'{d.variable}={d.value}' if d.value is not None else 'nothing set'}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the Ray reports carry it)."""

        def var(v: Variable) -> dict[str, str]:
            return {
                "name": v.name,
                "value": v.value,
                "planned": v.planned,
                "source": v.source,
                "reason": v.reason,
            }

        return {
            "specHash": self.spec_hash,
            "specPath": self.spec_path,
            "policy": self.policy,
            "assigned": [var(v) for v in self.assigned],
            "kept": [var(v) for v in self.kept],
            "decisions": [
                {"kind": d.kind, "variable": d.variable, "value": d.value, "reason": d.reason}
                for d in self.decisions
            ],
            "deepspeedPath": self.deepspeed_path,
            "inProcess": self.in_process,
            "zero3ConfigAlive": self.zero3_config is not None,
        }


class _Want(NamedTuple):
    name: str
    value: str
    source: str
    mode: Literal["set", "default"]


SpecArg = str | os.PathLike[str] | Mapping[str, Any] | None


def apply(spec: SpecArg = None, *, environ: MutableMapping[str, str] = os.environ) -> Applied:
    """Apply a worker spec to ``environ`` (this process's environment by default).

    ``spec``: a path, an already loaded spec document, or ``None`` for ``$OPTIMENV_SPEC`` or
    ``/etc/optimenv/spec.json``. Call it before anything creates Accelerate's state (``Accelerator``,
    ``PartialState``, ``TrainingArguments``). For ZeRO-3 it also creates transformers'
    ``HfTrainerDeepSpeedConfig`` and keeps it alive, so ``is_deepspeed_zero3_enabled()`` is true in
    this process. Idempotent: a second call with the same spec returns the same record.
    Raises :class:`~optimenv.errors.OptimEnvError` (one line) when it refuses.
    """
    return apply_spec(spec, environ, in_process=True)


def load_spec(spec: SpecArg, environ: Mapping[str, str]) -> tuple[dict[str, Any], str | None]:
    """The verified spec document and the path it came from (``None`` for a mapping)."""
    if spec is not None and not isinstance(spec, str | os.PathLike):
        return verify_spec(dict(spec)), None
    if spec is not None:
        path, origin = os.fspath(spec), "--spec"
    elif environ.get(SPEC_ENV):
        path, origin = environ[SPEC_ENV], f"${SPEC_ENV}"
    else:
        path, origin = SPEC_PATH, "the default location"
    data = _read_json(
        path,
        error=SpecError,
        label="spec",
        where=f" (from {origin})",
        missing=f"spec: no worker spec at {limits.key_text(path, 200)} (from {origin}); pass --spec PATH, "
        f"set {SPEC_ENV}, "
        f"or mount the spec ConfigMap rendered by optimenv at {SPEC_PATH}",
        fix="render it again with optimenv",
    )
    return verify_spec(data), os.path.abspath(path)


def _read_json(path: str, *, error: type[Exception], label: str, where: str, missing: str, fix: str) -> Any:
    """Parse the JSON file at ``path`` within the bounds; every way it can fail is one line of ``error``."""
    name = limits.key_text(path, 200)
    try:
        raw = limits.read_file(path, limits.MAX_JSON_FILE_BYTES)
    except FileNotFoundError:
        raise error(missing) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        raise error(f"{label}: cannot read {name}{where}: {reason}; {fix}") from None
    try:
        return limits.load_json(raw.decode("utf-8"), label)
    except UnicodeDecodeError:
        raise error(f"{label}: {name}{where} is not UTF-8 text; {fix}") from None
    except ValueError as exc:
        raise error(f"{label}: {name} is not valid JSON ({limits.json_problem(exc)}); {fix}") from None
    except OptimEnvError as exc:  # beyond a bound: nesting, integers, size
        raise error(f"{exc}; {fix}") from None


def apply_spec(
    spec: SpecArg,
    environ: MutableMapping[str, str],
    *,
    in_process: bool,
    deepspeed_path: str | None = None,
    extra: tuple[tuple[str, str, str], ...] = (),
) -> Applied:
    """:func:`apply` for every mode.

    ``in_process``: the caller trains in this process (keep the ZeRO-3 config alive); false for
    exec mode, where nothing in this process survives ``exec``. ``deepspeed_path``: a worker-local
    copy of the DeepSpeed JSON to use instead of the spec's path (Ray mode). ``extra``: variables
    the mode itself needs, as ``(name, value, source)`` (Ray on CPU: ``ACCELERATE_USE_CPU``).
    """
    doc, path = load_spec(spec, environ)
    wants, deferred = _parse(doc)
    key = (str(doc["hash"]), in_process, deepspeed_path)
    previous = _APPLIED.get(key)
    if previous is not None and previous[0] is environ and previous[1].holds_in(environ):
        return previous[1]
    _refuse_if_accelerate_started()

    ds_path = _check_deepspeed(doc, deepspeed_path)
    if deepspeed_path is not None:
        wants = [
            _Want(w.name, deepspeed_path, w.source, w.mode)
            if w.name == "ACCELERATE_DEEPSPEED_CONFIG_FILE" and w.value == doc["deepspeedPath"]
            else w
            for w in wants
        ]
    wants += [_Want(name, value, source, "set") for name, value, source in extra]

    decisions: list[Decision] = []
    zero3: object | None = None
    for i, step in enumerate(deferred):
        try:
            decision, more = _decide(step, environ, ds_path=ds_path, in_process=in_process)
        except KeyError as exc:
            raise SpecError(f"spec.deferred[{i}].detail: {step['kind']} needs {shown(exc.args[0])}") from None
        if step["kind"] == "deepspeed_zero3_config" and in_process and ds_path is not None:
            zero3 = _zero3_config(ds_path)
        decisions.append(decision)
        wants += more

    _check_wants(wants)
    assigned, kept = _resolve(wants, environ, policy=str(doc["policy"]))
    _refuse_unusable_tensor_parallel(assigned, environ)
    _write(assigned, environ)
    if zero3 is not None:
        _KEEP_ALIVE.append(zero3)
    result = Applied(
        spec_hash=str(doc["hash"]),
        spec_path=path,
        policy=str(doc["policy"]),
        assigned=tuple(assigned),
        kept=tuple(kept),
        decisions=tuple(decisions),
        deepspeed_path=ds_path,
        in_process=in_process,
        zero3_config=zero3,
    )
    _APPLIED[key] = (environ, result)
    return result


def _check_wants(wants: list[_Want]) -> None:
    """Every variable, the deferred steps' included, is writable and planned once."""
    seen: set[str] = set()
    for want in wants:
        _check_variable(f"spec ({limits.key_text(want.source)})", want.name, want.value)
        if want.name in seen:
            raise SpecError(
                f"spec: {limits.key_text(want.name)} is planned twice ({limits.key_text(want.source)}), "
                "so which value wins is undefined; render the spec again with optimenv"
            )
        seen.add(want.name)


def _write(assigned: list[Variable], environ: MutableMapping[str, str]) -> None:
    """Write every variable or none: a write that fails undoes the ones before it."""
    done: list[str] = []
    try:
        for var in assigned:
            environ[var.name] = var.value
            done.append(var.name)
    except BaseException as exc:
        for name in done:
            environ.pop(name, None)  # assigned only where nothing was set, so removing restores
        if isinstance(exc, OSError | ValueError):
            raise BootstrapError(
                f"environment: cannot set {limits.key_text(var.name)} ({shown(str(exc))}); nothing was set"
            ) from None
        raise


def _parse(doc: Mapping[str, Any]) -> tuple[list[_Want], list[dict[str, Any]]]:
    wants: list[_Want] = []
    env = doc.get("env")
    if not isinstance(env, list):
        raise SpecError("spec.env: must be a list of {name, value, source, mode}")
    for i, entry in enumerate(env):
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), str) for k in ("name", "value", "source", "mode")
        )
        if not ok or entry["mode"] not in ("set", "default"):
            raise SpecError(f"spec.env[{i}]: must be {{name, value, source, mode: set|default}} strings")
        name = entry["name"]
        _check_variable(f"spec.env[{i}]", name, entry["value"])
        if set_by_launcher(name):
            raise SpecError(
                f"spec.env[{i}]: {limits.key_text(name)} is a rendezvous variable that only the launcher "
                "sets; remove it from the spec"
            )
        if any(w.name == name for w in wants):
            raise SpecError(
                f"spec.env[{i}]: {limits.key_text(name)} is listed twice, so which value wins is undefined; "
                "render the spec again with optimenv"
            )
        wants.append(_Want(name, entry["value"], entry["source"], entry["mode"]))
    deferred = doc.get("deferred")
    if not isinstance(deferred, list):
        raise SpecError("spec.deferred: must be a list")
    for i, step in enumerate(deferred):
        if not isinstance(step, dict) or not isinstance(step.get("detail"), dict):
            raise SpecError(f"spec.deferred[{i}]: must be {{kind, variable, source, detail}}")
        variable = step.get("variable")
        if variable is not None:
            _check_variable(f"spec.deferred[{i}].variable", variable if isinstance(variable, str) else "", "")
        if step.get("kind") not in DEFERRED_KINDS:
            raise SpecError(
                f"spec.deferred[{i}].kind: {shown(step.get('kind'))} is unknown to this bootstrap; "
                "install the optimenv version that rendered the spec in the worker image"
            )
    return wants, deferred


def _check_variable(where: str, name: str, value: str) -> None:
    """What ``os.environ`` could not hold, or a shell could not name, is refused before any write."""
    if not (name.isascii() and (name[:1].isalpha() or name[:1] == "_") and name.replace("_", "a").isalnum()):
        raise SpecError(
            f"{where}: {shown(name)} is not an environment variable name (letters, digits and _, "
            "not starting with a digit); render the spec again with optimenv"
        )
    if "\0" in value:
        raise SpecError(
            f"{where}: the value of {limits.key_text(name)} contains a NUL character, which no "
            "environment can hold; "
            "render the spec again with optimenv"
        )


def _refuse_if_accelerate_started() -> None:
    # Only look if Accelerate is already imported: importing it here would cost seconds and prove nothing.
    state = sys.modules.get("accelerate.state")
    if state is None:
        return
    for name in ("PartialState", "AcceleratorState"):
        cls = getattr(state, name, None)
        if cls is not None and len(getattr(cls, "_shared_state", {})) > 0:
            raise BootstrapError(
                f"accelerate: {name} is already initialised in this process, so the planned "
                "environment would be silently ignored; call optimenv.bootstrap.apply() before "
                "anything creates Accelerator, PartialState or TrainingArguments (or start the "
                "script with optimenv-bootstrap or python -m optimenv.bootstrap run)"
            )


def _refuse_unusable_tensor_parallel(assigned: list[Variable], environ: Mapping[str, str]) -> None:
    """FSDP2 with tensor parallelism fails in Accelerate's prepare() on some library pairs: say so now.

    Otherwise the failure comes after the model is loaded, minutes into every worker's start.
    """
    final = {v.name: v.value for v in assigned}

    def seen(name: str) -> str | None:
        return final.get(name, environ.get(name))

    try:
        tp_size = int(seen("PARALLELISM_CONFIG_TP_SIZE") or "1")
    except ValueError:
        return  # Accelerate reports a malformed size itself
    if tp_size <= 1 or seen("ACCELERATE_USE_FSDP") != "true" or seen("FSDP_VERSION") != "2":
        return
    if seen(CPU_VARIABLE) == "true":
        return  # CPU training (local run): Accelerate's FSDP2 path, and with it the import, is never taken
    gap = _probe.tensor_parallel_import_gap()
    if gap is not None:
        raise BootstrapError(
            f"tensor_parallel_size: {tp_size} with FSDP2 cannot train on this worker: {gap}, so "
            "Accelerate's prepare() would fail once the model is loaded; install transformers==5.0.0 "
            "(the last release with it) or an Accelerate release that does not import it in the "
            "worker image, or set tensor_parallel_size: 1"
        )


def _check_deepspeed(doc: Mapping[str, Any], override: str | None) -> str | None:
    planned = doc.get("deepspeed")
    if planned is None:
        return None
    path = override or doc.get("deepspeedPath")
    if not isinstance(path, str) or not path:
        raise SpecError("spec.deepspeedPath: missing although the spec has a DeepSpeed config")
    on_disk = _read_json(
        path,
        error=BootstrapError,
        label="deepspeed",
        where="",
        missing=f"deepspeed: the plan's DeepSpeed JSON is missing at {path}; mount the DeepSpeed "
        "ConfigMap rendered with this spec there",
        fix="mount the DeepSpeed ConfigMap rendered with this spec",
    )
    if on_disk != planned:
        where = _first_difference(on_disk, planned, "")
        raise BootstrapError(
            f"deepspeed: {path} differs from the plan at {where}; a stale or hand-edited file "
            "would train with other settings than planned: mount the DeepSpeed ConfigMap rendered "
            "with this spec"
        )
    return path


def _first_difference(have: Any, want: Any, at: str) -> str:
    if isinstance(have, dict) and isinstance(want, dict):
        for key in sorted(set(have) | set(want), key=str):
            sub = f"{at}.{limits.key_text(key)}" if at else limits.key_text(key)
            if key not in have:
                return f"{sub} (missing in the file, the plan has {_json_text(want[key])})"
            if key not in want:
                return f"{sub} (in the file only: {_json_text(have[key])})"
            if have[key] != want[key]:
                return _first_difference(have[key], want[key], sub)
    return f"{at or '<top level>'} (file has {_json_text(have)}, the plan has {_json_text(want)})"


def _json_text(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Over 60 lines: one branch per deferred kind, kept together until each kind gets one typed definition
# shared with the planner (issue 17, phase B), which splits this dispatch.
def _decide(
    step: Mapping[str, Any], environ: Mapping[str, str], *, ds_path: str | None, in_process: bool
) -> tuple[Decision, list[_Want]]:
    kind = str(step["kind"])
    variable = step.get("variable")
    source = str(step.get("source") or kind)
    detail: Mapping[str, Any] = step["detail"]

    if kind == "nccl_p2p_check":
        var = str(variable or "NCCL_P2P_DISABLE")
        if detail.get("skip_if_set", True) and var in environ:
            return Decision(kind, var, None, f"{var} already set by the environment"), []
        supported, why = _probe.p2p_supported(environ)
        if supported is False:
            value = str(detail.get("value_if_unsupported", "1"))
            return Decision(kind, var, value, why), [_Want(var, value, source, "set")]
        return Decision(kind, var, None, why), []

    if kind == "bf16_auto":
        var = str(variable or "ACCELERATE_MIXED_PRECISION")
        supported, why = _probe.bf16_supported(environ)
        value = str(detail["if_supported"] if supported else detail["otherwise"])
        if not supported and "without_gpu" in detail and _probe.cuda_device_count(environ)[0] == 0:
            value = str(detail["without_gpu"])  # Accelerate refuses fp16 without a GPU
        required = detail.get("deepspeed_requires")
        if required and value != required:
            raise BootstrapError(
                f"bf16: auto resolves to {shown(value)} on this worker ({why}), but the DeepSpeed JSON "
                f'sets {required}.enabled: true; set it to "auto" in the JSON, or run on GPUs that '
                f"support {required}"
            )
        return Decision(kind, var, value, why), [_Want(var, value, source, "set")]

    if kind == "torch_compile_auto":
        var = str(variable or "ACCELERATE_DYNAMO_BACKEND")
        new_enough, why = _probe.torch_at_least(str(detail.get("min_torch", "0")))
        if not new_enough:
            return Decision(kind, var, None, f"{why}: torch_compile stays off"), []
        value = str(detail["value"])
        return Decision(kind, var, value, why), [_Want(var, value, source, "set")]

    if kind == "require_fp8":
        capability, why = _probe.min_compute_capability(environ)
        if capability is None or capability < (8, 9):
            raise BootstrapError(
                f"fp8: requested, but this worker cannot run it ({why}); fp8 needs GPUs of compute "
                "capability >= 8.9: remove fp8 from the config or schedule on such GPUs"
            )
        return Decision(kind, variable, None, why), []

    if kind == "single_gpu_rendezvous_defaults":
        defaults = detail.get("defaults")
        if not isinstance(defaults, dict) or not set(defaults) <= LAUNCHER_VARIABLES:
            raise SpecError(
                "spec.deferred: single_gpu_rendezvous_defaults.defaults must name rendezvous variables"
            )
        world = environ.get("WORLD_SIZE")
        if world not in (None, "1"):
            return Decision(kind, None, None, f"WORLD_SIZE={world} set by the launcher"), []
        count, why = _probe.cuda_device_count(environ)
        if count != 1:
            return Decision(kind, None, None, f"not a single-GPU run ({why})"), []
        wants = [_Want(k, str(v), f"{source} (single GPU)", "default") for k, v in defaults.items()]
        missing = [w.name for w in wants if w.name not in environ]
        return Decision(kind, None, None, f"one GPU: defaults for {', '.join(missing) or 'nothing'}"), wants

    if kind == "parallel_sizes":
        return _parallel_sizes(detail, environ, source)

    # deepspeed_zero3_config
    if in_process:
        why = (
            f"HfTrainerDeepSpeedConfig({ds_path}) held for this process: is_deepspeed_zero3_enabled() is true"
        )
    else:
        why = (
            "exec mode: no object survives exec; the training process keys on "
            "ACCELERATE_DEEPSPEED_ZERO_STAGE=3 (Accelerate and TrainingArguments build the config there)"
        )
    return Decision(kind, None, None, why), []


def _parallel_sizes(
    detail: Mapping[str, Any], environ: Mapping[str, str], source: str
) -> tuple[Decision, list[_Want]]:
    """Axolotl's loader inference and Accelerate's checks for this worker's process count (C29)."""
    from optimenv import parallel  # only specs with this step pay for the import

    kind = "parallel_sizes"
    try:
        written, layout = parallel.step_inputs(detail)
    except ValueError as exc:
        raise SpecError(f"spec.deferred: parallel_sizes.detail: {exc}") from None
    world, how = _world_size(environ)
    if world is None:
        return Decision(kind, None, None, f"{how}: the sizes stay as written; Accelerate checks them"), []
    try:
        settled = parallel.settle(written, world, layout, how)
    except OptimEnvError as exc:
        raise BootstrapError(str(exc)) from None
    wants = [
        _Want(parallel.VARIABLES[axis], str(size), f"{layout.names[axis]} (inferred)", "set")
        for axis, size in settled.inferred.items()
    ]
    shown = ", ".join(f"{w.name}={w.value}" for w in wants) or "nothing to infer"
    return Decision(kind, None, None, f"{how}: {shown}"), wants


def _world_size(environ: Mapping[str, str]) -> tuple[int | None, str]:
    """The job's process count as the launcher or operator states it, and how that was found out.

    ``PET_NNODES`` x ``PET_NPROC_PER_NODE`` (the Kubeflow operators, read by torchrun) comes first:
    in a pod's entrypoint ``WORLD_SIZE`` may count nodes, not processes.
    """
    nodes, per_node = environ.get("PET_NNODES", ""), environ.get("PET_NPROC_PER_NODE", "")
    if nodes.isdigit() and per_node.isdigit() and int(nodes) * int(per_node) > 0:
        return int(nodes) * int(
            per_node
        ), f"{nodes} node(s) x {per_node} processes (PET_NNODES, PET_NPROC_PER_NODE)"
    world = environ.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 0:
        return int(world), f"WORLD_SIZE={world}"
    return None, "the process count is unknown here (no WORLD_SIZE, PET_NNODES x PET_NPROC_PER_NODE)"


def _zero3_config(path: str) -> object:
    try:
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        return HfTrainerDeepSpeedConfig(path)
    except (ImportError, ValueError, RuntimeError) as exc:
        raise BootstrapError(
            f"deepspeed: cannot build transformers' HfTrainerDeepSpeedConfig from {path} ({exc}); "
            "install optimenv[worker] (transformers, accelerate, deepspeed) in the worker image"
        ) from None


def _resolve(
    wants: list[_Want], environ: Mapping[str, str], *, policy: str
) -> tuple[list[Variable], list[Variable]]:
    assigned: list[Variable] = []
    kept: list[Variable] = []
    conflicts: list[str] = []
    for w in wants:
        current = environ.get(w.name)
        if current is None:
            assigned.append(Variable(w.name, w.value, w.value, w.source, "planned"))
        elif current == w.value:
            kept.append(Variable(w.name, current, w.value, w.source, "already set to the planned value"))
        elif w.mode == "default":
            kept.append(
                Variable(w.name, current, w.value, "environment", "a default: the environment's value stays")
            )
        elif policy == "user-wins":
            kept.append(Variable(w.name, current, w.value, "environment", "policy user-wins"))
        else:
            conflicts.append(
                f"{limits.key_text(w.name)}={shown(current)} from the environment, the plan sets "
                f"{shown(w.value)} from {limits.key_text(w.source)}"
            )
    if conflicts:
        raise BootstrapError(
            f"conflict: {'; '.join(conflicts)}; unset the variable in the pod or Ray runtime env, or "
            "render the spec with policy user-wins to keep the environment's value"
        )
    return assigned, kept
