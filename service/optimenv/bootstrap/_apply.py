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
from typing import Any, NamedTuple

from optimenv import limits
from optimenv.bootstrap import _probe
from optimenv.errors import OptimEnvError, shown
from optimenv.spec import SPEC_ENV, SPEC_PATH, SpecError, set_by_launcher, verify_spec
from optimenv.spec import BootstrapError as BootstrapError  # the bootstrap's own error, defined with the spec
from optimenv.steps import Decision as Decision  # one per deferred step in Applied.decisions
from optimenv.steps import DeepSpeedZero3Config, Deferred, Setting, Worker, read_step

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
    wants, steps = _parse(doc)
    key = (str(doc["hash"]), in_process, deepspeed_path)
    previous = _APPLIED.get(key)
    if previous is not None and previous[0] is environ and previous[1].holds_in(environ):
        return previous[1]
    _refuse_if_accelerate_started()

    ds_path = _check_deepspeed(doc, deepspeed_path)
    if deepspeed_path is not None:
        wants = [_local_deepspeed(w, doc["deepspeedPath"], deepspeed_path) for w in wants]
    wants += [Setting(name, value, source) for name, value, source in extra]
    decisions, more, zero3 = _decide(steps, Worker(environ, _probe, in_process, ds_path))
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
        decisions=decisions,
        deepspeed_path=ds_path,
        in_process=in_process,
        zero3_config=zero3,
    )
    _APPLIED[key] = (environ, result)
    return result


def _local_deepspeed(want: Setting, planned: Any, local: str) -> Setting:
    """The DeepSpeed file variable pointed at the worker-local copy (Ray mode)."""
    if want.name == "ACCELERATE_DEEPSPEED_CONFIG_FILE" and want.value == planned:
        return want._replace(value=local)
    return want


def _decide(
    steps: list[Deferred], worker: Worker
) -> tuple[tuple[Decision, ...], list[Setting], object | None]:
    """Every deferred step decided on this worker: the decisions, the variables they add, and the
    ZeRO-3 config to hold (built here, where transformers may be imported)."""
    decisions: list[Decision] = []
    wants: list[Setting] = []
    zero3: object | None = None
    for step in steps:
        decision, sets = step.decide(worker)
        if isinstance(step, DeepSpeedZero3Config) and step.holds_config(worker):
            assert worker.deepspeed_path is not None  # holds_config says so
            zero3 = _zero3_config(worker.deepspeed_path)
        decisions.append(decision)
        wants += sets
    return tuple(decisions), wants, zero3


def _check_wants(wants: list[Setting]) -> None:
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


def _parse(doc: Mapping[str, Any]) -> tuple[list[Setting], list[Deferred]]:
    """The spec's planned variables and its deferred steps, each checked."""
    deferred = doc.get("deferred")
    if not isinstance(deferred, list):
        raise SpecError("spec.deferred: must be a list")
    steps = [read_step(entry, i) for i, entry in enumerate(deferred)]
    for i, step in enumerate(steps):
        if step.variable is not None:
            _check_variable(f"spec.deferred[{i}].variable", step.variable, "")
    return _parse_env(doc), steps


def _parse_env(doc: Mapping[str, Any]) -> list[Setting]:
    wants: list[Setting] = []
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
        wants.append(Setting(name, entry["value"], entry["source"], entry["mode"]))
    return wants


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
    wants: list[Setting], environ: Mapping[str, str], *, policy: str
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
