"""The evaluate-loop's report: per arm over seeds, the goals with paired intervals, warnings, and the plot.

Knows how runs (one arm, one seed: the start measurement and one per round) become the JSON
the issue asks for (``start_bon_gold``, ``rounds``, ``final_n1_gold``, ``arm``,
``thumb_rate``, ``seeds``, ``goals``, ``warnings``), how goals are judged (differences paired
per seed and held-out prompt, a normal 95% interval over those units), arms against each
other on the same units, what counts as a warning sign, each on evidence (reward-model score
up while gold falls, both significant: the reward model is being gamed; answers significantly
longer; KL beyond a bound; the trainer's watch firing) and how to draw it. Does no sampling or
training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from toyworld.evaluate import mean_ci, t975
from toyworld.loop.measure import Measurement
from toyworld.loop.trials import Judged, agreement
from toyworld.loop.user import Traffic

LENGTH_GROWTH = 1.3
KL_WARNING = 8.0


@dataclass
class RoundRecord:
    round: int
    measurement: Measurement
    policy_version: str
    pairs_used: int
    outcome: str
    """The round's outcome (trained, skipped) as the trainer printed it."""
    traffic: Traffic
    refit: dict[str, Any] | None = None
    """The reward-model refit after this round (``--refit-every``): its version and agreement figures."""
    seconds: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    """The canary trial of this round's version (``--canary-fraction``): the gate's action, what it judged on, its reason
    and figures, and the gold of what each arm served (``loop.trials``)."""
    thumbs_used: int = 0
    """Thumbed completions the round's training read (its own version's and, with ``trainer.history``, earlier ones')."""
    watch: dict[str, Any] | None = None
    """The trainer's reward-hacking watch after the round (``versioning.watch``: firing, version, reasons, checks)."""


@dataclass
class Run:
    arm: str
    seed: int
    thumb_rate: float
    start: Measurement
    rounds: list[RoundRecord] = field(default_factory=list)


def _r(x: float) -> float:
    return round(x, 4)


def _paired(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Mean of a − b over (seed, prompt) units, with its 95% interval."""
    diffs = [x - y for run_a, run_b in zip(a, b, strict=True) for x, y in zip(run_a, run_b, strict=True)]
    estimate = mean_ci(diffs)
    return {"estimate": _r(estimate.mean), "ci95": [_r(estimate.ci95[0]), _r(estimate.ci95[1])], "units": estimate.n}


def _pooled(values: Sequence[Sequence[float]]) -> tuple[float, list[float]]:
    estimate = mean_ci([v for run in values for v in run])
    return _r(estimate.mean), [_r(estimate.ci95[0]), _r(estimate.ci95[1])]


def arm_report(runs: Sequence[Run]) -> dict[str, Any]:
    """One arm over its seeds (every run has the same number of rounds)."""
    first = runs[0]
    ns = sorted(first.start.bon_gold)
    start_bon = {str(n): _r(fmean(run.start.bon_gold[n] for run in runs)) for n in ns}
    rounds = []
    for k in range(len(first.rounds)):
        at = [run.rounds[k] for run in runs]
        n1, ci = _pooled([r.measurement.per_prompt_n1 for r in at])
        versions = sorted({r.policy_version for r in at})
        thumbs, ups = sum(r.traffic.thumbs for r in at), sum(r.traffic.thumbs_up for r in at)
        rounds.append({
            "round": k + 1, "n1_gold": n1, "n1_gold_ci95": ci,
            "bon_gold": {str(n): _r(fmean(r.measurement.bon_gold[n] for r in at)) for n in ns},
            "rm_score": _r(fmean(r.measurement.rm_score for r in at)),
            "kl_to_start": _r(fmean(r.measurement.kl_to_start for r in at)),
            "kl_to_start_stderr": _r(math.sqrt(math.fsum(r.measurement.kl_to_start_stderr**2 for r in at)) / len(at)),
            "mean_len": _r(fmean(r.measurement.mean_len for r in at)),
            "pairs_used": _r(fmean(r.pairs_used for r in at)),
            "policy_version": versions[0] if len(versions) == 1 else versions,
            "thumbs": thumbs,
            "thumbs_up_rate": _r(ups / thumbs) if thumbs else None,
            "thumbs_used": _r(fmean(r.thumbs_used for r in at)),
            "rm_accuracy": _mean_or_none([r.measurement.rm_accuracy.mean for r in at if r.measurement.rm_accuracy]),
            "answers": sum(r.traffic.sent for r in at),
            **served([r.traffic for r in at]),
            "refits": [r.refit for r in at if r.refit is not None],
            "gate": [r.gate["action"] for r in at if r.gate is not None],
            "gate_primary": [r.gate.get("primary") or "reward" for r in at if r.gate is not None],
            "gate_agrees_with_gold": [(r.gate.get("gold") or {}).get("agrees") for r in at if r.gate is not None],
            "watch_firing": sum(1 for r in at if r.watch and r.watch.get("firing")),
        })  # fmt: skip
    start_n1, start_ci = _pooled([run.start.per_prompt_n1 for run in runs])
    return {
        "arm": first.arm,
        "thumb_rate": first.thumb_rate,
        "seeds": [run.seed for run in runs],
        "start_n1_gold": start_n1,
        "start_n1_gold_ci95": start_ci,
        "start_bon_gold": start_bon,
        "start_rm_score": _r(fmean(run.start.rm_score for run in runs)),
        "start_mean_len": _r(fmean(run.start.mean_len for run in runs)),
        "start_rm_accuracy": _mean_or_none([run.start.rm_accuracy.mean for run in runs if run.start.rm_accuracy]),
        "rounds": rounds,
        "final_n1_gold": rounds[-1]["n1_gold"] if rounds else start_n1,
        "goals": goals(runs),
        "gate_vs_gold": agreement([judged for run in runs for r in run.rounds if (judged := _judged(r)) is not None]),
        "warnings": warnings(runs),
        "per_seed": [_run_dict(run) for run in runs],
    }


def between_arms(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Each later arm against each earlier one (in the order the runs name them): N=1 gold of ``arms[1]`` minus
    ``arms[0]``'s at the start and per round, paired per seed and held-out prompt, over the seeds both ran and the rounds
    both finished. Every run of one ``--heldout`` measures the same held-out prompts in the same order, so the units
    pair. Arms whose measurements hold different numbers of prompts are not compared (``skipped`` says why)."""
    arms = list(dict.fromkeys(run.arm for run in runs))
    by = {(run.arm, run.seed): run for run in runs}
    out: list[dict[str, Any]] = []
    for i, first in enumerate(arms):
        for second in arms[i + 1 :]:
            seeds = sorted(s for a, s in by if a == first and (second, s) in by)
            entry: dict[str, Any] = {"arms": [first, second], "seeds": seeds}
            pairs = [(by[first, s], by[second, s]) for s in seeds]
            sizes = {len(run.start.per_prompt_n1) for pair in pairs for run in pair}
            if not pairs or len(sizes) != 1:
                entry["skipped"] = "no seed in common" if not pairs else f"held-out prompts differ in number ({sorted(sizes)})"
                out.append(entry)
                continue
            rounds = min(len(run.rounds) for pair in pairs for run in pair)
            entry["start"] = _paired([b.start.per_prompt_n1 for _, b in pairs], [a.start.per_prompt_n1 for a, _ in pairs])
            entry["rounds"] = [
                {"round": k + 1, "n1_gold_diff": _paired([b.rounds[k].measurement.per_prompt_n1 for _, b in pairs],
                                                         [a.rounds[k].measurement.per_prompt_n1 for a, _ in pairs])}
                for k in range(rounds)
            ]  # fmt: skip
            out.append(entry)
    return out


def served(traffic: Sequence[Traffic]) -> dict[str, Any]:
    """What the round's traffic was served (by the version before the round, and during a trial by the canary too):
    candidates generated per answered request (the compute dividend: it falls as adaptive N sees the best-of-N gain
    shrink), the answers by the adaptive rule that chose their N and their candidates per request (``spread``: where
    the rule chose, past a new version's ``cold`` start), and the mean gold of the answers with its 95%
    interval (a t-interval from the sums; prompts differ between rounds, so rounds compare unpaired)."""
    t = Traffic()
    for part in traffic:
        t.merge(part)
    out: dict[str, Any] = {
        "candidates_per_request": _r(t.candidates / t.answered) if t.answered else None,
        "adaptive": dict(sorted(t.adaptive.items())),
        "candidates_per_request_by_rule": {reason: _r(t.adaptive_candidates[reason] / t.adaptive[reason])
                                           for reason in sorted(t.adaptive) if reason in t.adaptive_candidates},
        "served_gold": None, "served_gold_ci95": None,
    }  # fmt: skip
    if t.golds >= 2:
        mean = t.gold_sum / t.golds
        spread = max(t.gold_squares - t.golds * mean * mean, 0.0) / (t.golds - 1)
        half = t975(t.golds - 1) * math.sqrt(spread / t.golds)
        out.update(served_gold=_r(mean), served_gold_ci95=[_r(mean - half), _r(mean + half)])
    return out


def _mean_or_none(values: Sequence[float]) -> float | None:
    return _r(fmean(values)) if values else None


def _judged(record: RoundRecord) -> Judged | None:
    gold = (record.gate or {}).get("gold")
    if not gold:
        return None
    return Judged(gold["canary_answers"], gold["current_answers"], tuple(gold["gold_diff"]), gold["significant"],
                  gold["agrees"])  # fmt: skip


def goals(runs: Sequence[Run]) -> dict[str, Any]:
    """The loop's goals, for any arm, paired per seed and held-out prompt: N=1 gold against the start's best-of-2 from
    round 1 (point estimates, and with the whole interval above), against its best-of-4 by round 3 and its best-of-8 by
    round 5 (the stretch), each also needing that no round is significantly below the one before; and the final round
    against the start's best-of-4."""
    out: dict[str, Any] = {}
    if not runs[0].rounds:
        return out
    rounds = len(runs[0].rounds)
    n1 = [[run.rounds[k].measurement.per_prompt_n1 for run in runs] for k in range(rounds)]
    previous = [[run.start.per_prompt_n1 for run in runs], *n1[:-1]]
    changes = [_paired(n1[k], previous[k]) for k in range(rounds)]
    never_fell = all(c["ci95"][1] >= 0 for c in changes)

    def start_bon(n: int) -> list[dict[str, Any]] | None:
        if n not in runs[0].start.per_prompt_bon:
            return None
        bon = [run.start.per_prompt_bon[n] for run in runs]
        return [_paired(n1[k], bon) for k in range(rounds)]

    vs_bon2, vs_bon4, vs_bon8 = start_bon(2), start_bon(4), start_bon(8)
    if vs_bon2 is not None:
        out["n1_vs_start_bon2"] = {
            "by_round": vs_bon2,
            "change_from_previous_round": changes,
            "met": all(d["estimate"] >= 0 for d in vs_bon2) and all(c["ci95"][1] >= 0 for c in changes[1:]),
            "met_with_interval": all(d["ci95"][0] > 0 for d in vs_bon2) and never_fell,
            "rule": "every round's N=1 gold >= the start's best-of-2 (point estimate; met_with_interval: the whole 95% "
            "interval above it, and round 1 not below the start either) and no round significantly below the one before "
            "(the change's 95% interval reaches 0; a refused round re-measures the same version, whose point estimate "
            "moves by sampling noise alone); intervals paired per seed and held-out prompt",
        }
    for n, by_round, at in ((4, vs_bon4, 3), (8, vs_bon8, 5)):
        if by_round is not None:
            reached = rounds >= at and by_round[at - 1]["estimate"] >= 0
            out[f"n1_vs_start_bon{n}_by_round{at}"] = {
                "by_round": by_round, "met": reached and never_fell,
                "rule": f"round {at}'s N=1 gold >= the start's best-of-{n} (point estimate) and no round significantly "
                "below the one before",
            }  # fmt: skip
    if vs_bon4 is not None:
        final = vs_bon4[-1]
        out["final_n1_vs_start_bon4"] = {**final, "met": final["estimate"] >= 0, "rule": "final N=1 gold >= start best-of-4"}
    return out


def warnings(runs: Sequence[Run]) -> list[str]:
    """Warning signs, each on evidence: the reward-model score rose while gold fell (both paired per held-out prompt
    against the round before, each 95% interval excluding 0); answers significantly longer than ``LENGTH_GROWTH`` x the
    start's; KL beyond ``KL_WARNING`` by two standard errors; a refused or skipped round; the trainer's watch firing."""
    found = []
    for run in runs:
        previous = run.start
        for record in run.rounds:
            m = record.measurement
            where = f"{run.arm} seed {run.seed} round {record.round}"
            gamed = _gamed(previous, m)
            if gamed is not None:
                found.append(f"{where}: reward-model score rose {gamed[0]} while N=1 gold fell {gamed[1]} (paired per "
                             "prompt): the reward model is being gamed")  # fmt: skip
            longer = _longer(run.start, m)
            if longer is not None:
                found.append(f"{where}: answers grew to {m.mean_len:.1f} tokens from {run.start.mean_len:.1f} at the start "
                             f"({longer})")  # fmt: skip
            if m.kl_to_start - 2 * m.kl_to_start_stderr > KL_WARNING:
                found.append(f"{where}: KL to the starting policy {m.kl_to_start:.2f} ± {m.kl_to_start_stderr:.2f} nats "
                             f"exceeds {KL_WARNING}")  # fmt: skip
            if record.outcome == "refused" and record.gate is not None:
                found.append(f"{where}: the canary gate refused the round ({record.gate['reason']}); "
                             f"{record.policy_version} kept serving")  # fmt: skip
            elif record.outcome != "trained":
                found.append(f"{where}: the round was {record.outcome}; {record.policy_version} kept serving")
            if record.watch and record.watch.get("firing"):
                found.append(f"{where}: the reward-hacking watch fired about {record.watch.get('version')}: "
                             f"{'; '.join(record.watch.get('reasons', []))}")  # fmt: skip
            previous = m
    return found


def _significant(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float] | None:
    """Mean of a − b with its 95% interval, when it excludes 0 (None otherwise, or without data)."""
    if len(a) != len(b) or len(a) < 2:
        return None
    estimate = mean_ci([x - y for x, y in zip(a, b, strict=True)])
    low, high = estimate.ci95
    return (estimate.mean, low, high) if low > 0 or high < 0 else None


def _gamed(before: Measurement, after: Measurement) -> tuple[str, str] | None:
    if before.per_prompt_rm is None or after.per_prompt_rm is None:
        return None
    rm = _significant(after.per_prompt_rm, before.per_prompt_rm)
    gold = _significant(after.per_prompt_n1, before.per_prompt_n1)
    if rm is None or gold is None or rm[0] < 0 or gold[0] > 0:
        return None
    return f"{rm[0]:+.3f} [{rm[1]:+.3f}, {rm[2]:+.3f}]", f"{gold[0]:+.3f} [{gold[1]:+.3f}, {gold[2]:+.3f}]"


def _longer(start: Measurement, now: Measurement) -> str | None:
    if start.per_prompt_len is None or now.per_prompt_len is None:
        return None
    grown = _significant(now.per_prompt_len, [LENGTH_GROWTH * x for x in start.per_prompt_len])
    if grown is None or grown[0] < 0:
        return None
    return f"{grown[0]:+.1f} [{grown[1]:+.1f}, {grown[2]:+.1f}] tokens beyond {LENGTH_GROWTH}x, paired per prompt"


def _measurement_dict(m: Measurement) -> dict[str, Any]:
    return {
        "policy_version": m.version, "rm_version": m.rm_version, "n1_gold": _r(m.n1_gold.mean),
        "n1_gold_ci95": [_r(m.n1_gold.ci95[0]), _r(m.n1_gold.ci95[1])],
        "bon_gold": {str(n): _r(v) for n, v in m.bon_gold.items()}, "rm_score": _r(m.rm_score),
        "kl_to_start": _r(m.kl_to_start), "kl_to_start_stderr": _r(m.kl_to_start_stderr), "mean_len": _r(m.mean_len),
        "rm_accuracy": m.rm_accuracy.as_dict() if m.rm_accuracy is not None else None,
    }  # fmt: skip


def _run_dict(run: Run) -> dict[str, Any]:
    return {
        "seed": run.seed,
        "start": _measurement_dict(run.start),
        "rounds": [
            {
                "round": r.round,
                **_measurement_dict(r.measurement),
                "pairs_used": r.pairs_used,
                "thumbs_used": r.thumbs_used,
                "watch": r.watch,
                "outcome": r.outcome,
                "answers": r.traffic.sent,
                "failed": r.traffic.failed,
                **served([r.traffic]),
                "thumbs_up": r.traffic.thumbs_up,
                "thumbs_down": r.traffic.thumbs_down,
                "refit": r.refit,
                "gate": r.gate,
                "seconds": {k: _r(v) for k, v in r.seconds.items()},
            }
            for r in run.rounds
        ],
    }


def plot(arms: Sequence[dict[str, Any]], path: Path) -> None:
    """Three panels: N=1 gold and reward-model score per round; best-of-N curves (start and last round); KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, bon_ax, kl_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    rm_ax = gold_ax.twinx()
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for colour, arm in zip(colours, arms, strict=False):
        label = f"{arm['arm']} (thumbs {arm['thumb_rate']:.0%})"
        xs = [0] + [r["round"] for r in arm["rounds"]]
        gold = [arm["start_n1_gold"]] + [r["n1_gold"] for r in arm["rounds"]]
        low = [arm["start_n1_gold_ci95"][0]] + [r["n1_gold_ci95"][0] for r in arm["rounds"]]
        high = [arm["start_n1_gold_ci95"][1]] + [r["n1_gold_ci95"][1] for r in arm["rounds"]]
        gold_ax.plot(xs, gold, "o-", color=colour, label=f"N=1 gold, {label}")
        gold_ax.fill_between(xs, low, high, color=colour, alpha=0.15)
        rm_ax.plot(xs, [arm["start_rm_score"]] + [r["rm_score"] for r in arm["rounds"]], "s--", color=colour, alpha=0.6,
                   label=f"RM score, {label}")  # fmt: skip
        ns = [int(n) for n in arm["start_bon_gold"]]
        bon_ax.plot(ns, [arm["start_bon_gold"][str(n)] for n in ns], "o--", color=colour, alpha=0.5, label=f"start, {label}")
        if arm["rounds"]:
            last = arm["rounds"][-1]
            bon_ax.plot(ns, [last["bon_gold"][str(n)] for n in ns], "o-", color=colour, label=f"round {last['round']}, {label}")
        kl_ax.errorbar(xs, [0.0] + [r["kl_to_start"] for r in arm["rounds"]], fmt="o-", color=colour, label=label, capsize=3,
                       yerr=[0.0] + [2 * r["kl_to_start_stderr"] for r in arm["rounds"]])  # fmt: skip
    if arms:
        for n, style in (("2", ":"), ("4", "-.")):
            if n in arms[0]["start_bon_gold"]:
                gold_ax.axhline(
                    arms[0]["start_bon_gold"][n], color="grey", linestyle=style, label=f"start best-of-{n} ({arms[0]['arm']})"
                )
    gold_ax.set(title="Held-out gold at N=1 (band: 95% CI) and RM score", xlabel="round", ylabel="gold reward")
    rm_ax.set_ylabel("reward-model score")
    bon_ax.set(title="Best-of-N gold (RM picks)", xlabel="N", ylabel="gold reward", xscale="log")
    if arms:
        ns = [int(n) for n in arms[0]["start_bon_gold"]]
        bon_ax.set_xticks(ns, [str(n) for n in ns])
    kl_ax.set(title="KL to the starting policy (bars: ± 2 s.e.)", xlabel="round", ylabel="nats per response")
    rounds = list(range(max((len(arm["rounds"]) for arm in arms), default=0) + 1))
    gold_ax.set_xticks(rounds)
    kl_ax.set_xticks(rounds)
    bon_ax.minorticks_off()
    handles, labels = gold_ax.get_legend_handles_labels()
    more, more_labels = rm_ax.get_legend_handles_labels()
    gold_ax.legend(handles + more, labels + more_labels, fontsize=7, loc="lower right")
    bon_ax.legend(fontsize=7)
    kl_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
