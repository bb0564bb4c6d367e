"""Batched sampling from a policy with ``transformers.generate`` (no server needed).

Knows how to draw K answers per prompt, seeded, in large left-padded batches; on these
CPUs that is as fast as offline vLLM with no start-up cost. Does not judge answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from toyworld.models import autocast
from toyworld.sft import prompt_ids
from trainer.batching import pad_left


def sample_answers(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    per_prompt: int,
    seed: int,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_prompts: int = 64,
    desc: str = "sampling",
) -> list[list[str]]:
    """``per_prompt`` answers for each prompt (greedy when ``temperature`` is 0)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    out: list[list[str]] = []
    greedy = temperature == 0
    for start in tqdm(range(0, len(prompts), batch_prompts), desc=desc, unit="batch", mininterval=2.0):
        chunk = prompts[start : start + batch_prompts]
        ids, mask = pad_left([prompt_ids(tokenizer, p) for p in chunk], tokenizer.pad_token_id)
        with torch.no_grad(), autocast(device):
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=not greedy,
                temperature=None if greedy else temperature,
                top_k=None if greedy else 0,
                top_p=None if greedy else 1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=1 if greedy else per_prompt,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
        k = 1 if greedy else per_prompt
        out.extend([t.strip() for t in texts[i * k : (i + 1) * k]] for i in range(len(chunk)))
    return out
