"""Domain types shared by workflows, activities, the CLI and the store.

Only pydantic and the standard library are imported here, so workflow code can pass
this module through Temporal's sandbox. Every model is frozen and forbids unknown
fields; new fields must get defaults because running histories hold old payloads.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlc.kafka_settings import KafkaSettings

DEFAULT_STAGES: tuple[str, ...] = ("DEV", "SIT", "UAT", "PROD")
"""The standard promotion path; a lifecycle may declare another ordered list."""

ANY_SERVICE_TAG = "*"
"""A runtime serving this tag accepts snapshots of every service tag."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a valid model/runtime/lifecycle name, else raise ValueError.

    Names end up in workflow ids, container names and file paths, so they are kept to a
    conservative alphabet.
    """
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not valid: use lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (at most 63 characters)"
        )
    return value


class Frozen(BaseModel):
    """Base for every payload: immutable, and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Mode(StrEnum):
    """How a model is consumed in a stage (the seed's consumption modes)."""

    ONLINE = "online"
    BATCH = "batch"
    STREAMING = "streaming"
    """A long-running consumer scoring a Kafka topic into another (the runtime's ``kafka``)."""


class HostingMode(StrEnum):
    """Whether a runtime's online deployments share a model-server process."""

    SHARED = "shared"
    DEDICATED = "dedicated"


class ModelNetwork(StrEnum):
    """What network a local runtime's model processes get (see :mod:`mlc.isolation`)."""

    NONE = "none"
    """A network namespace of their own: no address but their own loopback."""
    OUTBOUND = "outbound"
    """The host's network, except the host itself: connections to any of its own addresses
    (its loopback included) are refused to the model's user."""


class RuntimeKind(StrEnum):
    """Which driver acts on a runtime."""

    LOCAL = "local"
    DOCKER = "docker"


class DeploymentState(StrEnum):
    """Life of one deployment, as recorded in the inventory."""

    DEPLOYING = "deploying"
    SERVING = "serving"
    COMPLETED = "completed"
    FAILED = "failed"
    RETIRED = "retired"


class LifecycleState(StrEnum):
    """Where a lifecycle run stands."""

    STARTING = "starting"
    DEPLOYING = "deploying"
    TESTING = "testing"
    AWAITING_APPROVAL = "awaiting_approval"
    PROMOTING = "promoting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Decision(StrEnum):
    """Outcome of an approval gate."""

    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"


class TestKind(StrEnum):
    """Built-in stage tests."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    SMOKE = "smoke"
    METRICS = "metrics"
    CHAMPION_CHALLENGER = "champion_challenger"
    """Score the stage's labelled data with this run's deployment (the challenger) and the
    version serving the stage on that runtime (the champion); fail when the challenger's AUC
    is worse by more than the stage's ``max_auc_drop``. Passes, saying so, without a champion."""
    SHADOW = "shadow"
    """Recorded by a shadow rollout (``mlc.shadow``): both versions' answers to the same
    mirrored live requests compared. Not a test a stage lists: set ``rollout.strategy``."""


# --- models and snapshots -------------------------------------------------------------


class ModelRef(Frozen):
    """``model@version``: the business key of a snapshot."""

    model: str
    version: int = Field(ge=1)

    def __str__(self) -> str:
        return f"{self.model}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``name@version`` as typed on the command line."""
        name, sep, version = text.partition("@")
        if not sep or not version.isdigit():
            raise ValueError(f"{text!r} is not MODEL@VERSION (for example cc-fraud@1)")
        return cls(model=name, version=int(version))


class ModelSnapshot(Frozen):
    """An immutable, numbered, content-addressed version of a model package."""

    model: str
    version: int
    sha256: str
    service_tags: tuple[str, ...]
    entry_module: str
    requirements: tuple[str, ...] = ()
    created_at: datetime | None = None

    @property
    def ref(self) -> ModelRef:
        """The snapshot's ``model@version`` key."""
        return ModelRef(model=self.model, version=self.version)


# --- runtimes -------------------------------------------------------------------------


class DockerSettings(Frozen):
    """How a docker runtime reaches its engine and shapes its containers."""

    base_url: str | None = None
    """``DOCKER_HOST``-style URL (``unix://``, ``tcp://``, ``ssh://``); None uses the env."""
    tls_verify: bool = False
    tls_ca_cert: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    base_image: str = "python:3.11-slim"
    network_mode: str = "bridge"
    """A Docker network name (default ``bridge``: the engine's own, with the port published on
    ``publish_host``), or ``host`` when the runtime says so (the container binds 127.0.0.1 on
    the engine's host and shares its network: only for engines without a bridge)."""
    publish_host: str = "127.0.0.1"
    """Address the endpoint is reported on (and published ports bind to)."""
    cpus: float = 1.0
    memory: str = "1g"
    user: str = "65534:65534"
    restart_policy: str = "unless-stopped"
    health_timeout_seconds: float = 60.0


class GatewaySettings(Frozen):
    """A runtime's stable endpoints: a real proxy (nginx) in front of its online deployments.

    Consumers call ``http://HOST:PORT/models/MODEL/score`` and never change it; which
    versions answer behind it, and with which share of traffic, is the inventory's traffic
    table for that runtime and model, applied by the runtime's driver.
    """

    port: int = Field(ge=1024, le=65535)
    host: str = "127.0.0.1"
    """Address the gateway binds and reports (loopback unless the runtime says otherwise)."""

    def endpoint(self, model: str) -> str:
        """The stable endpoint of ``model`` on this gateway (no trailing slash)."""
        return f"http://{self.host}:{self.port}/models/{model}"


class TrafficRoute(Frozen):
    """One deployment behind a stable endpoint and its share of live traffic."""

    deployment_id: str
    version: int
    weight: int = Field(default=100, ge=0, le=100)
    """Percent of live requests it answers; the answering routes' weights sum to 100."""
    shadow: bool = False
    """Receives a mirrored copy of every live request; its answers are discarded (weight 0)."""


def check_routes(routes: tuple[TrafficRoute, ...]) -> tuple[TrafficRoute, ...]:
    """Return ``routes`` if they can stand behind one endpoint, else raise ValueError.

    Answering routes' weights sum to 100 (or there are none: the endpoint answers 503), a
    shadow has weight 0, there is at most one shadow, and no deployment appears twice.
    """
    ids = [r.deployment_id for r in routes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a deployment appears twice among the routes: {ids}")
    shadows = [r for r in routes if r.shadow]
    if len(shadows) > 1 or any(r.weight for r in shadows):
        raise ValueError("at most one shadow route, with weight 0")
    answering = [r for r in routes if not r.shadow]
    total = sum(r.weight for r in answering)
    if answering and total != 100:
        raise ValueError(f"the answering routes' weights sum to {total}, not 100")
    return routes


MAX_GRACE = timedelta(days=30)
"""The longest a version moved off a stable endpoint may stay warm."""

DEFAULT_RESTART_ATTEMPTS = 3
DEFAULT_RESTART = "on-failure:3"
_RESTART = re.compile(r"^(no|always|on-failure(:[1-9][0-9]{0,2})?)$")


class Runtime(Frozen):
    """A place a model can run: tagged with the stage and service tags it serves."""

    name: str
    kind: RuntimeKind = RuntimeKind.LOCAL
    stage: str
    service_tags: tuple[str, ...] = (ANY_SERVICE_TAG,)
    modes: tuple[Mode, ...] = (Mode.ONLINE, Mode.BATCH)
    task_queue: str = "mlc"
    docker: DockerSettings | None = None
    kafka: KafkaSettings | None = None
    """Brokers, topics, consumer group and security of streaming deployments."""
    gateway: GatewaySettings | None = None
    """Where this runtime's stable endpoints listen; None: consumers call deployments directly."""
    restart: str = DEFAULT_RESTART
    """What the runtime's reconciler does with a serving deployment it finds dead or
    unhealthy: ``no`` marks it failed; ``on-failure[:N]`` restarts it, up to N times in a
    row without a healthy check in between (default 3), then marks it failed; ``always``
    restarts it however often. Docker's own ``docker.restart_policy`` acts first, inside
    the engine; this one also covers containers the engine gave up on or lost."""
    hosting: HostingMode | None = None
    """How online deployments map to model-server processes: ``shared`` hosts them in one
    process per runtime (per-model routes ``/models/<deployment id>/...`` under one port,
    loaded lazily, evicted under a memory budget; a model whose requirements the shared
    process does not meet gets its own process), ``dedicated`` gives each its own process
    (and, when the worker is root, its own user). None: ``shared`` for local runtimes of
    any stage but PROD, ``dedicated`` otherwise. Models hosted together share one process
    and one user: a weaker boundary than a process per deployment."""
    model_network: ModelNetwork = ModelNetwork.NONE
    """On a local runtime whose worker is root: ``none`` (default) keeps model servers,
    hosts and batch jobs off every network; ``outbound`` lets them reach other hosts (a
    model calling an external service), never the worker's host itself. On a docker
    runtime: ``none`` runs model containers with no network; ``outbound`` puts them on
    ``docker.network_mode``, refused for ``host`` (see :mod:`activities.runtimes.docker`)."""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return check_name(value, "runtime name")

    @model_validator(mode="after")
    def _streaming_needs_kafka(self) -> Runtime:
        if Mode.STREAMING in self.modes and self.kafka is None:
            raise ValueError(
                f"runtime {self.name} supports mode streaming but has no kafka settings: give "
                "--kafka-bootstrap, --input-topic and --output-topic"
            )
        return self

    @model_validator(mode="after")
    def _outbound_off_the_host_network(self) -> Runtime:
        docker = self.docker or DockerSettings()
        if self.kind is RuntimeKind.DOCKER and self.model_network is ModelNetwork.OUTBOUND:
            if docker.network_mode == "host":
                raise ValueError(
                    f"runtime {self.name}: model_network outbound on docker network_mode host would let "
                    "model code reach this host's loopback (Temporal, PostgreSQL, other models): give "
                    "the runtime a Docker network of its own (--network-mode bridge or a network name)"
                )
        return self

    @field_validator("restart")
    @classmethod
    def _valid_restart(cls, value: str) -> str:
        if not _RESTART.fullmatch(value):
            raise ValueError(
                f"restart policy {value!r} is not valid: use no, always or on-failure[:N] (N from 1 to 999)"
            )
        return value

    @property
    def restart_limit(self) -> int | None:
        """Restarts in a row the reconciler may make (None: no limit, 0: none)."""
        name, _, count = self.restart.partition(":")
        if name == "no":
            return 0
        if name == "always":
            return None
        return int(count) if count else DEFAULT_RESTART_ATTEMPTS

    def shares_hosts(self, stage: str) -> bool:
        """Whether an online deployment of ``stage`` here joins the runtime's shared model
        host (see :attr:`hosting`)."""
        if self.hosting is not None:
            return self.hosting is HostingMode.SHARED
        return self.kind is RuntimeKind.LOCAL and "PROD" not in (self.stage.upper(), stage.upper())

    def serves(self, *, stage: str, service_tags: tuple[str, ...], mode: Mode) -> bool:
        """True when this runtime takes a snapshot with these tags in ``stage`` and ``mode``."""
        tag_match = ANY_SERVICE_TAG in self.service_tags or bool(set(self.service_tags) & set(service_tags))
        return self.stage == stage and tag_match and mode in self.modes


# --- deployments ----------------------------------------------------------------------


class Deployment(Frozen):
    """Which snapshot runs on which runtime, in which stage and mode, and where."""

    id: str
    model: str
    version: int
    runtime: str
    stage: str
    mode: Mode
    state: DeploymentState
    endpoint: str | None = None
    workflow_id: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


# --- lifecycle specs ------------------------------------------------------------------


class ApprovalGate(Frozen):
    """Who may let a lifecycle leave a stage, and how long they have."""

    approvers: tuple[str, ...] = ("role:approver",)
    """Identities, or ``role:NAME`` for everyone holding that role in the inventory."""
    timeout: timedelta = timedelta(days=7)


class RolloutStrategy(StrEnum):
    """How a stage moves live traffic to a new version (``mlc.rollout``)."""

    BLUE_GREEN = "blue_green"
    """All traffic at once, the previous version kept warm in standby (``mlc.promote``)."""
    CANARY = "canary"
    """A share of traffic raised in steps, compared with the current version at each step."""
    SHADOW = "shadow"
    """Live traffic mirrored to the new version; its answers are compared, then discarded."""


class Rollout(Frozen):
    """A stage's rollout strategy and its limits; plain JSON in a run's ``spec``.

    Example: ``{"strategy": "canary", "steps": [10, 50], "window": "PT5M",
    "max_error_rate_increase": 0.02, "max_p99_ratio": 1.5, "min_requests": 50}``
    (durations as ISO 8601 or seconds).
    """

    strategy: RolloutStrategy = RolloutStrategy.BLUE_GREEN
    steps: tuple[int, ...] = (10, 50)
    """Canary: the new version's percent of live traffic at each step, increasing, 1-99;
    after the last step it gets 100 %."""
    window: timedelta = timedelta(minutes=5)
    """Canary: how long each step observes live traffic before comparing."""
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1)
    """Canary: roll back when the new version's error rate exceeds the current one's by more
    (0.01: one percentage point)."""
    max_p99_ratio: float = Field(default=2.0, ge=1)
    """Canary: roll back when the new version's p99 latency exceeds the current one's times this."""
    p99_tolerance_ms: float = Field(default=10.0, ge=0)
    """Canary: a p99 latency at most this many ms above the current one's is never a breach
    (the gateway times answers to the millisecond, and a busy host delays a few by some ms)."""
    min_requests: int = Field(default=20, ge=1)
    """Canary: requests the new version must answer in a window for the step to be judged;
    fewer fails the rollout (too little traffic to tell), rolling back."""
    duration: timedelta = timedelta(minutes=10)
    """Shadow: how long live traffic is mirrored to the new version."""
    min_pairs: int = Field(default=20, ge=1)
    """Shadow: requests both versions must have answered for the comparison to count."""
    min_agreement: float = Field(default=0.95, ge=0, le=1)
    """Shadow: least share of records on which both versions predict the same label."""
    max_mean_abs_diff: float | None = Field(default=None, ge=0)
    """Shadow: largest mean absolute score difference allowed (None: not checked)."""

    @field_validator("steps")
    @classmethod
    def _valid_steps(cls, steps: tuple[int, ...]) -> tuple[int, ...]:
        if not steps:
            raise ValueError("a canary needs at least one step, e.g. [10, 50]")
        if any(not 1 <= s <= 99 for s in steps):
            raise ValueError(f"canary steps are percents of traffic from 1 to 99, got {list(steps)}")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"canary steps must increase, got {list(steps)}")
        return steps

    @field_validator("window", "duration")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"a rollout window or duration must be positive, got {value}")
        return value


class StageSpec(Frozen):
    """What happens in one stage."""

    name: str
    mode: Mode = Mode.ONLINE
    modes: tuple[Mode, ...] = ()
    """Several modes at once, e.g. ``["online", "streaming"]`` for two business processes:
    the stage deploys in each mode to its runtimes serving that mode and the snapshot's
    service tags, skipping a mode no such runtime serves (but not all of them). When set,
    ``mode`` is ignored."""
    tests: tuple[TestKind, ...] = (TestKind.SMOKE,)
    gate: ApprovalGate | None = None
    rollout: Rollout | None = None
    """How ``mlc.rollout`` moves live traffic to the new version here (None: blue/green)."""
    max_auc_drop: float = Field(default=0.01, ge=0, le=1)
    """``champion_challenger`` test: how much lower than the champion's the challenger's AUC
    may be (0.01: challenger AUC >= champion AUC - 0.01)."""
    grace: timedelta = Field(default=timedelta(minutes=10), ge=timedelta(0), le=MAX_GRACE)
    """On a runtime with a gateway: how long the versions a traffic change moves off the
    stable endpoint stay warm (standby, for a quick rollback) before the runtime's
    reconciler retires them; 0 retires them at its next round. A version whose own
    lifecycle is still running stays until that lifecycle ends."""

    @property
    def deploy_modes(self) -> tuple[Mode, ...]:
        """The modes this stage deploys in."""
        return self.modes or (self.mode,)

    @field_validator("tests")
    @classmethod
    def _runnable(cls, tests: tuple[TestKind, ...]) -> tuple[TestKind, ...]:
        if TestKind.SHADOW in tests:
            raise ValueError(
                'shadow is not a test a stage runs but a rollout: set "rollout": {"strategy": "shadow"}'
            )
        return tests

    @model_validator(mode="after")
    def _rollout_needs_online(self) -> StageSpec:
        strategy = self.rollout.strategy if self.rollout else RolloutStrategy.BLUE_GREEN
        if strategy is not RolloutStrategy.BLUE_GREEN and Mode.ONLINE not in self.deploy_modes:
            raise ValueError(
                f"stage {self.name}: rollout {strategy.value} splits live online traffic, but the "
                f"stage deploys in {', '.join(m.value for m in self.deploy_modes)}; use mode online "
                "or strategy blue_green"
            )
        return self


class LifecycleSpec(Frozen):
    """An ordered list of stages; the order is the promotion path."""

    stages: tuple[StageSpec, ...]

    @field_validator("stages")
    @classmethod
    def _unique(cls, stages: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
        names = [s.name for s in stages]
        if not names:
            raise ValueError("a lifecycle needs at least one stage")
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages

    def stage(self, name: str) -> StageSpec:
        """Return the spec of stage ``name`` or raise KeyError naming the known stages."""
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(f"unknown stage {name!r}; this lifecycle has {[s.name for s in self.stages]}")


# --- tests and approvals --------------------------------------------------------------


class TestResult(Frozen):
    """One test against one deployment."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    test: TestKind
    deployment_id: str
    passed: bool
    summary: str
    metrics: dict[str, float] = Field(default_factory=dict)


class StageTestReport(Frozen):
    """All tests of one stage."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    stage: str
    results: tuple[TestResult, ...] = ()

    @property
    def passed(self) -> bool:
        """True when every test passed (a stage with no tests passes)."""
        return all(r.passed for r in self.results)

    def failures(self) -> str:
        """One line naming each failed test, for error messages."""
        return "; ".join(
            f"{r.test.value} on {r.deployment_id}: {r.summary}" for r in self.results if not r.passed
        )


class ApprovalRecord(Frozen):
    """A decision as recorded: who, when, what, and the evidence it was made on."""

    stage: str
    decision: Decision
    approver: str
    comment: str = ""
    decided_at: datetime
    evidence: StageTestReport | None = None
    key_id: str | None = None
    """The key that signed the decision (None for an expired gate)."""


# --- custom lifecycle code ------------------------------------------------------------


class LifecycleDefinition(Frozen):
    """One immutable, numbered version of uploaded lifecycle code."""

    name: str
    """The workflow type people start it by (Web UI, ``mlc lifecycle start --lifecycle``)."""
    version: int = Field(ge=1)
    sha256: str
    source: str
    uploaded_by: str
    uploaded_at: datetime | None = None
