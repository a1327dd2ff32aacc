"""Controller benchmark: N OptimEnv objects reconciled by the real kopf operator against kmock.

Three kinds of process, all pinned to the same single core: the mock API server (kmock's emulator,
``tests/controller/apiserver.py``), the operator (the controller's kopf registry with the production
settings, logged in to the mock), and the baseline client. The mock runs apart so that the
operator's own peak RSS is measured; the benchmark itself only sends commands and sleeps.

Baseline, in the same run: a plain lightkube client creating the same children by POST (bodies
rendered beforehand, so it pays for HTTP only) with 64 requests in flight. Cold start: the operator
converges N objects, timed from the moment it starts (its imports done) until every object is
Ready=True. Resync: a restarted operator lists and reconciles all N again (it must write nothing and
read no object with a GET). Baselines and cold starts alternate, ``--rounds`` of each, each against a
fresh mock; the fastest of each kind (the least disturbed by whatever else runs on the machine) make
the ratio. Each run also reports the CPU seconds of the measured process and of the mock. The last
line sums it up.

    .venv/bin/python bench/controller_bench.py [--objects 1000] [--rounds 3]

``OPTIMENV_BENCH_PROFILE=FILE`` (the operator's cold start) and ``OPTIMENV_BENCH_MOCK_PROFILE=FILE``
write cProfile statistics of CPU time (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OE = "optimenv.dev/v1alpha1/optimenvs"
CONCURRENCY = 64


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def objects(n: int, namespace: str) -> list[dict[str, Any]]:
    from tests.controller.conftest import optimenv

    out = []
    for i in range(n):
        body = optimenv(f"train-{i:04d}")
        body["metadata"]["namespace"] = namespace
        # Vary the config so every object plans and renders its own children.
        body["spec"]["config"]["gradient_accumulation_steps"] = 1 + i % 16
        out.append(body)
    return out


# -- the mock API server's process ------------------------------------------------------------------
def classify(writes: list[Any]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in writes:
        if r.method.value == "PATCH" and r.headers.get("Content-Type") == "application/apply-patch+yaml":
            kind = "apply (children)"
        elif r.method.value == "POST" and not r.url.path.endswith("/events"):
            kind = "create (children)"
        elif r.url.path.endswith("/status"):
            kind = "status patch"
        elif r.url.path.endswith("/events"):
            kind = "event"
        else:
            kind = f"other {r.method.value} {r.url.path}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def serve_mock(conn: Connection) -> None:
    profile = os.environ.get("OPTIMENV_BENCH_MOCK_PROFILE")
    if profile:
        import cProfile

        profiler = cProfile.Profile(time.process_time)
        profiler.runcall(asyncio.run, _mock(conn))
        profiler.dump_stats(profile)
    else:
        asyncio.run(_mock(conn))


async def _mock(conn: Connection) -> None:
    import kmock
    from tests.controller.apiserver import ApiServer, settle

    commands: asyncio.Queue[Any] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), lambda: commands.put_nowait(conn.recv()))
    resource = kmock.resource(OE)
    keys: list[Any] = []
    async with ApiServer() as api, kmock.Server(api):
        conn.send(str(api.url))
        while True:
            command, arg = await commands.get()
            if command == "stop":
                return
            if command == "put":
                for body in arg:
                    api.put_object(OE, body)
                    keys.append((resource, body["metadata"]["namespace"], body["metadata"]["name"]))
                answer: Any = None
            elif command == "count":
                answer = (api.count, cpu_seconds())
            elif command == "ready":
                answer = _ready_count(api, [k for k in keys if k[1] == arg])
            elif command == "settle":
                await settle(api, quiet=arg, timeout=300)
                answer = None
            else:  # "summary" since (request count, CPU seconds)
                mark, cpu = arg
                writes = api.writes(since=mark)
                gets = sum(1 for r in list(api)[mark:] if r.action == kmock.action.FETCH)
                summary = {"writes": len(writes), "by_kind": classify(writes), "gets": gets}
                answer = {**summary, "requests": api.count - mark, "mock_cpu": cpu_seconds() - cpu}
            conn.send(answer)


def _ready_count(api: Any, names: list[Any]) -> int:
    """How many of these OptimEnvs say Ready=True (looked up by key: the mock holds many objects)."""
    done = 0
    for key in names:
        obj = api.objects[key]
        for cond in (obj.raw.get("status") or {}).get("conditions") or []:
            if cond["type"] == "Ready" and cond["status"] == "True":
                done += 1
    return done


# -- the measured processes -------------------------------------------------------------------------
def run_operator(conn: Connection, url: str, synced_at: int) -> None:
    """The operator, production settings; says "synced" once ``synced_at`` reconciles wrote nothing."""
    import kopf

    from optimenv_controller.controller import Controller
    from optimenv_controller.handlers import build_registry, make_settings
    from optimenv_controller.kube import Kube

    cpu = 0.0

    async def operate() -> None:
        nonlocal cpu
        controller = Controller(Kube.for_server(url))
        registry = build_registry(controller, login_url=url)
        conn.send("ready")
        assert await asyncio.get_running_loop().run_in_executor(None, conn.recv) == "go"
        cpu = cpu_seconds()
        stop = asyncio.Event()
        settings = make_settings()
        task = asyncio.create_task(
            kopf.operator(
                registry=registry, settings=settings, standalone=True, clusterwide=True, stop_flag=stop
            )
        )
        synced = controller.metrics.reconciles.labels(result="synced")
        told = False
        while not stop.is_set():
            await asyncio.sleep(0.1)
            if synced_at and not told and synced._value.get() >= synced_at:
                conn.send("synced")
                told = True
            if conn.poll():
                assert conn.recv() == "stop"
                stop.set()
        await asyncio.wait_for(task, timeout=60)

    profile = os.environ.get("OPTIMENV_BENCH_PROFILE")
    if profile and not synced_at:  # profile the cold start's CPU time: python -m pstats <file>
        import cProfile

        profiler = cProfile.Profile(time.process_time)
        profiler.runcall(asyncio.run, operate())
        profiler.dump_stats(profile)
    else:
        asyncio.run(operate())
    conn.send((peak_rss_mb(), cpu_seconds() - cpu))


def run_client(conn: Connection, url: str, n: int) -> None:
    """The baseline: the same children, rendered beforehand, created by a plain lightkube client."""
    from optimenv_controller import reconcile as rc
    from optimenv_controller.kube import Kube

    bodies = []
    for i, obj in enumerate(objects(n, "base")):
        obj["metadata"].update(uid=f"00000000-0000-0000-0000-{i:012d}", generation=1)
        want = rc.desired(obj)
        assert isinstance(want, rc.Desired)
        bodies.extend(want.children)
    conn.send(len(bodies))
    assert conn.recv() == "go"
    cpu = cpu_seconds()

    async def create_all() -> None:
        kube = Kube.for_server(url)
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(body: dict[str, Any]) -> None:
            async with sem:
                await kube.create(body)

        await asyncio.gather(*(one(b) for b in bodies))
        await kube.close()

    asyncio.run(create_all())
    conn.send((peak_rss_mb(), cpu_seconds() - cpu))


class Child:
    """A spawned process and our end of its pipe."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(theirs, *args), daemon=True)
        self.proc.start()

    def call(self, command: str, arg: Any = None) -> Any:
        self.conn.send((command, arg))
        return self.conn.recv()

    def wait(self, what: Callable[[], bool], timeout: float, interval: float = 0.25) -> None:
        deadline = time.perf_counter() + timeout
        while not what():
            if time.perf_counter() > deadline:
                raise TimeoutError("did not converge")
            time.sleep(interval)

    def finish(self) -> Any:
        answer = self.conn.recv()
        self.proc.join(timeout=60)
        return answer


def controller_phase(mock: Child, url: str, n: int, namespace: str, *, resync: bool) -> dict[str, Any]:
    """Start an operator; time it to all Ready (cold) or to n quiet reconciles (resync)."""
    mark = mock.call("count")
    op = Child(run_operator, url, n if resync else 0)
    assert op.conn.recv() == "ready"
    started = time.perf_counter()
    op.conn.send("go")
    if resync:
        op.wait(lambda: op.conn.poll(), timeout=600, interval=0.05)
        assert op.conn.recv() == "synced"
    else:
        op.wait(lambda: mock.call("ready", namespace) >= n, timeout=600)
    seconds = time.perf_counter() - started
    mock.call("settle", 0.5)
    op.conn.send("stop")
    rss, cpu = op.finish()
    return {"seconds": seconds, "rss": rss, "cpu": cpu, **mock.call("summary", mark)}


def baseline_phase(mock: Child, url: str, n: int) -> dict[str, Any]:
    mark = mock.call("count")
    client = Child(run_client, url, n)
    children = client.conn.recv()
    started = time.perf_counter()
    client.conn.send("go")
    rss, cpu = client.finish()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "children": children, "rss": rss, "cpu": cpu, **mock.call("summary", mark)}


@contextlib.contextmanager
def mock_server() -> Iterator[tuple[Child, str]]:
    """A fresh mock API server in its own process, and its URL."""
    mock = Child(serve_mock)
    try:
        yield mock, mock.conn.recv()
    finally:
        mock.conn.send(("stop", None))
        mock.proc.join(timeout=30)


def main(n: int, rounds: int) -> None:
    """``rounds`` baselines and cold starts, alternating, each against a fresh mock; one resync."""
    base: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    resync: dict[str, Any] = {}
    for i in range(rounds):
        for phase in ("baseline", "controller") if i % 2 == 0 else ("controller", "baseline"):
            with mock_server() as (mock, url):
                if phase == "baseline":
                    base.append(baseline_phase(mock, url, n))
                    continue
                mock.call("put", objects(n, "ctrl"))
                cold.append(controller_phase(mock, url, n, "ctrl", resync=False))
                if not resync:
                    resync = controller_phase(mock, url, n, "ctrl", resync=True)
    report(n, base, cold, resync)


def report(n: int, bases: list[dict[str, Any]], colds: list[dict[str, Any]], resync: dict[str, Any]) -> None:
    """Each run, then the fastest of each kind (the least disturbed by whatever else runs)."""
    print(
        f"objects: {n}; python {platform.python_version()}; cpus allowed: {sorted(os.sched_getaffinity(0))}"
    )
    for base in bases:
        print(
            f"baseline (lightkube POST of the same {base['children']} children, concurrency {CONCURRENCY}): "
            f"{base['seconds']:.2f} s, {base['writes']} writes; CPU: client {base['cpu']:.1f} s, "
            f"mock {base['mock_cpu']:.1f} s; client peak RSS {base['rss']:.0f} MB"
        )
    for cold in colds:
        print(
            f"controller cold start to all Ready: {cold['seconds']:.2f} s, {cold['writes']} writes = "
            f"{cold['writes'] / n:.2f} per object: {cold['by_kind']}; "
            f"{cold['gets'] / n:.2f} GETs per object; CPU: operator {cold['cpu']:.1f} s, "
            f"mock {cold['mock_cpu']:.1f} s; operator peak RSS {cold['rss']:.0f} MB"
        )
    print(
        f"controller full resync (restart, all {n} listed and reconciled): {resync['seconds']:.2f} s, "
        f"{resync['writes']} writes {resync['by_kind']}; {resync['gets']} GETs; CPU: operator "
        f"{resync['cpu']:.1f} s, mock {resync['mock_cpu']:.1f} s; operator peak RSS {resync['rss']:.0f} MB"
    )
    base, cold = min(b["seconds"] for b in bases), min(c["seconds"] for c in colds)
    base_cpu = min(b["cpu"] + b["mock_cpu"] for b in bases)
    cold_cpu = min(c["cpu"] + c["mock_cpu"] for c in colds)
    print(
        f"fastest of {len(bases)}: baseline {base:.2f} s, controller {cold:.2f} s; "
        f"CPU (measured process + mock): baseline {base_cpu:.1f} s, controller {cold_cpu:.1f} s "
        f"({cold_cpu / base_cpu:.2f}x)"
    )
    rss = max(c["rss"] for c in [*colds, resync])
    print(
        f"controller: cold {cold / base:.2f}x plain client, "
        f"resync {resync['writes']} writes {resync['gets']} GETs, operator RSS {rss:.0f} MB"
    )
    if resync["writes"]:
        raise SystemExit("a full resync must make zero writes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="baseline and cold-start runs of each")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the children inherit it
    main(args.objects, args.rounds)
