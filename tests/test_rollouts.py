"""Rollout strategies: the canary's and shadow's judgements, the spec, and their dry run.

The end-to-end canary and shadow runs (real nginx gateway with live traffic) are in
tests/test_rollouts_live.py; the judgements they act on are tested here directly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from cli.lifecycle_uploads import upload_lifecycle
from lifecycles._rollout import _scaled, _shadow_verdict, canary_breach, rollout_in_progress
from mlc.contracts.traffic import RouteStats, ShadowComparison, TrafficObservation
from mlc.domain import (
    LifecycleSpec,
    Rollout,
    RolloutStrategy,
    StageSpec,
    TestKind,
    TrafficRoute,
    check_routes,
)
from tests.conftest import AUTHOR, FIXTURES, Stack, require_sandbox

NOW = datetime(2026, 11, 28, tzinfo=UTC)
NEW = TrafficRoute(deployment_id="cc-fraud-v2-prod-gw", version=2, weight=10)
OLD = TrafficRoute(deployment_id="cc-fraud-v1-prod-gw", version=1, weight=90)
PLAN = Rollout(strategy=RolloutStrategy.CANARY, steps=(10, 50), min_requests=20)


def seen(new: RouteStats, old: RouteStats, shadow: ShadowComparison | None = None) -> TrafficObservation:
    return TrafficObservation(
        endpoint="http://127.0.0.1:8480/models/cc-fraud",
        since=NOW,
        until=NOW + timedelta(seconds=30),
        routes=(new, old),
        shadow=shadow,
    )


def stats(route: TrafficRoute, requests: int, errors: int = 0, p99: float = 10.0) -> RouteStats:
    return RouteStats(
        deployment_id=route.deployment_id,
        version=route.version,
        requests=requests,
        errors=errors,
        p50_ms=p99 / 3,
        p99_ms=p99,
    )


def test_a_canary_failing_a_third_of_its_requests_is_rolled_back() -> None:
    why = canary_breach(PLAN, NEW, seen(stats(NEW, 60, errors=20), stats(OLD, 540, errors=1)))
    assert why is not None and "error rate 33.3% (20/60)" in why and "0.2% of the current version" in why


def test_a_healthy_canary_passes_and_a_slow_or_starved_one_does_not() -> None:
    assert canary_breach(PLAN, NEW, seen(stats(NEW, 60), stats(OLD, 540))) is None
    slow = canary_breach(PLAN, NEW, seen(stats(NEW, 60, p99=50.0), stats(OLD, 540, p99=10.0)))
    assert slow is not None and "p99 latency 50 ms against 10 ms" in slow
    starved = canary_breach(PLAN, NEW, seen(stats(NEW, 3), stats(OLD, 540)))
    assert starved is not None and "fewer than min_requests 20" in starved


def test_p99_under_a_millisecond_counts_and_millisecond_jitter_does_not() -> None:
    # the gateway times to the millisecond: a current version answering in under 1 ms has p99 0
    slow = canary_breach(PLAN, NEW, seen(stats(NEW, 60, p99=40.0), stats(OLD, 540, p99=0.0)))
    assert slow is not None and "p99 latency 40 ms against 0 ms" in slow, slow
    # 3 ms against 1 ms is three times as slow, but within the tolerance (10 ms by default)
    assert canary_breach(PLAN, NEW, seen(stats(NEW, 60, p99=3.0), stats(OLD, 540, p99=1.0))) is None
    strict = PLAN.model_copy(update={"p99_tolerance_ms": 1.0})
    assert canary_breach(strict, NEW, seen(stats(NEW, 60, p99=3.0), stats(OLD, 540, p99=1.0))) is not None


def test_canary_shares_keep_every_route_table_valid() -> None:
    for share in (1, 10, 33, 50, 99):
        current = _scaled(
            (OLD.model_copy(update={"weight": 60}), TrafficRoute(deployment_id="x", version=0, weight=40)),
            100 - share,
        )
        check_routes((NEW.model_copy(update={"weight": share}), *current))


def test_shadow_comparison_becomes_test_evidence() -> None:
    plan = Rollout(strategy=RolloutStrategy.SHADOW, min_pairs=50, min_agreement=0.95)
    shadow = TrafficRoute(deployment_id=NEW.deployment_id, version=2, weight=0, shadow=True)
    good = ShadowComparison(
        primary_id=OLD.deployment_id,
        shadow_id=NEW.deployment_id,
        pairs=120,
        agreement_rate=0.99,
        mean_abs_diff=0.004,
    )
    result = _shadow_verdict(plan, shadow, seen(stats(NEW, 120), stats(OLD, 120), good))
    assert result.test is TestKind.SHADOW and result.passed, result
    assert result.metrics["pairs"] == 120 and result.metrics["agreement_rate"] == 0.99
    bad = good.model_copy(update={"agreement_rate": 0.7, "pairs": 10})
    refused = _shadow_verdict(plan, shadow, seen(stats(NEW, 10), stats(OLD, 10), bad))
    assert not refused.passed and "10 pairs < min_pairs 50" in refused.summary
    assert "agreement 0.700 < 0.950" in refused.summary


def test_rollout_spec_from_plain_json_with_clear_errors() -> None:
    spec = LifecycleSpec.model_validate(
        {
            "stages": [
                {
                    "name": "UAT",
                    "tests": ["smoke", "champion_challenger"],
                    "max_auc_drop": 0.02,
                    "rollout": {"strategy": "shadow", "duration": "PT2M", "min_agreement": 0.9},
                },
                {
                    "name": "PROD",
                    "rollout": {
                        "strategy": "canary",
                        "steps": [10, 50],
                        "window": 60,
                        "max_error_rate_increase": 0.05,
                    },
                },
            ]
        }
    )
    prod = spec.stage("PROD").rollout
    assert prod is not None and prod.window == timedelta(seconds=60) and prod.steps == (10, 50)
    for bad, message in (
        ({"strategy": "canary", "steps": [50, 10]}, "canary steps must increase"),
        ({"strategy": "canary", "steps": [100]}, "percents of traffic from 1 to 99"),
        ({"strategy": "canary", "window": 0}, "must be positive"),
        ({"strategy": "linear"}, "'blue_green', 'canary' or 'shadow'"),
    ):
        with pytest.raises(ValidationError, match=message):
            StageSpec.model_validate({"name": "PROD", "rollout": bad})
    with pytest.raises(ValidationError, match="splits live online traffic"):
        StageSpec.model_validate({"name": "PROD", "mode": "batch", "rollout": {"strategy": "canary"}})
    with pytest.raises(ValidationError, match="not a test a stage runs but a rollout"):
        StageSpec.model_validate({"name": "PROD", "tests": ["shadow"]})


async def test_a_lifecycle_using_canary_and_shadow_passes_its_dry_run(stack: Stack) -> None:
    require_sandbox()
    path: Path = FIXTURES / "lifecycles" / "good" / "canary_then_shadow.py"
    stored, created = await upload_lifecycle(
        stack.pool, path, signer=stack.signers[AUTHOR], settings=stack.settings
    )
    assert created and stored.name == "CanaryThenShadow"


def test_a_second_rollout_waits_for_the_first() -> None:
    """A split or shadow of other versions means another run's rollout holds the endpoint."""
    mine = TrafficRoute(deployment_id="v3", version=3, weight=0)
    v1 = TrafficRoute(deployment_id="v1", version=1)
    assert rollout_in_progress(mine, (v1,)) is None
    assert rollout_in_progress(mine, ()) is None
    split = (v1.model_copy(update={"weight": 75}), TrafficRoute(deployment_id="v2", version=2, weight=25))
    assert "another canary is in progress" in (rollout_in_progress(mine, split) or "")
    shadowed = (v1, TrafficRoute(deployment_id="v2", version=2, weight=0, shadow=True))
    assert "another shadow is in progress" in (rollout_in_progress(mine, shadowed) or "")
    # its own earlier share (a retried step) is not another rollout
    own = (v1.model_copy(update={"weight": 75}), mine.model_copy(update={"weight": 25}))
    assert rollout_in_progress(mine, own) is None
