"""Offline GRPO/RLOO on logged groups: the clipped, importance-weighted policy gradient with a KL penalty to the base.

Each sample of a group (``trainer.groups``) was drawn by the version that served it, whose
log-prob vLLM logged. The trainable policy (the current version's adapter, continued)
moves away from that version as it learns, and a group may come from an earlier version
(``trainer.history``), so every sample is importance-weighted by the ratio of the policy's
log-prob to the logged one, taken per token (the geometric mean over the answer's tokens,
as GSPO does: a sequence's product of ratios would explode with its length). The update is
PPO's clipped surrogate on that ratio (``epsilon``) with dual clipping for negative
advantages (``dual_clip``: a ratio far above 1 cannot push a bad sample's loss without
bound), plus ``beta`` × the per-token KL to the reference, the base with the adapter disabled
(the k3 estimator on the sampled tokens, as TRL's GRPOTrainer). A group's weight (its age)
scales its samples' losses.

vLLM logs raw log-probs (``--logprobs-mode raw_logprobs``, its default: before temperature
and top-p), so the ratio compares raw distributions: it measures how far the policy has
moved since the serving version, not the sampling temperature's effect. Samples whose
answer was cut to fit ``max_length`` are left out (their logged log-prob covers tokens the
model would not see). A plain torch loop: TRL's GRPOTrainer generates its own samples and
has no way in for logged ones. Does not read the log or write the registry.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.adapter import PolicyInit, Trained, prompt_ids, start_from_parent
from trainer.groups import Group, advantages
from trainer.settings import AdapterSettings, GrpoSettings

IMPLEMENTATION = "offline clipped importance-weighted policy gradient (trainer.grpo)"


@dataclass
class Sample:
    prompt_ids: list[int]
    answer_ids: list[int]
    advantage: float
    logged: float
    """The summed log-prob the serving version gave the answer (vLLM's)."""
    weight: float


@dataclass
class Samples:
    rows: list[Sample]
    truncated: int = 0
    zero_advantage: int = 0


def samples(groups: list[Group], tokenizer: Any, settings: GrpoSettings, max_length: int) -> Samples:
    out = Samples([])
    for group in groups:
        prompt = prompt_ids(tokenizer, group.prompt)
        for answer, advantage, logged in zip(group.answers, advantages(group, settings.baseline), group.logprobs, strict=True):
            if advantage == 0:
                out.zero_advantage += 1
                continue
            if len(prompt) + len(answer) > max_length:
                out.truncated += 1
                continue
            out.rows.append(Sample(prompt, answer, advantage, logged, group.weight))
    return out


def train(
    init: PolicyInit,
    tokenizer: Any,
    rows: list[Sample],
    settings: GrpoSettings,
    shared: AdapterSettings,
    work_dir: Path,
    *,
    progress: bool = True,
    max_steps: int | None = None,
) -> tuple[Trained, Any]:
    """Train the adapter on ``rows``; (what training reports, the peft model)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(shared.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = get_peft_model(init.base, init.lora)
    start_from_parent(model, init)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    order = list(range(len(rows)))
    rng = random.Random(shared.seed)
    batches_per_epoch = max(1, math.ceil(len(rows) / settings.batch_size))
    steps = max_steps or max(1, math.ceil(settings.epochs * batches_per_epoch))
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    step = 0
    while step < steps:
        rng.shuffle(order)
        for start in range(0, len(order), settings.batch_size):
            if step == steps:
                break
            batch = [rows[i] for i in order[start : start + settings.batch_size]]
            figures = _step(model, optimizer, params, batch, settings, shared.bf16, device, tokenizer.pad_token_id)
            step += 1
            history.append({"step": float(step), **figures})
            if progress and (step % max(1, steps // 10) == 0 or step == steps):
                print(f"grpo step {step}/{steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)
    seconds = time.perf_counter() - started
    last = history[-max(1, len(history) // 10) :]  # the last tenth of the steps, averaged
    figures = {k: sum(h[k] for h in last) / len(last) for k in ("ratio", "clipped", "kl", "advantage")}
    figures["first_ratio"] = history[0]["ratio"]  # before any update: the logged log-probs against the trainer's own
    loss = sum(h["loss"] for h in last) / len(last)
    model.eval()
    return Trained(step, seconds, loss, figures, history), model.to("cpu")


def _step(
    model: Any, optimizer: Any, params: list[Any], batch: list[Sample], settings: GrpoSettings, bf16: bool, device: Any,
    pad_id: int,
) -> dict[str, float]:  # fmt: skip
    import torch

    ids, answer_mask = _padded(batch, pad_id, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast, model.disable_adapter():
        reference = _token_logps(model, ids, answer_mask)
    with autocast:
        policy = _token_logps(model, ids, answer_mask)
    lengths = answer_mask.sum(dim=1).clamp(min=1)
    logged = torch.tensor([s.logged for s in batch], dtype=torch.float32, device=device)
    advantage = torch.tensor([s.advantage for s in batch], dtype=torch.float32, device=device)
    weight = torch.tensor([s.weight for s in batch], dtype=torch.float32, device=device)
    log_ratio = ((policy * answer_mask).sum(dim=1) - logged) / lengths
    ratio = torch.exp(log_ratio.clamp(max=20.0))
    clipped = torch.clamp(ratio, 1 - settings.epsilon, 1 + settings.epsilon)
    surrogate = torch.minimum(ratio * advantage, clipped * advantage)
    surrogate = torch.where(advantage < 0, torch.maximum(surrogate, settings.dual_clip * advantage), surrogate)
    delta = (reference - policy) * answer_mask
    kl = ((torch.exp(delta) - delta - 1) * answer_mask).sum(dim=1) / lengths
    loss = (weight * (settings.beta * kl - surrogate)).sum() / weight.sum()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    was_clipped = ((ratio - clipped).abs() > 1e-6).float()
    return {
        "loss": float(loss.detach()), "ratio": float(ratio.detach().mean()), "clipped": float(was_clipped.mean()),
        "kl": float(kl.detach().mean()), "advantage": float(advantage.abs().mean()),
    }  # fmt: skip


def _padded(batch: list[Sample], pad_id: int, device: Any) -> tuple[Any, Any]:
    """Prompt + answer ids, right-padded, and a mask of the positions whose next token is an answer token."""
    import torch

    width = max(len(s.prompt_ids) + len(s.answer_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width - 1), dtype=torch.float32)
    for row, s in enumerate(batch):
        sequence = s.prompt_ids + s.answer_ids
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, len(s.prompt_ids) - 1 : len(sequence) - 1] = 1.0
    return ids.to(device), mask.to(device)


def _token_logps(model: Any, ids: Any, mask: Any) -> Any:
    """Log-prob of each next token (position t predicts t + 1), in float32; 0 where ``mask`` is 0."""
    import torch

    attention = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logps * mask
