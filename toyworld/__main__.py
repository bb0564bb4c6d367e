"""``python -m toyworld``: the toy world's command line.

Subcommands:
  bootstrap      build the embedded default's tiny models (tokenizer, policy, reward model)
  evaluate-loop  rounds of traffic -> training -> hot-swap through a gateway, measured on the hidden gold reward
  loop-report    one report from the runs of one or several evaluate-loop invocations
  loop-compare   runs of one seed compared on what their traffic was served, paired per prompt

The fourth floor: it may use the trainer, the gateway and the versioning floor; only loadtest imports it.
Errors a user can fix print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from toyworld.loop.report import Run

PROG = "python -m toyworld"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The toy world: its tiny models, and the online loop measured on its gold reward.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    boot = sub.add_parser("bootstrap", help="build the tiny tokenizer, policy and reward model if absent")
    boot.add_argument("--preset", default="default", help="default (serving quality) or test (small, fast)")
    boot.add_argument("--out", type=Path, default=None, help="output directory (default: models/<preset>)")
    boot.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    boot.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    loop = sub.add_parser("evaluate-loop", help="the online loop measured against the toy world's gold reward")
    loop.add_argument("--config", type=Path, default=Path("configs/local.yaml"), help="the deployment's YAML settings")
    loop.add_argument("--rounds", type=int, default=3)
    loop.add_argument(
        "--arms",
        default="rm,thumbs",
        help="comma-separated: rm (reward model only), thumbs (+ simulated thumbs), grpo (thumbs, trained with --algo grpo)",
    )
    loop.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="runs per arm: K (seeds 0..K-1) or a list, e.g. 3,4")
    loop.add_argument(
        "--thumb-rate", type=float, default=0.2, help="thumbs and grpo arms: share of answers the simulated user thumbs"
    )
    loop.add_argument("--thumb-noise", type=float, default=0.1, help="sd of the noise on gold behind each thumb")
    loop.add_argument(
        "--refit-every", type=int, default=0, help="thumbs and grpo arms: refit the reward model every K rounds (0: never)"
    )
    loop.add_argument("--prompts-per-round", type=int, default=384, help="training prompts sent through the gateway per round")
    loop.add_argument("--heldout", type=int, default=200, help="held-out prompts every measurement uses")
    loop.add_argument("--samples", type=int, default=8, help="samples per held-out prompt (best-of-N up to this)")
    loop.add_argument("--concurrency", type=int, default=8)
    loop.add_argument("--max-tokens", type=int, default=64)
    loop.add_argument("--out", type=Path, default=Path("runs/evaluate-loop"), help="a new directory for the runs and report")
    loop.add_argument(
        "--canary-fraction",
        type=float,
        default=0.0,
        help="publish each round as a canary for this share of users; the gateway's gate promotes or refuses it",
    )
    loop.add_argument(
        "--gate-min-requests", type=int, default=100, help="the canary gate's answers per arm before its first look"
    )
    loop.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[ARM:]KEY=VALUE",
        help="override a key of each run's config (YAML value), e.g. trainer.dpo.learning_rate=1e-3; with ARM: "
        "that arm's runs only, e.g. thumbs:trainer.pairs.from_reward_model=false; repeatable",
    )
    loop.add_argument("--vllm", default=None, help="an already running vLLM (runtime LoRA on) instead of starting one")
    versus = sub.add_parser("loop-compare", help="runs of one seed compared on what their traffic was served, paired per prompt")
    versus.add_argument("base", type=Path, help="a run's directory (<out>/<arm>-seed<k>): the baseline")
    versus.add_argument("runs", type=Path, nargs="+", help="runs of the same seed to compare with it")
    again = sub.add_parser("loop-report", help="one report from evaluate-loop runs of one or several invocations")
    again.add_argument("runs", type=Path, nargs="+", help="evaluate-loop --out directories, or single runs' directories")
    again.add_argument("--out", type=Path, required=True, help="where report.json and loop.png go")
    return parser


def _seeds(text: str) -> tuple[int, ...]:
    """``K``: seeds 0..K-1; ``a,b,...``: those seeds."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a count (3) or a list of seeds (3,4)") from None
    seeds = tuple(range(values[0])) if len(values) == 1 and "," not in text else tuple(values)
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a positive count, or distinct seeds from 0")
    return seeds


def _bootstrap(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from toyworld.bootstrap import PRESETS, BootstrapError, bootstrap, check_writable, summary

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


def _evaluate_loop(args: argparse.Namespace) -> int:

    import yaml

    from gateway.settings import ConfigError
    from toyworld.loop.processes import LoopError
    from toyworld.loop.runner import ARMS, Loop, LoopOptions

    command = f"{PROG} evaluate-loop"
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    problems = [f"unknown arm {a!r} (choose from {', '.join(ARMS)})" for a in arms if a not in ARMS]
    if not arms:
        problems.append("--arms is empty")
    if args.rounds < 1 or args.prompts_per_round < 1 or args.heldout < 2 or args.samples < 1:
        problems.append("--rounds, --prompts-per-round and --samples must be positive, --heldout at least 2")
    if not 0.0 <= args.canary_fraction < 1.0:
        problems.append(f"--canary-fraction {args.canary_fraction}: use 0 (no canary) up to, not including, 1")
    if not 0.0 <= args.thumb_rate <= 0.2:
        problems.append(f"--thumb-rate {args.thumb_rate}: the simulated user thumbs at most 20% of answers")
    overrides: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. trainer.dpo.learning_rate=1e-3")
            continue
        arm, colon, _ = key.partition(":")
        if colon and arm.strip() not in arms:
            problems.append(f"--set {item!r}: {arm.strip()!r} is not one of this run's arms ({', '.join(arms)})")
            continue
        overrides[key.strip()] = yaml.safe_load(value)
    if problems:
        print(f"{command}: error: {problems[0]}", file=sys.stderr)
        return 2
    options = LoopOptions(
        config=args.config, rounds=args.rounds, arms=arms, seeds=args.seeds, thumb_rate=args.thumb_rate,
        thumb_noise=args.thumb_noise, refit_every=args.refit_every, prompts_per_round=args.prompts_per_round,
        heldout=args.heldout, samples=args.samples, max_tokens=args.max_tokens, concurrency=args.concurrency,
        out=args.out, vllm_url=args.vllm, canary_fraction=args.canary_fraction, gate_min_requests=args.gate_min_requests,
        overrides=overrides,
    )  # fmt: skip
    try:
        runs = Loop(options).run()
    except (LoopError, ConfigError) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 1
    meta = {"rounds_per_run": args.rounds, "heldout_prompts": args.heldout, "samples_per_prompt": args.samples,
            "prompts_per_round": args.prompts_per_round}  # fmt: skip
    _write_report(runs, args.out, meta)
    return 0


def _write_report(runs: list[Run], out: Path, meta: dict[str, object]) -> None:
    """``report.json`` and ``loop.png`` in ``out``, a line per arm (in ``ARMS``' order: later arms are compared with
    earlier ones), and the report as one JSON line last."""
    import json

    from toyworld.loop.report import arm_report, between_arms, plot
    from toyworld.loop.runner import ARMS

    runs = sorted(runs, key=lambda run: (ARMS.index(run.arm), run.seed))
    arms = list(dict.fromkeys(run.arm for run in runs))
    reports = [arm_report([r for r in runs if r.arm == arm]) for arm in arms]
    png = out / "loop.png"
    plot(reports, png)
    versus = between_arms(runs)
    result = {"arms": reports, "between_arms": versus, "plot": str(png), **meta}
    (out / "report.json").write_text(json.dumps(result, indent=2))
    for arm in reports:
        bon = arm["start_bon_gold"]
        rounds = ", ".join(f"{r['n1_gold']:.3f}" for r in arm["rounds"])
        print(f"{arm['arm']}: start N=1 {arm['start_n1_gold']:.3f}, BoN-2 {bon.get('2', float('nan')):.3f}, "
              f"BoN-4 {bon.get('4', float('nan')):.3f}; N=1 by round {rounds}; {len(arm['warnings'])} warnings")  # fmt: skip
    for pair in versus:
        diffs = "; ".join(f"{d['estimate']:+.3f} {d['ci95']}" for d in [pair["start"], *(r["n1_gold_diff"] for r in
                          pair["rounds"])]) if "start" in pair else pair["skipped"]  # fmt: skip
        print(f"{pair['arms'][1]} - {pair['arms'][0]} (N=1 gold, paired; start, then by round): {diffs}")
    print(json.dumps(result))


def _loop_report(args: argparse.Namespace) -> int:
    """Runs of one or several invocations (each ``run.json``), one report; an arm's runs are cut to the rounds all of
    them finished."""
    from toyworld.loop import records

    command = f"{PROG} loop-report"
    found = sorted({p.parent for d in args.runs for p in [d / records.FILE, *d.glob(f"*/{records.FILE}")] if p.is_file()})
    if not found:
        print(f"{command}: error: no {records.FILE} in {', '.join(map(str, args.runs))} or their subdirectories",
              file=sys.stderr)  # fmt: skip
        return 2
    runs = [records.load(d) for d in found]
    seen: dict[tuple[str, int], Path] = {}
    for run, where in zip(runs, found, strict=True):
        if (run.arm, run.seed) in seen:
            print(f"{command}: error: {run.arm} seed {run.seed} is in both {seen[run.arm, run.seed]} and {where}",
                  file=sys.stderr)  # fmt: skip
            return 2
        seen[run.arm, run.seed] = where
    rounds = {arm: min(len(r.rounds) for r in runs if r.arm == arm) for arm in {r.arm for r in runs}}
    for run in runs:
        del run.rounds[rounds[run.arm] :]
    args.out.mkdir(parents=True, exist_ok=True)
    _write_report(runs, args.out, {"runs": [str(d) for d in found], "rounds_per_arm": rounds})
    return 0


def _loop_compare(args: argparse.Namespace) -> int:
    """One JSON object: per run, per round, its served answers against the baseline's on the same prompts."""
    import json

    from toyworld.loop import compare, records

    for d in (args.base, *args.runs):
        if not (d / records.FILE).is_file() or not (d / "data" / "gateway.db").is_file():
            print(f"{PROG} loop-compare: error: {d} is not a run's directory (no {records.FILE} or data/gateway.db)",
                  file=sys.stderr)  # fmt: skip
            return 2
    base = compare.served(args.base)
    result = {"base": str(args.base), "runs": [{"run": str(d), "rounds": compare.compare(base, compare.served(d))}
                                               for d in args.runs]}  # fmt: skip
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bootstrap":
        return _bootstrap(args)
    if args.command == "evaluate-loop":
        return _evaluate_loop(args)
    if args.command == "loop-report":
        return _loop_report(args)
    if args.command == "loop-compare":
        return _loop_compare(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
