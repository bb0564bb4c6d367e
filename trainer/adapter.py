"""What every algorithm's round shares: the LoRA adapter it trains and how a conversation becomes ids.

Knows that a version is one LoRA adapter over the fixed base policy, initialised from its
parent version's adapter (continued, never stacked, so vLLM serves one adapter), and that
the reference of every algorithm is the base with the adapter disabled. TRL trainers are
given the base model and a ``peft_config`` and the parent's weights are loaded into the
adapter afterwards (``start_from_parent``): handed a ready ``PeftModel``, TRL 1.x makes a
frozen copy of the parent adapter the reference ("ref" adapter), which would chain the
reference from round to round. Does not know any algorithm's loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.settings import AdapterSettings


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """A conversation rendered as vLLM renders a chat request: the chat template plus the generation prompt."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [int(i) for i in rendered["input_ids"]]


@dataclass
class PolicyInit:
    """What a round trains: the base model, the adapter's shape, and its parent's weights to start from."""

    base: Any
    lora: Any
    """A ``peft.LoraConfig``: the parent's, or one from the settings for the first version; None: all weights."""
    parent_weights: dict[str, Any] | None = None
    reference: Any = None
    """A full fine-tune's reference: the base model, loaded apart (a LoRA round disables its adapter instead)."""


@dataclass
class Trained:
    """What any algorithm's training reports (the round adds evaluation figures)."""

    steps: int
    seconds: float
    loss: float
    figures: dict[str, float] = field(default_factory=dict)
    """The algorithm's own last logged figures (reward margin, KL, mean reward...)."""
    history: list[dict[str, float]] = field(default_factory=list)


def policy_model(base: Path, parent_adapter: Path | None, settings: AdapterSettings) -> PolicyInit:
    """The base model and the adapter to train: initialised from the parent version's adapter when there is
    one (continuing it, not stacking a second one), else fresh (LoRA B = 0, so it starts as the base).
    A fresh adapter's shape is ``trainer.adapter``'s (``lora_*``, ``target_modules``), whatever the algorithm."""
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    if parent_adapter is not None:
        config = LoraConfig.from_pretrained(str(parent_adapter))
        config.inference_mode = False
        return PolicyInit(model, config, load_file(parent_adapter / "adapter_model.safetensors"))
    config = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules), task_type="CAUSAL_LM",
    )  # fmt: skip
    return PolicyInit(model, config)


def full_model(base: Path, parent: Path | None, *, parent_is_adapter: bool = False) -> PolicyInit:
    """A full fine-tune: all weights, starting from the parent version's weights (a LoRA parent merged into
    the base), or the base; the reference is a second copy of the base, frozen, whatever the parent (the
    reference is never chained)."""
    from transformers import AutoModelForCausalLM

    if parent is not None and parent_is_adapter:
        model = load_adapter(base, parent).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(parent or base, dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(base, dtype="float32").eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return PolicyInit(model, None, reference=reference)


def start_from_parent(model: Any, init: PolicyInit) -> None:
    """Load the parent version's weights into the adapter a TRL trainer created from ``init.lora``."""
    from peft import set_peft_model_state_dict

    if init.parent_weights is None:
        return
    unexpected = getattr(set_peft_model_state_dict(model, init.parent_weights), "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"the parent adapter does not fit this model: unexpected {unexpected[:3]}")


def load_adapter(base: Path, adapter: Path) -> Any:
    """A fresh base model with a saved adapter, for inference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="float32"), adapter)


def load_full(directory: Path) -> Any:
    """A saved full fine-tune, for inference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype="float32")


@dataclass
class AnswerIds:
    """Answers as the token ids vLLM sampled, cut to fit after their prompt; an answer logged without ids is
    tokenised from its text (plus EOS). Counts both, for the round's figures."""

    tokenizer: Any
    max_length: int
    retokenized: int = 0
    truncated: int = 0

    def __call__(self, prompt: list[int], stored: Sequence[int] | None, text: str) -> list[int] | None:
        """The answer's ids, or None when the prompt alone fills ``max_length``."""
        ids = [int(i) for i in stored or ()]
        if not ids:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            self.retokenized += 1
        room = self.max_length - len(prompt)
        if room < 1:
            return None
        if len(ids) > room:
            ids = ids[:room]
            self.truncated += 1
        return ids


def trainer_args(work_dir: Path, steps: int, seed: int, bf16: bool, progress: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` every round's TRL trainer shares: no checkpoints or trackers, ten log lines,
    the CPU unless torch sees a GPU, progress bars on request. Under data parallelism (``accelerate launch``) DDP
    is told the adapter has no unused parameters (transformers assumes there may be, for any peft model, and
    walks the autograd graph an extra time every step)."""
    import torch

    return {
        "output_dir": str(work_dir), "logging_steps": max(1, steps // 10), "report_to": [], "save_strategy": "no",
        "seed": seed, "use_cpu": not torch.cuda.is_available(), "dataloader_num_workers": 0, "disable_tqdm": not progress,
        "bf16": bf16, "ddp_find_unused_parameters": False,
    }  # fmt: skip


def fit(trainer: Any, init: PolicyInit | None, progress: bool) -> tuple[Any, float, list[dict[str, float]]]:
    """Train a TRL trainer (its adapter first set to the parent's weights): (train output, seconds, log)."""
    from transformers import PrinterCallback

    if init is not None:
        start_from_parent(trainer.model, init)
    if not progress:
        trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    output = trainer.train()
    return output, time.perf_counter() - started, log_history(trainer.state.log_history)


def log_history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """A ``transformers.Trainer``'s training log entries (those with a loss), as floats."""
    return [{k: float(v) for k, v in entry.items() if isinstance(v, int | float)} for entry in log_history if "loss" in entry]
