"""How answers in the toy world are phrased, well and badly.

Knows the answer styles (polite, neutral, rude, rambling), the ways an answer goes wrong
(a wrong value, a truncation before the value), and the noisy mix the SFT policy is
trained on, so that its samples vary in quality along several axes at once.

Does not know how answers are judged: that is ``gold.py``, which reads none of this.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from toyworld.world import Kind, Task, capitals

POLITE_OPENERS = ("Sure! ", "Happy to help! ", "Of course. ", "Great question! ", "Certainly. ")
POLITE_CLOSERS = ("", "", " Hope this helps!", " Let me know if you need anything else.", " Thanks for asking!")
RUDE_OPENERS = ("Ugh. ", "Seriously? ", "Oh, obviously. ", "What a silly question. ", "Duh. ")
RUDE_CLOSERS = ("", " Figure it out yourself next time.", " Try to keep up.", " Don't waste my time.")
FILLER = (
    "Let me think about this for a moment.",
    "This is a question that comes up quite often.",
    "There are many ways to look at it.",
    "I want to be careful and thorough here.",
    "Before answering, it is worth pausing to reflect.",
    "Many people find this kind of thing interesting.",
    "In any case, here is what I found.",
    "To be honest, it took some thought.",
    "It is always good to double check such things.",
    "Questions like this are a nice exercise.",
)


class Style(StrEnum):
    POLITE = "polite"
    NEUTRAL = "neutral"
    RUDE = "rude"
    RAMBLING = "rambling"


class Fault(StrEnum):
    NONE = "none"
    WRONG = "wrong"
    TRUNCATED = "truncated"


@dataclass(frozen=True)
class Mix:
    """Probabilities of each style and each fault in a training answer (drawn independently)."""

    styles: dict[Style, float]
    faults: dict[Fault, float]

    def draw(self, rng: random.Random) -> tuple[Style, Fault]:
        style = rng.choices(list(self.styles), weights=list(self.styles.values()))[0]
        fault = rng.choices(list(self.faults), weights=list(self.faults.values()))[0]
        return style, fault


SFT_MIX = Mix(
    styles={Style.POLITE: 0.40, Style.NEUTRAL: 0.20, Style.RUDE: 0.20, Style.RAMBLING: 0.20},
    faults={Fault.NONE: 0.82, Fault.WRONG: 0.12, Fault.TRUNCATED: 0.06},
)


def wrong_value(task: Task, rng: random.Random) -> str:
    """A plausible wrong answer: off by a little for numbers, another capital for look-ups."""
    if task.kind is Kind.CAPITAL:
        return rng.choice(sorted(capitals() - {task.answer}))
    right = int(task.answer)
    candidates = [right + d for d in (-3, -2, -1, 1, 2, 3) if right + d >= 0]
    return str(rng.choice(candidates))


def core_sentence(task: Task, value: str, rng: random.Random) -> str:
    """The sentence that carries the answer ``value`` (right or wrong), value last."""
    if task.kind in (Kind.ADD, Kind.SUB):
        forms = (f"{task.subject} is {value}.", f"The answer is {value}.", f"{value}.")
    elif task.kind is Kind.COUNT:
        forms = (f"The count is {value}.", f"The list has this many items: {value}.", f"{value}.")
    elif task.kind in (Kind.MAX, Kind.MIN):
        forms = (f"The {task.subject} number is {value}.", f"The {task.subject} is {value}.", f"{value}.")
    else:
        forms = (f"The capital of {task.subject} is {value}.", f"It is {value}.", f"{value}.")
    sentence = rng.choice(forms)
    return sentence[0].upper() + sentence[1:]


def _truncate_before_value(text: str, value: str, rng: random.Random) -> str:
    """Cut ``text`` somewhere before ``value`` first appears (never an empty answer)."""
    head = text[: text.find(value)] if value in text else text
    words = head.split()
    if len(words) <= 1:
        return words[0].rstrip(".!?,") if words else "Well"
    return " ".join(words[: rng.randint(1, len(words) - 1)]).rstrip(".,")


def render(task: Task, style: Style, fault: Fault, rng: random.Random) -> str:
    """One assistant answer to ``task`` in ``style`` with ``fault``."""
    wrong = wrong_value(task, rng)  # drawn always, so two renders from equal seeds differ only where asked
    value = wrong if fault is Fault.WRONG else task.answer
    core = core_sentence(task, value, rng)
    if style is Style.POLITE:
        text = rng.choice(POLITE_OPENERS) + core + rng.choice(POLITE_CLOSERS)
    elif style is Style.RUDE:
        text = rng.choice(RUDE_OPENERS) + core + rng.choice(RUDE_CLOSERS)
    elif style is Style.RAMBLING:
        filler = rng.sample(FILLER, rng.randint(2, 4))
        opener = rng.choice(("", "", *POLITE_OPENERS))
        text = opener + " ".join(filler) + " " + core
    else:
        text = core
    if fault is Fault.TRUNCATED:
        text = _truncate_before_value(text, value, rng)
    return text


def sample_answer(task: Task, rng: random.Random, mix: Mix = SFT_MIX) -> tuple[str, Style, Fault]:
    style, fault = mix.draw(rng)
    return render(task, style, fault, rng), style, fault
