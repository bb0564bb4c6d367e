"""The evaluate-loop's report on constructed runs: pooled figures, paired goals, warnings, the plot.

Runs here are built by hand (no gateway, no training), so each figure can be checked
against a value computed by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from toyworld.evaluate import mean_ci
from toyworld.gold import gold_reward
from toyworld.loop.measure import Measurement, summarise
from toyworld.loop.report import RoundRecord, Run, arm_report, between_arms, goals, plot, served, warnings
from toyworld.loop.user import Traffic


def measurement(n1: list[float], *, bon2: list[float] | None = None, bon4: list[float] | None = None, rm: float = 0.0,
                length: float = 10.0, kl: float = 0.0, version: str = "base", spread: float = 0.0) -> Measurement:  # fmt: skip
    """Per-prompt RM scores and lengths at ``rm`` and ``length``, alternating by ``spread`` around them."""
    per = {1: n1, 2: bon2 or n1, 4: bon4 or n1}
    bon = {n: sum(v) / len(v) for n, v in per.items()}
    wobble = [spread * (1 if i % 2 else -1) for i in range(len(n1))]
    return Measurement(version, "rm-base", mean_ci(n1), bon, rm, kl, length, n1, per, kl_to_start_stderr=kl / 10,
                       per_prompt_rm=[rm + w for w in wobble], per_prompt_len=[length + 10 * w for w in wobble])  # fmt: skip


def record(k: int, m: Measurement, outcome: str = "trained") -> RoundRecord:
    return RoundRecord(k, m, m.version, 100, outcome, Traffic(sent=50))


def test_summarise_scores_gold_and_picks_by_reward() -> None:
    prompt = "What is 2 + 3?"
    texts = ["It is 5.", "It is 7.", "It is 5, thank you for asking, I hope this helps you a lot today.", "9"]
    rewards = [0.0, 1.0, 2.0, 0.5]
    gold = [gold_reward(prompt, t) for t in texts]
    m = summarise("v0001", "rm-base", [prompt], [texts], [rewards], [4.0], (0.3, 0.02))
    assert m.bon_gold[1] == pytest.approx(sum(gold) / 4)
    assert m.bon_gold[2] == pytest.approx((gold[1] + gold[2]) / 2)  # the RM's picks in groups (0, 1) and (2, 3)
    assert m.bon_gold[4] == pytest.approx(gold[2])
    assert m.rm_score == pytest.approx(0.875)
    assert m.per_prompt_rm is not None
    assert m.per_prompt_rm[0] == pytest.approx(0.875)
    assert (m.mean_len, m.per_prompt_len) == (4.0, [4.0])
    assert (m.kl_to_start, m.kl_to_start_stderr) == (0.3, 0.02)
    assert len(set(gold)) > 1  # the texts differ in gold, so the picks above are tested
    # the reward model's accuracy on these samples: pairs whose gold differs, ordered alike by reward and gold
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4) if abs(gold[i] - gold[j]) >= 0.05]
    right = sum((rewards[i] > rewards[j]) == (gold[i] > gold[j]) for i, j in pairs)
    assert m.rm_accuracy is not None
    assert m.rm_accuracy.mean == pytest.approx(right / len(pairs))
    assert m.rm_accuracy.n == len(pairs)


def traffic(golds: list[float], ns: list[int], reasons: list[str], failed: int = 0) -> Traffic:
    t = Traffic(sent=len(golds) + failed, failed=failed, candidates=sum(ns), golds=len(golds), gold_sum=sum(golds),
                gold_squares=sum(g * g for g in golds))  # fmt: skip
    for reason, n in zip(reasons, ns, strict=False):
        t.adaptive[reason] = t.adaptive.get(reason, 0) + 1
        t.adaptive_candidates[reason] = t.adaptive_candidates.get(reason, 0) + n
    return t


def test_served_pools_the_seeds_candidates_per_request_and_the_gold_served() -> None:
    a = traffic([0.9, 0.6, 0.8], [4, 1, 2], ["cold", "spread", "spread"], failed=1)
    b = traffic([0.5, 1.0], [4, 4], ["explore", "cold"])
    got = served([a, b])
    assert got["candidates_per_request"] == pytest.approx(15 / 5)  # the failed request generated nothing it was told of
    assert got["adaptive"] == {"cold": 2, "explore": 1, "spread": 2}
    assert got["candidates_per_request_by_rule"] == {"cold": 4.0, "explore": 4.0, "spread": 1.5}
    expected = mean_ci([0.9, 0.6, 0.8, 0.5, 1.0])
    assert got["served_gold"] == pytest.approx(expected.mean, abs=1e-4)
    assert got["served_gold_ci95"] == pytest.approx(list(expected.ci95), abs=1e-4)
    # adaptive N off (no header), and a round with no answer
    assert served([traffic([0.7, 0.7], [4, 4], [])])["adaptive"] == {}
    assert served([traffic([0.0, 0.0], [1, 1], [])])["served_gold"] == 0.0  # zero gold is gold read, not none
    assert served([Traffic()]) == {"candidates_per_request": None, "adaptive": {}, "candidates_per_request_by_rule": {},
                                   "served_gold": None, "served_gold_ci95": None}  # fmt: skip
    merged = Traffic()
    merged.merge(a)
    merged.merge(b)
    assert served([merged]) == got


def test_goals_pair_rounds_with_the_start_per_seed_and_prompt() -> None:
    start = measurement([0.5, 0.5], bon2=[0.6, 0.7], bon4=[0.8, 0.9])
    run = Run("rm", 0, 0.0, start, [record(1, measurement([0.7, 0.8], version="v0001")),
                                    record(2, measurement([0.6, 0.9], version="v0002"))])  # fmt: skip
    g = goals([run])
    by_round = g["n1_vs_start_bon2"]["by_round"]
    assert by_round[0]["estimate"] == pytest.approx(0.1)  # (0.7-0.6 + 0.8-0.7) / 2
    assert by_round[1]["estimate"] == pytest.approx(0.1)
    change = g["n1_vs_start_bon2"]["change_from_previous_round"]
    assert change[1]["estimate"] == pytest.approx(0.0)  # (0.6-0.7 + 0.9-0.8) / 2: did not fall
    assert g["n1_vs_start_bon2"]["met"]
    assert g["final_n1_vs_start_bon4"]["estimate"] == pytest.approx(-0.1)
    assert not g["final_n1_vs_start_bon4"]["met"]
    falling = Run("rm", 0, 0.0, start, [record(1, measurement([0.8, 0.9, 0.8])), record(2, measurement([0.7, 0.8, 0.7]))])
    falling.start = measurement([0.5, 0.5, 0.5], bon2=[0.6, 0.7, 0.6])
    assert not goals([falling])["n1_vs_start_bon2"]["met"]  # above best-of-2 but fell between rounds (every prompt)
    noisy = Run("rm", 0, 0.0, falling.start, [record(1, measurement([0.8, 0.9, 0.8])),
                                              record(2, measurement([0.9, 0.7, 0.8]))])  # fmt: skip
    assert goals([noisy])["n1_vs_start_bon2"]["met"]  # a lower mean within noise is not a fall


def test_the_goals_by_round_three_and_five_need_the_round_and_no_fall() -> None:
    start = measurement([0.5, 0.5], bon2=[0.6, 0.6], bon4=[0.7, 0.7])
    climbing = [measurement([0.55, 0.56]), measurement([0.65, 0.66]), measurement([0.7, 0.71])]
    run = Run("thumbs", 0, 0.2, start, [record(k + 1, m) for k, m in enumerate(climbing)])
    g = goals([run])
    assert g["n1_vs_start_bon4_by_round3"]["by_round"][2]["estimate"] == pytest.approx(0.005)
    assert g["n1_vs_start_bon4_by_round3"]["met"]
    assert not g["n1_vs_start_bon2"]["met"]  # round 1 (0.555) is below best-of-2 (0.6)
    assert not g["n1_vs_start_bon2"]["met_with_interval"]
    assert "n1_vs_start_bon8_by_round5" not in g  # the start was not measured at best-of-8 here
    short = Run("thumbs", 0, 0.2, start, [record(k + 1, m) for k, m in enumerate(climbing[:2])])
    assert not goals([short])["n1_vs_start_bon4_by_round3"]["met"]  # no round 3
    dip = [measurement([0.75, 0.75, 0.75]), measurement([0.7, 0.7, 0.7]), measurement([0.8, 0.8, 0.8])]
    low_start = measurement([0.5] * 3, bon2=[0.6] * 3, bon4=[0.7] * 3)
    fell = Run("thumbs", 0, 0.2, low_start, [record(k + 1, m) for k, m in enumerate(dip)])
    assert not goals([fell])["n1_vs_start_bon4_by_round3"]["met"]  # round 2 fell on every prompt
    above = Run("rm", 0, 0.0, measurement([0.5] * 3, bon2=[0.6, 0.61, 0.6]), [record(1, measurement([0.7, 0.72, 0.71]))])
    assert goals([above])["n1_vs_start_bon2"]["met_with_interval"]


def test_warnings_flag_reward_hacking_length_kl_and_refusals_on_evidence() -> None:
    start = measurement([0.6, 0.62, 0.58, 0.6], rm=1.0, length=10.0, spread=0.01)
    gamed = measurement([0.5, 0.52, 0.48, 0.5], rm=1.5, length=20.0, kl=12.0, version="v0001", spread=0.01)
    watched = {"firing": True, "version": "v0001", "reasons": ["length: answers 2.0x"]}
    run = Run("rm", 3, 0.0, start, [record(1, gamed), RoundRecord(2, gamed, "v0001", 80, "refused", Traffic(),
                                                                   gate={"reason": "reward fell"}, watch=watched)])  # fmt: skip
    found = warnings([run])
    assert any("being gamed" in w and "round 1" in w and "paired per prompt" in w for w in found)
    assert any("grew" in w for w in found)
    assert any("KL to the starting policy 12.00 ± 1.20 nats" in w for w in found)  # 9.0 ± 0.9 would be within 2 s.e.
    assert any("refused" in w and "reward fell" in w for w in found)
    assert any("watch fired about v0001: length: answers 2.0x" in w for w in found)
    honest = Run("rm", 3, 0.0, start, [record(1, measurement([0.7, 0.72, 0.68, 0.7], rm=1.5, spread=0.01))])
    assert warnings([honest]) == []
    # what the old rule flagged: the score up a little, gold down 0.02, both within noise: no warning now
    noisy = measurement([0.7, 0.5, 0.62, 0.5], rm=1.02, length=10.5, spread=0.3)
    assert warnings([Run("rm", 3, 0.0, start, [record(1, noisy)])]) == []


def test_between_arms_pairs_each_later_arm_with_an_earlier_one_per_seed_and_prompt() -> None:
    def run(arm: str, seed: int, n1: list[list[float]]) -> Run:
        return Run(arm, seed, 0.2, measurement([0.5, 0.5]), [record(k + 1, measurement(v)) for k, v in enumerate(n1)])

    runs = [
        run("thumbs", 0, [[0.6, 0.7], [0.7, 0.8]]),
        run("thumbs", 1, [[0.6, 0.6], [0.6, 0.6]]),
        run("grpo", 0, [[0.7, 0.7], [0.9, 0.8], [0.9, 0.9]]),  # a third round thumbs did not run: not compared
        run("grpo", 1, [[0.6, 0.8], [0.7, 0.9]]),
        run("grpo", 2, [[0.1, 0.1], [0.1, 0.1]]),  # a seed thumbs did not run: not compared
    ]
    [pair] = between_arms(runs)
    assert pair["arms"] == ["thumbs", "grpo"]
    assert pair["seeds"] == [0, 1]
    assert pair["start"]["estimate"] == pytest.approx(0.0)
    assert [r["round"] for r in pair["rounds"]] == [1, 2]
    first, second = (r["n1_gold_diff"] for r in pair["rounds"])
    assert first["estimate"] == pytest.approx((0.1 + 0.0 + 0.0 + 0.2) / 4)
    assert first["units"] == 4
    assert second["estimate"] == pytest.approx((0.2 + 0.0 + 0.1 + 0.3) / 4)
    assert second["ci95"] == pytest.approx(list(mean_ci([0.2, 0.0, 0.1, 0.3]).ci95), abs=1e-4)  # over units, not seeds
    other = Run("rm", 0, 0.0, measurement([0.5, 0.5, 0.5]), [record(1, measurement([0.6, 0.6, 0.6]))])
    lonely = Run("rm", 9, 0.0, measurement([0.5, 0.5]), [])
    assert between_arms([other, runs[0]])[0]["skipped"] == "held-out prompts differ in number ([2, 3])"
    assert between_arms([lonely, runs[0]])[0]["skipped"] == "no seed in common"


def test_arm_report_has_the_issue_fields_and_pools_seeds(tmp_path: Path) -> None:
    runs = [
        Run(
            "thumbs",
            s,
            0.2,
            measurement([0.5, 0.6], bon2=[0.6, 0.6], bon4=[0.7, 0.7]),
            [record(1, measurement([0.6 + s / 10, 0.7], kl=0.3 * (s + 1), version="v0001"))],
        )
        for s in range(3)
    ]
    report = arm_report(runs)
    assert report["arm"] == "thumbs"
    assert report["thumb_rate"] == 0.2
    assert report["seeds"] == [0, 1, 2]
    assert report["start_bon_gold"] == {"1": 0.55, "2": 0.6, "4": 0.7}
    [first] = report["rounds"]
    assert first["n1_gold"] == pytest.approx((0.6 + 0.7 + 0.7 + 0.7 + 0.8 + 0.7) / 6, abs=1e-4)
    assert first["n1_gold_ci95"][0] < first["n1_gold"] < first["n1_gold_ci95"][1]
    assert first["policy_version"] == "v0001"
    assert first["kl_to_start"] == pytest.approx(0.6)  # mean of 0.3, 0.6, 0.9
    assert first["kl_to_start_stderr"] == pytest.approx((0.03**2 + 0.06**2 + 0.09**2) ** 0.5 / 3, abs=1e-4)
    assert report["final_n1_gold"] == first["n1_gold"]
    assert first["thumbs_used"] == 0
    assert first["rm_accuracy"] is None  # the constructed measurements have none
    assert first["gate_primary"] == []
    assert report["gate_vs_gold"]["trials"] == 0
    assert len(report["per_seed"]) == 3
    png = tmp_path / "loop.png"
    plot([report, {**report, "arm": "rm", "thumb_rate": 0.0}], png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_arm_report_counts_the_gates_agreement_with_gold_over_its_trials() -> None:
    def gated(k: int, action: str, diff: list[float], agrees: bool | None) -> RoundRecord:
        gold = {"canary_answers": 100, "current_answers": 100, "gold_diff": diff, "significant": agrees is not None,
                "agrees": agrees}  # fmt: skip
        gate = {"action": action, "primary": "thumbs", "reason": "", "gold": gold}
        return RoundRecord(k, measurement([0.6, 0.6]), "base", 10, "trained", Traffic(), gate=gate, thumbs_used=40)

    rounds = [gated(1, "promote", [0.1, 0.05, 0.15], True), gated(2, "rollback", [0.0, -0.1, 0.1], None),
              gated(3, "rollback", [0.1, 0.05, 0.15], False)]  # fmt: skip
    report = arm_report([Run("thumbs", 0, 0.2, measurement([0.5, 0.5]), rounds)])
    assert report["gate_vs_gold"]["trials"] == 3
    assert report["gate_vs_gold"]["significant"] == 2
    assert report["gate_vs_gold"]["share"] == 0.5
    assert [r["gate_primary"] for r in report["rounds"]] == [["thumbs"]] * 3
    assert [r["gate_agrees_with_gold"] for r in report["rounds"]] == [[True], [None], [False]]
    assert report["rounds"][0]["thumbs_used"] == 40
    assert report["rounds"][0]["thumbs_up_rate"] is None  # the constructed traffic has no thumbs
