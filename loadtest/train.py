"""``bench train``: one DPO round's training on the default models with the reference log-probs cached (computed
once per pair; cold: this round's pairs are new; warm: seen in an earlier round); baseline = recomputed by TRL at
every step (``dpo.cache_reference: false``)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtest.stats import over_rounds

HELP = "a DPO round's training with reference log-probs cached vs recomputed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models/default", help="the toy models (policy/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=128, help="pairs per round")
    parser.add_argument("--epochs", type=float, default=2.0, help="a round's epochs (the default round's)")


def _toy_pairs(tokenizer: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` toy-world pairs: a right answer in the SFT mix of styles against a wrong one, as the log stores them."""
    import random

    from toyworld.answers import Fault, Style, render
    from toyworld.world import sample_task

    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        task = sample_task(rng)
        chosen = render(task, rng.choice(list(Style)), Fault.NONE, rng)
        rejected = render(task, rng.choice(list(Style)), Fault.WRONG, rng)
        row: dict[str, Any] = {"prompt": [{"role": "user", "content": task.prompt}]}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            row[side] = [{"role": "assistant", "content": text}]
            row[f"{side}_token_ids"] = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        pairs.append(row)
    return pairs


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of ``dpo.train`` (the trainer's set-up, reference log-probs, the epochs) per variant and round."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trainer import adapter, dpo
    from trainer.settings import AdapterSettings, DpoSettings

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base = Path(args.models) / "policy"
    tokenizer = AutoTokenizer.from_pretrained(base)
    # the defaults of a round (bf16 autocast as in TRL, batch 16, LoRA r 16)
    settings, shared = DpoSettings(epochs=args.epochs), AdapterSettings()
    reference = f"{dpo.reference_id(base)}-{'bf16' if shared.bf16 else 'fp32'}"
    seconds: dict[str, list[float]] = {"recompute": [], "cached_cold": [], "cached_warm": []}
    losses: dict[str, list[float]] = {name: [] for name in seconds}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for r in range(args.rounds):
            made = dpo.rows(_toy_pairs(tokenizer, args.pairs, seed=1000 + r), tokenizer, shared.max_length)
            cache = dpo.RefCache(Path(tmp) / f"ref-{r}.sqlite", reference)  # empty: this round's pairs are new
            order = ["recompute", "cached_cold", "cached_warm"]
            order = order if r % 2 == 0 else ["cached_cold", "cached_warm", "recompute"]  # warm needs cold first
            for name in order:
                torch.manual_seed(shared.seed)
                init = adapter.policy_model(base, None, shared)
                result, _ = dpo.train(init, tokenizer, made.rows, settings, shared, Path(tmp) / "work",
                                      None if name == "recompute" else cache, progress=False)  # fmt: skip
                if name == "cached_cold" and result.ref_computed != 2 * len(made.rows):
                    raise RuntimeError(f"the cold cache was not cold: {result.ref_cached} cached")
                if name == "cached_warm" and result.ref_computed != 0:
                    raise RuntimeError(f"the warm cache was not warm: {result.ref_computed} computed")
                seconds[name].append(result.seconds)
                losses[name].append(result.loss)
                print(f"round {r + 1} {name}: {result.seconds:.2f} s, loss {result.loss:.4f}", file=sys.stderr, flush=True)
    pairs = len(made.rows)
    return {
        "benchmark": "train",
        "pairs": pairs,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "seconds": {name: round(statistics.median(v), 3) for name, v in seconds.items()},
        "ref_cache_ratio": over_rounds([c / b for c, b in zip(seconds["cached_cold"], seconds["recompute"], strict=True)]),
        "ref_cache_ratio_warm": over_rounds([c / b for c, b in zip(seconds["cached_warm"], seconds["recompute"], strict=True)]),
        "pairs_per_s": {name: round(pairs * args.epochs / statistics.median(v), 1) for name, v in seconds.items()},
        "loss_abs_diff_cached_vs_recompute": round(
            max(abs(c - b) for c, b in zip(losses["cached_cold"], losses["recompute"], strict=True)), 6
        ),
        "goal": {"ref_cache_ratio": "<= 0.8"},
    }
