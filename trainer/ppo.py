"""On-policy RL against the reward model: PPO's clipped objective with a KL penalty to the reference.

Knows how a round turns the window's prompts into an online RL run: the policy (the
adapter) samples ``generations`` answers per prompt, the reward model of the current
reward-model version scores them (rendered with its own chat template, exactly as the
gateway scores candidates), and the adapter is updated with PPO's clipped surrogate
(``epsilon``, ``iterations`` passes per batch of samples) plus ``beta`` × KL to the
reference, the base policy with the adapter disabled (``trainer.adapter``).

TRL 1.16 (pinned ``trl<2``) no longer ships ``PPOTrainer``: ``trl.experimental.ppo`` is in
1.0 and gone by 1.8. Its maintained successor for LLMs is ``GRPOTrainer``: the same clipped
ratio objective and reference KL, with the advantage taken relative to the other samples
of the same prompt instead of a learned value head (no critic to train or store). That is
what ``--algo ppo`` runs; the manifest records the trainer class. Does not read the log
or write the registry.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.adapter import PolicyInit, Trained, fit, trainer_args
from trainer.settings import AdapterSettings, PpoSettings

IMPLEMENTATION = "trl.GRPOTrainer"


class RewardModel:
    """A transformers reward model (one label) as a TRL reward function: raw logits, its own chat template."""

    __name__ = "reward_model"  # TRL names a callable reward function's metrics after it

    def __init__(self, model_dir: Path, batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_dir} is not a reward model: {self.model.config.num_labels} labels, expected 1")
        self.batch_size = batch_size

    def __call__(
        self, prompts: Sequence[list[dict[str, str]]], completions: Sequence[list[dict[str, str]]], **_: Any
    ) -> list[float]:
        import torch

        from gateway.score import Conversation, render

        texts = [
            render(self.tokenizer, Conversation(list(p), c[-1]["content"])) for p, c in zip(prompts, completions, strict=True)
        ]
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], add_special_tokens=False, padding=True,
                                   return_tensors="pt")  # fmt: skip
            with torch.inference_mode():
                rewards.extend(float(x) for x in self.model(**batch).logits[:, 0].float())
        return rewards


def train(
    init: PolicyInit,
    tokenizer: Any,
    prompts: list[list[dict[str, Any]]],
    reward: RewardModel,
    settings: PpoSettings,
    shared: AdapterSettings,
    work_dir: Path,
    *,
    progress: bool = True,
    max_steps: int | None = None,
) -> tuple[Trained, Any]:
    """Train the adapter online on ``prompts`` (conversations without the answer) against ``reward``."""
    import datasets

    with warnings.catch_warnings():
        # Importing GRPOTrainer imports vLLM (TRL's optional generation backend, unused here: use_vllm is off and
        # the round samples with transformers), which warns at import time: TRL lists vLLM 0.22-0.31 (we serve
        # with 0.32) and vLLM's modules use torch.jit decorators torch 2.13 deprecates. None of it concerns us.
        warnings.simplefilter("ignore")
        from trl import GRPOConfig, GRPOTrainer  # type: ignore[attr-defined]

    steps = max_steps or settings.steps
    config = GRPOConfig(
        beta=settings.beta, learning_rate=settings.learning_rate, max_steps=steps,
        per_device_train_batch_size=settings.prompts_per_step * settings.generations,
        num_generations=settings.generations, max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature, epsilon=settings.epsilon, num_iterations=settings.iterations,
        **trainer_args(work_dir, steps, shared.seed, shared.bf16, progress),
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=init.base, reward_funcs=reward, args=config, peft_config=init.lora, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
    )  # fmt: skip
    output, seconds, history = fit(trainer, init, progress)
    last = history[-1] if history else {}
    figures = {k: v for k, v in last.items() if k in ("reward", "reward_std", "kl", "completions/mean_length")}
    return Trained(output.global_step, seconds, float(output.training_loss), figures, history), trainer.model
