"""``python -m gateway``: the gateway's command line.

  serve    start the gateway (and, when the config says so, its managed vLLM) and listen
           until stopped; the models must exist (``make models`` or ``python -m toyworld
           bootstrap`` builds the embedded default's: the gateway never imports the toy world)
  migrate  bring the log database's schema to the newest migration (serve does it too)
  purge    delete log records older than the config's retention (a CronJob in production)

Errors a user can fix (a bad config, a taken port, a missing model, vLLM dying) print one
line or a short log excerpt and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

PROG = "python -m gateway"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="OpenAI-compatible best-of-N gateway.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, default=Path("configs/local.yaml"), help="YAML settings file")
    serve.add_argument("--host", default=None, help="override the config's host")
    serve.add_argument("--port", type=int, default=None, help="override the config's port")
    migrate = sub.add_parser("migrate", help="migrate the log database")
    migrate.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    purge = sub.add_parser("purge", help="delete log records older than the retention")
    purge.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    purge.add_argument("--older-than-days", type=float, default=None, help="override store.retention_days")
    return parser


def _fail(message: str, command: str = "serve") -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 1


def _store_command(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.settings import ConfigError, load
    from gateway.store.sql import SqlStore

    try:
        settings = load(args.config)
    except ConfigError as exc:
        return _fail(str(exc), args.command)
    url = settings.store.database_url()
    try:
        store = SqlStore(url, connect_timeout_s=settings.store.connect_timeout_s)
        store.migrate()
        if args.command == "migrate":
            print(f"[gateway] {store.engine.url.render_as_string(hide_password=True)} is at the newest schema")
            return 0
        days = args.older_than_days if args.older_than_days is not None else settings.store.retention_days
        if days is None:
            print("[gateway] store.retention_days is null: nothing to purge")
            return 0
        purged = store.purge(days * 86400.0)
        print(f"[gateway] purged records older than {days:g} days: {purged.completions} completions, "
              f"{purged.candidates} candidates, {purged.feedback} thumbs")  # fmt: skip
        return 0
    except SQLAlchemyError as exc:
        return _fail(f"database error: {exc.__class__.__name__}: {str(exc).splitlines()[0]}", args.command)


def _missing_models(settings: GatewaySettings) -> str | None:
    """A one-line problem when a model directory the config names is absent; None when all are there."""
    wanted = [settings.scorer.model_dir] if settings.scoring_enabled else []
    if settings.managed_vllm.enabled:
        wanted.append(settings.managed_vllm.model_dir)
    missing = [d for d in wanted if not (d / "config.json").is_file()]
    if not missing:
        return None
    out = missing[0].parent
    return (
        f"model directory {missing[0]} is missing (the embedded default's: `make models`, or "
        f"`python -m toyworld bootstrap --out {out}`; else point the config at a model directory)"
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.logconfig import configure_logging
    from gateway.settings import ConfigError, load
    from gateway.vllm_process import VLLMProcess, VLLMStartError, port_free

    try:
        settings = load(args.config, host=args.host, port=args.port)
    except ConfigError as exc:
        return _fail(str(exc))
    problem = _missing_models(settings)
    if problem:
        return _fail(problem)
    configure_logging()
    if not port_free(settings.host, settings.port):
        return _fail(f"port {settings.port} on {settings.host} is already in use")
    # SIGTERM (Kubernetes, systemd, `kill`): uvicorn drains requests and runs the lifespan's
    # shutdown (the log is flushed), then re-raises the signal; this handler turns it into an
    # exception so the managed vLLM (its own process group) is stopped too, not orphaned.
    signal.signal(signal.SIGTERM, _raise_terminated)
    vllm = None
    fatal: list[str] = []
    try:
        managed = settings.managed_vllm
        if managed.enabled:
            vllm = VLLMProcess(
                managed.model_dir, managed.served_name, managed.host, managed.port,
                max_model_len=managed.max_model_len, max_lora_rank=managed.max_lora_rank, max_loras=managed.max_loras,
                dtype=managed.dtype, extra_args=managed.vllm_args(), log_path=Path("logs") / f"vllm-{managed.port}.log",
                env=_resolver_env(settings), nice=managed.nice,
            )  # fmt: skip
            print(f"[gateway] starting vLLM on {managed.model_dir} at {vllm.url} (log: {vllm.log_path}) ...", flush=True)
            try:
                vllm.start()
                vllm.wait_healthy(managed.startup_s)
            except VLLMStartError as exc:
                return _fail(str(exc))
        if settings.workers > 1:
            from gateway import workers

            print(f"[gateway] serving '{settings.model_alias}' on http://{settings.host}:{settings.port} "
                  f"with {settings.workers} workers", flush=True)  # fmt: skip
            stopped = workers.serve(settings, args.config, vllm)
            if stopped is not None:
                return _fail(stopped)
            print("[gateway] stopped", flush=True)
            return 0
        server: uvicorn.Server | None = None

        def on_fatal(message: str) -> None:
            fatal.append(message)
            if server is not None:
                server.should_exit = True

        app = create_app(settings, vllm=vllm, on_fatal=on_fatal)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="warning", access_log=False, ws="none",
            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
        )  # fmt: skip
        server = uvicorn.Server(config)
        print(f"[gateway] serving '{settings.model_alias}' on http://{settings.host}:{settings.port}", flush=True)
        server.run()
    except _Terminated:
        print("[gateway] stopped (SIGTERM)", flush=True)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if vllm is not None:
            vllm.stop()
    if fatal:
        return _fail(fatal[0])
    return 0


def _resolver_env(settings: GatewaySettings) -> dict[str, str]:
    """vLLM's filesystem LoRA resolver over the registry's policy versions (``swap.lora_loading: resolver``)."""
    if not settings.swap.enabled or settings.swap.lora_loading != "resolver":
        return {}
    versions = (settings.registry_dir() / "policy" / "versions").resolve()
    versions.mkdir(parents=True, exist_ok=True)  # vLLM refuses to start on a missing cache dir
    return {"VLLM_LORA_RESOLVER_CACHE_DIR": str(versions)}


class _Terminated(Exception):
    """SIGTERM arrived (after uvicorn's graceful shutdown, or while vLLM was starting)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command in ("migrate", "purge"):
        return _store_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
