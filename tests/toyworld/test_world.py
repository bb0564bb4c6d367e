"""Prompt sets are deterministic, disjoint, and every prompt recovers its task."""

from __future__ import annotations

import random
from collections import Counter

from toyworld.world import KIND_WEIGHTS, Kind, fact_table, parse_prompt, prompt_sets, sample_task


def test_same_seed_gives_same_prompt_sets() -> None:
    assert prompt_sets(7, 500, 60) == prompt_sets(7, 500, 60)


def test_other_seed_gives_other_prompt_sets() -> None:
    assert prompt_sets(7, 500, 60).heldout != prompt_sets(8, 500, 60).heldout


def test_train_and_heldout_are_disjoint_by_text() -> None:
    sets = prompt_sets(0, 3000, 200)
    assert len(sets.train) == 3000
    assert len({t.prompt for t in sets.heldout}) == len(sets.heldout)
    assert not {t.prompt for t in sets.train} & {t.prompt for t in sets.heldout}


def test_heldout_follows_the_task_mix_and_every_country_stays_in_training() -> None:
    sets = prompt_sets(0, 3000, 200)
    kinds = Counter(t.kind for t in sets.heldout)
    assert set(kinds) == set(KIND_WEIGHTS)
    trained = {t.subject for t in sets.train if t.kind is Kind.CAPITAL}
    assert trained == set(fact_table())


def test_parse_prompt_recovers_every_sampled_task() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        task = sample_task(rng)
        assert parse_prompt(task.prompt) == task


def test_parse_prompt_rejects_other_text() -> None:
    assert parse_prompt("Write me a poem about the sea.") is None
    assert parse_prompt("What is the capital of Atlantis?") is None


def test_fact_table_is_fixed() -> None:
    table = fact_table()
    assert len(table) == 24
    assert len(set(table.values())) == 24
