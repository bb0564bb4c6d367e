"""``python -m trainer``: the trainer's command line.

Subcommands:
  bootstrap      build the embedded default's tiny models (tokenizer, policy, reward model)
  pairs export   write the log's preference pairs (and unpaired thumbs) in TRL's formats
  registry       list|show|promote|rollback versions and the current/canary pointers

Errors a user can fix print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

PROG = "python -m trainer"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Tiny-model bootstrap and preference training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    boot = sub.add_parser("bootstrap", help="build the tiny tokenizer, policy and reward model if absent")
    boot.add_argument("--preset", default="default", help="default (serving quality) or test (small, fast)")
    boot.add_argument("--out", type=Path, default=None, help="output directory (default: models/<preset>)")
    boot.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    boot.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
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
    registry.add_argument("action", choices=["list", "show", "promote", "rollback"])
    registry.add_argument("version", nargs="?", help="show: the version (default: current)")
    registry.add_argument("--kind", choices=["policy", "reward_model"], default="policy")
    registry.add_argument("--config", type=Path, default=Path("configs/local.yaml"), help="the deployment's YAML settings")
    registry.add_argument("--registry", type=Path, default=None, help="override trainer.registry_dir")
    registry.add_argument("--reason", default=None, help="promote/rollback: why (kept in the pointer)")
    return parser


def _registry(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from gateway.settings import ConfigError
    from trainer.registry import PointerState, Registry, RegistryError
    from trainer.settings import load

    try:
        root = args.registry or load(args.config).trainer.registry_dir
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
            version = args.version or (p.version if (p := registry.pointer(kind, "current")) else None)
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
        f"{s.below_margin} under the margin, {s.duplicates} duplicates"
    )
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from trainer.toyworld.bootstrap import PRESETS, BootstrapError, bootstrap, check_writable, summary

    if args.preset not in PRESETS:
        print(f"{PROG} bootstrap: error: unknown preset {args.preset!r} (choose from {', '.join(PRESETS)})", file=sys.stderr)
        return 2
    preset = PRESETS[args.preset]
    if args.seed is not None:
        preset = replace(preset, seed=args.seed)
    out: Path = args.out or Path("models") / preset.name
    try:
        check_writable(out)
        import torch

        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        report = bootstrap(preset, out)
    except BootstrapError as exc:
        print(f"{PROG} bootstrap: error: {exc}", file=sys.stderr)
        return 1
    print(summary(report), flush=True)
    print(f"models: {out / 'policy'} and {out / 'reward_model'}; report: {out / 'bootstrap_report.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bootstrap":
        return _bootstrap(args)
    if args.command == "pairs":
        return _export(args)
    if args.command == "registry":
        return _registry(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
