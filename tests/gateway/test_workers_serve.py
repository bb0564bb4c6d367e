"""``python -m gateway serve`` with ``workers: 2``, the real processes on the benchmark's mock backend: both workers
serve one port; ``/metrics`` counts every request whichever worker answered it; a thumb is accepted by the worker
that did not sign its completion's id; a killed worker is replaced in its slot and its live gauges are dropped;
SIGTERM stops everything with every answered completion in the log."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.metrics import sample
from gateway.vllm_process import free_port
from loadtest.servers import mock_backend, wait_http
from tests.polling import wait_until

pytestmark = pytest.mark.slow
BODY = {"model": "toy-bon", "messages": [{"role": "user", "content": "What is 3 plus 4?"}], "max_tokens": 8}


def _children(pid: int) -> list[int]:
    """The gateway's worker processes (not multiprocessing's resource tracker, also a child)."""
    kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [k for k in kids if b"spawn_main" in _cmdline(k)]


def _cmdline(pid: int) -> bytes:
    """A process's command line; empty once it is gone (a killed worker can be reaped between the listing and the read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def _metrics_dir(worker: int) -> Path:
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    [value] = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(value.decode())


def _served_by(metrics_dir: Path, pid: int) -> float:
    """200s one worker answered, from its own counter file alone."""
    files = [str(metrics_dir / f"counter_{pid}.db")]
    [family] = [f for f in MultiProcessCollector.merge(files) if f.name == "bon_requests"]  # type: ignore[no-untyped-call]
    return sum(float(s.value) for s in family.samples if s.name == "bon_requests_total" and s.labels == {"status": "200"})


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with mock_backend(0) as backend:
        port = free_port()
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump({
            "port": port, "workers": 2, "backends": [{"url": backend, "model": "policy"}], "scoring_enabled": False,
            "n_candidates": 1, "warmup": False, "swap": {"enabled": False},
            "feedback": {"per_minute": 6000, "burst": 200},  # each worker enforces half: 100 at once
            "store": {"data_dir": str(tmp_path / "data"), "flush_interval_ms": 20},
        }))  # fmt: skip
        with (tmp_path / "gateway.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)], stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", timeout_s=60)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


async def _chat(url: str, requests: int, concurrency: int) -> list[str]:
    """Completion ids of ``requests`` answered chats, each on a new connection (so the kernel spreads them)."""
    ids: list[str] = []
    queue = list(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

        async def worker() -> None:
            while queue:
                queue.pop()
                async with session.post(f"{url}/v1/chat/completions", json=BODY) as response:
                    assert response.status == 200, await response.text()
                    ids.append((await response.json())["id"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids


async def _thumbs(url: str, ids: list[str]) -> list[int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        statuses = []
        for cid in ids:
            async with session.post(f"{url}/v1/feedback", json={"completion_id": cid, "thumb": "up"}) as response:
                statuses.append(response.status)
        return statuses


def test_two_workers_serve_one_port_with_merged_metrics_shared_ids_and_nothing_lost(
    gateway: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, proc = gateway
    wait_until(lambda: len(_children(proc.pid)) == 2, 60, "two workers")
    workers = _children(proc.pid)
    metrics_dir = _metrics_dir(workers[0])
    wait_until(lambda: all((metrics_dir / f"counter_{w}.db").exists() for w in workers), 60, "both workers serving")

    ids = asyncio.run(_chat(url, 200, 8))
    served = {w: _served_by(metrics_dir, w) for w in workers}
    assert all(n > 0 for n in served.values()), served  # the kernel gave both workers connections
    assert sum(served.values()) == 200
    for _ in range(4):  # whichever worker answers the scrape, it counts both
        assert sample(url, "bon_requests_total", {"status": "200"}) == 200
    assert asyncio.run(_thumbs(url, ids[:40])) == [200] * 40  # about half were signed by the other worker

    data = tmp_path / "data"
    wait_until(lambda: _logged(data) >= set(ids), 30, "the burst in the log")  # SIGKILL below loses only a queue

    # a killed worker: replaced in its slot (no third slot), its live gauges dropped by the parent
    victim = workers[1]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in _children(proc.pid) and len(_children(proc.pid)) == 2, 60, "a replacement")
    wait_until(lambda: not list(metrics_dir.glob(f"gauge_live*_{victim}.db")), 30, "the dead worker's live gauges")
    assert sorted(p.name for p in (data / "workers").iterdir()) == ["worker-0.lock", "worker-1.lock"]
    wait_until(lambda: sample(url, "bon_requests_in_flight") == 0, 30, "in flight back to 0")
    more = asyncio.run(_chat(url, 40, 4))

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert not metrics_dir.exists()
    assert _logged(data) >= set(ids + more)  # every answered completion, whichever worker answered it
    with sqlite3.connect(data / "gateway.db") as db:
        assert db.execute("SELECT count(*) FROM feedback").fetchone()[0] == 40


def _logged(data: Path) -> set[str]:
    db = sqlite3.connect(data / "gateway.db")
    try:
        return {row[0] for row in db.execute("SELECT id FROM completions")}
    finally:
        db.close()
