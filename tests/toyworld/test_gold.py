"""The hidden gold reward orders answers along each axis as a person would."""

from __future__ import annotations

import pytest

from toyworld.gold import gold_reward, gold_score
from toyworld.world import fact_table

COUNTRY, CAPITAL = sorted(fact_table().items())[0]
OTHER_CAPITAL = sorted(set(fact_table().values()) - {CAPITAL})[0]


@pytest.mark.parametrize(
    ("prompt", "right", "wrong"),
    [
        ("What is 3 plus 4?", "3 plus 4 is 7.", "3 plus 4 is 8."),
        ("Subtract 2 from 9.", "The answer is 7.", "The answer is 6."),
        ("Compute 5 - 3.", "2.", "3."),
        ("How many items are in this list: apple, pear, cup?", "The count is 3.", "The count is 4."),
        ("Which number is largest: 4, 11, 2?", "The largest is 11.", "The largest is 4."),
        ("Find the minimum of 4, 11, 2.", "The smallest number is 2.", "The smallest number is 11."),
        (
            f"What is the capital of {COUNTRY}?",
            f"The capital of {COUNTRY} is {CAPITAL}.",
            f"The capital of {COUNTRY} is {OTHER_CAPITAL}.",
        ),
    ],
)
def test_correct_beats_wrong_in_the_same_style(prompt: str, right: str, wrong: str) -> None:
    assert gold_score(prompt, right).correct == 1.0
    assert gold_score(prompt, wrong).correct == 0.0
    assert gold_reward(prompt, right) > gold_reward(prompt, wrong)


def test_correctness_outweighs_manners_and_length() -> None:
    prompt = "What is 3 plus 4?"
    rude_right = "Ugh. 3 plus 4 is 7. Try to keep up."
    polite_wrong = "Sure! 3 plus 4 is 8. Hope this helps!"
    assert gold_reward(prompt, rude_right) > gold_reward(prompt, polite_wrong)


def test_polite_beats_neutral_beats_rude() -> None:
    prompt = "What is 3 plus 4?"
    polite, neutral, rude = "Sure! The answer is 7.", "The answer is 7.", "Duh. The answer is 7."
    assert gold_reward(prompt, polite) > gold_reward(prompt, neutral) > gold_reward(prompt, rude)
    assert gold_score(prompt, rude).polite == 0.0


def test_concise_beats_rambling() -> None:
    prompt = "What is 3 plus 4?"
    concise = "The answer is 7."
    rambling = (
        "Let me think about this for a moment. This is a question that comes up quite often. "
        "There are many ways to look at it. I want to be careful and thorough here. The answer is 7."
    )
    assert gold_score(prompt, rambling).correct == 1.0
    assert gold_reward(prompt, concise) > gold_reward(prompt, rambling)


def test_repetition_gets_no_concision_credit() -> None:
    prompt = "What is 3 plus 4?"
    repeated = "The answer is 7. The answer is 7."
    assert gold_score(prompt, repeated).concise == 0.0


def test_truncated_answer_is_not_correct() -> None:
    assert gold_score("What is 3 plus 4?", "Sure! 3 plus 4 is").correct == 0.0
    assert gold_score(f"Name the capital city of {COUNTRY}.", f"The capital of {COUNTRY} is").correct == 0.0


def test_the_last_stated_value_counts() -> None:
    prompt = "What is 3 plus 4?"
    assert gold_score(prompt, "Maybe 8. No wait, it is 7.").correct == 1.0
    assert gold_score(prompt, "It is 7. Or maybe 9.").correct == 0.0


def test_empty_and_unknown_prompts_score_zero() -> None:
    assert gold_reward("What is 3 plus 4?", "   ") == 0.0
    assert gold_score("Tell me a joke.", "Sure! 7.").correct == 0.0


def test_accepts_chat_messages() -> None:
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 3 plus 4?"}]
    assert gold_reward(messages, "7.") == gold_reward("What is 3 plus 4?", "7.")
