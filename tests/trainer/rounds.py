"""A gateway log and a deployment for training rounds on the tiny test models (helpers for the round tests)."""

from __future__ import annotations

import random
import time
from typing import Any

from gateway.store.records import CandidateRecord, CompletionRecord
from gateway.store.sql import SqlStore


def tokens(tokenizer: Any, text: str) -> list[int]:
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def write_log(url: str, tokenizer: Any, n: int, policy_version: str = "base", seed: int = 0) -> None:
    """``n`` arithmetic completions with a right (high reward) and a wrong (low reward) candidate."""
    rng = random.Random(seed)
    store = SqlStore(url)
    store.migrate()
    records = []
    for i, (a, b) in enumerate(rng.sample([(a, b) for a in range(1, 13) for b in range(1, 13)], n)):
        good, bad = f"{a} + {b} = {a + b}. Glad to help!", f"{a + b + rng.randint(1, 3)}."
        candidates = [
            CandidateRecord(0, good, tokens(tokenizer, good), "stop", reward=1.0 + rng.random(), chosen=True),
            CandidateRecord(1, bad, tokens(tokenizer, bad), "stop", reward=-1.0 - rng.random()),
        ]
        messages = [{"role": "user", "content": f"What is {a} + {b}?"}]
        records.append(
            CompletionRecord(
                f"c-{policy_version}-{i}", time.time(), "k", messages, {}, policy_version, "rm-base", 2, 9, 12, {}, candidates
            )
        )
    store.write(records)
    store.close()


def pair(tokenizer: Any, question: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "chosen_token_ids": tokens(tokenizer, chosen),
        "rejected_token_ids": tokens(tokenizer, rejected),
    }


def logp(model: Any, prompt: list[int], answer: list[int]) -> float:
    """Sum of the answer's token log-probs given the prompt, by hand."""
    import torch

    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return float(sum(logps[len(prompt) - 1 + k, t] for k, t in enumerate(answer)))
