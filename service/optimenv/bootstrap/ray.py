"""Ray mode: apply the plan inside each Ray Train (V2) worker, after Ray set the ranks, before Accelerate.

Public pieces:

* :func:`prepare_worker` — call it first in your own ``train_loop_per_worker``.
* :func:`report` — send per-step metrics from a training script to the driver (a no-op outside
  :func:`launch`, so the same script runs in every mode).
* :func:`launch` — run a script in N ``TorchTrainer`` workers (what ``optimenv ray-launch`` does)
  and get one :class:`WorkerReport` per rank back.

Ray is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimenv.bootstrap import _probe
from optimenv.bootstrap._apply import Applied, SpecArg, apply_spec, load_spec
from optimenv.errors import OptimEnvError
from optimenv.spec import deepspeed_text

#: The variable that makes Accelerate reuse Ray's gloo group on CPU workers (machine-notes.md).
CPU_VARIABLE = "ACCELERATE_USE_CPU"


@dataclass(frozen=True)
class MetricsRecord:
    """One :func:`report` call: ``rank`` of the worker, ``step``, the metrics, wall time sent."""

    rank: int
    step: int | None
    metrics: dict[str, Any]
    time: float

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "step": self.step, "metrics": self.metrics, "time": self.time}


@dataclass(frozen=True)
class WorkerReport:
    """What one worker did. ``exit_code`` 0 is success; ``error`` is the refusal or the traceback.

    ``finished_at`` is when the worker sent its report (``None``: Ray stopped it before it could,
    usually because another worker had failed).
    """

    rank: int
    local_rank: int | None
    world_size: int | None
    node_rank: int | None
    exit_code: int
    applied: dict[str, Any] | None
    accelerate: dict[str, Any] | None
    metrics: tuple[MetricsRecord, ...]
    error: str | None
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "localRank": self.local_rank,
            "worldSize": self.world_size,
            "nodeRank": self.node_rank,
            "exitCode": self.exit_code,
            "applied": self.applied,
            "accelerate": self.accelerate,
            "metrics": [m.to_dict() for m in self.metrics],
            "error": self.error,
            "finishedAt": self.finished_at,
        }


class LaunchError(Exception):
    """Some worker failed; ``reports`` has every rank's report, ``exit_code`` the one to exit with."""

    def __init__(self, message: str, reports: list[WorkerReport], exit_code: int) -> None:
        super().__init__(message)
        self.reports = reports
        self.exit_code = exit_code


def prepare_worker(
    spec: SpecArg = None,
    *,
    cpu: bool | None = None,
    environ: MutableMapping[str, str] = os.environ,
) -> Applied:
    """Apply ``spec`` in this Ray Train worker; call it first in ``train_loop_per_worker``.

    Ship the spec document in ``train_loop_config`` (driver env does not reach Ray workers).
    When the spec's DeepSpeed path does not exist on this node, the JSON from the spec is written
    to a worker-local file and ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` points there. ``cpu``: set
    ``ACCELERATE_USE_CPU=true`` so Accelerate joins Ray's gloo group (default: when no GPU is
    visible). For ZeRO-3 the returned record holds transformers' config alive for the process.
    """
    doc, _ = load_spec(spec, environ)
    local: str | None = None
    planned = doc.get("deepspeed")
    path = doc.get("deepspeedPath")
    if planned is not None and isinstance(path, str) and not os.path.exists(path):
        local = _write_local_copy(str(doc["hash"]), planned)
    if cpu is None:
        cpu = _probe.no_gpu_reason(environ) is not None
    extra = ((CPU_VARIABLE, "true", "ray: CPU workers"),) if cpu else ()
    return apply_spec(doc, environ, in_process=True, deepspeed_path=local, extra=extra)


def _write_local_copy(spec_hash: str, deepspeed: dict[str, Any]) -> str:
    # Named by the spec hash: workers on one node write the same bytes, and a rerun reuses it.
    folder = Path(tempfile.gettempdir()) / f"optimenv-{spec_hash.removeprefix('sha256:')[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "deepspeed.json"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(deepspeed_text(deepspeed))
    os.replace(tmp, target)  # atomic: a worker never reads a half-written file
    return str(target)


# The collector of the launch this worker belongs to, and this worker's rank (set by _train_loop).
_channel: tuple[Any, int] | None = None


def report(step: int | None = None, **metrics: Any) -> bool:
    """Send ``metrics`` for ``step`` to the driver of :func:`launch` (``optimenv ray-launch``).

    Values should be numbers or strings (tensors and numpy scalars are converted with ``.item()``).
    Returns ``False`` and does nothing when the script does not run under :func:`launch`.
    """
    if _channel is None:
        return False
    collector, rank = _channel
    clean = {key: value.item() if hasattr(value, "item") else value for key, value in metrics.items()}
    collector.add.remote(MetricsRecord(rank, step, clean, time.time()))
    return True


def accelerate_state() -> dict[str, Any] | None:
    """Accelerate's state in this process, if something created it (never creates it)."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return None
    partial = dict(state.PartialState._shared_state)
    if not partial:
        return None
    full = dict(state.AcceleratorState._shared_state)

    def name(value: Any) -> Any:
        return getattr(value, "value", None) or (None if value is None else str(value))

    out: dict[str, Any] = {
        "distributed_type": name(partial.get("distributed_type")),
        "num_processes": partial.get("num_processes"),
        "process_index": partial.get("process_index"),
        "local_process_index": partial.get("local_process_index"),
        "device": str(partial.get("device")),
        "backend": partial.get("backend"),
        "accelerator_state": "_mixed_precision" in full,
    }
    if "_mixed_precision" in full:
        out["mixed_precision"] = full["_mixed_precision"]
        dynamo = full.get("dynamo_plugin")
        out["dynamo_backend"] = name(getattr(dynamo, "backend", None))
        plugins = full.get("deepspeed_plugins") or {}
        out["deepspeed"] = {
            key: {"zero_stage": p.zero_stage, "zero3_init": p.zero3_init_flag} for key, p in plugins.items()
        }
        fsdp = full.get("fsdp_plugin")
        out["fsdp_version"] = getattr(fsdp, "fsdp_version", None)
    return out


class _Collector:
    """A Ray actor in the driver's job: workers send metrics and final reports here."""

    def __init__(self) -> None:
        self._new: list[MetricsRecord] = []
        self._all: list[MetricsRecord] = []
        self._final: dict[int, dict[str, Any]] = {}

    def add(self, record: MetricsRecord) -> None:
        self._new.append(record)
        self._all.append(record)

    def finish(self, rank: int, final: dict[str, Any]) -> None:
        self._final[rank] = final

    def drain(self) -> list[MetricsRecord]:
        new, self._new = self._new, []
        return new

    def results(self) -> tuple[list[MetricsRecord], dict[int, dict[str, Any]]]:
        return self._all, self._final


class _ScriptExit(RuntimeError):
    """The script ended with a non-zero ``SystemExit``; raised so Ray marks the worker failed."""


def _train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of :func:`launch`: apply the plan, then run the script as ``__main__``."""
    global _channel
    import runpy

    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    collector = config["collector"]
    _channel = (collector, rank)
    final: dict[str, Any] = {
        "local_rank": context.get_local_rank(),
        "world_size": context.get_world_size(),
        "node_rank": context.get_node_rank(),
        "exit_code": 0,
        "applied": None,
        "error": None,
    }
    try:
        try:
            applied = prepare_worker(config["spec"], cpu=not config["use_gpu"])
        except OptimEnvError as exc:
            final.update(exit_code=1, error=f"optimenv-bootstrap: error: {exc}")
            raise
        final["applied"] = applied.to_dict()
        if os.path.isdir(config["cwd"]):
            os.chdir(config["cwd"])  # like running the script from the driver's directory
        # The driver's stdout carries data only (reports, JSON): the script's prints go to stderr,
        # which Ray forwards to the driver's stderr.
        sys.stdout.flush()
        os.dup2(2, 1)
        sys.argv = [config["target"], *config["args"]]
        try:
            if config["module"]:
                runpy.run_module(config["target"], run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(config["target"]))
                runpy.run_path(config["target"], run_name="__main__")
        except SystemExit as exc:
            code = exc.code
            if code not in (None, 0):
                final["exit_code"] = code if isinstance(code, int) else 1
                final["error"] = f"{traceback.format_exc().rstrip()}\nthe script exited with {code!r}"
                raise _ScriptExit(f"the script exited with {code!r}") from None
    except BaseException:
        if final["error"] is None:
            final.update(exit_code=1, error=traceback.format_exc())
        raise
    finally:
        final["accelerate"] = accelerate_state()
        final["finished_at"] = time.time()
        # Calls from one process run in order on the actor: every report() has arrived after this.
        ray.get(collector.finish.remote(rank, final))
        _channel = None


def launch(
    spec: SpecArg,
    target: str,
    args: Sequence[str] = (),
    *,
    workers: int = 1,
    use_gpu: bool | None = None,
    module: bool = False,
    address: str | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    on_report: Callable[[MetricsRecord], None] | None = None,
    poll_s: float = 0.5,
) -> list[WorkerReport]:
    """Run ``target`` (a script path, or a module with ``module=True``) in ``workers`` Ray Train workers.

    Connects to ``address``, else ``$RAY_ADDRESS``, else starts a local Ray (and stops it after).
    Each worker applies the spec (:func:`prepare_worker`) and runs the script as ``__main__``.
    ``use_gpu``: one GPU per worker; ``None`` means "if the cluster has GPUs". ``on_report`` is
    called on the driver with every :func:`report` record while training runs. Returns one report
    per rank (sorted by rank); raises :class:`LaunchError` with the same reports if a worker failed,
    and :class:`~optimenv.errors.OptimEnvError` for a bad spec before anything starts.
    """
    doc, _ = load_spec(spec, os.environ)
    if workers < 1:
        raise OptimEnvError(f"workers: must be >= 1, got {workers}")
    if not module:
        target = os.path.abspath(target)
        if not os.path.isfile(target):
            raise OptimEnvError(f"script: {target}: no such file")

    import ray
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    try:
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        collector = ray.remote(num_cpus=0)(_Collector).remote()
        config = {
            "spec": doc,
            "target": target,
            "args": list(args),
            "module": module,
            "use_gpu": use_gpu,
            "cwd": os.getcwd(),
            "collector": collector,
        }
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=RunConfig(name=name, storage_path=storage_path),
        )
        stop = threading.Event()
        poller: threading.Thread | None = None
        if on_report is not None:
            poller = threading.Thread(
                target=_poll, args=(collector, on_report, stop, poll_s), name="optimenv-report", daemon=True
            )
            poller.start()
        failed: TrainingFailedError | None = None
        try:
            trainer.fit()
        except TrainingFailedError as exc:
            failed = exc
        finally:
            stop.set()
            if poller is not None:
                poller.join()
        if on_report is not None:
            for record in ray.get(collector.drain.remote()):
                on_report(record)
        records, finals = ray.get(collector.results.remote())
        ray.kill(collector)
    finally:
        if started:
            ray.shutdown()
    reports = _reports(workers, records, finals)
    # The first worker to fail is the cause; the others usually fail or are stopped because of it.
    failures = sorted(
        (r for r in reports if r.exit_code != 0 and r.finished_at is not None),
        key=lambda r: r.finished_at or 0,
    )
    lost = [str(r.rank) for r in reports if r.finished_at is None]
    if failed is None and not failures and not lost:
        return reports
    if failures:
        code = failures[0].exit_code
        message = f"worker {failures[0].rank} failed first (exit {code})"
        if len(failures) > 1:
            message += f"; also failed: {', '.join(str(r.rank) for r in failures[1:])}"
    else:
        code = 1
        message = f"training failed: {str(failed).splitlines()[0] if failed else 'workers lost'}"
    if lost:
        message += f"; stopped before reporting: {', '.join(lost)}"
    raise LaunchError(message, reports, code)


def _poll(
    collector: Any, on_report: Callable[[MetricsRecord], None], stop: threading.Event, every: float
) -> None:
    import ray

    while not stop.wait(every):
        for record in ray.get(collector.drain.remote()):
            on_report(record)


def _reports(
    workers: int, records: list[MetricsRecord], finals: Mapping[int, dict[str, Any]]
) -> list[WorkerReport]:
    out = []
    for rank in range(workers):
        final = finals.get(rank)
        mine = tuple(r for r in records if r.rank == rank)
        if final is None:  # killed before it could report (another worker failed first)
            out.append(
                WorkerReport(rank, None, None, None, 1, None, None, mine, "no report: the worker was stopped")
            )
            continue
        out.append(
            WorkerReport(
                rank=rank,
                local_rank=final["local_rank"],
                world_size=final["world_size"],
                node_rank=final["node_rank"],
                exit_code=int(final["exit_code"]),
                applied=final["applied"],
                accelerate=final["accelerate"],
                metrics=mine,
                error=final["error"],
                finished_at=final["finished_at"],
            )
        )
    return out


def reports_json(reports: Sequence[WorkerReport]) -> str:
    """The reports as the JSON document ``optimenv ray-launch --report`` writes."""
    return (
        json.dumps({"workers": [r.to_dict() for r in reports]}, indent=2, sort_keys=True, default=str) + "\n"
    )
