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

from optimenv._files import write_atomically
from optimenv.bootstrap._apply import Applied, BootstrapError, SpecArg, apply_spec, cpu_variables, load_spec
from optimenv.bootstrap._script import run_script
from optimenv.bootstrap._state import accelerate_state
from optimenv.errors import OptimEnvError
from optimenv.spec import deepspeed_text


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
    local_world_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "localRank": self.local_rank,
            "localWorldSize": self.local_world_size,
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

    def failure_lines(self) -> list[str]:
        """The first failure in full, as its cause; workers that failed the same way share it.

        A worker that failed later, another way, gets one line (its error's last): its traceback is
        usually the collective that broke when the first one left (the report keeps it whole).
        """
        failed = sorted(
            (r for r in self.reports if r.exit_code != 0 and r.finished_at is not None),
            key=lambda r: r.finished_at or 0.0,
        )
        by_error: dict[tuple[int, str], list[int]] = {}
        for r in failed:
            by_error.setdefault((r.exit_code, (r.error or "").rstrip()), []).append(r.rank)
        lines: list[str] = []
        first = ""
        for (code, error), ranks in by_error.items():
            # Groups in the order they failed; the ranks of one group in rank order.
            who = f"worker {ranks[0]}" if len(ranks) == 1 else f"workers {', '.join(map(str, sorted(ranks)))}"
            if not first:
                first = who
                lines.append(f"--- {who} (exit {code}) ---")
                lines.extend(error.splitlines())
                continue
            last = next((line.strip() for line in reversed(error.splitlines()) if line.strip()), "no error")
            lines.append(f"--- {who} (exit {code}), after {first}: {last}")
        return lines


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
    visible; never over a value the environment already has). For ZeRO-3 the returned record
    holds transformers' config alive for the process.
    """
    doc, _ = load_spec(spec, environ)
    local: str | None = None
    planned = doc.get("deepspeed")
    path = doc.get("deepspeedPath")
    if planned is not None and isinstance(path, str) and not os.path.exists(path):
        local = _write_local_copy(str(doc["hash"]), planned)
    extra = cpu_variables(environ, "ray: CPU workers", cpu=cpu)
    return apply_spec(doc, environ, in_process=True, deepspeed_path=local, extra=extra)


def _write_local_copy(spec_hash: str, deepspeed: dict[str, Any]) -> str:
    # Named by the spec hash: workers on one node write the same bytes, and a rerun reuses it.
    try:
        folder = Path(tempfile.gettempdir()) / f"optimenv-{spec_hash.removeprefix('sha256:')[:16]}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "deepspeed.json"
        write_atomically(target, deepspeed_text(deepspeed))  # a worker never reads a half-written file
    except OSError as exc:
        raise BootstrapError(
            f"deepspeed: cannot write the DeepSpeed JSON to a local file: {exc.strerror or exc} "
            f"(point TMPDIR at a writable folder on the workers)"
        ) from None
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


class _Collector:
    """A Ray actor in the driver's job: workers send metrics, output lines and final reports here."""

    def __init__(self) -> None:
        self._new: list[MetricsRecord] = []
        self._all: list[MetricsRecord] = []
        self._lines: list[tuple[int, list[str]]] = []
        self._final: dict[int, dict[str, Any]] = {}

    def add(self, record: MetricsRecord) -> None:
        self._new.append(record)
        self._all.append(record)

    def output(self, rank: int, lines: list[str]) -> None:
        self._lines.append((rank, lines))

    def finish(self, rank: int, final: dict[str, Any]) -> None:
        self._final[rank] = final

    def drain(self) -> tuple[list[MetricsRecord], list[tuple[int, list[str]]]]:
        new, self._new = self._new, []
        lines, self._lines = self._lines, []
        return new, lines

    def results(self) -> tuple[list[MetricsRecord], dict[int, dict[str, Any]]]:
        return self._all, self._final


class _ScriptFailed(RuntimeError):
    """The script ended with a non-zero exit code; raised so Ray marks the worker failed."""


def _train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of :func:`launch`: apply the plan, then run the script as ``__main__``."""
    global _channel
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    collector = config["collector"]
    _channel = (collector, rank)
    final: dict[str, Any] = {
        "local_rank": context.get_local_rank(),
        "local_world_size": context.get_local_world_size(),
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
        result = _run(config, collector, rank)
        final.update(exit_code=result.exit_code, error=result.error)
        if result.exit_code != 0:
            raise _ScriptFailed(result.error or f"the script exited with {result.exit_code}")
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


def _run(config: dict[str, Any], collector: Any, rank: int) -> Any:
    if config["capture"]:
        return run_script(
            config["target"],
            config["args"],
            module=config["module"],
            on_lines=lambda lines: collector.output.remote(rank, lines),
        )
    # Ray forwards a worker's stdout to the driver's stdout, which carries data only: the
    # script's prints go to stderr instead.
    sys.stdout.flush()
    os.dup2(2, 1)
    return run_script(config["target"], config["args"], module=config["module"])


OutputSink = Callable[[int, list[str]], None]


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
    on_output: OutputSink | None = None,
    poll_s: float = 0.5,
) -> list[WorkerReport]:
    """Run ``target`` (a script path, or a module with ``module=True``) in ``workers`` Ray Train workers.

    Connects to ``address``, else ``$RAY_ADDRESS``, else starts a local Ray (and stops it after).
    Each worker applies the spec (:func:`prepare_worker`) and runs the script as ``__main__``.
    ``use_gpu``: one GPU per worker; ``None`` means "if the cluster has GPUs". ``on_report`` is
    called on the driver with every :func:`report` record while training runs; ``on_output`` with
    ``(rank, lines)`` of what the script printed (without it the lines go to Ray's worker logs).
    Returns one report per rank (sorted by rank); raises :class:`LaunchError` with the same reports
    if a worker failed, and :class:`~optimenv.errors.OptimEnvError` before anything starts for a bad
    spec, a missing script, or more workers than the cluster can place.
    """
    doc, target = checked_launch(spec, target, module=module, workers=workers)

    import ray

    started = not ray.is_initialized()
    if started:
        # "local": a cluster of our own, never one that `ray start` left running on this machine.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=on_output is None)
    try:
        resources = ray.cluster_resources()
        if use_gpu is None:
            use_gpu = resources.get("GPU", 0) > 0
        check_capacity(workers, use_gpu, resources)
        config = {
            "spec": doc,
            "target": target,
            "args": list(args),
            "module": module,
            "use_gpu": use_gpu,
            "cwd": os.getcwd(),
            "capture": on_output is not None,
        }
        records, finals, failed = _fit(config, workers, storage_path, name, on_report, on_output, poll_s)
    finally:
        if started:
            ray.shutdown()
    return _outcome(_reports(workers, records, finals), failed)


def checked_launch(spec: SpecArg, target: str, *, module: bool, workers: int) -> tuple[dict[str, Any], str]:
    """The verified spec and the script's absolute path; what launch() refuses before Ray starts."""
    doc, _ = load_spec(spec, os.environ)
    if workers < 1:
        raise OptimEnvError(f"workers: must be >= 1, got {workers}")
    if not module:
        target = os.path.abspath(target)
        if not os.path.isfile(target):
            raise OptimEnvError(f"script: {target}: no such file")
    return doc, target


def check_capacity(workers: int, use_gpu: bool, resources: Mapping[str, float]) -> None:
    """Refuse at once what Ray would wait for forever: more workers than the cluster has CPUs/GPUs.

    Ray Train asks one GPU per worker with ``use_gpu``, else one CPU (``ScalingConfig`` defaults).
    """
    kind = "GPU" if use_gpu else "CPU"
    have = int(resources.get(kind, 0))
    if workers <= have:
        return
    fewer = f"use --workers {have} or fewer, " if have else ""
    elsewhere = "or train on CPU workers (--cpu)" if use_gpu else "or join a larger cluster ($RAY_ADDRESS)"
    raise OptimEnvError(
        f"workers: {workers} {kind} workers need {workers} {kind}s (one each), "
        f"but the Ray cluster has {have}; {fewer}{elsewhere}"
    )


def _fit(
    config: dict[str, Any],
    workers: int,
    storage_path: str | None,
    name: str | None,
    on_report: Callable[[MetricsRecord], None] | None,
    on_output: OutputSink | None,
    poll_s: float,
) -> tuple[list[MetricsRecord], dict[int, dict[str, Any]], Exception | None]:
    import ray
    from ray.exceptions import RayError
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    collector = ray.remote(num_cpus=0)(_Collector).remote()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={**config, "collector": collector},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=config["use_gpu"]),
        run_config=RunConfig(name=name, storage_path=storage_path),
    )
    stop = threading.Event()
    poller = threading.Thread(
        target=_poll,
        args=(collector, on_report, on_output, stop, poll_s),
        name="optimenv-report",
        daemon=True,
    )
    poller.start()
    failed: Exception | None = None
    try:
        trainer.fit()
    except (TrainingFailedError, RayError) as exc:  # a worker failed, or Ray lost an actor
        failed = exc
    finally:
        stop.set()
        poller.join()
    _deliver(ray.get(collector.drain.remote()), on_report, on_output)
    records, finals = ray.get(collector.results.remote())
    ray.kill(collector)
    return records, finals, failed


def _outcome(reports: list[WorkerReport], failed: Exception | None) -> list[WorkerReport]:
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
    collector: Any,
    on_report: Callable[[MetricsRecord], None] | None,
    on_output: OutputSink | None,
    stop: threading.Event,
    every: float,
) -> None:
    import ray

    while not stop.wait(every):
        _deliver(ray.get(collector.drain.remote()), on_report, on_output)


def _deliver(
    drained: tuple[list[MetricsRecord], list[tuple[int, list[str]]]],
    on_report: Callable[[MetricsRecord], None] | None,
    on_output: OutputSink | None,
) -> None:
    records, lines = drained
    if on_output is not None:
        for rank, chunk in lines:
            on_output(rank, chunk)
    if on_report is not None:
        for record in records:
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
                local_world_size=final.get("local_world_size"),
            )
        )
    return out


def reports_json(reports: Sequence[WorkerReport]) -> str:
    """The reports as the JSON document ``optimenv ray-launch --report`` writes."""
    return (
        json.dumps({"workers": [r.to_dict() for r in reports]}, indent=2, sort_keys=True, default=str) + "\n"
    )
