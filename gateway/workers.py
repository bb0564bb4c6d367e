"""Several gateway processes on one port (``workers: N``): the parent's part and each worker's.

The parent (``python -m gateway serve``) does once what must happen before the workers start: the
log database's migration, the completion-id secret they must share, a fresh directory for
prometheus-client's multiprocess mode (``gateway.metrics``). It runs the workers under uvicorn's
supervisor (one listening socket, the kernel hands each connection to one worker, a dead worker is
replaced), watches the managed vLLM, and clears a dead worker's live gauges.

A worker claims the lowest free slot, a lock file held for its lifetime (a replaced worker gets its
slot back). The slot names its log spool; slot 0 also owns the jobs one process does for all: the
retention purge, and replaying the spools of slots no worker holds any more. The jobs replicas
already coordinate (the swapper following the registry, the canary gate under its lock, the
reward-model follower) run in every worker, as they run in every replica. uvicorn was chosen over
gunicorn or a hand-made pre-fork: it is already the server, and its supervisor is what the
``--workers`` flag runs. Does not know what a request does.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI
    from uvicorn.supervisors import Multiprocess

    from gateway.settings import GatewaySettings
    from gateway.vllm_process import VLLMProcess

WORKER_ENV = "BON_GATEWAY_WORKER"
"""The parent's command line for its workers (config path, host, port), as JSON: each worker loads the same settings."""


@dataclass
class Slot:
    """A worker's place among its siblings, held by a ``flock`` until the process ends."""

    index: int
    fd: int

    @property
    def owner(self) -> bool:
        """This worker runs the jobs one process does for all."""
        return self.index == 0

    def spool_dir(self, data_dir: Path) -> Path:
        """Slot 0's spool is a single gateway's; the others have their own next to it."""
        return data_dir / "spool" if self.index == 0 else data_dir / f"spool-{self.index}"

    def release(self) -> None:
        os.close(self.fd)


def claim_slot(directory: Path) -> Slot:
    """The lowest slot no live process holds (the kernel drops a dead process's lock)."""
    directory.mkdir(parents=True, exist_ok=True)
    index = 0
    while True:
        fd = _try_lock(directory / f"worker-{index}.lock")
        if fd is not None:
            return Slot(index, fd)
        index += 1


def adopt_spools(data_dir: Path, slots: Path, into: Path) -> int:
    """Move the spooled records of slots no worker holds (fewer workers than before) into ``into`` as replay files,
    so slot 0's writer replays them; returns how many files moved. Holds each slot's lock while moving."""
    into.mkdir(parents=True, exist_ok=True)
    moved = 0
    for spool in sorted(data_dir.glob("spool-*")):
        index = spool.name.removeprefix("spool-")
        if not spool.is_dir() or not index.isdigit():
            continue
        fd = _try_lock(slots / f"worker-{index}.lock")
        if fd is None:
            continue  # a live worker's
        try:
            for path in [*sorted(spool.glob("spool-*.replay.jsonl")), spool / "spool.jsonl"]:
                if path.exists() and path.stat().st_size > 0:
                    path.rename(into / f"spool-{time.time_ns()}.replay.jsonl")
                    moved += 1
        finally:
            os.close(fd)
    return moved


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def worker_app() -> FastAPI:
    """uvicorn's app factory in each worker: the parent's settings (same file, overrides and environment), this
    worker's share of the caps and rates, its slot."""
    from gateway.app import create_app
    from gateway.logconfig import configure_logging
    from gateway.settings import load

    spec = json.loads(os.environ[WORKER_ENV])
    settings = load(Path(spec["config"]) if spec["config"] else None, host=spec["host"], port=spec["port"])
    configure_logging()
    slot = claim_slot(settings.store.data_dir / "workers") if settings.store.enabled else None
    return create_app(settings.per_worker(), slot=slot)


def prepare(settings: GatewaySettings) -> None:
    """What the workers must find done: the log database migrated (not N migrations racing on one file) and the
    completion-id secret created (one secret, or a worker's ids fail at its siblings)."""
    if not settings.store.enabled:
        return
    from gateway.ids import load_or_create_secret
    from gateway.store.sql import SqlStore

    store = SqlStore(settings.store.database_url(), connect_timeout_s=settings.store.connect_timeout_s)
    try:
        store.migrate()
    finally:
        store.engine.dispose()
    if settings.store.id_secret is None:
        load_or_create_secret(settings.store.data_dir / "id_secret")


def serve(settings: GatewaySettings, config: Path | None, vllm: VLLMProcess | None) -> str | None:
    """Run ``settings.workers`` workers until SIGTERM or SIGINT; None, or why the gateway had to stop (the managed
    vLLM died, a worker could not start)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    prepare(settings)
    metrics_dir = tempfile.mkdtemp(prefix="bon-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any worker imports prometheus_client
    os.environ[WORKER_ENV] = json.dumps({"config": str(config) if config else None, "host": settings.host, "port": settings.port})
    uv = uvicorn.Config(
        "gateway.workers:worker_app", factory=True, workers=settings.workers, host=settings.host, port=settings.port,
        log_level="warning", access_log=False, ws="none", timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )  # fmt: skip
    supervisor = Multiprocess(uv, sockets=[uv.bind_socket()])
    fatal: list[str] = []
    done = threading.Event()
    tender = threading.Thread(target=_tend, args=(supervisor, vllm, Path(metrics_dir), fatal, done), daemon=True)
    tender.start()
    try:
        supervisor.run()
    finally:
        done.set()
        tender.join(5)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if fatal:
        return fatal[0]
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        return "a worker failed to start (its error is above)"
    return None


def _tend(supervisor: Multiprocess, vllm: VLLMProcess | None, metrics_dir: Path, fatal: list[str], done: threading.Event) -> None:
    """The parent's watch, once a second: stop every worker when the managed vLLM dies; drop dead workers' live
    gauges (a killed worker's requests in flight and queue must not count forever)."""
    from prometheus_client.multiprocess import mark_process_dead

    should_exit = supervisor.should_exit
    while not done.wait(1.0):
        if vllm is not None and vllm.returncode() is not None and not fatal:
            fatal.append(f"the managed vLLM exited with code {vllm.returncode()}; its log ({vllm.log_path}) ends:\n"
                         f"{vllm.log_tail()}")  # fmt: skip
            should_exit.set()
        for pid in _dead_writers(metrics_dir):
            mark_process_dead(pid, str(metrics_dir))


def _dead_writers(metrics_dir: Path) -> set[int]:
    """Processes whose live-gauge files are in ``metrics_dir`` and that no longer run."""
    pids = set()
    for path in metrics_dir.glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            pids.add(int(pid))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
