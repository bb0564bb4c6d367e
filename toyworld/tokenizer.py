"""The toy world's tokenizer: byte-level BPE with a chat template.

Knows the special tokens, the chat template (the same string that transformers' and
vLLM's ``apply_chat_template`` render), and how to train the BPE on a corpus drawn
from the toy world. Saved as a standard HF fast tokenizer, so any HF or vLLM code that
loads a model directory loads it unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from toyworld.answers import FILLER, sample_answer
from toyworld.world import TEMPLATES, prompt_sets

PAD = "<|pad|>"
END = "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (PAD, END, *tuple(f"<|{role}|>" for role in ROLES))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template in plain Python (used to build training text without Jinja)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{END}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def _corpus(seed: int, size: int) -> Iterator[str]:
    rng = random.Random(seed)
    sets = prompt_sets(seed, n_train=size, n_heldout=0)
    for task in sets.train:
        answer, _, _ = sample_answer(task, rng)
        yield render_chat([{"role": "user", "content": task.prompt}, {"role": "assistant", "content": answer}], False)
    for templates in TEMPLATES.values():
        yield from templates
    yield from FILLER


def build_tokenizer(seed: int, vocab_size: int, corpus_size: int = 4000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on toy-world text; deterministic for a given seed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed, corpus_size), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[f"<|{role}|>" for role in ROLES],
        model_max_length=512,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
