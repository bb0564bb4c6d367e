"""The online loop, run end to end against the hidden gold reward: traffic → log → round → hot-swap → measure.

For each arm (``rm``: the reward model's picks only; ``thumbs``: plus a simulated user's
thumbs on a stated share of answers, and a reward-model refit every K rounds; ``grpo``: the
thumbs arm's traffic, trained with ``--algo grpo`` on the served groups) and each seed, a
fresh run: its own registry, log and gateway (``python -m gateway serve``, started through
``toyworld.loop.sealed`` so it cannot import the gold reward), all on one vLLM
(started here, or ``--vllm URL``; adapters of a finished run are unloaded so versions of
the next run, named alike, are loaded fresh). A run measures the start policy, then each
round: the simulated user asks the next training prompts through the gateway (thumbing
some), the round is trained by ``python -m trainer run`` (sealed too), the gateway
swaps the new version in, and it is measured on the held-out prompts (``loop.measure``).
Training prompts and held-out prompts are the bootstrap's disjoint sets
(``toyworld.world.prompt_sets``). Knows the orchestration and the run's config; starting and
stopping the processes is ``loop.processes``'s, the statistics ``loop.report``'s.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.canary import recorded
from toyworld.loop import measure, records
from toyworld.loop.processes import (
    GatewayProcess,
    LoopError,
    raise_terminated,
    run_trainer,
    start_gateway,
    start_vllm,
    terminable,
    unload_adapters,
)
from toyworld.loop.report import RoundRecord, Run, served
from toyworld.loop.trials import judge, served_gold
from toyworld.loop.user import Judgement, SimulatedUser, Traffic
from versioning import watch
from versioning.registry import Kind, Pointer, Registry

API_KEY = "sk-simulated-user"
ARMS = ("rm", "thumbs", "grpo")
THUMB_ARMS = ("thumbs", "grpo")
"""Arms whose simulated user thumbs answers (and whose reward model ``--refit-every`` refits)."""
ALGORITHM = {"grpo": "grpo"}
"""Arms that train with another algorithm than the config's: ``grpo`` learns from the served groups themselves."""


@dataclass
class LoopOptions:
    config: Path
    rounds: int = 3
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    thumb_rate: float = 0.2
    thumb_noise: float = 0.1
    refit_every: int = 0
    """Thumbs arm: refit the reward model after every K-th round (0: never)."""
    prompts_per_round: int = 384
    heldout: int = 200
    samples: int = 8
    """Samples per held-out prompt (best-of-N for N up to this)."""
    max_tokens: int = 64
    concurrency: int = 8
    out: Path = Path("runs/evaluate-loop")
    vllm_url: str | None = None
    canary_fraction: float = 0.0
    """Publish each round as a canary answering this share of users and let the gateway's gate promote or refuse it
    on live traffic (more training prompts, thumbed at the same rate, until it decides); 0: publish to current."""
    gate_min_requests: int = 100
    """The gate's ``canary.min_requests`` (its looks at 1x, 2x, 4x this)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted keys of the run config set after the loop's own (``trainer.dpo.learning_rate`` -> 1e-3); a key
    ``ARM:dotted.key`` applies to that arm's runs only."""
    timeout_s: float = 900.0
    """Longest wait for one step (a gateway start, a swap, a round)."""
    log: Callable[[str], None] = field(default=lambda message: print(f"[evaluate-loop] {message}", flush=True))


def toy_prompts(models_dir: Path, heldout: int) -> tuple[list[str], list[str]]:
    """The bootstrap's training stream and its first ``heldout`` held-out prompts (never in the stream)."""
    from toyworld.bootstrap import PRESETS, REPORT
    from toyworld.world import prompt_sets

    report_path = models_dir / REPORT
    try:
        report = json.loads(report_path.read_text())
        preset = PRESETS[report["preset"]]
        seed = int(report["seed"])
    except (OSError, ValueError, KeyError) as exc:
        raise LoopError(
            f"cannot read the toy world's bootstrap report {report_path} ({exc}); the loop needs the toy world"
        ) from None
    sets = prompt_sets(seed, preset.train_draws, preset.heldout)
    if heldout > len(sets.heldout):
        raise LoopError(f"--heldout {heldout}: the {preset.name} preset holds out {len(sets.heldout)} prompts")
    return [t.prompt for t in sets.train], [t.prompt for t in sets.heldout[:heldout]]


class Loop:
    def __init__(self, options: LoopOptions) -> None:
        from gateway.settings import read_yaml

        self.o = options
        self.base = read_yaml(options.config)
        managed = self.base.get("managed_vllm", {})
        self.policy_dir = Path(managed.get("model_dir", "models/default/policy"))
        self.served_name = str(managed.get("served_name", "policy"))
        self.base_policy = Path(self.base.get("trainer", {}).get("base_policy", self.policy_dir))
        self.model_alias = str(self.base.get("model_alias", "toy-bon"))

    # ---- the whole loop ----
    def run(self) -> list[Run]:
        train, heldout = toy_prompts(self.policy_dir.parent, self.o.heldout)
        self.o.out.mkdir(parents=True, exist_ok=True)
        vllm = None
        url = self.o.vllm_url
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, raise_terminated) if main else None
        runs = []
        try:
            if url is None:
                vllm = start_vllm(self.base.get("managed_vllm", {}), self.o.out / "vllm.log", self.o.log)
                url = vllm.url
            for arm in self.o.arms:
                for seed in self.o.seeds:
                    runs.append(asyncio.run(terminable(self._run(arm, seed, url, train, heldout))))
        finally:
            if vllm is not None:
                vllm.stop()
            if main:
                signal.signal(signal.SIGTERM, previous)
        return runs

    # ---- one run ----
    async def _run(self, arm: str, seed: int, vllm: str, train: list[str], heldout: list[str]) -> Run:
        run_dir = self.o.out / f"{arm}-seed{seed}"
        if run_dir.exists():
            raise LoopError(f"{run_dir} exists: each run starts from an empty log and registry (choose another --out)")
        (run_dir / "registry").mkdir(parents=True)
        thumb_rate = self.o.thumb_rate if arm in THUMB_ARMS else 0.0
        config = self._write_config(run_dir, vllm, seed, arm)
        stream = itertools.cycle(random.Random(seed).sample(train, k=len(train)))
        # idle connections are dropped before the gateway's server (uvicorn, 5 s) closes them: no reuse races
        connector = aiohttp.TCPConnector(keepalive_timeout=2.0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
            await unload_adapters(session, vllm, self.served_name)
            gateway = await start_gateway(session, run_dir, config, self.o.timeout_s)
            try:
                self.o.log(f"{arm} seed {seed}: measuring the starting policy on {len(heldout)} held-out prompts")
                start = await self._measure(session, gateway.url, run_dir, heldout, seed)
                self.o.log(f"{arm} seed {seed} start: N=1 gold {start.n1_gold.mean:.3f}, "
                           f"BoN {', '.join(f'{n}:{v:.3f}' for n, v in start.bon_gold.items())}, RM {start.rm_score:.3f}, "
                           f"len {start.mean_len:.1f}")  # fmt: skip
                result = Run(arm, seed, thumb_rate, start)
                records.save(result, run_dir)
                user = SimulatedUser(session, gateway.url, API_KEY, self.model_alias,
                                     Judgement(rate=thumb_rate, noise=self.o.thumb_noise), seed)  # fmt: skip
                sent = 0
                for k in range(1, self.o.rounds + 1):
                    record = await self._round(session, gateway, run_dir, config, user, stream, k, sent, heldout, seed, arm)
                    sent += record.traffic.sent - record.traffic.failed
                    result.rounds.append(record)
                    records.save(result, run_dir)
                    m, got = record.measurement, served([record.traffic])
                    spread = ""
                    if (chose := got["candidates_per_request_by_rule"].get("spread")) is not None:
                        spread = f" ({chose:.2f} where the spread rule chose)"
                    self.o.log(
                        f"{arm} seed {seed} round {k}: {record.policy_version} N=1 gold {m.n1_gold.mean:.3f}, "
                        f"BoN {', '.join(f'{n}:{v:.3f}' for n, v in m.bon_gold.items())}, RM {m.rm_score:.3f}, "
                        f"KL {m.kl_to_start:.2f} ± {m.kl_to_start_stderr:.2f}, len {m.mean_len:.1f}, pairs {record.pairs_used}; "
                        f"the round's traffic: {got['candidates_per_request'] or 0:.2f} candidates per request{spread}, "
                        f"served gold {got['served_gold'] or 0:.3f}"
                    )
            finally:
                await gateway.stop()
                await unload_adapters(session, vllm, self.served_name)
        measured = [("start", result.start)] + [(f"round{r.round}", r.measurement) for r in result.rounds]
        per_prompt = {
            name: {"version": m.version, "bon": {str(n): v for n, v in m.per_prompt_bon.items()}} for name, m in measured
        }
        (run_dir / "measurements.json").write_text(json.dumps({"prompts": heldout, **per_prompt}))  # for re-analysis
        return result

    async def _round(
        self, session: aiohttp.ClientSession, gateway: GatewayProcess, run_dir: Path, config: Path, user: SimulatedUser,
        stream: Iterator[str], k: int, sent_before: int, heldout: list[str], seed: int, arm: str,
    ) -> RoundRecord:  # fmt: skip
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        prompts = list(itertools.islice(stream, self.o.prompts_per_round))
        traffic: Traffic = await user.converse(prompts, self.o.concurrency, self.o.max_tokens)
        if traffic.failed:
            raise LoopError(f"{traffic.failed} of {traffic.sent} requests failed in round {k}; see {gateway.log_path}")
        await self._until(lambda: self._logged(run_dir) >= sent_before + traffic.sent, "the log to hold the round's traffic")
        seconds["traffic"] = time.perf_counter() - t
        t = time.perf_counter()
        outcome, output = await run_trainer(config, [], self.o.timeout_s)
        seconds["train"] = time.perf_counter() - t
        registry = Registry(run_dir / "registry")
        trained = self._pointer(registry, "policy", "canary" if self.o.canary_fraction else "current")
        gate = None
        if self.o.canary_fraction and outcome == "trained" and trained is not None:
            t = time.perf_counter()
            gate, more = await self._trial(gateway, run_dir, user, stream, trained)
            traffic.merge(more)
            seconds["trial"] = time.perf_counter() - t
            if gate["action"] != "promote":
                outcome = "refused"
        current = self._pointer(registry, "policy")
        version = current or "base"
        t = time.perf_counter()
        await self._until(lambda: self._serves_only(gateway.url, version), f"the gateway to serve {version} alone")
        seconds["swap"] = time.perf_counter() - t
        t = time.perf_counter()
        measured = await self._measure(session, gateway.url, run_dir, heldout, seed)
        seconds["measure"] = time.perf_counter() - t
        pairs = thumbs_used = 0
        if trained is not None and outcome in ("trained", "refused"):
            window = registry.manifest("policy", trained).data_window
            pairs = int(window.get("rows", window.get("pairs", 0)))
            thumbs_used = int(window.get("thumbs_used", 0))
        refit = None
        if arm in THUMB_ARMS and self.o.refit_every and k % self.o.refit_every == 0 and k < self.o.rounds:
            refit = await self._refit(run_dir, config, gateway)  # the next round's traffic is scored by the refit model
        self.o.log(f"{arm} seed {seed} round {k}: {output.strip().splitlines()[0] if output.strip() else outcome}")
        watching = asdict(watch.read(registry.root))
        return RoundRecord(k, measured, version, pairs, outcome, traffic, refit, seconds, gate, thumbs_used, watching)

    async def _trial(
        self, gateway: GatewayProcess, run_dir: Path, user: SimulatedUser, stream: Iterator[str], trial: str
    ) -> tuple[dict[str, Any], Traffic]:
        """Live traffic (the next training prompts) until the gateway's gate promotes or rolls back ``trial``."""
        await self._until(lambda: self._status(gateway.url)["canary"] == trial, f"the gateway to put {trial} on trial")
        total = Traffic()
        registry = Registry(run_dir / "registry")
        began = registry.pointer("policy", "canary")
        if began is None or began.version != trial:
            raise LoopError(f"{trial} left trial before any traffic")
        while self._pointer(registry, "policy", "canary") == trial:
            limit = await asyncio.to_thread(self._trial_limit, gateway.url)
            if total.sent >= limit:
                raise LoopError(f"the canary gate did not decide on {trial} after {total.sent} requests")
            batch = list(itertools.islice(stream, 4 * self.o.concurrency))
            total.merge(await user.converse(batch, self.o.concurrency, self.o.max_tokens))
            if total.failed:
                raise LoopError(f"{total.failed} requests failed during the trial of {trial}; see {gateway.log_path}")
            await asyncio.sleep(0.2)
        last = [look for look in recorded(registry.root) if look["canary"] == trial][-1]
        keys = ("canary", "current", "action", "reason", "look", "reward_diff", "up_rate_diff", "length_ratio", "primary")
        gate = {key: last.get(key) for key in keys}
        gate["answers"] = total.sent
        database = f"sqlite:///{run_dir / 'data' / 'gateway.db'}"
        arms = await asyncio.to_thread(served_gold, database, [trial, last["current"]], began.updated, float(last["at"]))
        judged = judge(last["action"], arms[trial], arms[last["current"]])
        gate["gold"] = judged.as_dict() if judged is not None else None
        verdict = "" if judged is None else (
            f"; served gold {judged.gold_diff[0]:+.3f} [{judged.gold_diff[1]:+.3f}, {judged.gold_diff[2]:+.3f}]"
            f"{'' if judged.agrees is None else ', the gate agreed with gold' if judged.agrees else ', gold disagreed'}"
        )  # fmt: skip
        self.o.log(f"canary {trial}: {last['action']} on {last.get('primary', 'reward')} after {total.sent} more answers "
                   f"({last['reason']}){verdict}")  # fmt: skip
        return gate, total

    def _trial_limit(self, url: str) -> int:
        """Requests after which a trial that has not ended is an error: past the gate's last planned look (the plan's
        answers per arm, from ``GET /admin/policy``, for the canary's share), else past 8x ``min_requests``."""
        floor = int(8 * self.o.gate_min_requests / self.o.canary_fraction)
        plan = (self._status(url).get("trial") or {}).get("plan") or {}
        needed = plan.get("answers_needed")
        if not isinstance(needed, int | float):
            return floor if plan.get("unit") != "thumbs" else 20 * floor  # thumbs: unknown until the first thumb arrives
        share = min(self.o.canary_fraction, 1 - self.o.canary_fraction) or 1.0
        return max(floor, int(2 * needed / share))

    async def _refit(self, run_dir: Path, config: Path, gateway: GatewayProcess) -> dict[str, Any]:
        registry = Registry(run_dir / "registry")
        before = self._pointer(registry, "reward_model")
        outcome, output = await run_trainer(config, ["--refit-reward-model"], self.o.timeout_s)
        after = self._pointer(registry, "reward_model")
        refit: dict[str, Any] = {"outcome": outcome, "rm_version": after}
        if after is not None and after != before:
            refit["evaluation"] = registry.manifest("reward_model", after).evaluation
            await self._until(lambda: self._served_rm(gateway.url) == after, f"the gateway to score with {after}")
        else:
            refit["message"] = output.strip().splitlines()[-1] if output.strip() else ""
        return refit

    # ---- measuring ----
    async def _measure(
        self, session: aiohttp.ClientSession, url: str, run_dir: Path, heldout: list[str], seed: int
    ) -> measure.Measurement:
        texts, rewards, versions, lengths = await measure.sample(
            session, url, API_KEY, self.model_alias, heldout, self.o.samples, self.o.max_tokens, self.o.concurrency
        )
        if len(versions) != 1:
            raise LoopError(f"held-out answers came from several versions ({', '.join(sorted(versions))}) during a measurement")
        version = versions.pop()
        version_dir = None if version == "base" else run_dir / "registry" / "policy" / "versions" / version
        kl = await asyncio.to_thread(measure.kl_to_start, self.base_policy, version_dir, heldout, self.o.max_tokens, seed)
        return measure.summarise(version, self._served_rm(url) or "?", heldout, texts, rewards, lengths, kl)

    # ---- processes ----
    # ---- the run's config ----
    def _write_config(self, run_dir: Path, vllm: str, seed: int, arm: str) -> Path:
        from gateway.auth import digest
        from gateway.vllm_process import free_port

        cfg = copy.deepcopy(self.base)
        registry = str((run_dir / "registry").resolve())
        cfg.update(host="127.0.0.1", port=free_port(), policy_version="base")
        cfg["managed_vllm"] = {**cfg.get("managed_vllm", {}), "enabled": False}
        cfg["backends"] = [{"url": vllm, "model": self.served_name}]
        cfg["api_keys"] = [{"id": "simulated-user", "sha256": digest(API_KEY)}]
        cfg["store"] = {**cfg.get("store", {}), "enabled": True, "url": None, "data_dir": str((run_dir / "data").resolve())}
        cfg["swap"] = {
            **cfg.get("swap", {}), "enabled": True, "registry_dir": registry, "poll_s": 1.0, "drain_s": 5.0,
            "max_live_adapters": 2, "lora_loading": "admin", "full": "refuse",
        }  # fmt: skip
        trainer = cfg.setdefault("trainer", {})
        publish_to = "canary" if self.o.canary_fraction else "current"
        trainer.update(registry_dir=registry, publish_to=publish_to, metrics_file=str((run_dir / "trainer.prom").resolve()))
        cfg["canary"] = {
            **cfg.get("canary", {}), "fraction": self.o.canary_fraction, "auto": True, "poll_s": 1.0,
            "min_requests": self.o.gate_min_requests, "looks": 3,
        }  # fmt: skip
        if arm in ALGORITHM:
            trainer["algorithm"] = ALGORITHM[arm]
        trainer["adapter"] = {**trainer.get("adapter", {}), "seed": seed}
        trainer["reward"] = {**trainer.get("reward", {}), "seed": seed}
        for key, value in self.o.overrides.items():
            only, _, dotted = key.rpartition(":")
            if only and only != arm:
                continue
            *parents, leaf = dotted.split(".")
            node = cfg
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        path = run_dir / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    # ---- reading state ----
    def _logged(self, run_dir: Path) -> int:
        from sqlalchemy import create_engine, text

        engine = create_engine(f"sqlite:///{run_dir / 'data' / 'gateway.db'}")
        try:
            with engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM completions")).scalar_one())
        finally:
            engine.dispose()

    @staticmethod
    def _pointer(registry: Registry, kind: Kind, name: Pointer = "current") -> str | None:
        return registry.version_at(kind, name)

    @staticmethod
    def _status(url: str) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{url}/admin/policy", timeout=10) as response:
            status: dict[str, Any] = json.loads(response.read())
        return status

    def _serves_only(self, url: str, version: str) -> bool:
        """Whether ``version`` answers every request (current, and no trial still routed: a measurement's requests
        would otherwise reach the canary for as long as the gateway has not noticed the trial's end)."""
        status = self._status(url)
        return bool(status["current"] == version and status["canary"] is None)

    @staticmethod
    def _served_rm(url: str) -> str | None:
        from gateway.metrics import scrape

        return next((s.labels["reward_model"] for s in scrape(url) if s.name == "bon_policy_version_info" and s.value == 1), None)

    async def _until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.o.timeout_s
        while not await asyncio.to_thread(condition):
            if time.monotonic() > deadline:
                raise LoopError(f"timed out after {self.o.timeout_s:.0f} s waiting for {what}")
            await asyncio.sleep(0.5)
