"""The toy world's tasks: what users ask and what the right answer is.

Knows the fixed synthetic fact table (invented countries and their capitals), the
request templates of each task kind, how to sample a task, how to recover a task (and
so its right answer) from a prompt's text, and how to split prompts into train and
held-out sets deterministically from a seed.

Does not know how answers are phrased (``answers.py``) or how they are judged
(``gold.py``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

WORLD_SEED = 20261123
"""Seed of the fact table. Fixed: the world does not change with the training seed."""

N_COUNTRIES = 24

_SYLLABLES_A = ["val", "mor", "ket", "zan", "bri", "dul", "fen", "gor", "hal", "ist", "jor", "lum"]
_SYLLABLES_B = ["dor", "ra", "vi", "mar", "sto", "len", "qui", "bar", "tes", "nox", "pel", "rin"]
_COUNTRY_ENDS = ["ia", "land", "istan", "ova", "eth", "une"]
_CITY_ENDS = ["port", "burg", "haven", "ford", "stad", "ton"]

LIST_ITEMS = [
    "apple",
    "pear",
    "stone",
    "cloud",
    "lamp",
    "river",
    "chair",
    "book",
    "candle",
    "shell",
    "feather",
    "coin",
    "rope",
    "cup",
    "leaf",
    "key",
]


class Kind(StrEnum):
    ADD = "add"
    SUB = "sub"
    COUNT = "count"
    MAX = "max"
    MIN = "min"
    CAPITAL = "capital"


TEMPLATES: dict[Kind, tuple[str, ...]] = {
    Kind.ADD: (
        "What is {a} plus {b}?",
        "Add {a} and {b}.",
        "Compute {a} + {b}.",
        "What do you get when you add {a} to {b}?",
        "Please work out {a} + {b}.",
    ),
    Kind.SUB: (
        "What is {a} minus {b}?",
        "Subtract {b} from {a}.",
        "Compute {a} - {b}.",
        "Take {b} away from {a}.",
        "What is left when you take {b} from {a}?",
    ),
    Kind.COUNT: (
        "How many items are in this list: {items}?",
        "Count the words in: {items}.",
        "How many things did I list here: {items}?",
    ),
    Kind.MAX: (
        "Which number is largest: {nums}?",
        "What is the biggest number in {nums}?",
        "Find the maximum of {nums}.",
    ),
    Kind.MIN: (
        "Which number is smallest: {nums}?",
        "Find the minimum of {nums}.",
    ),
    Kind.CAPITAL: (
        "What is the capital of {country}?",
        "Name the capital city of {country}.",
        "Which city is the capital of {country}?",
        "Tell me the capital of {country}.",
        "Do you know the capital of {country}?",
        "Capital of {country}?",
    ),
}

KIND_WEIGHTS: dict[Kind, float] = {
    Kind.ADD: 0.14,
    Kind.SUB: 0.10,
    Kind.COUNT: 0.18,
    Kind.MAX: 0.12,
    Kind.MIN: 0.12,
    Kind.CAPITAL: 0.34,
}


@dataclass(frozen=True)
class Task:
    """One request of the toy world and its right answer."""

    kind: Kind
    prompt: str
    answer: str
    subject: str
    """What the answer is about, as a phrase for answers: '7 plus 5', 'Valdoria', 'largest'."""


@cache
def fact_table() -> dict[str, str]:
    """Invented country -> capital, fixed by ``WORLD_SEED``."""
    rng = random.Random(WORLD_SEED)
    countries: set[str] = set()
    cities: set[str] = set()
    table: dict[str, str] = {}
    while len(table) < N_COUNTRIES:
        country = (rng.choice(_SYLLABLES_A) + rng.choice(_SYLLABLES_B) + rng.choice(_COUNTRY_ENDS)).capitalize()
        city = (rng.choice(_SYLLABLES_B) + rng.choice(_SYLLABLES_A) + rng.choice(_CITY_ENDS)).capitalize()
        if country in countries or city in cities:
            continue
        countries.add(country)
        cities.add(city)
        table[country] = city
    return table


def capitals() -> frozenset[str]:
    return frozenset(fact_table().values())


def _join(values: list[str]) -> str:
    return ", ".join(values)


def sample_task(rng: random.Random) -> Task:
    """Draw one task (kind by ``KIND_WEIGHTS``, then its arguments and template)."""
    kinds = list(KIND_WEIGHTS)
    kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
    template = rng.choice(TEMPLATES[kind])
    if kind is Kind.ADD:
        a, b = rng.randint(1, 5), rng.randint(1, 5)
        return Task(kind, template.format(a=a, b=b), str(a + b), f"{a} plus {b}")
    if kind is Kind.SUB:
        a = rng.randint(2, 7)
        b = rng.randint(1, a - 1)
        return Task(kind, template.format(a=a, b=b), str(a - b), f"{a} minus {b}")
    if kind is Kind.COUNT:
        items = [rng.choice(LIST_ITEMS) for _ in range(rng.randint(2, 5))]
        return Task(kind, template.format(items=_join(items)), str(len(items)), "the list")
    if kind in (Kind.MAX, Kind.MIN):
        nums = rng.sample(range(1, 13), 3)
        best = max(nums) if kind is Kind.MAX else min(nums)
        subject = "largest" if kind is Kind.MAX else "smallest"
        return Task(kind, template.format(nums=_join([str(n) for n in nums])), str(best), subject)
    country = rng.choice(sorted(fact_table()))
    return Task(kind, template.format(country=country), fact_table()[country], country)


_FIELD = {
    "a": r"(?P<a>\d+)",
    "b": r"(?P<b>\d+)",
    "items": r"(?P<items>[a-z]+(?:, [a-z]+)*)",
    "nums": r"(?P<nums>\d+(?:, \d+)*)",
    "country": r"(?P<country>[A-Z][a-z]+)",
}


@cache
def _patterns() -> tuple[tuple[Kind, re.Pattern[str]], ...]:
    compiled: list[tuple[Kind, re.Pattern[str]]] = []
    for kind, templates in TEMPLATES.items():
        for template in templates:
            parts = re.split(r"\{(\w+)\}", template)
            regex = "".join(re.escape(p) if i % 2 == 0 else _FIELD[p] for i, p in enumerate(parts))
            compiled.append((kind, re.compile(rf"\s*{regex}\s*", re.IGNORECASE)))
    return tuple(compiled)


def parse_prompt(prompt: str) -> Task | None:
    """Recover the task (and its right answer) from a prompt's text; None if not a toy task."""
    for kind, pattern in _patterns():
        m = pattern.fullmatch(prompt)
        if m is None:
            continue
        fields = m.groupdict()
        if kind in (Kind.ADD, Kind.SUB):
            a, b = int(fields["a"]), int(fields["b"])
            value = a + b if kind is Kind.ADD else a - b
            word = "plus" if kind is Kind.ADD else "minus"
            return Task(kind, prompt, str(value), f"{a} {word} {b}")
        if kind is Kind.COUNT:
            return Task(kind, prompt, str(len(fields["items"].split(", "))), "the list")
        if kind in (Kind.MAX, Kind.MIN):
            nums = [int(n) for n in fields["nums"].split(", ")]
            best = max(nums) if kind is Kind.MAX else min(nums)
            return Task(kind, prompt, str(best), "largest" if kind is Kind.MAX else "smallest")
        country = fields["country"].capitalize()
        capital = fact_table().get(country)
        if capital is None:
            return None
        return Task(kind, prompt, capital, country)
    return None


MAX_HELDOUT_SHARE = 0.2
"""At most this share of a kind's distinct prompts is held out, so training still sees its facts."""


def prompt_space(kind: Kind) -> int:
    """How many distinct prompts ``sample_task`` can produce for ``kind``."""
    templates = len(TEMPLATES[kind])
    if kind is Kind.ADD:
        return 25 * templates
    if kind is Kind.SUB:
        return sum(a - 1 for a in range(2, 8)) * templates
    if kind is Kind.CAPITAL:
        return N_COUNTRIES * templates
    return 10**6  # lists: far more than any held-out set


@dataclass(frozen=True)
class PromptSets:
    train: tuple[Task, ...]
    heldout: tuple[Task, ...]


def prompt_sets(seed: int, n_train: int, n_heldout: int) -> PromptSets:
    """Held-out prompts (distinct texts) and a training stream that never repeats them.

    Held-out prompts follow the task mix (a quota per kind, at most ``MAX_HELDOUT_SHARE``
    of the kind's distinct prompts); the training stream is
    ``n_train`` draws from the same mix, repeats allowed, minus the held-out texts.
    Each country keeps at least one phrasing in training, so a held-out look-up asks a
    known fact in an unseen phrasing, never an unknowable one. Deterministic from ``seed``.
    """
    rng = random.Random(seed)
    quotas = {
        kind: min(round(weight * n_heldout), int(MAX_HELDOUT_SHARE * prompt_space(kind))) for kind, weight in KIND_WEIGHTS.items()
    }
    per_country = 2
    heldout: dict[str, Task] = {}
    held_countries: dict[str, int] = {}
    filled = dict.fromkeys(quotas, 0)
    attempts = 0
    while sum(filled.values()) < sum(quotas.values()):
        attempts += 1
        if attempts > 200 * max(1, n_heldout):
            raise ValueError(f"cannot draw {n_heldout} distinct held-out prompts; ask for fewer")
        task = sample_task(rng)
        if filled[task.kind] >= quotas[task.kind] or task.prompt in heldout:
            continue
        if task.kind is Kind.CAPITAL:
            if held_countries.get(task.subject, 0) >= per_country:
                continue
            held_countries[task.subject] = held_countries.get(task.subject, 0) + 1
        heldout[task.prompt] = task
        filled[task.kind] += 1
    train: list[Task] = []
    while len(train) < n_train:
        task = sample_task(rng)
        if task.prompt not in heldout:
            train.append(task)
    return PromptSets(train=tuple(train), heldout=tuple(heldout.values()))
