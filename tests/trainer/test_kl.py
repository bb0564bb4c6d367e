"""``trainer.kl`` against a brute-force sequence KL on a model small enough to enumerate every answer.

Two random tiny Llamas over a 5-token vocabulary and answers of at most 3 tokens: every
possible answer is listed, so KL(π ‖ π_ref) = Σ_y π(y) log(π(y) / π_ref(y)) is exact. The
estimator's expectation (Σ_y π(y) · its value on y) must equal it, its value on every answer
must be non-negative, a sampled estimate must land within its own error of it, and a
policy equal to its reference must give exactly 0.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer import kl

VOCAB, EOS, PAD, MAX_NEW = 5, 1, 0, 3
PROMPT = [2, 3, 4]


def tiny_llama(seed: int) -> Any:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper than the default init, so the two models differ by a KL of order 1
        model.lm_head.weight.mul_(40.0)
    return model


def every_answer() -> list[list[int]]:
    """Every answer generation can produce: up to MAX_NEW tokens, ending at the first EOS or cut at MAX_NEW."""
    answers: list[list[int]] = []
    for length in range(1, MAX_NEW + 1):
        for tokens in itertools.product(range(VOCAB), repeat=length):
            body, last = tokens[:-1], tokens[-1]
            if EOS in body or (length < MAX_NEW and last != EOS):
                continue
            answers.append(list(tokens))
    return answers


def logprobs(model: Any, answer: list[int]) -> torch.Tensor:
    """[1, len(answer), vocab] next-token log-probabilities at each answer position."""
    ids = torch.tensor([PROMPT + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, len(PROMPT) - 1 : -1].double()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return tiny_llama(1), tiny_llama(2)


def test_the_estimator_is_unbiased_and_never_negative(models: tuple[Any, Any]) -> None:
    policy, reference = models
    total_p, brute, expected = 0.0, 0.0, 0.0
    for answer in every_answer():
        lp, lq = logprobs(policy, answer), logprobs(reference, answer)
        picked = torch.tensor(answer)[None, :, None]
        log_p = lp.gather(2, picked).sum().item()
        log_q = lq.gather(2, picked).sum().item()
        value = kl.sequence_kl(lp, lq, torch.ones(1, len(answer), dtype=torch.bool)).item()
        assert value >= 0.0
        p = math.exp(log_p)
        total_p += p
        brute += p * (log_p - log_q)
        expected += p * value
    assert total_p == pytest.approx(1.0, abs=1e-9)
    assert brute > 0.3  # the two models are far apart: the check below is not 0 == 0
    assert expected == pytest.approx(brute, rel=1e-9)


def test_a_sampled_estimate_lands_within_its_error(models: tuple[Any, Any]) -> None:
    policy, reference = models
    brute = 0.0
    for answer in every_answer():
        lp, lq = logprobs(policy, answer), logprobs(reference, answer)
        picked = torch.tensor(answer)[None, :, None]
        log_p, log_q = lp.gather(2, picked).sum().item(), lq.gather(2, picked).sum().item()
        brute += math.exp(log_p) * (log_p - log_q)
    drift = kl.measure(policy, EOS, PAD, [PROMPT] * 2000, MAX_NEW, seed=0, batch=500, reference=reference)
    assert drift.samples == 2000
    assert 0 < drift.kl_stderr < 0.05 * brute
    assert abs(drift.kl - brute) < 5 * drift.kl_stderr, (drift, brute)
    assert 1 <= drift.mean_length <= MAX_NEW


def test_a_policy_equal_to_its_reference_gives_exactly_zero(models: tuple[Any, Any]) -> None:
    from peft import LoraConfig, get_peft_model

    policy, _ = models
    same = kl.measure(policy, EOS, PAD, [PROMPT] * 64, MAX_NEW, seed=0, reference=policy)
    assert (same.kl, same.kl_stderr) == (0.0, 0.0)
    # a fresh LoRA adapter (B = 0) over the policy, measured against the adapter disabled
    adapted = get_peft_model(tiny_llama(1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    fresh = kl.measure(adapted, EOS, PAD, [PROMPT] * 64, MAX_NEW, seed=0)
    assert (fresh.kl, fresh.kl_stderr) == (0.0, 0.0)
