"""The gateway's one settings class: YAML from ``configs/`` with environment overrides.

Knows every knob of one gateway process and checks them when loaded (a bad config is a
start-up error, not a surprise at the first request). Environment variables override
the YAML: ``GATEWAY_PORT=9000``, ``GATEWAY_SCORER__DEVICE=cuda`` (``__`` nests).
Does not know how the knobs are used.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class Backend(BaseModel):
    """One vLLM OpenAI server serving the policy."""

    url: str
    model: str = Field(description="the name vLLM serves the policy under (its --served-model-name)")


class ManagedVLLM(BaseModel):
    """A vLLM server the gateway starts and stops itself (the embedded default)."""

    enabled: bool = False
    model_dir: Path = Path("models/default/policy")
    served_name: str = "policy"
    host: str = "127.0.0.1"
    port: int = 8100
    max_model_len: int = 256
    max_lora_rank: int = 16
    max_loras: int = 4
    dtype: str = "float32"
    """vLLM's --dtype. float32: served log-probs match the trainer's to ~1e-5 (the swap probe's check), and on
    these CPUs LoRA requests ran 1.26x faster than in bfloat16 (base-model requests 1.23x slower)."""
    startup_s: float = 300.0
    max_num_queued_reqs: int | None = Field(default=256, ge=1)
    """vLLM's ``--max-num-queued-reqs``: past it vLLM refuses at once (503), which the gateway passes on as
    ``overloaded`` after trying its other backends; None: vLLM queues without bound."""
    extra_args: list[str] = Field(default_factory=list)
    nice: int = Field(default=0, ge=0, le=19)
    """vLLM's CPU priority (its engine and workers inherit it). On a CPU host whose cores vLLM shares with the
    reward model, 10 keeps the reward model's passes from waiting for vLLM's busy cores: measured here, a batch's
    scoring while vLLM decoded took p50 0.6-1.7 s and p90 2-13 s at 0, p50 13 ms and p90 21 ms at 10 (12 ms idle)."""

    def vllm_args(self) -> list[str]:
        """vLLM's command-line arguments besides the model, name, address and the LoRA ones."""
        queued = ["--max-num-queued-reqs", str(self.max_num_queued_reqs)] if self.max_num_queued_reqs is not None else []
        return [*queued, *self.extra_args]


class SwapSettings(BaseModel):
    """Hot-swap of policy versions from the registry (``gateway.swap``)."""

    enabled: bool = True
    registry_dir: Path | None = None
    """The registry the trainer publishes to; None: the ``trainer.registry_dir`` of the same file, else ``registry``."""
    poll_s: float = Field(default=2.0, gt=0, description="how often the current pointer is read")
    probe_tolerance: float = Field(default=0.01, gt=0)
    """Largest mean |served − expected| probe log-prob (nats per token) accepted as "serves this version"."""
    admin_timeout_s: float = Field(default=30.0, gt=0, description="each vLLM admin call (load, list, probe)")
    retry_s: float = Field(default=30.0, ge=0, description="wait before retrying a version that failed to swap")
    drain_s: float = Field(default=150.0, ge=0, description="an unrouted adapter is unloaded after this (requests done)")
    max_live_adapters: int = Field(default=3, ge=1)
    """Most policy versions loaded on a backend at once (routed + rollback target + draining). A swap that would
    exceed it first unloads a drained rollback target, else waits for a slot; at most the managed vLLM's
    ``max_loras`` (vLLM keeps that many adapters' weights; more would be evicted and reloaded from disk)."""
    lora_loading: Literal["admin", "resolver"] = "admin"
    """How a LoRA version gets into vLLM: ``admin``: the gateway loads it (``/v1/load_lora_adapter``) as
    ``<served>@<version>``; ``resolver``: vLLM's filesystem LoRA resolver loads it from the shared registry volume
    on the first request naming the version (``VLLM_LORA_RESOLVER_CACHE_DIR=<registry>/policy/versions``, set for
    the managed vLLM; the adapter's ``base_model_name_or_path``, the trainer's ``base_policy``, must equal vLLM's
    ``--model``). Either way the gateway verifies the probe before routing."""
    full: Literal["blue_green", "refuse"] = "blue_green"
    """Full fine-tuned versions: ``blue_green`` starts a vLLM for each on this host with ``managed_vllm``'s settings
    (a free port; needs memory for two servers during the switch); ``refuse`` leaves them unserved (e.g. when the
    policy runs on separate vLLM deployments: roll those out instead)."""
    full_cpu_binds: list[str] = Field(default_factory=list)
    """CPU only: ``VLLM_CPU_OMP_THREADS_BIND`` for blue-green instances, used in turn (empty: vLLM's auto binding).
    vLLM's CPU worker spins on its cores while serving; measured here, a second vLLM pinned to the same core as a
    serving one got no CPU at all and never became healthy, on another core it started in 71 s. Give each
    instance cores the previous one does not use, e.g. ``["1", "0"]`` on 2 cores with the managed vLLM on core 0."""


class CanarySettings(BaseModel):
    """Canary trials of the registry's ``canary`` policy version and the gate that ends them (``gateway.canary``)."""

    fraction: float = Field(default=0.1, ge=0, le=1)
    """Share of users (by ``user``, else by API key; sticky) whose requests the canary version answers."""
    auto: bool = True
    """Promote or roll back automatically when the gate decides; off: only the admin endpoint or the CLI does."""
    poll_s: float = Field(default=10.0, gt=0, description="how often the gate reads the arms' totals")
    min_requests: int = Field(default=200, ge=2)
    """Canary answers (and current answers) before the first look; later looks at 2x, 4x, ... this."""
    looks: int = Field(default=4, ge=1)
    """Looks at most; each tests at ``alpha / looks``; undecided at the last look: rolled back."""
    alpha: float = Field(default=0.05, gt=0, lt=1)
    reward_margin: float = Field(default=0.05, ge=0)
    """Non-inferiority margin on the mean chosen reward (reward-model units)."""
    min_thumbs: int = Field(default=30, ge=1, description="thumbs per arm before the thumbs-up rate counts")
    thumbs_margin: float = Field(default=0.05, ge=0)
    max_length_ratio: float = Field(default=1.3, gt=1)
    """Canary mean answer length over current's above this: rolled back even if its reward is higher."""
    max_kl: float | None = Field(default=8.0, gt=0)
    """KL to the starting policy (nats per response, the trainer's evaluation in the manifest) above this: rolled back."""
    primary: Literal["auto", "reward", "thumbs"] = "auto"
    """What a trial is judged on: the chosen answer's reward, or the thumbs-up rate (then the reward is a guardrail at
    ``guard_reward_margin`` and the looks are planned in thumbs); ``auto``: thumbs for a version trained mainly on
    thumb-decided pairs (its manifest says), else the reward."""
    power: float = Field(default=0.8, gt=0, lt=1)
    """Power of the last look to show non-inferiority when the arms are equal: sizes the thumbs schedule, and the
    sample the reward needs (shown in ``GET /admin/policy`` and ``bon_canary_needed``)."""
    guard_reward_margin: float = Field(default=0.3, ge=0)
    """Thumbs-primary trials: a reward drop significantly beyond this rolls back (reward-model units)."""
    planning_up_rate: float = Field(default=0.5, gt=0, lt=1)
    """The thumbs-up rate the thumbs schedule is sized for (variance p(1 − p) per arm): ½, the default, is the worst
    case; set it from the current version's rate before a trial (e.g. 0.85 when answers are mostly liked) for a
    schedule that many fewer thumbs reach. Only the power depends on it: every look's interval uses the observed
    rates, so the error rate of a promotion holds whatever it is."""


class ScorerSettings(BaseModel):
    kind: Literal["local", "remote"] = "local"
    model_dir: Path = Path("models/default/reward_model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=1, ge=1, description="torch threads for the local reward model (vLLM needs the rest)")
    max_batch: int = Field(default=64, ge=1, description="most conversations scored in one forward pass")
    batch_wait_ms: float = Field(default=2.0, ge=0, description="how long the batcher waits for more requests")
    max_length: int | None = Field(default=None, ge=8, description="tokens read at most, the end kept; None: the model's limit")
    remote_url: str | None = Field(default=None, description="a vLLM --runner pooling server, for kind=remote")
    remote_model: str = "reward"
    version: str = "rm-base"
    on_failure: Literal["fail_closed", "fail_open"] = "fail_closed"
    """The reward model failed or missed ``deadline_ms``: 503 (closed), or the first candidates unranked, tagged
    ``x-bon-degraded`` and counted (open)."""
    deadline_ms: float = Field(default=10_000, gt=0, description="longest wait for a request's rewards")
    overlap: bool = True
    """Score each candidate as soon as vLLM finishes it (the N samples are streamed), so the reward model works while
    the slower candidates are still decoding; the choice is the same as scoring all of them at the end."""
    length_weight: float = 0.0
    """Added to every reward: this × the answer's length in words. Negative: a length penalty; positive: a planted
    length bias (how the reward-hacking watch is shown to fire). 0: the reward model's score alone."""
    degrade_above_ms: float | None = Field(default=None, gt=0)
    """When the reward model's recent pace would take longer than this for a request's N, N is lowered to fit (not
    below n), tagged ``x-bon-degraded: scorer_slow`` and counted (``gateway.degrade``). None: never."""


class PruneSettings(BaseModel):
    """Early-pruned best-of-N (``selection: prune``, ``gateway.prune``)."""

    every_tokens: int = Field(default=8, ge=1, description="tokens between checkpoints, where partial answers are scored")
    keep: float = Field(default=0.5, gt=0, lt=1, description="at each checkpoint, the share of candidates left that go on")
    min_keep: int = Field(default=1, ge=1, description="candidates never pruned below this many")
    straggler_ms: float | None = Field(default=None, ge=0)
    """How long a checkpoint waits for the candidates behind once the first reached it; past it, it is decided among
    those there and the others go on. None: it waits for every candidate still decoding."""


class AdaptiveSettings(BaseModel):
    """Adaptive N (``gateway.adaptive``): fewer candidates where recent ones bought little, or where the latency budget
    would not hold. A request that sets ``n_candidates`` gets that many (the budget may still lower it)."""

    enabled: bool = False
    """Choose N per request from the reward spread of recent requests of its kind, ``n_candidates`` the most."""
    keep_gain: float = Field(default=0.9, gt=0, le=1, description="the share of the cap's best-of-N gain a choice keeps")
    min_requests: int = Field(default=30, ge=2, description="requests of a kind at the cap before its N is lowered")
    window: int = Field(default=200, ge=2, description="recent requests per policy version, kind and N that a gain is read from")
    explore: float = Field(default=0.1, ge=0, le=1, description="the share of a kind's requests still run at the cap")
    z: float = Field(default=1.96, ge=0, description="standard errors a gain needs to count (below: one candidate)")
    min_gain_per_candidate: float | None = Field(default=None, gt=0)
    """The least a further candidate must add to the expected best reward, in reward units (what one candidate's
    compute is worth); None: only ``keep_gain``. As training distils best-of-N, each extra candidate buys less and N
    falls under this price, while a share of a shrinking gain stays the same N."""
    length_edges: list[int] = Field(default_factory=lambda: [64, 256, 1024])
    """Message characters that split prompt kinds into length buckets (with the client's ``metadata.task``)."""
    latency_budget_ms: float | None = Field(default=None, gt=0)
    """Every request's budget unless it asks for its own (``latency_budget_ms``): N is the most predicted to fit."""
    latency_quantile: float = Field(default=0.95, gt=0, le=1, description="the share of requests the budget is for")
    latency_horizon_s: float = Field(default=30.0, gt=0, description="how far back latency is read")


Objective = Literal["reward_model", "length", "refusal", "judge"]


class JudgeSettings(BaseModel):
    """An LLM as judge (``gateway.objectives.Judge``) on an OpenAI-compatible endpoint (vLLM, or any provider)."""

    url: str | None = Field(default=None, description="the server's base URL (``/v1/chat/completions`` is appended)")
    model: str = "judge"
    api_key_env: str | None = Field(default=None, description="the environment variable holding its API key, if any")
    timeout_s: float = Field(default=10.0, gt=0)
    top_logprobs: int = Field(default=5, ge=1, le=20, description="first-token alternatives read for yes / no")


def _reward_model_only() -> dict[Objective, float]:
    return {"reward_model": 1.0}


class ObjectiveSettings(BaseModel):
    """Multi-objective scoring (``gateway.objectives``): the reward is sum(weight x score); a request's
    ``reward_weights`` replace these for it."""

    weights: dict[Objective, float] = Field(default_factory=_reward_model_only)
    """``reward_model`` (the served reward model), ``length`` (words), ``refusal`` (1 when the answer refuses),
    ``judge`` (P(yes) from the judge). Only the reward model by default: nothing else runs."""
    refusal_patterns: list[str] | None = Field(default=None, description="regular expressions; None: the built-in list")
    judge: JudgeSettings = Field(default_factory=JudgeSettings)

    @model_validator(mode="after")
    def _judge_configured(self) -> ObjectiveSettings:
        if self.weights.get("judge") and not self.judge.url:
            raise ValueError("objectives.weights.judge needs objectives.judge.url")
        return self

    @property
    def plain(self) -> bool:
        """Only the reward model, at weight 1: scoring is the reward model's own."""
        return {k: w for k, w in self.weights.items() if w} == {"reward_model": 1.0}


Selection = Literal["best_of_n", "prune"]

Scope = Literal["chat", "feedback", "admin"]
DEFAULT_SCOPES: tuple[Scope, ...] = ("chat", "feedback")


class ApiKey(BaseModel):
    """A client key, stored as the SHA-256 hex digest of the bearer token, never in clear."""

    id: str
    sha256: str
    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES))
    """What the key may call: chat completions (and the model list), feedback, the admin endpoints."""
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0, description="completion tokens (n x max_tokens reserved)")
    max_concurrent: int | None = Field(default=None, ge=1)
    max_n_candidates: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    revoked: bool = False
    """Refused (401 ``revoked_api_key``); kept listed so that what the key did stays attributed to its id."""

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("sha256 must be a 64-character hex digest of the key")
        return value


class Timeouts(BaseModel):
    connect_s: float = 5.0
    request_s: float = 120.0
    """Whole generation request to vLLM; past it the client gets 504."""
    deadline_s: float = Field(default=130.0, gt=0)
    """A request's whole time, generation and scoring together, unless it asks for less (``deadline_ms``): generation
    gets what is left of it (504 ``deadline_exceeded`` past it), scoring the rest (within ``scorer.deadline_ms``),
    a relayed stream its first token."""
    keepalive_s: float = Field(default=4.0, gt=0)
    """How long an idle connection to vLLM is kept for reuse. Below vLLM's own idle timeout
    (``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``, 5 s): a connection reused just as the server closes it fails
    the request ("Cannot write to closing transport"; aiohttp's default is 15 s)."""


VLLM_FIELDS = (
    "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids", "include_stop_str_in_output",
    "skip_special_tokens", "spaces_between_special_tokens", "bad_words", "allowed_token_ids", "structured_outputs",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "echo", "documents",
    "truncate_prompt_tokens",
)  # fmt: skip
"""vLLM's own request fields that change only the caller's own answer."""


class LimitSettings(BaseModel):
    """What one request may ask (each over-limit request is a 4xx naming the field) and how many run at once."""

    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="413 from Content-Length, or while reading")
    max_messages: int = Field(default=256, ge=1)
    max_message_chars: int = Field(default=100_000, ge=1, description="characters of text in one message")
    max_total_chars: int = Field(default=400_000, ge=1, description="characters of text in all messages")
    max_candidate_tokens: int = Field(default=2048, ge=1, description="n_candidates x max_tokens: what one request may cost")
    max_stream_s: float = Field(default=300.0, gt=0, description="a relayed stream is ended (with an error event) after this")
    max_in_flight: int = Field(default=256, ge=0, description="chat requests at once; beyond: 503 at once. 0: no cap")
    degrade_above: int = Field(default=0, ge=0, description="past this many in flight, N x it / in flight (>= n); 0: never")


class BreakerSettings(BaseModel):
    """Per backend (``gateway.breaker``): skip one that failed ``failures`` times in a row; probe it after ``cooldown_s``."""

    failures: int = Field(default=3, ge=1)
    cooldown_s: float = Field(default=10.0, gt=0)


class UiSettings(BaseModel):
    """The inspector page at ``/ui`` (``gateway.inspector``)."""

    loop_plot: Path | None = None
    """An evaluate-loop run's ``loop.png`` to show (``python -m toyworld evaluate-loop --out DIR``); None: none."""


class RedactSettings(BaseModel):
    """Personal data replaced by a tag before text is stored (``gateway.redact``); the served answer is unchanged."""

    enabled: bool = False
    emails: bool = True
    phones: bool = True
    cards: bool = True
    patterns: list[str] = Field(default_factory=list, description="regular expressions of the deployment's own")


class StoreSettings(BaseModel):
    """The candidate/feedback log (see ``gateway/store``)."""

    enabled: bool = True
    url: str | None = None
    """SQLAlchemy URL; None: SQLite at ``<data_dir>/gateway.db``. PostgreSQL: ``postgresql+psycopg://user@host/db``."""
    data_dir: Path = Path("data")
    """SQLite file, the spool and the completion-id secret (each replica has its own)."""
    id_secret: SecretStr | None = None
    """Signs completion ids (feedback ownership). None: a secret file in ``data_dir``. Replicas must share one."""
    writer: Literal["thread", "process"] = "thread"
    """Who writes the log: a thread of the serving process, or a process of its own (``gateway.store.logproc``),
    so the database work does not compete with the event loop for the interpreter."""
    queue_size: int = Field(default=10_000, ge=1)
    batch_size: int = Field(default=256, ge=1)
    flush_interval_ms: float = Field(default=50.0, gt=0)
    retry_s: float = Field(default=2.0, gt=0, description="how long a failed database is left alone before a retry")
    connect_timeout_s: float = Field(default=3.0, gt=0)
    retention_days: float | None = Field(default=90.0, gt=0)
    """Records older than this are deleted (``python -m gateway purge``, and every ``purge_every_h``); None keeps all."""
    purge_every_h: float | None = Field(default=24.0, gt=0)
    """The gateway itself purges on this schedule (None: only the command, e.g. from a CronJob). Idempotent, so
    replicas sharing a database may all do it."""
    score_unscored: bool = True
    """Score N=1 answers for the log after the response is sent (off the critical path)."""
    redact: RedactSettings = Field(default_factory=RedactSettings)

    def database_url(self) -> str:
        return self.url or f"sqlite:///{self.data_dir / 'gateway.db'}"


class FeedbackSettings(BaseModel):
    per_minute: float = Field(default=60.0, gt=0, description="thumbs per API key per minute (per replica)")
    burst: int = Field(default=20, ge=1)
    max_comment_chars: int = Field(default=2000, ge=0)


class YamlSettings(BaseSettings):
    """A process's settings: YAML passed as init values, the environment on top (no dotenv, no secrets dir)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings


class GatewaySettings(YamlSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(default=1, ge=1)
    """Gateway processes serving one port (``gateway.workers``). Rates, quotas and in-flight caps are the
    gateway's: each worker enforces its share. More than one needs ``swap.full: refuse`` (each worker would start
    its own blue-green vLLM) and suits a reward model outside the process (``scorer.kind: remote``): a local one
    is loaded by every worker."""
    allow_keyless_public: bool = False
    """Bind to a non-loopback address with no API keys configured. Off: refuse to start."""
    model_alias: str = "toy-bon"
    """The stable model name clients see in /v1/models and each response's ``model``."""
    policy_version: str = "base"
    backends: list[Backend] = Field(default_factory=list)
    managed_vllm: ManagedVLLM = Field(default_factory=ManagedVLLM)
    scorer: ScorerSettings = Field(default_factory=ScorerSettings)
    scoring_enabled: bool = True
    """Off: N must be 1 and nothing is scored (a plain proxy; the overhead benchmark's mode)."""
    n_candidates: int = Field(default=4, ge=1)
    max_n_candidates: int = Field(default=16, ge=1)
    selection: Selection = "best_of_n"
    """How N>1 candidates are chosen by default (a request's ``selection`` overrides it): ``best_of_n`` generates all N
    to the end and returns the best; ``prune`` aborts the weakest while they decode (``prune``, ``gateway.prune``)."""
    prune: PruneSettings = Field(default_factory=PruneSettings)
    adaptive: AdaptiveSettings = Field(default_factory=AdaptiveSettings)
    objectives: ObjectiveSettings = Field(default_factory=ObjectiveSettings)
    default_max_tokens: int = Field(default=64, ge=1)
    max_tokens_limit: int = Field(default=192, ge=1)
    vllm_fields: list[str] = Field(default_factory=lambda: list(VLLM_FIELDS))
    """Fields beyond OpenAI's a request may set, passed to vLLM as they are; any other unknown field is a 400. Not by
    default: fields that schedule or budget vLLM for everyone (``priority``, ``ignore_eos``, ``min_tokens``,
    ``request_id``, ``cache_salt``, ``kv_transfer_params``, ``vllm_xargs``, ``chat_template``...)."""
    timeouts: Timeouts = Field(default_factory=Timeouts)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    shutdown_grace_s: float = Field(default=30.0, gt=0)
    """On SIGTERM: stop accepting, let requests in flight finish for at most this long, then flush the log and stop
    the managed vLLM (a Kubernetes ``terminationGracePeriodSeconds`` should exceed it)."""
    warmup: bool = True
    """Before ``/ready`` turns ready: one best-of-N request and one reward-model pass (``gateway.warmup``)."""
    api_keys: list[ApiKey] = Field(default_factory=list)
    api_keys_file: Path | None = None
    """More keys in a YAML file (a list of ``api_keys`` entries), re-read when it changes (``gateway.keyfile``): keys
    are added, rotated and revoked without a restart."""
    keys_reload_s: float = Field(default=5.0, gt=0, description="how often api_keys_file is checked for changes")
    quota_replicas: int = Field(default=1, ge=1)
    """Replicas sharing the keys' quotas: each enforces 1/this of every rate and of the requests at once."""
    store: StoreSettings = Field(default_factory=StoreSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    log_prompts: bool = False
    swap: SwapSettings = Field(default_factory=SwapSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    admin_token: SecretStr | None = None
    ui: UiSettings = Field(default_factory=UiSettings)
    """Bearer token of the admin endpoints (``/admin/...``). None: they answer only on a loopback ``host``."""
    trainer: dict[str, Any] = Field(default_factory=dict)
    """The trainer's section of the same file (``trainer.settings``); the gateway does not read it."""

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySettings:
        if self.n_candidates > self.max_n_candidates:
            raise ValueError(f"n_candidates {self.n_candidates} exceeds max_n_candidates {self.max_n_candidates}")
        if not self.backends and not self.managed_vllm.enabled:
            raise ValueError("no backends configured and managed_vllm is disabled: nothing to generate with")
        if self.scorer.kind == "remote" and not self.scorer.remote_url:
            raise ValueError("scorer.kind is remote but scorer.remote_url is not set")
        if not self.api_keys and self.api_keys_file is None and not self.allow_keyless_public and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without API keys; configure api_keys or set allow_keyless_public: true"
            )
        if self.store.enabled and self.store.url and not self.store.url.startswith("sqlite") and self.store.id_secret is None:
            raise ValueError("store.url is a shared database: set store.id_secret (the same on every replica)")
        if self.workers > 1 and self.swap.enabled and self.swap.full == "blue_green":
            raise ValueError(
                f"workers: {self.workers} needs swap.full: refuse (every worker would start its own blue-green vLLM for a "
                "full version); roll full versions out as separate vLLM deployments"
            )
        managed = self.managed_vllm
        if self.swap.enabled and managed.enabled and self.swap.max_live_adapters > managed.max_loras:
            raise ValueError(
                f"swap.max_live_adapters {self.swap.max_live_adapters} exceeds managed_vllm.max_loras {managed.max_loras}"
            )
        return self

    def per_worker(self) -> GatewaySettings:
        """This settings' share for one of ``workers`` processes: per-process caps and rates divided (rounded up),
        API-key quotas split ``quota_replicas x workers`` ways; the same settings with one worker."""
        w = self.workers
        if w == 1:
            return self
        limits = self.limits.model_copy(update={
            "max_in_flight": -(-self.limits.max_in_flight // w),
            "degrade_above": -(-self.limits.degrade_above // w),
        })  # fmt: skip
        feedback = self.feedback.model_copy(
            update={"per_minute": self.feedback.per_minute / w, "burst": -(-self.feedback.burst // w)}
        )
        return self.model_copy(update={"limits": limits, "feedback": feedback, "quota_replicas": self.quota_replicas * w})

    def registry_dir(self) -> Path:
        return self.swap.registry_dir or Path(self.trainer.get("registry_dir", "registry"))

    def all_backends(self) -> list[Backend]:
        """Configured backends, plus the managed vLLM when enabled (first)."""
        managed = self.managed_vllm
        own = [Backend(url=f"http://{managed.host}:{managed.port}", model=managed.served_name)] if managed.enabled else []
        return own + list(self.backends)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(Exception):
    """A config file that cannot be read or does not validate; one line for the user."""


def read_yaml(path: Path | None) -> dict[str, Any]:
    """A config file's mapping ({} for no file); the trainer reads the same file."""
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a YAML mapping")
    return loaded


def load(path: Path | None, **overrides: Any) -> GatewaySettings:
    """Settings from a YAML file (optional), then ``overrides``, with the environment on top."""
    data = read_yaml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GatewaySettings(**data)
    except ValueError as exc:
        raise ConfigError(f"invalid config {path}: {exc}") from None
