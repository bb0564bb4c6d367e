"""One chat completion, start to end: protocol → generate → score → select → log.

Knows the request's plan (how many candidates to generate and return, the token budget,
what best-of-N cannot honour), runs the stages in order with their timings, and hands the
record of every candidate to the log itself on every path (best-of-N, N=1, a relayed
stream; never waiting for the database; an N=1 answer is scored for the log after the
response). The OpenAI bodies and chunks of an outcome are ``gateway.responses``'. Routes
call it; it never sees HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from gateway import prune
from gateway.adaptive import Latency, Reason, Spread, kind_of
from gateway.degrade import ScorerPace, under_load, within_pace
from gateway.errors import DeadlineExceeded, InvalidRequest, LogUnavailable, ModelNotFound, ScorerFailed, ScorerUnavailable
from gateway.generate import Candidate, Generation, Generator
from gateway.ids import CompletionIds
from gateway.metrics import Metrics
from gateway.objectives import OBJECTIVES, Judge, Refusals, Weighted
from gateway.protocol import ChatCompletionRequest, passthrough, unknown_fields, uses_tools
from gateway.redact import Redactor
from gateway.routing import Route
from gateway.score import Conversation, Scorer
from gateway.select import select
from gateway.settings import GatewaySettings, LimitSettings, Selection
from gateway.store.logproc import LogUnavailable as NotKept
from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord, Record

log = logging.getLogger("gateway.service")
RECENT_IDS = 100_000
"""Completion ids remembered with their policy version, to label thumbs in metrics."""


class RecordSink(Protocol):
    def submit(self, record: Record) -> None:
        """Queue a record for the log; never blocks."""
        ...

    def persist(self, record: Record) -> None:
        """Keep a record durably before returning (blocking: called from a worker thread)."""
        ...


@dataclass
class Plan:
    """What the gateway will do for one validated request."""

    request: ChatCompletionRequest
    n_candidates: int
    n_return: int
    max_tokens: int
    body: dict[str, Any]
    """The fields vLLM receives (without model, n and streaming, which the generator sets)."""
    key_id: str
    completion_id: str
    policy_version: str = ""
    """The policy version that answers (the route's, fixed when the request is planned)."""
    models: dict[str, str] | None = None
    """The route's backend URL → model name (None: every backend under its configured name)."""
    created: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    degraded: str | None = None
    """Why N was lowered (``overload``: past ``limits.degrade_above`` requests in flight; ``scorer_slow``: the reward
    model's pace past ``scorer.degrade_above_ms``; both: comma-separated)."""
    used_tokens: int | None = None
    """Completion tokens generated, once known (every candidate's); what the key's token quota is charged."""
    deadline_s: float = float("inf")
    """The request's whole time (``deadline_ms``, else ``timeouts.deadline_s``)."""
    deadline: float = float("inf")
    """``time.monotonic()`` by which the answer must be ready."""
    selection: Selection = "best_of_n"
    """How the N>1 candidates are chosen (``prune``: the weakest aborted while they decode, ``gateway.prune``)."""
    kind: str | None = None
    """The request's kind for adaptive N (``gateway.adaptive``; None: adaptive N is off)."""
    adaptive: Reason | None = None
    """Which adaptive rule set N (None: N is the request's or the configured one)."""
    weights: dict[str, float] | None = None
    """The objectives' weights (``gateway.objectives``; None: the reward model's score alone)."""
    custom_weights: bool = False
    """``weights`` are the request's own, not the configured ones."""

    def left_s(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())

    @property
    def streaming(self) -> bool:
        return bool(self.request.stream)

    @property
    def include_usage(self) -> bool:
        options = self.request.stream_options
        return bool(options and options.include_usage)


@dataclass
class Outcome:
    generation: Generation
    rewards: list[float] | None
    chosen: list[int]
    rm_version: str | None = None
    """The reward model that gave ``rewards`` (the scorer may be swapped while a request runs)."""
    degraded: str | None = None
    """Why the answer is not best-of-N (``scorer_failed``, ``scorer_timeout``: ``scorer.on_failure`` fail_open)."""
    cancelled: bool = False
    """Not completed (the client left, or its stream broke off): logged with what was generated so far (maybe
    nothing), never trained on."""
    scores: list[dict[str, float] | None] | None = None
    """Each candidate's score per objective, when several make the reward (``gateway.objectives``)."""


def sticky_key(request: ChatCompletionRequest, key_id: str) -> str:
    """Who a canary trial keeps on one version: the end user when the client names one, else the API key."""
    return f"user:{request.user}" if request.user else f"key:{key_id}"


class ChatService:
    def __init__(
        self,
        settings: GatewaySettings,
        generator: Generator,
        scorer: Scorer | None,
        metrics: Metrics,
        ids: CompletionIds,
        sink: RecordSink | None = None,
        route: Callable[[str], Route] | None = None,
        judge: Judge | None = None,
        on_trial: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.judge = judge
        """The LLM judge of the ``judge`` objective (None: none configured)."""
        self.refusals = Refusals(settings.objectives.refusal_patterns)
        configured = settings.objectives
        self._configured_weights = {str(k): w for k, w in configured.weights.items() if w}
        """The configured objectives with a weight (read once: every request's plan compares with them)."""
        self._plain_weights = configured.plain
        self.generator = generator
        self.scorer = scorer
        self.metrics = metrics
        self.ids = ids
        self.sink = sink
        r = settings.store.redact
        self._redactor = Redactor(r.patterns, emails=r.emails, phones=r.phones, cards=r.cards) if r.enabled else None
        self.route = route
        """The hot-swap's route for a sticky key (``gateway.swap``: current or canary); None: the configured backends."""
        self.on_trial = on_trial
        """Whether a canary is on trial now (``gateway.swap``); None: never."""
        self._background: set[asyncio.Task[None]] = set()
        self._recent: OrderedDict[str, str] = OrderedDict()
        self.scorer_pace = ScorerPace()
        """The reward model's recent seconds per candidate (``scorer.degrade_above_ms`` lowers N by it)."""
        a = settings.adaptive
        self.spread = Spread(a.window, a.min_requests, a.keep_gain, a.explore, a.z, a.min_gain_per_candidate)
        """Adaptive N's recent best-of-N gains by policy version and kind."""
        self.latency = Latency(a.latency_horizon_s, a.latency_quantile)
        """Adaptive N's recent latency against N (a latency budget lowers N by it)."""

    # ---- protocol: validate and plan ----
    def plan(self, request: ChatCompletionRequest, key_id: str, in_flight: int = 0) -> Plan:
        """What to do for ``request``; ``in_flight``: requests running now (this one included), which may lower N
        (``limits.degrade_above``), as a slow reward model may (``scorer.degrade_above_ms``): ``gateway.degrade``."""
        s = self.settings
        if request.model != s.model_alias:
            raise ModelNotFound(
                f"The model '{request.model}' does not exist; this gateway serves '{s.model_alias}'", param="model"
            )
        if request.audio is not None or (request.modalities and "audio" in request.modalities):
            raise InvalidRequest("audio output is not supported: the model is text-only", param="modalities")
        if request.web_search_options is not None:
            raise InvalidRequest("web search is not supported by this gateway", param="web_search_options")
        if unknown := unknown_fields(request, s.vllm_fields):
            raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0], code="unknown_field")
        max_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = request.max_completion_tokens or request.max_tokens or s.default_max_tokens
        if max_tokens > s.max_tokens_limit:
            raise InvalidRequest(
                f"{max_param} {max_tokens} exceeds this gateway's limit of {s.max_tokens_limit}", param=max_param
            )
        _within_limits(request, s.limits)
        n_return = request.n or 1
        default_n = s.n_candidates if s.scoring_enabled else 1
        n_candidates = max(request.n_candidates or default_n, n_return)
        param = "n_candidates" if request.n_candidates is not None and request.n_candidates >= n_return else "n"
        if n_candidates > s.max_n_candidates:
            raise InvalidRequest(f"{param} {n_candidates} exceeds the maximum of {s.max_n_candidates} candidates", param=param)
        if n_candidates * max_tokens > s.limits.max_candidate_tokens:
            raise InvalidRequest(
                f"{param} {n_candidates} x max_tokens {max_tokens} = {n_candidates * max_tokens} tokens exceeds this gateway's "
                f"budget of {s.limits.max_candidate_tokens} per request", param=param, code="budget_exceeded",
            )  # fmt: skip
        if n_candidates > 1 and not s.scoring_enabled:
            raise InvalidRequest("scoring is disabled on this gateway, so it generates one candidate (n=1)", param=param)
        tool_field = uses_tools(request)
        if tool_field and n_candidates > 1:
            raise InvalidRequest(
                f"'{tool_field}' cannot be used with best-of-N: set n_candidates to 1 to call tools", param=tool_field
            )
        weights, custom_weights = self._weights(request)  # a 400 before adaptive N counts the request
        route = self.route(sticky_key(request, key_id)) if self.route is not None else None
        version = route.version if route is not None else s.policy_version
        kind, adapted = None, None
        if s.adaptive.enabled:
            chars = sum(len(m.text()) for m in request.messages)
            kind = kind_of((request.metadata or {}).get("task"), chars, s.adaptive.length_edges)
        if s.scoring_enabled and n_candidates > n_return:
            n_candidates, adapted = self._adapt(request, kind, version, n_candidates, n_return)
        reasons = []
        if (lowered := under_load(n_candidates, n_return, in_flight, s.limits.degrade_above)) < n_candidates:
            n_candidates = lowered
            reasons.append("overload")
        pace = self.scorer_pace.per_candidate_s()
        if (lowered := within_pace(n_candidates, n_return, pace, s.scorer.degrade_above_ms)) < n_candidates:
            n_candidates = lowered
            reasons.append("scorer_slow")
        for reason in reasons:
            self.metrics.degraded.labels(reason).inc()
        body = passthrough(request)
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = max_tokens
        models = route.models if route is not None else None
        plan = Plan(request, n_candidates, n_return, max_tokens, body, key_id, self.ids.new(key_id), version, models)
        plan.degraded = ",".join(reasons) or None
        plan.kind, plan.adaptive = kind, adapted
        plan.weights, plan.custom_weights = weights, custom_weights
        if n_candidates > 1:
            plan.selection = request.selection or s.selection
        asked = request.deadline_ms / 1000 if request.deadline_ms is not None else s.timeouts.deadline_s
        plan.deadline_s = min(s.timeouts.deadline_s, asked)
        plan.deadline = time.monotonic() + plan.deadline_s
        return plan

    def _weights(self, request: ChatCompletionRequest) -> tuple[dict[str, float] | None, bool]:
        """The objectives' weights for ``request`` (its ``reward_weights``, else the configured ones), None for the reward
        model alone; a 400 for an unknown objective, a judge not configured, or no weight at all."""
        plain = self._plain_weights
        asked = request.reward_weights
        if asked is None:
            return (None if plain else dict(self._configured_weights)), False
        for name in asked:
            if name not in OBJECTIVES:
                raise InvalidRequest(f"unknown objective '{name}' in reward_weights; this gateway scores {', '.join(OBJECTIVES)}",
                                     param="reward_weights", code="unknown_objective")  # fmt: skip
        if asked.get("judge") and self.judge is None:
            raise InvalidRequest("reward_weights.judge needs a judge; this gateway has none (objectives.judge.url)",
                                 param="reward_weights", code="unknown_objective")  # fmt: skip
        if not any(asked.values()):
            raise InvalidRequest("reward_weights gives every objective weight 0", param="reward_weights")
        same = {k: w for k, w in asked.items() if w} == self._configured_weights
        if same and plain:
            return None, False
        return dict(asked), not same

    def _scorer_for(self, plan: Plan) -> Scorer | None:
        """The reward model, or the weighted objectives over it for this request (one per request: it keeps scores)."""
        scorer = self.scorer  # one reward model per request, whatever swaps meanwhile
        if scorer is None or plan.weights is None:
            return scorer
        return Weighted(scorer, plan.weights, self.refusals, self.judge, plan.custom_weights)

    def _adapt(
        self, request: ChatCompletionRequest, kind: str | None, version: str, n: int, n_return: int
    ) -> tuple[int, Reason | None]:
        """Adaptive N (``gateway.adaptive``): the spread rule when the request left N to the gateway, then its latency
        budget; the count of each decision by the rule that made it. While a canary is on trial the spread rule is held
        (``trial``: the configured N): the new version starts cold at the cap while the current one has learned to use
        fewer, and the gate, which compares the answers users get, would credit the canary with its larger N."""
        reason: Reason | None = None
        if kind is not None and request.n_candidates is None:
            if self.on_trial is not None and self.on_trial():
                reason = "trial"
            else:
                choice = self.spread.choose(version, kind, n, n_return)
                n, reason = choice.n, choice.reason
                if choice.kept is not None:
                    self.metrics.adaptive_kept.observe(choice.kept)
        budget_ms = request.latency_budget_ms or self.settings.adaptive.latency_budget_ms
        if budget_ms is not None and (fits := self.latency.most_within(budget_ms / 1000, n, n_return)) < n:
            n, reason = fits, "budget"
        if reason is not None:
            self.metrics.adaptive.labels(reason).inc()
        return n, reason

    # ---- generate → score → select → log ----
    async def run(self, plan: Plan, leader: prune.Leader | None = None) -> Outcome:
        """The answer for a buffered request (JSON, or N>1 streamed after scoring); its record goes to the log here,
        also when the request is cancelled (its client left: marked so). ``leader``: a pruned best-of-N's answer
        streamed as it decodes, once it is the only candidate left (``gateway.prune.Leader``)."""
        generated: list[Generation] = []
        started = time.perf_counter()
        try:
            outcome = await self._run(plan, generated, leader)
            self.latency.observe(plan.n_candidates, time.perf_counter() - started)
            self._count(plan.policy_version, len(outcome.generation.candidates))
            return outcome
        except asyncio.CancelledError:
            generation = generated[0] if generated else Generation([], 0, 0, backend="")
            self.log(plan, Outcome(generation, None, [], cancelled=True))
            raise

    async def _run(self, plan: Plan, generated: list[Generation], leader: prune.Leader | None = None) -> Outcome:
        scorer = self._scorer_for(plan)
        if plan.selection == "prune" and scorer is not None:
            try:
                return await self._run_pruned(plan, scorer, generated, leader)
            except ScorerFailed as exc:  # best-of-N again, whose scoring follows scorer.on_failure
                if leader is not None and leader.index is not None:  # its answer is being streamed: no other now
                    raise
                log.warning("pruning %s: %s; generating all %d candidates instead", plan.completion_id, exc, plan.n_candidates)
                generated.clear()
                plan.selection = "best_of_n"
        overlap = scorer is not None and self.settings.scorer.overlap and plan.n_candidates > 1
        early = _EarlyScores(scorer, _messages(plan)) if scorer is not None and overlap else None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(plan.left_s()):  # not wait_for: that would be one more task per request
                generation = await self.generator.generate(
                    plan.body, plan.n_candidates, plan.models, early.submit if early else None
                )
        except BaseException as exc:
            if early is not None:  # generation failed or was cancelled: its scoring is not needed
                early.cancel()
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(f"no answer within the request's deadline of {plan.deadline_s * 1000:.0f} ms") from None
            raise
        generated.append(generation)
        plan.used_tokens = generation.completion_tokens
        plan.timings["generate"] = time.perf_counter() - started
        self.metrics.stage["generate"].observe(plan.timings["generate"])
        self.metrics.candidates.observe(len(generation.candidates))

        rewards: list[float] | None = None
        degraded: str | None = None
        if scorer is not None and (len(generation.candidates) > 1 or plan.request.return_candidates):
            started = time.perf_counter()
            rewards, degraded = await self._score(scorer, plan, generation, early)
            plan.timings["score"] = time.perf_counter() - started  # with overlap: only what decoding did not hide
            self.metrics.stage["score"].observe(plan.timings["score"])

        started = time.perf_counter()
        chosen = select(rewards, plan.n_return) if rewards is not None else list(range(plan.n_return))
        plan.timings["select"] = time.perf_counter() - started
        self.metrics.stage["select"].observe(plan.timings["select"])
        if rewards is not None:
            self._observe_rewards(rewards, chosen[0], plan.policy_version)
            if len(rewards) > 1:  # what best-of-N bought over the answer N=1 would have given (the first candidate)
                gain = rewards[chosen[0]] - rewards[0]
                self.metrics.bon_gain.labels(plan.policy_version).observe(gain)
                self.metrics.bon_gain_squares.labels(plan.policy_version).inc(gain * gain)
            if plan.kind is not None:
                self.spread.observe(plan.policy_version, plan.kind, rewards)
        self.metrics.chosen_length.observe(generation.candidates[chosen[0]].token_count)
        rm_version = scorer.version if scorer is not None and rewards is not None else None
        outcome = Outcome(generation, rewards, chosen, rm_version, degraded, scores=_scores(scorer, generation))
        self.log(plan, outcome)
        return outcome

    async def _run_pruned(
        self, plan: Plan, scorer: Scorer, generated: list[Generation], leader: prune.Leader | None = None
    ) -> Outcome:
        """Early-pruned best-of-N: scoring is part of generation; the answers are the best finished candidates."""
        settings = self.settings.prune
        if plan.n_return > settings.min_keep:  # as many finished candidates as answers asked for
            settings = settings.model_copy(update={"min_keep": plan.n_return})
        started = time.perf_counter()
        try:
            async with asyncio.timeout(plan.left_s()):
                pruned = await prune.generate(
                    self.generator, scorer, plan.body, plan.n_candidates, _messages(plan), settings, plan.models, leader
                )
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within the request's deadline of {plan.deadline_s * 1000:.0f} ms") from None
        generation = pruned.generation
        generated.append(generation)
        plan.used_tokens = generation.completion_tokens
        plan.timings["generate"] = time.perf_counter() - started  # scoring included: it runs while candidates decode
        self.metrics.stage["generate"].observe(plan.timings["generate"])
        self.metrics.candidates.observe(len(generation.candidates))
        self.metrics.pruned.inc(len(pruned.pruned))
        kept = pruned.finished
        chosen = [kept[k] for k in select([pruned.rewards[i] for i in kept], plan.n_return)]
        self._observe_rewards([pruned.rewards[i] for i in kept], kept.index(chosen[0]), plan.policy_version)
        self.metrics.chosen_length.observe(generation.candidates[chosen[0]].token_count)
        outcome = Outcome(generation, pruned.rewards, chosen, scorer.version, scores=_scores(scorer, generation))
        self.log(plan, outcome)
        return outcome

    async def _score(
        self, scorer: Scorer, plan: Plan, generation: Generation, early: _EarlyScores | None = None
    ) -> tuple[list[float] | None, str | None]:
        """The candidates' rewards within ``scorer.deadline_ms`` (those scored while others decoded, ``early``, are
        awaited, the rest scored now); on failure, per ``scorer.on_failure``: 503, or (None, why) and the answer goes
        out unranked."""
        s = self.settings.scorer
        messages = _messages(plan)
        left_s = plan.left_s()
        started, limit_s = time.perf_counter(), min(s.deadline_ms / 1000, left_s)
        if early is not None:
            work = early.all(generation.candidates)
        else:
            work = scorer.score([Conversation(messages, c.text) for c in generation.candidates])
        try:
            async with asyncio.timeout(limit_s):
                rewards = await work
            self.scorer_pace.observe(time.perf_counter() - started, len(generation.candidates))
            return rewards, None
        except (ScorerFailed, TimeoutError) as exc:
            if early is not None:
                early.cancel()
            if isinstance(exc, TimeoutError):
                self.scorer_pace.observe(time.perf_counter() - started, len(generation.candidates))
            reason = "scorer_timeout" if isinstance(exc, TimeoutError) else "scorer_failed"
            what = f"missed its {limit_s * 1000:.0f} ms deadline" if reason == "scorer_timeout" else f"failed ({exc})"
            if s.on_failure == "fail_closed":
                if reason == "scorer_timeout" and left_s < s.deadline_ms / 1000:  # the request's own deadline cut it short
                    deadline_ms = plan.deadline_s * 1000
                    raise DeadlineExceeded(f"no ranked answer within the request's deadline of {deadline_ms:.0f} ms") from None
                raise ScorerUnavailable(f"the reward model {what}; retry shortly") from None
            self.metrics.degraded.labels(reason).inc()
            log.warning("reward model %s: %s answered unranked (scorer.on_failure fail_open)", what, plan.completion_id)
            return None, reason

    def _count(self, version: str, candidates: int) -> None:
        """Candidates per request by policy version: what serving it costs as training distils best-of-N into it."""
        self.metrics.version_requests.labels(version).inc()
        self.metrics.version_candidates.labels(version).inc(candidates)

    def _observe_rewards(self, rewards: list[float], chosen: int, version: str) -> None:
        self.metrics.chosen_reward.labels(version).observe(rewards[chosen])
        self.metrics.chosen_reward_stats.labels(version).observe(rewards[chosen])
        if len(rewards) > 1:
            runner_up = max(r for i, r in enumerate(rewards) if i != chosen)
            self.metrics.reward_margin.labels("runner_up").observe(rewards[chosen] - runner_up)
            self.metrics.reward_margin.labels("mean").observe(rewards[chosen] - sum(rewards) / len(rewards))

    # ---- log ----
    def log(self, plan: Plan, outcome: Outcome) -> None:
        """Hand the completion's record to the log (never blocks). An unscored answer is scored
        first, in the background, when the config asks for it."""
        self._remember(plan.completion_id, plan.policy_version)
        if self.sink is None or plan.request.store is False:
            return  # `store: false`: served, counted in metrics, not kept for training
        started = time.perf_counter()
        record = self._record(plan, outcome)
        if outcome.rewards is None and self.scorer is not None and self.settings.store.score_unscored and not outcome.cancelled:
            task = asyncio.create_task(self._score_then_submit(plan, record))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self._submit(record)
        self.metrics.stage["log"].observe(time.perf_counter() - started)

    async def _score_then_submit(self, plan: Plan, record: CompletionRecord) -> None:
        assert self.sink is not None
        scorer = self._scorer_for(plan)
        assert scorer is not None
        conversations = [Conversation(_messages(plan), c.text) for c in record.candidates]
        try:
            rewards = await asyncio.wait_for(
                scorer.score(conversations, background=True), self.settings.scorer.deadline_ms / 1000
            )
            for c, reward in zip(record.candidates, rewards, strict=True):
                c.reward = reward
                c.scores = scorer.scores.get(c.text) if isinstance(scorer, Weighted) else None
            record.rm_version = scorer.version
        except asyncio.CancelledError:  # shutting down before the reward model answered: the record is kept unscored
            self._submit(record)
            raise
        except Exception as exc:  # failed or past scorer.deadline_ms: kept unscored
            log.warning("scoring %s for the log failed: %s", record.id, exc.__class__.__name__)
        self._submit(record)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for background scoring (at shutdown), so its records reach the log; past ``timeout_s`` the rest
        are logged unscored."""
        if self._background:
            _, late = await asyncio.wait(set(self._background), timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _record(self, plan: Plan, outcome: Outcome) -> CompletionRecord:
        rewards = outcome.rewards
        return CompletionRecord(
            id=plan.completion_id,
            created=plan.created,
            key_id=plan.key_id,
            messages=_messages(plan),
            params={k: v for k, v in plan.body.items() if k != "messages"},
            policy_version=plan.policy_version,
            rm_version=outcome.rm_version,
            n_candidates=plan.n_candidates,
            prompt_tokens=outcome.generation.prompt_tokens,
            completion_tokens=outcome.generation.completion_tokens,
            timings_ms={k: round(v * 1000, 3) for k, v in plan.timings.items()},
            candidates=[
                _candidate_record(
                    c,
                    rewards[k] if rewards is not None else None,
                    k in outcome.chosen,
                    outcome.scores[k] if outcome.scores is not None else None,
                )
                for k, c in enumerate(outcome.generation.candidates)
            ],
            status="cancelled" if outcome.cancelled else "ok",
        )

    def _submit(self, record: Record) -> None:
        """To the log, redacted first when the config asks (``store.redact``): the database never sees the original."""
        assert self.sink is not None
        self.sink.submit(self._redacted(record))

    def _redacted(self, record: Record) -> Record:
        return self._redactor.record(record) if self._redactor is not None else record

    def _remember(self, completion_id: str, version: str) -> None:
        self._recent[completion_id] = version
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    # ---- feedback ----
    async def feedback(self, record: FeedbackRecord) -> None:
        """Keep a thumb (ownership was checked by the caller) durably, then count it: once this returns, the
        thumb is in the database or fsync'd in the spool, so the 200 that follows survives a crash."""
        if self.sink is not None:
            try:
                await asyncio.to_thread(self.sink.persist, self._redacted(record))
            except NotKept as exc:  # the log's process did not acknowledge it: not accepted
                raise LogUnavailable(str(exc), retry_after_s=1.0) from None
        version = self._recent.get(record.completion_id, "unknown")
        self.metrics.feedback.labels(record.thumb, version).inc()

    async def relay(self, plan: Plan) -> AsyncGenerator[bytes, None]:
        """N=1 streaming: vLLM's chunks as they come, with this gateway's id, model and fingerprint.
        The answer is collected on the way (text, token ids, usage) and logged once it is complete."""
        started = time.perf_counter()
        body = {**plan.body, "return_token_ids": True, "stream_options": {"include_usage": True}}
        client_usage = plan.include_usage
        if plan.request.stream_options is not None:
            body["stream_options"] |= plan.request.stream_options.model_dump(exclude_none=True)
        stream = self.generator.stream(body, plan.models)
        first = True
        answer = Candidate(index=0, text="", finish_reason=None)
        texts: list[str] = []
        usage: dict[str, Any] = {}
        complete = left = False
        try:
            async for payload in stream:
                if first:
                    plan.timings["first_token"] = time.perf_counter() - started
                    first = False
                if payload == b"[DONE]":
                    complete = True
                    yield payload
                    continue
                chunk = orjson.loads(payload)
                if "error" not in chunk:
                    chunk.pop("prompt_token_ids", None)
                    for choice in chunk.get("choices") or ():
                        answer.token_ids.extend(choice.pop("token_ids", None) or ())
                        texts.append((choice.get("delta") or {}).get("content") or "")
                        answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        if not client_usage:
                            if not chunk.get("choices"):
                                continue  # the final usage-only chunk the client did not ask for
                            chunk["usage"] = None
                    chunk.update(id=plan.completion_id, model=self.settings.model_alias, system_fingerprint=plan.policy_version)
                yield orjson.dumps(chunk)
        except (asyncio.CancelledError, GeneratorExit):
            left = True  # the client left (or the stream was cut at its time limit)
            raise
        finally:
            await stream.aclose()  # now, not when collected: closing it closes vLLM's request
            plan.timings["generate"] = time.perf_counter() - started
            self.metrics.stage["generate"].observe(plan.timings["generate"])
            self.metrics.candidates.observe(1)
            answer.text = "".join(texts)
            plan.used_tokens = int(usage["completion_tokens"]) if "completion_tokens" in usage else len(answer.token_ids)
            generation = Generation(
                [answer], int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), backend=""
            )
            if complete:
                self.latency.observe(1, plan.timings["generate"])
                self._count(plan.policy_version, 1)
                self.metrics.chosen_length.observe(answer.token_count)
                self.log(plan, Outcome(generation, None, [0]))
            elif left or not first:  # cut short (a backend failure before the first byte was no answer at all)
                self.log(plan, Outcome(generation, None, [], cancelled=True))


class _EarlyScores:
    """Scoring that overlaps generation: each candidate goes to the reward model as soon as vLLM finishes it (the
    scorer batches it with whatever else is waiting), while the others are still decoding."""

    def __init__(self, scorer: Scorer, messages: list[dict[str, Any]]) -> None:
        self.scorer, self.messages = scorer, messages
        self.tasks: dict[int, asyncio.Task[list[float]]] = {}

    def submit(self, candidate: Candidate) -> None:
        self.tasks[candidate.index] = asyncio.ensure_future(self.scorer.score([Conversation(self.messages, candidate.text)]))

    async def all(self, candidates: list[Candidate]) -> list[float]:
        """Every candidate's reward, in order; one that was never handed over (no finish reason) is scored now."""
        rewards: dict[int, float] = {}
        scored = [c for c in candidates if c.index in self.tasks]
        for c, reward in zip(scored, await asyncio.gather(*(self.tasks[c.index] for c in scored)), strict=True):
            rewards[c.index] = reward[0]
        late = [c for c in candidates if c.index not in self.tasks]
        if late:
            scores = await self.scorer.score([Conversation(self.messages, c.text) for c in late])
            rewards.update((c.index, reward) for c, reward in zip(late, scores, strict=True))
        return [rewards[c.index] for c in candidates]

    def cancel(self) -> None:
        """Drop scoring still under way; a finished one's failure is collected (not reported as never retrieved)."""
        for task in self.tasks.values():
            if task.done():
                if not task.cancelled():
                    task.exception()
            else:
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _messages(plan: Plan) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.text()} for m in plan.request.messages]


def _scores(scorer: Scorer | None, generation: Generation) -> list[dict[str, float] | None] | None:
    """Each candidate's score per objective, when the weighted objectives scored them."""
    if not isinstance(scorer, Weighted):
        return None
    return [scorer.scores.get(c.text) for c in generation.candidates]


def _candidate_record(
    c: Candidate, reward: float | None, chosen: bool, scores: dict[str, float] | None = None
) -> CandidateRecord:
    logprobs = [t["logprob"] for t in (c.logprobs or {}).get("content") or () if t.get("logprob") is not None]
    total = sum(logprobs) if logprobs else None
    return CandidateRecord(
        index=c.index,
        text=c.text,
        token_ids=c.token_ids,
        finish_reason=c.finish_reason,
        reward=reward,
        scores=scores,
        logprob_sum=total,
        logprob_mean=total / len(logprobs) if total is not None else None,
        chosen=chosen,
    )


def _within_limits(request: ChatCompletionRequest, limits: LimitSettings) -> None:
    """Messages within ``limits``: how many, and the characters of text in each and in all; a 400 naming the field."""
    if len(request.messages) > limits.max_messages:
        raise InvalidRequest(
            f"{len(request.messages)} messages; this gateway takes at most {limits.max_messages}", param="messages",
            code="too_many_messages",
        )  # fmt: skip
    total = 0
    for i, message in enumerate(request.messages):
        chars = len(message.text())
        if chars > limits.max_message_chars:
            raise InvalidRequest(
                f"message {i} has {chars} characters; this gateway takes at most {limits.max_message_chars} per message",
                param=f"messages.{i}.content", code="message_too_long",
            )  # fmt: skip
        total += chars
    if total > limits.max_total_chars:
        raise InvalidRequest(
            f"the messages have {total} characters; this gateway takes at most {limits.max_total_chars}", param="messages",
            code="messages_too_long",
        )  # fmt: skip
