"""Nothing accepted is lost: the real gateway process under a burst, with PostgreSQL killed
mid-burst and brought back, and with the gateway stopped by SIGTERM mid-burst. SIGKILL
(nothing runs at exit) loses the completions still queued for the writer, measured and
printed here; a thumb is kept before its 200, so none is lost.

The backend is the benchmark's mock (the model does not matter here; the log does). Every
request that got a 200 must be in the database exactly once afterwards, with its thumbs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from sqlalchemy import create_engine, text

from gateway.metrics import sample
from gateway.store.sql import SqlStore
from gateway.vllm_process import free_port
from loadtest.servers import mock_backend, wait_http
from tests.polling import wait_until
from tests.postgres import Postgres

pytestmark = pytest.mark.slow
BODY = {"model": "toy-bon", "messages": [{"role": "user", "content": "What is 3 plus 4?"}], "max_tokens": 8}


@pytest.fixture
def database(postgres: Postgres, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the session's server (the server itself gets killed by these tests)."""
    name = "crash_" + request.node.name.removeprefix("test_")[:40]
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    yield postgres.url.rsplit("/", 1)[0] + "/" + name
    with contextlib.suppress(subprocess.CalledProcessError):  # leave the server up for the other tests
        postgres.start()


class Gateway:
    """``python -m gateway serve`` as its own process, on the mock backend and the given database."""

    def __init__(self, tmp: Path, backend_url: str, db_url: str, writer: str = "thread") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "gateway.yaml"
        self.log = tmp / "gateway.log"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "port": self.port,
                    "backends": [{"url": backend_url, "model": "policy"}],
                    "scoring_enabled": False,
                    "n_candidates": 1,
                    "store": {
                        "url": db_url,
                        "id_secret": "crash-test-secret-0123456789abcdef",
                        "data_dir": str(tmp / "data"),
                        "retry_s": 0.3,
                        "connect_timeout_s": 1,
                        "flush_interval_ms": 20,
                        "writer": writer,
                    },
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)], stdout=log, stderr=log
            )
        wait_http(f"{self.url}/health", timeout_s=60)

    def sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def sigkill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(backend_url: str, db_url: str, writer: str = "thread") -> Gateway:
        made.append(Gateway(tmp_path, backend_url, db_url, writer))
        return made[-1]

    yield make
    for gw in made:
        gw.stop()


async def burst(
    url: str, requests: int, concurrency: int, at: dict[int, Callable[[], Awaitable[None]]], accepted: list[str]
) -> int:
    """POST ``requests`` chat completions; run ``at[k]`` once ``k`` have been accepted. Returns failures."""
    remaining, failed = requests, 0
    pending = dict(sorted(at.items()))
    lock = asyncio.Lock()

    async def events() -> None:
        async with lock:
            for k in [k for k in pending if len(accepted) >= k]:
                await pending.pop(k)()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker() -> None:
            nonlocal remaining, failed
            while remaining > 0:
                remaining -= 1
                try:
                    async with session.post(f"{url}/v1/chat/completions", json=BODY) as response:
                        body: dict[str, Any] = await response.json(content_type=None)
                        if response.status == 200:
                            accepted.append(body["id"])
                        else:
                            failed += 1
                except (aiohttp.ClientError, TimeoutError):
                    failed += 1
                    await asyncio.sleep(0.01)
                await events()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    for k in list(pending):  # thresholds never reached still run (in order)
        await pending.pop(k)()
    return failed


def exposed(url: str, name: str) -> float:
    value = sample(url, name)
    assert value is not None, f"{name} not exposed"
    return value


def killer(postgres: Postgres) -> Callable[[], Awaitable[None]]:
    """A burst event that crashes the database (connections cut, nothing flushed politely)."""

    async def kill() -> None:
        await asyncio.to_thread(postgres.stop, "immediate")

    return kill


def assert_all_logged(db_url: str, accepted: list[str], thumbs: int = 0) -> None:
    store = SqlStore(db_url)
    try:
        wait_until(lambda: store.counts().completions >= len(accepted), timeout_s=60, message="the accepted completions")
        counts = store.counts()
        ids = store.completion_ids()
        assert len(set(accepted)) == len(accepted)
        assert sorted(ids) == sorted(accepted)  # every accepted one, nothing else, none twice (primary key)
        assert (counts.candidates, counts.feedback) == (len(accepted), thumbs)
    finally:
        store.close()


def test_database_killed_mid_burst_and_back(
    postgres: Postgres, database: str, gateway_factory: Callable[[str, str], Gateway]
) -> None:
    accepted: list[str] = []
    thumbed: list[int] = []
    with mock_backend(delay_ms=10) as backend_url:
        gw = gateway_factory(backend_url, database)
        gw.start()

        async def thumbs_while_down() -> None:  # feedback must survive the outage too
            async with aiohttp.ClientSession() as session:
                for cid in accepted[:10]:
                    body = {"completion_id": cid, "thumb": "up"}
                    async with session.post(f"{gw.url}/v1/feedback", json=body) as response:
                        assert response.status == 200, await response.text()
                        thumbed.append(1)

        async def revive() -> None:
            await asyncio.to_thread(postgres.start)

        failed = asyncio.run(burst(gw.url, 900, 12, {150: killer(postgres), 200: thumbs_while_down, 600: revive}, accepted))
        assert failed == 0  # the database being down never fails a request
        assert exposed(gw.url, "bon_log_records_spooled_total") > 0  # the outage did hit the write path
        assert_all_logged(database, accepted, thumbs=len(thumbed))
        wait_until(lambda: exposed(gw.url, "bon_log_spool_pending") == 0, timeout_s=30, message="the spool to empty")
    assert len(thumbed) == 10


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigterm_mid_burst_loses_nothing_even_with_the_database_down(
    postgres: Postgres, database: str, gateway_factory: Callable[..., Gateway], writer: str
) -> None:
    accepted: list[str] = []
    with mock_backend(delay_ms=10) as backend_url:
        gw = gateway_factory(backend_url, database, writer)
        gw.start()

        async def sigterm() -> None:
            gw.sigterm()

        asyncio.run(burst(gw.url, 900, 12, {100: killer(postgres), 300: sigterm}, accepted))
        assert gw.wait() == 0  # a clean exit after the graceful shutdown
        spooled = list((gw.config.parent / "data" / "spool").glob("*.jsonl"))
        assert spooled, "records accepted while the database was down should be in the spool"

        postgres.start()
        gw.start()  # the next start replays the spool
        assert_all_logged(database, accepted)

        # and with the database up: a SIGTERM mid-burst flushes the queue before exiting
        before = len(accepted)
        asyncio.run(burst(gw.url, 600, 12, {before + 150: sigterm}, accepted))
        assert gw.wait() == 0  # a clean exit after the graceful shutdown
        assert len(accepted) > before + 150
        assert_all_logged(database, accepted)
    assert os.path.exists(gw.log)


def test_sigkill_mid_burst_keeps_every_thumb_and_measures_the_completions_lost(
    tmp_path: Path, gateway_factory: Callable[[str, str], Gateway]
) -> None:
    db_url = f"sqlite:///{tmp_path / 'log.db'}"
    accepted: list[str] = []
    thumbed: list[str] = []
    with mock_backend(delay_ms=10) as backend_url:
        gw = gateway_factory(backend_url, db_url)
        gw.start()

        async def thumbs() -> None:  # each 200 is a promise: the thumb outlives the process
            async with aiohttp.ClientSession() as session:
                for cid in accepted[:20]:  # the default burst of thumbs per key
                    async with session.post(f"{gw.url}/v1/feedback", json={"completion_id": cid, "thumb": "up"}) as response:
                        assert response.status == 200, await response.text()
                        thumbed.append(cid)

        async def thumbs_then_sigkill() -> None:  # the kill follows the last thumb's 200 at once
            await thumbs()
            gw.sigkill()

        asyncio.run(burst(gw.url, 600, 12, {250: thumbs_then_sigkill}, accepted))
        assert gw.wait() == -signal.SIGKILL
        gw.start()  # replays whatever reached the spool
        store = SqlStore(db_url)
        try:
            wait_until(lambda: exposed(gw.url, "bon_log_spool_pending") == 0, timeout_s=30, message="the spool to empty")
            kept = store.read_feedback(thumbed)
            logged = set(store.completion_ids())
        finally:
            store.close()
    lost = [cid for cid in accepted if cid not in logged]
    print(f"\nSIGKILL mid-burst: {len(accepted)} answered with 200, {len(lost)} of them not in the log (queued, unwritten); "
          f"{len(kept)} of {len(thumbed)} thumbs kept")  # fmt: skip
    assert len(thumbed) == 20
    assert sorted(kept) == sorted(thumbed)  # every thumb that got its 200
    assert len(lost) <= len(accepted) // 2  # the writer kept up until the kill: only its queue's tail is lost
