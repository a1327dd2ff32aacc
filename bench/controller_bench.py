"""Controller benchmark: N OptimEnv objects reconciled by the real kopf operator against kmock.

Baseline, in the same run and process, against the same mock: a plain lightkube client applying
the same children (bodies rendered beforehand, so the baseline pays for HTTP only) with the same
concurrency kopf gets (one task per object). Then the controller converges N objects from a cold
start; then a restarted controller resyncs all N (must write nothing). Pinned to one core; the mock
server shares that core and event loop with whichever client is measured.

    .venv/bin/python bench/controller_bench.py [--objects 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import kmock  # noqa: E402
from tests.controller.apiserver import ApiServer, settle  # noqa: E402
from tests.controller.conftest import optimenv  # noqa: E402
from tests.controller.harness import running_operator  # noqa: E402

from optimenv_controller import reconcile as rc  # noqa: E402
from optimenv_controller.kube import Kube  # noqa: E402

OE = "optimenv.dev/v1alpha1/optimenvs"
CONCURRENCY = 64


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def objects(n: int, namespace: str) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        body = optimenv(f"train-{i:04d}")
        body["metadata"]["namespace"] = namespace
        # Vary the config so every object plans and renders its own children.
        body["spec"]["config"]["gradient_accumulation_steps"] = 1 + i % 16
        out.append(body)
    return out


async def baseline(api: ApiServer, n: int) -> dict[str, Any]:
    """A plain client creating the same children (POST, as the controller creates them), no controller."""
    bodies = []
    for i, obj in enumerate(objects(n, "base")):
        # Not stored in the mock: the controller under test must not see the baseline's objects.
        obj["metadata"].update(uid=f"00000000-0000-0000-0000-{i:012d}", generation=1)
        want = rc.desired(obj)
        assert isinstance(want, rc.Desired)
        bodies.extend(want.children)
    kube = Kube.for_server(str(api.url))
    mark = api.count
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(body: dict[str, Any]) -> None:
        async with sem:
            await kube.create(body)

    started = time.perf_counter()
    await asyncio.gather(*(one(b) for b in bodies))
    elapsed = time.perf_counter() - started
    await kube.close()
    return {"seconds": elapsed, "writes": len(api.writes(since=mark)), "children": len(bodies)}


def all_ready(api: ApiServer, namespace: str, n: int) -> bool:
    done = 0
    for (res, ns, _), obj in api.objects.items():
        if res != kmock.resource(OE) or ns != namespace or obj.deleted:
            continue
        for cond in (obj.raw.get("status") or {}).get("conditions") or []:
            if cond["type"] == "Ready" and cond["status"] == "True":
                done += 1
    return done == n


async def wait_for(check: Any, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError("did not converge")
        await asyncio.sleep(0.25)  # the check scans the mock's objects on the measured core


def classify(writes: list[kmock.Request]) -> dict[str, int]:
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
        elif "/optimenvs/" in r.url.path:
            kind = "kopf annotations"
        else:
            kind = f"other {r.method.value} {r.url.path}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


async def controller_run(api: ApiServer, n: int) -> dict[str, Any]:
    for obj in objects(n, "ctrl"):
        api.put_object(OE, obj)
    mark = api.count
    started = time.perf_counter()
    async with running_operator(str(api.url)) as op:
        await wait_for(lambda: all_ready(api, "ctrl", n), timeout=600)
        converge = time.perf_counter() - started
        await settle(api, quiet=0.5, timeout=120)
    writes = api.writes(since=mark)
    cold = {"seconds": converge, "writes": len(writes), "by_kind": classify(writes), "gets": gets(api, mark)}
    del op

    mark = api.count
    started = time.perf_counter()
    async with running_operator(str(api.url)) as op:
        synced = op.controller.metrics.reconciles.labels(result="synced")
        await wait_for(lambda: synced._value.get() >= n, timeout=600)
        resync_time = time.perf_counter() - started
        await settle(api, quiet=0.5, timeout=120)
    resync_writes = api.writes(since=mark)
    resync = {"seconds": resync_time, "writes": len(resync_writes), "by_kind": classify(resync_writes)}
    return {"cold": cold, "resync": {**resync, "gets": gets(api, mark)}}


def gets(api: ApiServer, since: int) -> int:
    """Single-object GETs (not lists, watches or discovery) from request ``since`` on."""
    return sum(1 for r in list(api)[since:] if r.action == kmock.action.FETCH)


async def main(n: int) -> None:
    async with ApiServer() as api, kmock.Server(api):
        # The controller first: it watches every ConfigMap, so the baseline's would burden it.
        rss_start = peak_rss_mb()
        ctrl = await controller_run(api, n)
        rss_ctrl = peak_rss_mb()
        gc.collect()
        base = await baseline(api, n)
    cold, resync = ctrl["cold"], ctrl["resync"]
    print(
        f"objects: {n}; python {platform.python_version()}; cpus allowed: {sorted(os.sched_getaffinity(0))}"
    )
    print(
        f"baseline (lightkube apply of the same {base['children']} children, concurrency {CONCURRENCY}): "
        f"{base['seconds']:.2f} s, {base['writes']} writes"
    )
    print(
        f"controller cold start to all Ready: {cold['seconds']:.2f} s "
        f"(ratio {cold['seconds'] / base['seconds']:.2f}x baseline), {cold['writes']} writes "
        f"= {cold['writes'] / n:.2f} per object: {cold['by_kind']}; {cold['gets'] / n:.2f} GETs per object"
    )
    print(
        f"controller full resync (restart, all {n} resumed): {resync['seconds']:.2f} s, "
        f"{resync['writes']} writes {resync['by_kind']}; {resync['gets'] / n:.2f} GETs per object"
    )
    print(
        f"peak RSS of the process (mock + controller): {rss_start:.0f} MB before the operator started, "
        f"{rss_ctrl:.0f} MB after converge and resync"
    )
    if resync["writes"]:
        raise SystemExit("a full resync must make zero writes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1000)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    asyncio.run(main(args.objects))
