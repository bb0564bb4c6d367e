"""KL to the reference and answer length, measured by sampling from a policy.

One definition used everywhere: sequence-level KL(π ‖ π_ref) in nats per response. Answers
y ~ π(·|x) are sampled, and at every position t of each answer the next-token KL is
computed exactly over the whole vocabulary, Σ_v π(v|x,y<t) (log π(v|x,y<t) − log π_ref(v|x,y<t)),
and summed over the answer's positions (up to and including its EOS). By the chain rule
the mean of these sums over sampled answers is an unbiased estimate of the sequence-level
KL, and every sum is a sum of non-negative terms: the estimate cannot go below zero (a
policy equal to its reference gives exactly 0), and its sampling noise is far smaller than
that of the plain log-ratio log π(y|x) − log π_ref(y|x), which went below zero here on a
round that barely moved the policy. The standard error over answers says how sure it is.

Knows how to sample (seeded, left-padded batches) and score with and without the adapter;
does not know where the prompts come from.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.batching import pad_left


@dataclass
class Drift:
    kl: float
    """Mean over sampled answers of the summed exact next-token KL to the reference (nats per response, ≥ 0)."""
    kl_stderr: float
    """Standard error of ``kl`` over the sampled answers (0 for fewer than two)."""
    mean_length: float
    """Mean answer length in tokens (the EOS token counted)."""
    samples: int

    def __str__(self) -> str:
        return f"{self.kl:.3g} ± {self.kl_stderr:.2g} nats"


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
    """One sampled answer per prompt from ``model``, its next-token distributions compared with the reference's:
    ``reference`` when given (a full fine-tune's base), else ``model`` with its adapter disabled (a peft model)."""
    import torch

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    per_answer: list[float] = []
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
            policy = _answer_logprobs(model, out, full_mask, ids.shape[1])
            if reference is not None:
                base = _answer_logprobs(reference.to(device).eval(), out, full_mask, ids.shape[1])
            else:
                with model.disable_adapter():
                    base = _answer_logprobs(model, out, full_mask, ids.shape[1])
            per_answer.extend(sequence_kl(policy, base, keep).tolist())
        lengths.extend(keep.sum(dim=1).tolist())
    n = len(per_answer)
    mean = statistics.fmean(per_answer) if n else 0.0
    stderr = statistics.stdev(per_answer) / math.sqrt(n) if n > 1 else 0.0
    return Drift(kl=mean, kl_stderr=stderr, mean_length=statistics.fmean(lengths) if n else 0.0, samples=n)


def sequence_kl(policy_logps: Any, reference_logps: Any, keep: Any) -> Any:
    """Per answer, Σ_t KL(π_t ‖ π_ref,t) over the kept positions.

    ``policy_logps``, ``reference_logps``: [batch, T, vocab] log-probabilities (log-softmax) at each answer position;
    ``keep``: [batch, T] bool, True at the answer's positions (up to and including its EOS). Returns [batch].
    Each position's term is clamped at 0: a KL is never negative, and float rounding must not make it so (in float64
    that rounding is ~1e-16).
    """
    import torch

    per_position = (policy_logps.exp() * (policy_logps - reference_logps)).sum(dim=-1).clamp(min=0.0)
    return torch.where(keep, per_position, torch.zeros_like(per_position)).sum(dim=1)


def _answer_mask(answers: Any, eos_id: int) -> Any:
    """True up to and including each answer's first EOS (generate pads after it)."""
    is_eos = (answers == eos_id).long()
    before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before this position
    return before == 0


def _answer_logprobs(model: Any, ids: Any, mask: Any, prompt_len: int) -> Any:
    """[batch, answer positions, vocab] next-token log-probabilities at each answer position."""
    import torch

    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, prompt_len - 1 : -1]
    # float64: in float32 the rounding of two log-softmaxes left ~1e-7 nats per answer of clamped noise, a floor
    # that hid how little a very small step moves the policy
    return torch.log_softmax(logits.double(), dim=-1)
