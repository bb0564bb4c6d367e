"""``python -m trainer``: the trainer's command line.

Subcommands:
  bootstrap   build the embedded default's tiny models (tokenizer, policy, reward model)

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
    return parser


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
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
