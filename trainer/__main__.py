"""``python -m trainer``: the trainer's command line.

Subcommands:
  pairs export   write the log's preference pairs (and unpaired thumbs) in TRL's formats
  registry       init|list|show|promote|rollback versions and the current/canary pointers
  run            one training round: the log's window -> pairs -> DPO/KTO/PPO -> a registered version
  schedule       run a round every --every (a local stand-in for the Kubernetes CronJob)
  watch          status|check|clear the reward-hacking watch (rounds pause while it fires)

The toy world's commands (bootstrap, evaluate-loop) are ``python -m toyworld``'s: the
trainer does not know the toy world. Errors a user can fix print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from trainer.settings import TrainerSettings

PROG = "python -m trainer"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Preference training from the gateway's log.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pairs = sub.add_parser("pairs", help="preference pairs from the gateway's log").add_subparsers(
        dest="pairs_command", required=True, parser_class=_Parser
    )
    export = pairs.add_parser("export", help="write pairs (TRL conversational) and unpaired thumbs (KTO)")
    export.add_argument("--config", type=Path, default=Path("configs/local.yaml"), help="the deployment's YAML settings")
    export.add_argument("--db", default=None, help="override store.url (a SQLAlchemy URL)")
    export.add_argument("--since", default=None, help="7d, 12h, 30m, an ISO date or time, or epoch seconds (default: all)")
    export.add_argument("--until", default=None, help="same forms as --since (default: now)")
    export.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    export.add_argument("--out", type=Path, required=True, help="pairs file; unpaired thumbs go to <stem>.kto<suffix>")
    export.add_argument("--policy", choices=["best_vs_worst", "best_vs_each"], default=None, help="override trainer.pairs")
    export.add_argument("--min-margin", type=float, default=None, help="override trainer.pairs.min_margin")
    export.add_argument("--policy-version", default=None, help="only completions served by this policy version")
    export.add_argument("--rm-version", default=None, help="only completions scored by this reward-model version")
    registry = sub.add_parser("registry", help="versioned models and the current/canary pointers")
    registry.add_argument("action", choices=["init", "list", "show", "promote", "rollback"])
    registry.add_argument("version", nargs="?", help="show: the version (default: current)")
    registry.add_argument("--kind", choices=["policy", "reward_model"], default="policy")
    registry.add_argument("--config", type=Path, default=Path("configs/local.yaml"), help="the deployment's YAML settings")
    registry.add_argument("--registry", type=Path, default=None, help="override trainer.registry_dir")
    registry.add_argument("--reason", default=None, help="promote/rollback: why (kept in the pointer)")
    for name, text in (("run", "one training round"), ("schedule", "a training round every --every")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", type=Path, default=Path("configs/local.yaml"), help="the deployment's YAML settings")
        cmd.add_argument("--algo", choices=["dpo", "kto", "ppo", "grpo"], default=None, help="override trainer.algorithm")
        cmd.add_argument("--registry", type=Path, default=None, help="override trainer.registry_dir")
        cmd.add_argument("--db", default=None, help="override store.url (a SQLAlchemy URL)")
        cmd.add_argument("--min-pairs", type=int, default=None, help="override trainer.min_pairs")
        cmd.add_argument(
            "--publish-to", choices=["current", "canary"], default=None,
            help="override trainer.publish_to: serve the new version to everyone, or as a canary the gateways' gate judges",
        )  # fmt: skip
        cmd.add_argument("--quiet", action="store_true", help="no progress bars")
        cmd.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    sub.choices["run"].add_argument(
        "--refit-reward-model", action="store_true",
        help="instead of a policy round: refit the reward model on thumb-decided pairs (a new reward-model version)",
    )  # fmt: skip
    watch = sub.add_parser("watch", help="the reward-hacking watch: status, check now, or clear (rounds pause while it fires)")
    watch.add_argument("action", choices=["status", "check", "clear"], nargs="?", default="status")
    watch.add_argument("--config", type=Path, default=Path("configs/local.yaml"), help="the deployment's YAML settings")
    watch.add_argument("--registry", type=Path, default=None, help="override trainer.registry_dir")
    watch.add_argument("--db", default=None, help="override store.url (a SQLAlchemy URL)")
    watch.add_argument("--reason", default=None, help="clear: why (recorded)")
    sub.choices["schedule"].add_argument("--every", default="10m", help="interval between round starts (10m, 1h)")
    sub.choices["schedule"].add_argument("--rounds", type=int, default=None, help="stop after this many rounds")
    return parser


def _round_settings(args: argparse.Namespace) -> TrainerSettings:
    from trainer.settings import load

    settings = load(args.config)
    section = settings.trainer.model_copy(
        update={
            k: v
            for k, v in (("registry_dir", args.registry), ("min_pairs", args.min_pairs), ("publish_to", args.publish_to))
            if v is not None
        }
    )
    store = settings.store.model_copy(update={"url": args.db}) if args.db else settings.store
    return settings.model_copy(update={"trainer": section, "store": store})


def _run(args: argparse.Namespace) -> int:
    import logging
    import traceback

    from gateway.settings import ConfigError
    from trainer import cpu, distributed
    from trainer.metrics import report
    from trainer.round import RoundError, RoundResult, refit_reward_model, run
    from versioning.lock import LockHeld
    from versioning.registry import Registry, RegistryError

    command = f"{PROG} run"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = _round_settings(args)
    except ConfigError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 1
    s = settings.trainer
    try:
        cpu.apply(s.cpus, s.threads)  # before anything loads torch
    except cpu.CpuError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 1
    refit = bool(getattr(args, "refit_reward_model", False))
    kind = "reward" if refit else (args.algo or s.algorithm)  # which metrics a failure is reported under
    team = distributed.team()
    if not team.main:  # rank 0 reports and prints; this rank trains with it, and exits 0 when rank 0 ends the round
        try:
            run(settings, args.algo, progress=False, team=team)
        except distributed.Stopped:
            return 0
        finally:
            distributed.close(team)
        return 0
    result = RoundResult("failed", "did not start", algorithm=kind)
    try:
        if refit and team.distributed:
            team.finish("failed", "refit")
            raise RoundError("--refit-reward-model runs in one process; launch it without accelerate")
        if refit:
            result = refit_reward_model(settings, progress=not args.quiet)
        else:
            result = run(settings, args.algo, progress=not args.quiet, team=team)
    except LockHeld as exc:
        result = RoundResult("skipped", f"{exc}; this round is not needed", algorithm=kind)
    except (RoundError, RegistryError) as exc:
        result = RoundResult("failed", str(exc), algorithm=kind)
    except Exception as exc:  # any failure is one line (and a metric), the traceback on request
        reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        result = RoundResult("failed", reason, algorithm=kind)
        if args.debug:
            traceback.print_exc()
    finally:
        team.finish(result.outcome, result.reason)  # releases the other ranks whatever happened (once)
        distributed.close(team)
        registry = Registry(s.registry_dir) if s.registry_dir.is_dir() else None
        report(result, registry, s.metrics_file or s.registry_dir / "metrics" / "trainer.prom", s.pushgateway_url)
    if result.outcome == "failed":
        print(f"{command}: error: {result.reason}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def _schedule(args: argparse.Namespace) -> int:
    import signal
    import subprocess
    import time

    from trainer.export import parse_duration

    every = parse_duration(args.every)
    if not every:
        print(f"{PROG} schedule: error: --every must be a positive duration such as 10m, 1h or 1d", file=sys.stderr)
        return 2
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    passthrough = ["--config", str(args.config)]
    for flag, value in (
        ("--algo", args.algo), ("--registry", args.registry), ("--db", args.db), ("--min-pairs", args.min_pairs),
        ("--publish-to", args.publish_to),
    ):  # fmt: skip
        if value is not None:
            passthrough += [flag, str(value)]
    passthrough += ["--quiet"] * args.quiet + ["--debug"] * args.debug
    done = 0
    while not stopping:
        started = time.monotonic()
        # Each round in its own process: a crash or a leak in one round never reaches the next.
        code = subprocess.call([sys.executable, "-m", "trainer", "run", *passthrough])
        done += 1
        print(f"{PROG} schedule: round {done} exited {code}; next in {every:.0f} s", flush=True)
        if args.rounds is not None and done >= args.rounds:
            break
        while not stopping and time.monotonic() - started < every:
            time.sleep(min(1.0, every))
    return 0


def _registry(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from gateway.settings import ConfigError
    from trainer.settings import load
    from versioning.registry import KINDS, PointerState, Registry, RegistryError

    try:
        root = args.registry or load(args.config).trainer.registry_dir
        if args.action == "init":  # the layout, so that vLLM's LoRA resolver can start on policy/versions before any round
            for kind in KINDS:
                Registry(root).versions_dir(kind).mkdir(parents=True, exist_ok=True)
            print(f"registry at {root}")
            return 0
        if not root.is_dir():
            raise RegistryError(f"no registry at {root} (set trainer.registry_dir or --registry)")
        registry = Registry(root)
        kind = args.kind
        if args.action == "list":
            current, canary = registry.pointer(kind, "current"), registry.pointer(kind, "canary")
            for m in registry.versions(kind):
                marks = [n for n, p in (("current", current), ("canary", canary)) if p is not None and p.version == m.version]
                figures = ", ".join(f"{k}={v}" for k, v in m.evaluation.items() if isinstance(v, int | float))
                print(f"{m.version}  {m.format:<4}  parent={m.parent or 'base'}  {m.algorithm or '-':<5}  "
                      f"{figures or '-'}  {' '.join(marks)}".rstrip())  # fmt: skip
            return 0
        if args.action == "show":
            version = args.version or registry.version_at(kind)
            if version is None:
                raise RegistryError(f"no current {kind}; name a version")
            print(json.dumps(asdict(registry.verify(kind, version)), indent=2))
            return 0
        state: PointerState | None
        if args.action == "promote":
            state = registry.promote(kind, args.reason or "promoted by hand")
        else:
            state = registry.rollback(kind, args.reason or "rolled back by hand")
        print(f"{kind} current -> {state.version if state else 'none'}")
        return 0
    except (ConfigError, RegistryError) as exc:
        print(f"{PROG} registry: error: {exc}", file=sys.stderr)
        return 1


def _watch(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from gateway.settings import ConfigError
    from trainer.metrics import write_watch
    from trainer.round import RoundError, check_watch
    from versioning import watch
    from versioning.lock import LockHeld

    command = f"{PROG} watch"
    try:
        settings = _round_settings(argparse.Namespace(**{"min_pairs": None, "publish_to": None, **vars(args)}))
        root = settings.trainer.registry_dir
        if not root.is_dir():
            raise RoundError(f"no registry at {root} (set trainer.registry_dir or --registry)")
        if args.action == "clear":
            state = watch.clear(root, "admin", args.reason or "cleared by hand")
        elif args.action == "check":
            state = check_watch(settings)
        else:
            state = watch.read(root)
    except (ConfigError, RoundError, LockHeld) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 1
    write_watch(state, settings.trainer.metrics_file or root / "metrics" / "trainer.prom")
    print(json.dumps(asdict(state), indent=1))
    return 0


def _export(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.settings import ConfigError
    from gateway.store.sql import SqlStore
    from trainer.export import ExportError, export, kto_path, parse_time
    from trainer.settings import load

    command = f"{PROG} pairs export"
    try:
        settings = load(args.config)
        pair_settings = settings.trainer.pairs.model_copy(
            update={k: v for k, v in (("policy", args.policy), ("min_margin", args.min_margin)) if v is not None}
        )
        since = parse_time(args.since) if args.since else 0.0
        until = parse_time(args.until) if args.until else None
        url = args.db or settings.store.database_url()
        if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).is_file():
            raise ExportError(f"no log database at {url} (has the gateway run with store.enabled?)")
        store = SqlStore(url, connect_timeout_s=settings.store.connect_timeout_s)
        try:
            store.migrate()
            exported = export(store, args.out, args.format, pair_settings, since, until, args.policy_version, args.rm_version)
        finally:
            store.close()
    except (ConfigError, ExportError) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        print(f"{command}: error: database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    s = exported.stats
    print(
        f"{s.completions} completions -> {s.pairs} pairs ({s.from_thumbs} decided by thumbs) in {args.out}, "
        f"{s.unpaired} unpaired thumbs in {kto_path(args.out)}; skipped: {s.unscored} unscored, "
        f"{s.below_margin} under the margin, {s.duplicates} duplicates, {s.unthumbed} without a thumb"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "pairs":
        return _export(args)
    if args.command == "registry":
        return _registry(args)
    if args.command == "run":
        return _run(args)
    if args.command == "schedule":
        return _schedule(args)
    if args.command == "watch":
        return _watch(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
