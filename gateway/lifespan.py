"""The gateway's lifespan: everything a process serves with, built once from small named builders, and torn down.

Order of start: metrics → one aiohttp session → generator → scorer → log writer → swapper
(serves the registry's current version from the first request on) → chat service →
reward-model follower → canary gate → state; then the background tasks (vLLM watcher,
swapper, follower, gate). Shutdown runs the other way and loses nothing accepted: the
background scoring drains, and the writer flushes to the database or its spool. Knows
which settings select which implementation; routes never build anything.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from fastapi import FastAPI

from gateway.auth import AdminGuard, KeyRing
from gateway.blue_green import launcher
from gateway.breaker import Breakers, State
from gateway.canary import CanaryGate, Totals
from gateway.generate import Generator, VLLMGenerator
from gateway.ids import CompletionIds, load_or_create_secret
from gateway.keyfile import KeyFile
from gateway.limits import RateLimiter
from gateway.metrics import Metrics
from gateway.objectives import Judge
from gateway.quotas import Quotas
from gateway.reward_follow import RewardModelFollower
from gateway.score import LocalRewardModel, RemotePoolingScorer, Scorer, with_length_term
from gateway.service import ChatService
from gateway.settings import ApiKey, GatewaySettings
from gateway.state import GatewayState
from gateway.store import ChildSettings, LogWriter, ProcessWriter, RecordWriter, Spool, SqlStore, Store, WriterStats
from gateway.swap import Swapper
from gateway.vllm_process import VLLMProcess
from gateway.warmup import until_warm
from gateway.workers import Slot, adopt_spools

log = structlog.get_logger("gateway")
Lifespan = Callable[[FastAPI], Any]


def lifespan(
    settings: GatewaySettings,
    generator: Generator | None,
    scorer: Scorer | None,
    store: Store | None,
    vllm: VLLMProcess | None,
    on_fatal: Callable[[str], None] | None,
    slot: Slot | None = None,
) -> Lifespan:
    """The app's lifespan; ``generator``, ``scorer`` and ``store`` replace the real ones (fakes in unit tests, which
    also leaves out the swapper and the reward-model follower), ``vllm`` is watched while serving; ``slot``: this
    worker's, one of several (its own spool; slot 0 purges and replays orphaned spools)."""

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        async with _session(settings) as session:
            gen = generator or _generator(settings, session, metrics)
            score = scorer if scorer is not None else (_scorer(settings, session) if settings.scoring_enabled else None)
            if score is not None:
                await score.start()
            metrics.set_versions(settings.policy_version, score.version if score else "none")
            writer = await asyncio.to_thread(_writer, settings, metrics, store, slot) if settings.store.enabled else None
            if writer is not None:
                writer.start()

            def gone(url: str) -> None:  # a stopped blue-green instance: no breaker state or metric series left behind
                if isinstance(gen, VLLMGenerator):
                    gen.breakers.forget(url)
                metrics.forget_backend(url)

            swapper = await _swapper(settings, session, metrics, gone) if generator is None and settings.swap.enabled else None
            route = swapper.route_for if swapper is not None else None
            if swapper is not None and isinstance(gen, VLLMGenerator):
                gen.on_missing = swapper.lost  # a version vLLM lost is loaded again, not a lasting 502
            on_trial = swapper.on_trial if swapper is not None else None
            judge = _judge(settings, session)
            service = ChatService(settings, gen, score, metrics, _ids(settings), writer, route, judge, on_trial)
            follower = None
            if scorer is None and score is not None and settings.swap.enabled:
                follower = await _reward_follower(settings, session, service, metrics)
            gate = _gate(settings, service, writer, metrics) if settings.swap.enabled else None

            def rekeyed(new: list[ApiKey]) -> None:  # the key file changed
                keys.replace(new)
                quotas.replace(new)

            key_file = KeyFile(settings.api_keys_file, settings.api_keys, rekeyed) if settings.api_keys_file else None
            api_keys = key_file.keys() if key_file is not None else settings.api_keys
            keys = KeyRing(api_keys, keyless_public=settings.allow_keyless_public)
            quotas = Quotas(api_keys, settings.quota_replicas)
            state = GatewayState(
                settings, service, keys, metrics, RateLimiter(settings.feedback.per_minute, settings.feedback.burst),
                AdminGuard(settings.admin_token, settings.host, keys), writer, swapper, gate, quotas=quotas,
            )  # fmt: skip
            app.state.gateway = state
            state.warm = not settings.warmup

            def warmed() -> None:
                state.warm = True

            stop = on_fatal or (lambda message: signal.raise_signal(signal.SIGTERM))
            tasks = [
                asyncio.create_task(work)
                for work in (
                    _watch(vllm, state, stop) if vllm is not None else None,
                    swapper.run() if swapper is not None else None,
                    follower.run() if follower is not None else None,
                    gate.run() if gate is not None and gate.automatic else None,
                    until_warm(service, warmed) if settings.warmup else None,
                    key_file.run(settings.keys_reload_s) if key_file is not None else None,
                    _purge_every(settings, writer.store)
                    if writer is not None and isinstance(writer.store, SqlStore) and (slot is None or slot.owner)
                    else None,
                    _refresh_every(metrics) if metrics.multiprocess is not None else None,
                )
                if work is not None
            ]
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)  # a cancelled blue-green start stops its vLLM
                await _shut_down(service, swapper, follower, writer, owns_store=store is None)

    return run


async def _refresh_every(metrics: Metrics) -> None:
    """Several workers: the log's queue and spool written to this worker's metric files every second."""
    while True:
        metrics.refresh()
        await asyncio.sleep(1.0)


async def _purge_every(settings: GatewaySettings, store: SqlStore) -> None:
    """Retention on a schedule: records older than ``store.retention_days`` deleted every ``store.purge_every_h``."""
    s = settings.store
    if s.retention_days is None or s.purge_every_h is None:
        return
    while True:
        try:
            counts = await asyncio.to_thread(store.purge, s.retention_days * 86400)
            log.info("log_purged", completions=counts.completions, candidates=counts.candidates, feedback=counts.feedback)
        except Exception as exc:  # the database may be down: the next round tries again
            log.warning("log_purge_failed", error=f"{exc.__class__.__name__}: {exc}")
        await asyncio.sleep(s.purge_every_h * 3600)


def _generator(settings: GatewaySettings, session: aiohttp.ClientSession, metrics: Metrics) -> VLLMGenerator:
    """vLLM's client: the request and connect timeouts, a circuit breaker per backend (its state a gauge)."""

    def changed(url: str, state: State) -> None:
        metrics.backend_circuit.labels(url).set(1 if state == "open" else 0)
        (log.warning if state == "open" else log.info)("backend_circuit", backend=url, state=state)

    b = settings.breaker
    t = settings.timeouts
    for backend in settings.all_backends():
        metrics.backend_circuit.labels(backend.url).set(0)  # the series exists from the start (an alert needs it)
    return VLLMGenerator(session, settings.all_backends(), t.request_s, t.connect_s, Breakers(b.failures, b.cooldown_s, changed))


def _session(settings: GatewaySettings) -> aiohttp.ClientSession:
    """One client session for vLLM, the pooling server and the admin calls; connections idle at most keepalive_s."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=settings.timeouts.keepalive_s)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=settings.timeouts.connect_s)
    )


async def _swapper(
    settings: GatewaySettings, session: aiohttp.ClientSession, metrics: Metrics, gone: Callable[[str], None]
) -> Swapper:
    registry_dir = settings.registry_dir()
    await asyncio.to_thread(registry_dir.mkdir, parents=True, exist_ok=True)
    swap = settings.swap
    launch = launcher(settings.managed_vllm, Path("logs"), swap.full_cpu_binds) if swap.full == "blue_green" else None
    swapper = Swapper(session, settings.all_backends(), settings.policy_version, swap, registry_dir, metrics, launch,
                      settings.canary.fraction, gone)  # fmt: skip
    await swapper.sync()  # serve the registry's current version from the first request on
    return swapper


async def _reward_follower(
    settings: GatewaySettings, session: aiohttp.ClientSession, service: ChatService, metrics: Metrics
) -> RewardModelFollower:
    follower = RewardModelFollower(service, scorer_factory(settings, session), settings.scorer.model_dir,
                                   settings.scorer.version, settings.registry_dir(), metrics, settings.swap.poll_s,
                                   settings.swap.retry_s)  # fmt: skip
    await follower.sync()  # score with the registry's current reward model from the first request on
    return follower


def _gate(settings: GatewaySettings, service: ChatService, writer: LogWriter | None, metrics: Metrics) -> CanaryGate:
    """Moves the registry's pointers; the swapper (when there is one) follows them."""
    totals = writer.store if writer is not None and isinstance(writer.store, Totals) else None
    return CanaryGate(
        settings.registry_dir(), totals, lambda: service.scorer.version if service.scorer else None,
        settings.policy_version, settings.canary, metrics, settings.store.database_url() if settings.store.enabled else None,
    )  # fmt: skip


async def _shut_down(
    service: ChatService, swapper: Swapper | None, follower: RewardModelFollower | None, writer: LogWriter | None,
    owns_store: bool,
) -> None:  # fmt: skip
    if swapper is not None:
        await swapper.close()  # blue-green instances it started
    await service.drain()  # background scoring of N=1 answers for the log
    if writer is not None:
        await asyncio.to_thread(writer.close)  # everything accepted reaches the database or the spool
        if owns_store:
            await asyncio.to_thread(writer.store.close)
    if follower is not None:
        await follower.close()
    if service.scorer is not None:
        await service.scorer.close()  # the one scoring now (a follower may have replaced the first)


def _judge(settings: GatewaySettings, session: aiohttp.ClientSession) -> Judge | None:
    """The LLM judge of the ``judge`` objective, when ``objectives.judge.url`` names one (its key from the environment)."""
    j = settings.objectives.judge
    if not j.url:
        return None
    key = os.environ.get(j.api_key_env) if j.api_key_env else None
    return Judge(session, j.url, j.model, key, j.timeout_s, j.top_logprobs)


def _scorer(settings: GatewaySettings, session: aiohttp.ClientSession) -> Scorer:
    return scorer_factory(settings, session)(settings.scorer.model_dir, settings.scorer.version)


def scorer_factory(settings: GatewaySettings, session: aiohttp.ClientSession) -> Callable[[Path, str], Scorer]:
    """How the reward-model follower builds the scorer of a registry version (its directory, its name).

    Local: the version's weights in this process. Remote: the pooling server must serve the version under its
    name (``--served-model-name v0003``: a rollout of the pooling server, which the gateway does not start);
    until it lists that name, the follower retries and the old version keeps scoring. Its tokenizer is the
    version directory's. With ``scorer.length_weight``, each gets the length term (``gateway.score.LengthTerm``)."""
    s = settings.scorer
    if s.kind == "remote":
        assert s.remote_url is not None  # checked by the settings
        url = s.remote_url

        def remote(path: Path, version: str) -> Scorer:
            model = s.remote_model if version == s.version else version
            scorer = RemotePoolingScorer(session, url, model, path, version, require_listed=version != s.version)
            return with_length_term(scorer, s.length_weight)

        return remote

    def local(path: Path, version: str) -> Scorer:
        scorer = LocalRewardModel(path, version, s.device, s.threads, s.max_batch, s.batch_wait_ms, s.max_length)
        return with_length_term(scorer, s.length_weight)

    return local


def _writer(settings: GatewaySettings, metrics: Metrics, store: Store | None, slot: Slot | None) -> LogWriter:
    s = settings.store
    spool = s.data_dir / "spool" if slot is None else slot.spool_dir(s.data_dir)
    if slot is not None and slot.owner and (moved := adopt_spools(s.data_dir, s.data_dir / "workers", spool)):
        log.info("spools_adopted", files=moved)  # from slots no worker holds now (fewer workers than before)
    if store is None:
        sql = SqlStore(s.database_url(), connect_timeout_s=s.connect_timeout_s)
        sql.migrate()
        store = sql
    stats = WriterStats(
        logged=metrics.records_logged.inc,
        spooled=metrics.records_spooled.inc,
        write_error=lambda kind: metrics.log_write_errors.labels(kind).inc(),
        quarantined=metrics.records_quarantined.inc,
    )
    writer: LogWriter
    if s.writer == "process" and isinstance(store, SqlStore):  # the database work in a process of its own
        child = ChildSettings(s.database_url(), s.connect_timeout_s, spool, s.queue_size, s.batch_size,
                              s.flush_interval_ms / 1000, s.retry_s)  # fmt: skip
        writer = ProcessWriter(store, child, stats)
    else:
        writer = RecordWriter(
            store, Spool(spool), queue_size=s.queue_size, batch_size=s.batch_size,
            flush_interval_s=s.flush_interval_ms / 1000, retry_s=s.retry_s, stats=stats,
        )  # fmt: skip
    metrics.watch_log(lambda: writer.queue_depth, lambda: writer.spool.pending)
    return writer


def _ids(settings: GatewaySettings) -> CompletionIds:
    secret = settings.store.id_secret
    if secret is not None:
        return CompletionIds(secret.get_secret_value().encode())
    if not settings.store.enabled:  # nothing on disk: ids are checkable for this process's lifetime
        return CompletionIds(os.urandom(32))
    return CompletionIds(load_or_create_secret(settings.store.data_dir / "id_secret"))


async def _watch(process: VLLMProcess, state: GatewayState, on_fatal: Callable[[str], None]) -> None:
    """Stop the gateway (the CLI then exits non-zero) when its managed vLLM dies."""
    while process.returncode() is None:
        await asyncio.sleep(1.0)
    code = process.returncode()
    state.fatal = f"the managed vLLM exited with code {code}; its log ({process.log_path}) ends:\n{process.log_tail()}"
    log.error("vllm_died", returncode=code, log=str(process.log_path))
    await asyncio.to_thread(process.stop)  # its engine-core child may still be alive
    on_fatal(state.fatal)
