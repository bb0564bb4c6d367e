"""KL to the reference and answer length, measured by sampling from a LoRA policy.

One definition used everywhere: sequence-level KL(π ‖ π_ref) in nats per response,
estimated as the mean over sampled answers y ~ π(·|x) of log π(y|x) − log π_ref(y|x),
where π_ref is the same model with its adapter disabled (the fixed base policy). Knows
how to sample (seeded, left-padded batches) and score with and without the adapter;
does not know where the prompts come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.toyworld.batching import pad_left


@dataclass
class Drift:
    kl: float
    """Mean sequence log-ratio to the reference over sampled answers (nats per response)."""
    mean_length: float
    """Mean answer length in tokens (the EOS token counted)."""
    samples: int


def measure(
    model: Any,
    eos_id: int,
    pad_id: int,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    seed: int,
    batch: int = 32,
    reference: Any = None,
) -> Drift:
    """One sampled answer per prompt from ``model``, scored by it and by the reference: ``reference`` when
    given (a full fine-tune's base), else ``model`` with its adapter disabled (a peft model)."""
    import torch

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    ratios: list[float] = []
    lengths: list[int] = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        ids, mask = pad_left(chunk, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
            )  # fmt: skip
            answers = out[:, ids.shape[1] :]
            keep = _answer_mask(answers, eos_id)
            full_mask = torch.cat([mask, keep.long()], dim=1)
            policy = _sequence_logps(model, out, full_mask, ids.shape[1], keep)
            if reference is not None:
                base = _sequence_logps(reference.to(device).eval(), out, full_mask, ids.shape[1], keep)
            else:
                with model.disable_adapter():
                    base = _sequence_logps(model, out, full_mask, ids.shape[1], keep)
        ratios.extend((policy - base).tolist())
        lengths.extend(keep.sum(dim=1).tolist())
    n = max(len(ratios), 1)
    return Drift(kl=sum(ratios) / n, mean_length=sum(lengths) / n, samples=len(ratios))


def _answer_mask(answers: Any, eos_id: int) -> Any:
    """True up to and including each answer's first EOS (generate pads after it)."""
    is_eos = (answers == eos_id).long()
    before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before this position
    return before == 0


def _sequence_logps(model: Any, ids: Any, mask: Any, prompt_len: int, keep: Any) -> Any:
    import torch

    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, prompt_len - 1 : -1].float()
    picked = torch.log_softmax(logits, dim=-1).gather(2, ids[:, prompt_len:, None])[..., 0]
    return (picked * keep).sum(dim=1)
