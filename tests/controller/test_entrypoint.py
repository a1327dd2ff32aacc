"""``optimenv controller`` as a process: KUBECONFIG, /metrics, /healthz, JSON logs, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.controller.apiserver import ApiServer, eventually
from tests.controller.conftest import NS, optimenv
from tests.controller.test_wire import OE, ready


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.timeout(60)
async def test_controller_process_reconciles_and_serves_probes_and_metrics(
    kmock: ApiServer, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "kmock", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    kmock.put_object(OE, optimenv())
    metrics_port, health_port = _free_port(), _free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from optimenv.cli import main; main()",
        "controller",
        "--metrics-port",
        str(metrics_port),
        "--health-port",
        str(health_port),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await eventually(lambda: ready(kmock), timeout=30)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{health_port}/healthz") as response:
                assert response.status == 200
            # The counter moves when the reconcile ends: after its status write and its Event.
            for _ in range(50):
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                    text = await response.text()
                if 'optimenv_reconciles_total{result="updated"}' in text:
                    break
                await asyncio.sleep(0.1)
        assert 'optimenv_reconciles_total{result="updated"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert stdout == b""  # stdout carries data only; the controller has none
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert lines, stderr.decode()[-2000:]
    assert any(line.get("k8s-obj", {}).get("name") == "demo" for line in lines)
    obj = kmock.obj(OE, NS, "demo")
    assert obj is not None and obj["status"]["observedGeneration"] == 1
