"""The deferred steps: what only the worker can decide, one typed definition per kind.

Each kind is one class: its fields (the spec's ``detail``), how it is read back from a spec
(:meth:`read`, every field checked, nothing left unread) and the decision the worker takes
(:meth:`decide`) from its environment and a :class:`Probe` of its GPUs and packages. The planner
builds the steps (``optimenv.plan``), the spec carries them as ``{kind, variable, source, detail}``
(:func:`to_spec`), and the bootstrap reads them (:func:`read_step`) and decides them, passing
``optimenv.bootstrap._probe`` as the probe. Standard library only: the bootstrap imports this on
every pod start, and the probe is where torch is asked.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

from optimenv import parallel
from optimenv.errors import OptimEnvError, shown
from optimenv.spec import LAUNCHER_VARIABLES, BootstrapError, DeferredKind, SpecError, SpecStep

MIXED_PRECISION = "ACCELERATE_MIXED_PRECISION"
P2P_DISABLE = "NCCL_P2P_DISABLE"
DYNAMO_BACKEND = "ACCELERATE_DYNAMO_BACKEND"
#: torch_compile: auto turns compilation on from this torch on (Axolotl's check, C17).
TORCH_COMPILE_MIN = "2.5.1"
#: Rendezvous defaults Axolotl sets (setdefault) for a DeepSpeed run on a single GPU.
SINGLE_GPU_DEFAULTS: Mapping[str, str] = types.MappingProxyType(
    {"WORLD_SIZE": "1", "LOCAL_RANK": "0", "RANK": "0", "MASTER_ADDR": "0.0.0.0", "MASTER_PORT": "29500"}
)
_RENDER_AGAIN = "render the spec again with optimenv"


class Probe(Protocol):
    """What a worker's hardware and packages say (``optimenv.bootstrap._probe`` is the real one).

    Each answer comes with how it was found out, which the decision reports.
    """

    def cuda_device_count(self, environ: Mapping[str, str]) -> tuple[int, str]: ...

    def bf16_supported(self, environ: Mapping[str, str]) -> tuple[bool, str]: ...

    def min_compute_capability(self, environ: Mapping[str, str]) -> tuple[tuple[int, int] | None, str]: ...

    def p2p_supported(self, environ: Mapping[str, str]) -> tuple[bool | None, str]: ...

    def torch_at_least(self, minimum: str) -> tuple[bool, str]: ...


class Worker(NamedTuple):
    """What a step is decided from: the worker's environment, its probe, and how the bootstrap runs.

    ``in_process``: the training runs in this process (false: exec mode). ``deepspeed_path``: the
    DeepSpeed JSON the bootstrap checked (``None``: the spec has none).
    """

    environ: Mapping[str, str]
    probe: Probe
    in_process: bool = True
    deepspeed_path: str | None = None


class Decision(NamedTuple):
    """A deferred step as decided on this worker; ``value`` is what it set (``None``: nothing)."""

    kind: str
    variable: str | None
    value: str | None
    reason: str


class Setting(NamedTuple):
    """A variable a step (or the spec's ``env``) wants; ``default``: only where nothing is set."""

    name: str
    value: str
    source: str
    mode: Literal["set", "default"] = "set"


Decided = tuple[Decision, tuple[Setting, ...]]


class _Detail:
    """A step's ``detail`` as read from a spec: each field taken once, by type; a field left unread
    (one this bootstrap does not know) is refused by :meth:`finish`."""

    def __init__(self, data: Mapping[str, Any], kind: str, where: str) -> None:
        self._data, self._kind, self.where = data, kind, where
        self._read: set[str] = set()

    def _take(self, key: str, default: Any = ...) -> Any:
        self._read.add(key)
        if key in self._data:
            return self._data[key]
        if default is ...:
            raise SpecError(f"{self.where}: {self._kind} needs {key!r}; {_RENDER_AGAIN}")
        return default

    def _wrong(self, key: str, what: str, value: Any) -> SpecError:
        return SpecError(f"{self.where}.{key}: must be {what}, got {shown(value)}; {_RENDER_AGAIN}")

    def text(self, key: str) -> str:
        value = self._take(key)
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def optional_text(self, key: str) -> str | None:
        value = self._take(key, None)
        if value is not None and not isinstance(value, str):
            raise self._wrong(key, "a string or null", value)
        return value

    def flag(self, key: str) -> bool:
        value = self._take(key)
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false", value)
        return value

    def size(self, key: str, *, optional: bool = False) -> Any:
        value = self._take(key)
        if (value is None and optional) or (type(value) is int and value >= 1):
            return value
        raise self._wrong(key, "a whole number >= 1" + (" or null" if optional else ""), value)

    def texts(self) -> dict[str, str]:
        """Every field, each a string (a mapping of names to values)."""
        return {str(key): self.text(key) for key in list(self._data)}

    def section(self, key: str) -> _Detail:
        value = self._take(key)
        if not isinstance(value, Mapping):
            raise self._wrong(key, "a mapping", value)
        return _Detail(value, self._kind, f"{self.where}.{key}")

    def legacy(self, key: str) -> None:
        """A field older planners wrote and nothing reads any more: accepted, not used."""
        self._read.add(key)

    def finish(self) -> None:
        unknown = sorted(str(key) for key in self._data if key not in self._read)
        if unknown:
            raise SpecError(
                f"{self.where}.{unknown[0]}: unknown to this bootstrap's {self._kind} step; install the "
                "optimenv version that rendered the spec in the worker image"
            )


def _sets(step: _Named, value: str, reason: str) -> Decided:
    """The decision that ``step`` sets its variable to ``value``."""
    return Decision(step.kind, step.variable, value, reason), (Setting(step.variable, value, step.source),)


class _Named(Protocol):
    """A step that sets one variable."""

    @property
    def kind(self) -> str: ...

    @property
    def variable(self) -> str: ...

    @property
    def source(self) -> str: ...


class NcclP2PCheck(NamedTuple):
    """``NCCL_P2P_DISABLE=1`` where the GPUs of this node cannot talk peer to peer (Axolotl's check).

    Skipped when the environment sets the variable already (``skip_if_set``): the operator's value
    stands.
    """

    source: str = "default"
    variable: str = P2P_DISABLE
    value_if_unsupported: str = "1"
    skip_if_set: bool = True
    kind: Literal["nccl_p2p_check"] = "nccl_p2p_check"

    def detail(self) -> dict[str, Any]:
        return {"skip_if_set": self.skip_if_set, "value_if_unsupported": self.value_if_unsupported}

    @classmethod
    def read(cls, variable: str | None, source: str, detail: _Detail) -> NcclP2PCheck:
        value, skip = detail.text("value_if_unsupported"), detail.flag("skip_if_set")
        return cls(source, variable or P2P_DISABLE, value, skip)

    def decide(self, worker: Worker) -> Decided:
        var = self.variable
        if self.skip_if_set and var in worker.environ:
            return Decision(self.kind, var, None, f"{var} already set by the environment"), ()
        supported, why = worker.probe.p2p_supported(worker.environ)
        if supported is False:
            return _sets(self, self.value_if_unsupported, why)
        return Decision(self.kind, var, None, why), ()


class Bf16Auto(NamedTuple):
    """``bf16: auto``: ``if_supported`` on a GPU with bf16, ``otherwise`` on another GPU, and
    ``without_gpu`` on a worker without one (Accelerate refuses fp16 off the GPU; older specs lack
    it and keep ``otherwise``). ``deepspeed_requires``: the precision the DeepSpeed JSON hard-codes,
    which the decision must match.
    """

    otherwise: str
    if_supported: str = "bf16"
    without_gpu: str | None = None
    deepspeed_requires: str | None = None
    source: str = "bf16"
    variable: str = MIXED_PRECISION
    kind: Literal["bf16_auto"] = "bf16_auto"

    def detail(self) -> dict[str, Any]:
        detail = {"if_supported": self.if_supported, "otherwise": self.otherwise}
        if self.without_gpu is not None:
            detail["without_gpu"] = self.without_gpu
        if self.deepspeed_requires is not None:
            detail["deepspeed_requires"] = self.deepspeed_requires
        return dict(sorted(detail.items()))

    @classmethod
    def read(cls, variable: str | None, source: str, detail: _Detail) -> Bf16Auto:
        return cls(
            otherwise=detail.text("otherwise"),
            if_supported=detail.text("if_supported"),
            without_gpu=detail.optional_text("without_gpu"),
            deepspeed_requires=detail.optional_text("deepspeed_requires"),
            source=source,
            variable=variable or MIXED_PRECISION,
        )

    def decide(self, worker: Worker) -> Decided:
        supported, why = worker.probe.bf16_supported(worker.environ)
        value = self.if_supported if supported else self.otherwise
        if not supported and self.without_gpu is not None:
            gpus, _ = worker.probe.cuda_device_count(worker.environ)
            value = self.without_gpu if gpus == 0 else value
        required = self.deepspeed_requires
        if required and value != required:
            raise BootstrapError(
                f"bf16: auto resolves to {shown(value)} on this worker ({why}), but the DeepSpeed JSON "
                f'sets {required}.enabled: true; set it to "auto" in the JSON, or run on GPUs that '
                f"support {required}"
            )
        return _sets(self, value, why)


class TorchCompileAuto(NamedTuple):
    """``torch_compile: auto``: the dynamo backend ``value`` with torch ``min_torch`` or later, read
    as the planner reads ``--torch-version`` (:mod:`optimenv.versions`); else compilation stays off."""

    value: str
    min_torch: str = TORCH_COMPILE_MIN
    source: str = "torch_compile"
    variable: str = DYNAMO_BACKEND
    kind: Literal["torch_compile_auto"] = "torch_compile_auto"

    def detail(self) -> dict[str, Any]:
        return {"min_torch": self.min_torch, "value": self.value}

    @classmethod
    def read(cls, variable: str | None, source: str, detail: _Detail) -> TorchCompileAuto:
        value, min_torch = detail.text("value"), detail.text("min_torch")
        return cls(value, min_torch, source, variable or DYNAMO_BACKEND)

    def decide(self, worker: Worker) -> Decided:
        new_enough, why = worker.probe.torch_at_least(self.min_torch)
        if not new_enough:
            return Decision(self.kind, self.variable, None, f"{why}: torch_compile stays off"), ()
        return _sets(self, self.value, why)


#: fp8 needs GPUs of at least this compute capability (Ada, Hopper).
FP8_MIN_CAPABILITY = (8, 9)


class RequireFp8(NamedTuple):
    """``fp8`` where the planner did not know the GPUs: refused on a worker that cannot run it."""

    source: str = "fp8"
    variable: str = MIXED_PRECISION
    kind: Literal["require_fp8"] = "require_fp8"

    def detail(self) -> dict[str, Any]:
        return {}

    @classmethod
    def read(cls, variable: str | None, source: str, detail: _Detail) -> RequireFp8:
        return cls(source, variable or MIXED_PRECISION)

    def decide(self, worker: Worker) -> Decided:
        capability, why = worker.probe.min_compute_capability(worker.environ)
        if capability is None or capability < FP8_MIN_CAPABILITY:
            raise BootstrapError(
                f"fp8: requested, but this worker cannot run it ({why}); fp8 needs GPUs of compute "
                "capability >= 8.9: remove fp8 from the config or schedule on such GPUs"
            )
        return Decision(self.kind, self.variable, None, why), ()


class SingleGpuRendezvousDefaults(NamedTuple):
    """DeepSpeed on one GPU without a launcher: the rendezvous ``defaults`` where nothing is set."""

    defaults: Mapping[str, str] = SINGLE_GPU_DEFAULTS
    source: str = "deepspeed"
    kind: Literal["single_gpu_rendezvous_defaults"] = "single_gpu_rendezvous_defaults"

    @property
    def variable(self) -> None:
        return None

    def detail(self) -> dict[str, Any]:
        return {"defaults": dict(self.defaults)}

    @classmethod
    def read(cls, variable: str | None, source: str, detail: _Detail) -> SingleGpuRendezvousDefaults:
        section = detail.section("defaults")
        defaults = section.texts()
        if not set(defaults) <= LAUNCHER_VARIABLES:
            raise SpecError(f"{section.where}: must name rendezvous variables only; {_RENDER_AGAIN}")
        return cls(types.MappingProxyType(defaults), source)

    def decide(self, worker: Worker) -> Decided:
        world = worker.environ.get("WORLD_SIZE")
        if world not in (None, "1"):
            return Decision(self.kind, None, None, f"WORLD_SIZE={world} set by the launcher"), ()
        count, why = worker.probe.cuda_device_count(worker.environ)
        if count != 1:
            return Decision(self.kind, None, None, f"not a single-GPU run ({why})"), ()
        source = f"{self.source} (single GPU)"
        sets = tuple(Setting(name, value, source, "default") for name, value in self.defaults.items())
        missing = [s.name for s in sets if s.name not in worker.environ]
        why = f"one GPU: defaults for {', '.join(missing) or 'nothing'}"
        return Decision(self.kind, None, None, why), sets


class DeepSpeedZero3Config(NamedTuple):
    """ZeRO-3: transformers' ``HfTrainerDeepSpeedConfig`` of the spec's DeepSpeed JSON, held alive
    in a process that trains in place (in-process and Ray modes; the bootstrap builds it), so that
    ``from_pretrained`` loads the model sharded. Exec mode keeps nothing across ``exec``.

    Specs rendered before this definition also carry ``path`` (the spec's ``deepspeedPath`` again);
    it is accepted and not read: the bootstrap uses the file it checked, a Ray worker's local copy
    included.
    """

    source: str = "deepspeed.zero_optimization.stage"
    kind: Literal["deepspeed_zero3_config"] = "deepspeed_zero3_config"

    @property
    def variable(self) -> None:
        return None

    def detail(self) -> dict[str, Any]:
        return {}

    @classmethod
    def read(cls, variable: str | None, source: str, detail: _Detail) -> DeepSpeedZero3Config:
        detail.legacy("path")
        return cls(source)

    def holds_config(self, worker: Worker) -> bool:
        """Whether this worker builds and holds the config (it trains in this process)."""
        return worker.in_process and worker.deepspeed_path is not None

    def decide(self, worker: Worker) -> Decided:
        if worker.deepspeed_path is None:
            raise SpecError(f"spec.deepspeed: {self.kind} needs the spec's DeepSpeed config; {_RENDER_AGAIN}")
        if self.holds_config(worker):
            why = (
                f"HfTrainerDeepSpeedConfig({worker.deepspeed_path}) held for this process: "
                "is_deepspeed_zero3_enabled() is true"
            )
        else:
            why = (
                "exec mode: no object survives exec; the training process keys on "
                "ACCELERATE_DEEPSPEED_ZERO_STAGE=3 (Accelerate and TrainingArguments build the config there)"
            )
        return Decision(self.kind, None, None, why), ()


class ParallelSizes(NamedTuple):
    """The parallel sizes of a plan made without the process count: the worker settles them for its
    own (:func:`optimenv.parallel.settle`, as the planner does when it knows the count), writing
    the sizes Axolotl's loader infers and refusing what Accelerate would refuse (C28, C29)."""

    written: parallel.Sizes
    layout: parallel.Layout
    source: str
    kind: Literal["parallel_sizes"] = "parallel_sizes"

    @property
    def variable(self) -> None:
        return None

    def detail(self) -> dict[str, Any]:
        layout = {**self.layout._asdict(), "names": dict(self.layout.names)}
        return {"layout": layout, "written": self.written._asdict()}

    @classmethod
    def read(cls, variable: str | None, source: str, detail: _Detail) -> ParallelSizes:
        sizes = detail.section("written")
        optional = ("dp_shard", "dp_replicate")
        written = parallel.Sizes(**{a: sizes.size(a, optional=a in optional) for a in parallel.Sizes._fields})
        sizes.finish()
        layout = detail.section("layout")
        names = layout.section("names")
        fields = {
            "fsdp": layout.flag("fsdp"),
            "fsdp_version": layout.size("fsdp_version", optional=True),
            "deepspeed": layout.flag("deepspeed"),
            "infer": layout.flag("infer"),
            "axolotl": layout.flag("axolotl"),
            "always_built": layout.flag("always_built"),
            "names": {axis: names.text(axis) for axis in parallel.AXOLOTL_FIELDS},
        }
        layout.finish()
        return cls(written, parallel.Layout(**fields), source)

    def decide(self, worker: Worker) -> Decided:
        world, how = world_size(worker.environ)
        if world is None:
            why = f"{how}: the sizes stay as written; Accelerate checks them"
            return Decision(self.kind, None, None, why), ()
        try:
            settled = parallel.settle(self.written, world, self.layout, how)
        except OptimEnvError as exc:
            raise BootstrapError(str(exc)) from None
        sets = tuple(
            Setting(parallel.VARIABLES[axis], str(size), f"{self.layout.names[axis]} (inferred)")
            for axis, size in settled.inferred.items()
        )
        done = ", ".join(f"{s.name}={s.value}" for s in sets) or "nothing to infer"
        return Decision(self.kind, None, None, f"{how}: {done}"), sets


def world_size(environ: Mapping[str, str]) -> tuple[int | None, str]:
    """The job's process count as the launcher or operator states it, and how that was found out.

    ``PET_NNODES`` x ``PET_NPROC_PER_NODE`` (the Kubeflow operators, read by torchrun) comes first:
    in a pod's entrypoint ``WORLD_SIZE`` may count nodes, not processes.
    """
    nodes, per_node = environ.get("PET_NNODES", ""), environ.get("PET_NPROC_PER_NODE", "")
    if nodes.isdigit() and per_node.isdigit() and int(nodes) * int(per_node) > 0:
        how = f"{nodes} node(s) x {per_node} processes (PET_NNODES, PET_NPROC_PER_NODE)"
        return int(nodes) * int(per_node), how
    world = environ.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 0:
        return int(world), f"WORLD_SIZE={world}"
    return None, "the process count is unknown here (no WORLD_SIZE, PET_NNODES x PET_NPROC_PER_NODE)"


#: A deferred step of any kind.
Deferred: TypeAlias = (
    NcclP2PCheck
    | Bf16Auto
    | TorchCompileAuto
    | RequireFp8
    | SingleGpuRendezvousDefaults
    | DeepSpeedZero3Config
    | ParallelSizes
)
STEP_TYPES: tuple[type[Deferred], ...] = (
    NcclP2PCheck,
    Bf16Auto,
    TorchCompileAuto,
    RequireFp8,
    SingleGpuRendezvousDefaults,
    DeepSpeedZero3Config,
    ParallelSizes,
)
#: kind -> its definition, for reading a spec (the kind is each class's ``kind`` field).
BY_KIND: Mapping[str, type[Deferred]] = {t._field_defaults["kind"]: t for t in STEP_TYPES}


def to_spec(step: Deferred) -> SpecStep:
    """``step`` as the spec (and ``optimenv plan -o json``) carries it."""
    kind: DeferredKind = step.kind
    return {"kind": kind, "variable": step.variable, "source": step.source, "detail": step.detail()}


def read_step(entry: Any, index: int) -> Deferred:
    """The step at ``spec.deferred[index]``, checked field by field; :class:`SpecError` otherwise."""
    where = f"spec.deferred[{index}]"
    if not isinstance(entry, Mapping) or not isinstance(entry.get("detail"), Mapping):
        raise SpecError(f"{where}: must be {{kind, variable, source, detail}}")
    kind = entry.get("kind")
    definition = BY_KIND.get(kind) if isinstance(kind, str) else None
    if definition is None or not isinstance(kind, str):
        raise SpecError(
            f"{where}.kind: {shown(kind)} is unknown to this bootstrap; "
            "install the optimenv version that rendered the spec in the worker image"
        )
    variable, source = entry.get("variable"), entry.get("source") or kind
    if not (variable is None or isinstance(variable, str)) or not isinstance(source, str):
        raise SpecError(f"{where}: variable must be a string or null, source a string; {_RENDER_AGAIN}")
    detail = _Detail(entry["detail"], kind, f"{where}.detail")
    step = definition.read(variable, source, detail)
    detail.finish()
    if variable is not None and step.variable is None:
        raise SpecError(f"{where}.variable: {kind} sets no single variable, the spec names {shown(variable)}")
    return step
