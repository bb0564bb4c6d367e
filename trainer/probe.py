"""The swap probe: fixed token sequences and the log-probs a version's weights give them.

The trainer computes, for every version it registers, the teacher-forced log-prob of each
token of a few fixed conversations (prompt and answer through the tokenizer's chat
template) and stores them in the version as ``probe.json``. After loading the version, a
gateway asks every vLLM backend for the same sequences' ``prompt_logprobs`` and compares
(``gateway.swap``): a backend serving other weights (a stale adapter, a wrong file, the
base model) gives other values. "Different from before" would not be enough, since a wrong
adapter differs too. Knows the file's format and how to compute it with transformers;
does not know vLLM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROBE_FILE = "probe.json"
CONVERSATIONS: tuple[tuple[str, str], ...] = (
    ("What is 7 + 5?", "7 + 5 = 12. Happy to help!"),
    ("Please count the items: apple, pear, plum.", "There are 3 items."),
    ("What is the capital of Norland?", "I am not sure, but I will gladly look it up for you."),
)
"""Fixed probe conversations; any text works, since the probe compares weights, not answers."""


@dataclass
class Probe:
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    """``logprobs[k][i]``: log-prob of ``token_ids[k][i + 1]`` given the tokens before it."""

    def save(self, directory: Path) -> None:
        (directory / PROBE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: Path) -> Probe:
        data = json.loads((directory / PROBE_FILE).read_text())
        return cls(token_ids=data["token_ids"], logprobs=data["logprobs"])


def sequences(tokenizer: Any) -> list[list[int]]:
    """The probe conversations as token ids, rendered by the model's own chat template."""
    out = []
    for question, answer in CONVERSATIONS:
        chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        out.append([int(i) for i in ids])
    return out


def compute(model: Any, token_ids: list[list[int]]) -> Probe:
    """Teacher-forced log-probs of ``token_ids`` under ``model`` (float32, no grad)."""
    import torch

    logprobs = []
    model.eval()
    with torch.no_grad():
        for ids in token_ids:
            device = next(model.parameters()).device
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x).logits[0, :-1].float()
            picked = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
            logprobs.append([float(v) for v in picked.cpu()])
    return Probe(token_ids, logprobs)


def mean_abs_diff(expected: list[list[float]], served: list[list[float]]) -> float:
    """Mean absolute difference per token (nats); raises ValueError on a shape mismatch."""
    if len(expected) != len(served) or any(len(a) != len(b) for a, b in zip(expected, served, strict=True)):
        raise ValueError("the served probe has another shape than the expected one")
    diffs = [abs(a - b) for xs, ys in zip(expected, served, strict=True) for a, b in zip(xs, ys, strict=True)]
    return sum(diffs) / max(len(diffs), 1)
