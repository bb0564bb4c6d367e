"""The tokenizer is deterministic and its chat template is the one training text uses."""

from __future__ import annotations

import jinja2
import pytest

from toyworld.tokenizer import END, build_tokenizer, render_chat

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "Sure! 3 plus 4 is 7."},
]


def test_same_seed_gives_the_same_tokenizer() -> None:
    a, b = build_tokenizer(5, 512, corpus_size=800), build_tokenizer(5, 512, corpus_size=800)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_chat_template_matches_training_text() -> None:
    tok = build_tokenizer(0, 512, corpus_size=800)
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == render_chat(MESSAGES, add_generation_prompt=False)
    assert tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True) == render_chat(
        MESSAGES[:2], add_generation_prompt=True
    )


def test_special_tokens_are_single_ids_and_round_trip() -> None:
    tok = build_tokenizer(0, 512, corpus_size=800)
    assert tok.eos_token == END
    assert tok.pad_token_id != tok.eos_token_id
    text = "Happy to help! The capital is Rafenton."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_unknown_role_is_refused() -> None:
    tok = build_tokenizer(0, 512, corpus_size=800)
    with pytest.raises(jinja2.TemplateError, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
